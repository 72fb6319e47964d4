//! Event lines for stdout: readable text or JSON lines.
//!
//! The JSON keys are a contract with log pipelines; `json_keys_are_stable`
//! pins them.

use std::{fmt::Write as _, io::Write as _, net::SocketAddr, time::SystemTime};

use serde::Serialize;

use crate::{
    clock,
    decode::{Event, UnixConnect},
    enrich::attribution::Process,
    enrich::context::Workload,
    flood::{Aggregate, FloodListener},
};

#[derive(Serialize)]
struct Endpoint {
    addr: String,
    port: u16,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Endpoint {
            addr: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

#[derive(Serialize)]
struct Queue {
    len: u32,
    max: u32,
}

#[derive(Serialize)]
struct SynQueue {
    len: u32,
}

#[derive(Serialize)]
struct ProcessJson<'a> {
    pid: u32,
    comm: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmdline: Option<&'a str>,
}

fn processes_json(processes: &[Process]) -> Vec<ProcessJson<'_>> {
    processes
        .iter()
        .map(|p| ProcessJson {
            pid: p.pid,
            comm: &p.comm,
            cmdline: p.cmdline.as_deref(),
        })
        .collect()
}

/// Where the listener lives, for events and summaries.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Placement {
    /// cgroup v2 path of the listener, e.g. /system.slice/nginx.service.
    pub cgroup: Option<String>,
    /// Container or service recognised in the cgroup path.
    pub container: Option<Workload>,
    /// Whether the listener's network namespace is the host's.
    pub host_netns: Option<bool>,
}

#[derive(Serialize)]
struct EventJson<'a> {
    kind: &'static str,
    time: String,
    listener: Endpoint,
    local: Option<Endpoint>,
    peer: Option<Endpoint>,
    accept_queue: Queue,
    syn_queue: SynQueue,
    netns: u32,
    socket_inode: u64,
    cgroup_id: u64,
    cpu: u32,
    processes: Vec<ProcessJson<'a>>,
    #[serde(flatten)]
    placement: &'a Placement,
    /// The dropped final ACK was answered with a RST (tcp_abort_on_overflow=1);
    /// otherwise the client believes it is connected.
    reset_sent: bool,
    /// Some kernel read failed: zero values may not be true.
    partial: bool,
}

pub fn json_line(
    event: &Event,
    time: SystemTime,
    processes: &[Process],
    placement: &Placement,
) -> String {
    let json = EventJson {
        kind: event.kind.as_str(),
        time: clock::rfc3339(time),
        listener: event.listener.into(),
        local: event.local.map(Endpoint::from),
        peer: event.peer.map(Endpoint::from),
        accept_queue: Queue {
            len: event.accept_queue_len,
            max: event.accept_queue_max,
        },
        syn_queue: SynQueue {
            len: event.syn_queue_len,
        },
        netns: event.netns_inode,
        socket_inode: event.socket_inode,
        cgroup_id: event.cgroup_id,
        cpu: event.cpu,
        processes: processes_json(processes),
        placement,
        reset_sent: event.reset_sent,
        partial: event.partial,
    };
    // Serialising plain structs of strings and integers cannot fail.
    serde_json::to_string(&json).unwrap_or_default()
}

/// What an event's JSON line says about its listener's holders and place,
/// `"processes":[..],"cgroup":..,"container":..,"host_netns":..`: rendered
/// once per listener and reused by [`write_json_event`] for every event.
pub fn json_listener_fragment(processes: &[Process], placement: &Placement) -> String {
    #[derive(Serialize)]
    struct Fragment<'a> {
        processes: Vec<ProcessJson<'a>>,
        #[serde(flatten)]
        placement: &'a Placement,
    }
    let object = serde_json::to_string(&Fragment {
        processes: processes_json(processes),
        placement,
    })
    .unwrap_or_default();
    // Without the braces: it is spliced into the event's object.
    object
        .strip_prefix('{')
        .and_then(|o| o.strip_suffix('}'))
        .unwrap_or("\"processes\":[]")
        .to_owned()
}

fn write_endpoint(out: &mut Vec<u8>, name: &str, addr: Option<SocketAddr>) {
    let _ = match addr {
        Some(a) => write!(
            out,
            ",\"{name}\":{{\"addr\":\"{}\",\"port\":{}}}",
            a.ip(),
            a.port()
        ),
        None => write!(out, ",\"{name}\":null"),
    };
}

/// Appends the JSON line of `event` (with its newline) to `out`: the keys
/// and values of [`json_line`], written without building a value tree or
/// allocating, for floods. `time` is RFC 3339; `listener` comes from
/// [`json_listener_fragment`]. Addresses, kinds and numbers need no
/// escaping; the fragment was escaped when it was rendered.
pub fn write_json_event(out: &mut Vec<u8>, event: &Event, time: &str, listener: &str) {
    let _ = write!(
        out,
        "{{\"kind\":\"{}\",\"time\":\"{time}\",\"listener\":{{\"addr\":\"{}\",\"port\":{}}}",
        event.kind.as_str(),
        event.listener.ip(),
        event.listener.port()
    );
    write_endpoint(out, "local", event.local);
    write_endpoint(out, "peer", event.peer);
    let _ = writeln!(
        out,
        ",\"accept_queue\":{{\"len\":{},\"max\":{}}},\"syn_queue\":{{\"len\":{}}},\
         \"netns\":{},\"socket_inode\":{},\"cgroup_id\":{},\"cpu\":{},{listener},\
         \"reset_sent\":{},\"partial\":{}}}",
        event.accept_queue_len,
        event.accept_queue_max,
        event.syn_queue_len,
        event.netns_inode,
        event.socket_inode,
        event.cgroup_id,
        event.cpu,
        event.reset_sent,
        event.partial
    );
}

/// `pid/comm` list, or `?` when no holder was found.
pub fn process_list(processes: &[Process]) -> String {
    if processes.is_empty() {
        return "?".into();
    }
    let mut out = String::new();
    for (i, p) in processes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}/{}", p.pid, p.comm);
    }
    out
}

#[derive(Serialize)]
struct Path<'a> {
    path: Option<&'a str>,
}

#[derive(Serialize)]
struct Client<'a> {
    pid: u32,
    comm: &'a str,
}

#[derive(Serialize)]
struct UnixJson<'a> {
    kind: &'static str,
    time: String,
    listener: Path<'a>,
    client: Client<'a>,
    processes: Vec<ProcessJson<'a>>,
    /// The listener's backlog as sock_diag showed it right after the
    /// failure; null when the listener was not found.
    accept_queue: Option<Queue>,
    /// The client's network namespace; null when it exited first.
    netns: Option<u32>,
    socket_inode: Option<u64>,
    cpu: u32,
}

/// What is known of the UNIX listener a connect() failed on.
pub struct UnixListenerView {
    pub netns: Option<u32>,
    pub inode: Option<u64>,
    pub queue: Option<(u32, u32)>,
}

pub fn unix_json_line(
    event: &UnixConnect,
    time: SystemTime,
    listener: &UnixListenerView,
    processes: &[Process],
) -> String {
    let json = UnixJson {
        kind: backlog_common::DropKind::UnixConnectBacklogFull.as_str(),
        time: clock::rfc3339(time),
        listener: Path {
            path: event.path.as_deref(),
        },
        client: Client {
            pid: event.pid,
            comm: &event.comm,
        },
        processes: processes_json(processes),
        accept_queue: listener.queue.map(|(len, max)| Queue { len, max }),
        netns: listener.netns,
        socket_inode: listener.inode,
        cpu: event.cpu,
    };
    serde_json::to_string(&json).unwrap_or_default()
}

pub fn unix_text_line(
    event: &UnixConnect,
    time: SystemTime,
    listener: &UnixListenerView,
    processes: &[Process],
) -> String {
    format!(
        "{} {} listener=unix:{} client={}/{} accept_queue={} processes={}",
        clock::rfc3339(time),
        backlog_common::DropKind::UnixConnectBacklogFull.as_str(),
        event.path.as_deref().unwrap_or("?"),
        event.pid,
        event.comm,
        listener
            .queue
            .map_or_else(|| "?".to_owned(), |(len, max)| format!("{len}/{max}")),
        process_list(processes),
    )
}

#[derive(Serialize)]
struct PeerCount {
    addr: String,
    count: u64,
}

#[derive(Serialize)]
#[serde(untagged)]
enum AggregateListener<'a> {
    Inet { addr: String, port: u16 },
    Unix { path: &'a str },
}

/// One aggregate record: the drops of one listener and kind that were over
/// the rate limit during one interval. Same `kind` as the events, told
/// apart by `aggregated: true` and `count`, so a log pipeline can sum
/// `count` (1 for an event) to get the kernel's total.
#[derive(Serialize)]
struct AggregateJson<'a> {
    kind: &'static str,
    aggregated: bool,
    count: u64,
    start: String,
    end: String,
    listener: AggregateListener<'a>,
    netns: u32,
    socket_inode: Option<u64>,
    processes: Vec<ProcessJson<'a>>,
    /// Sources of the aggregated drops, busiest first (approximate).
    top_peers: Vec<PeerCount>,
    /// The limit that engaged flood mode: full events per second.
    max_events_per_sec: u32,
}

pub fn aggregate_json_line(
    aggregate: &Aggregate,
    socket_inode: Option<u64>,
    processes: &[Process],
    max_events_per_sec: u32,
) -> String {
    let (listener, netns) = match &aggregate.listener {
        FloodListener::Inet { addr, netns, .. } => (
            AggregateListener::Inet {
                addr: addr.ip().to_string(),
                port: addr.port(),
            },
            *netns,
        ),
        FloodListener::Unix { path, netns } => (AggregateListener::Unix { path }, *netns),
    };
    let json = AggregateJson {
        kind: aggregate.kind.as_str(),
        aggregated: true,
        count: aggregate.count,
        start: clock::rfc3339(aggregate.start),
        end: clock::rfc3339(aggregate.end),
        listener,
        netns,
        socket_inode,
        processes: processes_json(processes),
        top_peers: aggregate
            .top_peers
            .iter()
            .map(|(addr, count)| PeerCount {
                addr: addr.to_string(),
                count: *count,
            })
            .collect(),
        max_events_per_sec,
    };
    serde_json::to_string(&json).unwrap_or_default()
}

pub fn aggregate_text_line(aggregate: &Aggregate, processes: &[Process]) -> String {
    let seconds = aggregate
        .end
        .duration_since(aggregate.start)
        .unwrap_or_default()
        .as_secs_f64();
    let mut line = format!(
        "{} {} aggregated count={} over {seconds:.1}s listener={} netns={}",
        clock::rfc3339(aggregate.end),
        aggregate.kind.as_str(),
        aggregate.count,
        aggregate.listener,
        match &aggregate.listener {
            FloodListener::Inet { netns, .. } | FloodListener::Unix { netns, .. } => *netns,
        },
    );
    if !aggregate.top_peers.is_empty() {
        line.push_str(" top_peers=");
        for (i, (addr, count)) in aggregate.top_peers.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            let _ = write!(line, "{addr}x{count}");
        }
    }
    let _ = write!(line, " processes={}", process_list(processes));
    line
}

pub fn text_line(event: &Event, time: SystemTime, processes: &[Process]) -> String {
    let mut line = format!(
        "{} {} listener={} peer={} accept_queue={}/{} syn_queue={} netns={} processes={}",
        clock::rfc3339(time),
        event.kind.as_str(),
        event.listener,
        event
            .peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into()),
        event.accept_queue_len,
        event.accept_queue_max,
        event.syn_queue_len,
        event.netns_inode,
        process_list(processes),
    );
    if event.reset_sent {
        line.push_str(" rst_sent");
    }
    if event.partial {
        line.push_str(" (partial: some kernel fields were unreadable)");
    }
    line
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use backlog_common::DropKind;
    use serde_json::Value;

    use super::*;

    fn event() -> Event {
        Event {
            kind: DropKind::AckDroppedAcceptQueueFull,
            timestamp_ns: 1,
            cpu: 1,
            listener: "[::]:8080".parse().unwrap(),
            local: Some("127.0.0.1:8080".parse().unwrap()),
            peer: Some("127.0.0.1:40000".parse().unwrap()),
            accept_queue_len: 9,
            accept_queue_max: 8,
            syn_queue_len: 2,
            netns_inode: 4026531840,
            socket_inode: 555,
            cgroup_id: 77,
            partial: false,
            reset_sent: false,
        }
    }

    fn procs() -> Vec<Process> {
        vec![
            Process {
                pid: 10,
                comm: "nginx".into(),
                cmdline: None,
            },
            Process {
                pid: 11,
                comm: "nginx".into(),
                cmdline: None,
            },
        ]
    }

    fn time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_316_400)
    }

    #[test]
    fn json_keys_are_stable() {
        let placement = Placement {
            cgroup: Some("/system.slice/nginx.service".into()),
            container: None,
            host_netns: Some(true),
        };
        let v: Value =
            serde_json::from_str(&json_line(&event(), time(), &procs(), &placement)).unwrap();
        assert_eq!(v["cgroup"], "/system.slice/nginx.service");
        assert_eq!(v["host_netns"], true);
        assert!(v["container"].is_null());
        assert!(v["processes"][0].get("cmdline").is_none());
        assert_eq!(v["kind"], "ack_dropped_accept_queue_full");
        assert_eq!(v["time"], "2026-11-22T03:00:00.000000Z");
        assert_eq!(v["listener"]["addr"], "::");
        assert_eq!(v["listener"]["port"], 8080);
        assert_eq!(v["peer"]["addr"], "127.0.0.1");
        assert_eq!(v["peer"]["port"], 40000);
        assert_eq!(v["local"]["port"], 8080);
        assert_eq!(v["accept_queue"]["len"], 9);
        assert_eq!(v["accept_queue"]["max"], 8);
        assert_eq!(v["syn_queue"]["len"], 2);
        assert_eq!(v["netns"], 4026531840u64);
        assert_eq!(v["socket_inode"], 555);
        assert_eq!(v["cgroup_id"], 77);
        assert_eq!(v["processes"][1]["pid"], 11);
        assert_eq!(v["processes"][1]["comm"], "nginx");
        assert_eq!(v["partial"], false);
        assert_eq!(v["reset_sent"], false);
    }

    #[test]
    fn the_fast_writer_writes_what_serde_writes() {
        let placement = Placement {
            cgroup: Some("/system.slice/a \"quoted\" unit.service".into()),
            container: None,
            host_netns: Some(false),
        };
        let mut cases = vec![event()];
        let mut e = event();
        e.peer = None;
        e.local = None;
        e.partial = true;
        e.reset_sent = true;
        e.listener = "10.1.2.3:443".parse().unwrap();
        cases.push(e);
        for (e, processes) in cases.iter().zip([procs(), Vec::new()]) {
            let fragment = json_listener_fragment(&processes, &placement);
            let mut fast = Vec::new();
            write_json_event(&mut fast, e, &clock::rfc3339(time()), &fragment);
            let fast = String::from_utf8(fast).unwrap();
            assert_eq!(
                fast,
                format!("{}\n", json_line(e, time(), &processes, &placement))
            );
        }
    }

    #[test]
    fn json_unknown_peer_is_null() {
        let mut e = event();
        e.peer = None;
        let v: Value =
            serde_json::from_str(&json_line(&e, time(), &[], &Placement::default())).unwrap();
        assert!(v["peer"].is_null());
        assert_eq!(v["processes"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn aggregate_records_for_log_pipelines() {
        let aggregate = Aggregate {
            kind: DropKind::SynDroppedSynQueueFull,
            listener: FloodListener::Inet {
                netns: 7,
                socket_inode: 555,
                addr: "198.18.0.1:80".parse().unwrap(),
            },
            count: 41_000,
            start: time(),
            end: time() + Duration::from_secs(1),
            top_peers: vec![("198.19.0.1".parse().unwrap(), 300)],
        };
        let v: Value =
            serde_json::from_str(&aggregate_json_line(&aggregate, Some(555), &procs(), 100))
                .unwrap();
        assert_eq!(v["kind"], "syn_dropped_syn_queue_full");
        assert_eq!(v["aggregated"], true);
        assert_eq!(v["count"], 41_000);
        assert_eq!(v["start"], "2026-11-22T03:00:00.000000Z");
        assert_eq!(v["end"], "2026-11-22T03:00:01.000000Z");
        assert_eq!(v["listener"]["addr"], "198.18.0.1");
        assert_eq!(v["listener"]["port"], 80);
        assert_eq!(v["netns"], 7);
        assert_eq!(v["socket_inode"], 555);
        assert_eq!(v["top_peers"][0]["addr"], "198.19.0.1");
        assert_eq!(v["top_peers"][0]["count"], 300);
        assert_eq!(v["processes"][0]["comm"], "nginx");
        assert_eq!(v["max_events_per_sec"], 100);
        assert_eq!(
            aggregate_text_line(&aggregate, &procs()),
            "2026-11-22T03:00:01.000000Z syn_dropped_syn_queue_full aggregated count=41000 \
             over 1.0s listener=198.18.0.1:80 netns=7 top_peers=198.19.0.1x300 \
             processes=10/nginx,11/nginx"
        );
    }

    #[test]
    fn text_line_reads_well() {
        assert_eq!(
            text_line(&event(), time(), &procs()),
            "2026-11-22T03:00:00.000000Z ack_dropped_accept_queue_full listener=[::]:8080 \
             peer=127.0.0.1:40000 accept_queue=9/8 syn_queue=2 netns=4026531840 \
             processes=10/nginx,11/nginx"
        );
        let mut e = event();
        e.peer = None;
        e.partial = true;
        let line = text_line(&e, time(), &[]);
        assert!(line.contains("peer=? "), "{line}");
        assert!(line.contains("processes=?"), "{line}");
        assert!(line.ends_with("(partial: some kernel fields were unreadable)"));
    }
}
