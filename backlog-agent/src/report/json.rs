//! The JSON-lines renderer: one object per line on stdout for events,
//! aggregates, near-full warnings, listener summaries and counted drops.
//!
//! The JSON keys are a contract with log pipelines; `json_keys_are_stable`
//! pins them.

use std::{collections::BTreeMap, io::Write as _, net::IpAddr, net::SocketAddr};

use backlog_common::DropKind;
use serde::Serialize;

use crate::{
    clock,
    enrich::{accept_wait::WaitMs, advice::Advice, attribution::Process},
    flood::FloodListener,
    model::{
        summary::{Folded, KernelSkip},
        AggregateRecord, CountedNetns, DropEvent, ListenerAddr, ListenerContext, ListenerReport,
        NearFullWarning, Placement, UnixDrop,
    },
};

/// How many of a listener's busiest peers its summary names.
const TOP_PEERS: usize = 5;

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

/// The JSON line of a drop, built with serde: the reference that
/// [`write_drop`], the fast path, must match.
pub fn drop_line(drop: &DropEvent) -> String {
    let event = drop.event;
    let json = EventJson {
        kind: event.kind.as_str(),
        time: clock::rfc3339(drop.time),
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
        processes: processes_json(&drop.listener.processes),
        placement: &drop.listener.placement,
        reset_sent: event.reset_sent,
        partial: event.partial,
    };
    // Serialising plain structs of strings and integers cannot fail.
    serde_json::to_string(&json).unwrap_or_default()
}

/// What an event's JSON line says about its listener's holders and place,
/// `"processes":[..],"cgroup":..,"container":..,"host_netns":..`: rendered
/// once per listener context and reused by [`write_drop`] for every event.
fn listener_fragment(listener: &ListenerContext) -> String {
    #[derive(Serialize)]
    struct Fragment<'a> {
        processes: Vec<ProcessJson<'a>>,
        #[serde(flatten)]
        placement: &'a Placement,
    }
    let object = serde_json::to_string(&Fragment {
        processes: processes_json(&listener.processes),
        placement: &listener.placement,
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

/// Appends the JSON line of `drop` (with its newline) to `out`: the keys
/// and values of [`drop_line`], written without building a value tree or
/// allocating, for floods. `time` is the event's time in RFC 3339.
/// Addresses, kinds and numbers need no escaping; the listener's fragment
/// was escaped when it was rendered.
pub fn write_drop(out: &mut Vec<u8>, drop: &DropEvent, time: &str) {
    let event = drop.event;
    let listener = drop.listener.rendered(listener_fragment);
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

pub fn unix_line(drop: &UnixDrop) -> String {
    let event = drop.event;
    let json = UnixJson {
        kind: DropKind::UnixConnectBacklogFull.as_str(),
        time: clock::rfc3339(drop.time),
        listener: Path {
            path: event.path.as_deref(),
        },
        client: Client {
            pid: event.pid,
            comm: &event.comm,
        },
        processes: processes_json(drop.processes),
        accept_queue: drop.listener.queue.map(|(len, max)| Queue { len, max }),
        netns: drop.listener.netns,
        socket_inode: drop.listener.inode,
        cpu: event.cpu,
    };
    serde_json::to_string(&json).unwrap_or_default()
}

#[derive(Serialize)]
struct PeerCount {
    addr: String,
    count: u64,
}

/// A listener in aggregates and summaries: `{addr, port}` or `{path}`.
#[derive(Serialize)]
#[serde(untagged)]
enum ListenerJson<'a> {
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
    listener: ListenerJson<'a>,
    netns: u32,
    socket_inode: Option<u64>,
    processes: Vec<ProcessJson<'a>>,
    /// Sources of the aggregated drops, busiest first (approximate).
    top_peers: Vec<PeerCount>,
    /// The limit that engaged flood mode: full events per second.
    max_events_per_sec: u32,
}

pub fn aggregate_line(record: &AggregateRecord, max_events_per_sec: u32) -> String {
    let aggregate = record.aggregate;
    let (listener, netns) = match &aggregate.listener {
        FloodListener::Inet { addr, netns, .. } => (
            ListenerJson::Inet {
                addr: addr.ip().to_string(),
                port: addr.port(),
            },
            *netns,
        ),
        FloodListener::Unix { path, netns } => (ListenerJson::Unix { path }, *netns),
    };
    let json = AggregateJson {
        kind: aggregate.kind.as_str(),
        aggregated: true,
        count: aggregate.count,
        start: clock::rfc3339(aggregate.start),
        end: clock::rfc3339(aggregate.end),
        listener,
        netns,
        socket_inode: record.socket_inode,
        processes: processes_json(record.processes),
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

/// The warning as a JSON line: `kind`, `time`, `listener` {`addr`,
/// `port`}, `accept_queue` {`len`, `max`}, `threshold_percent`, `netns`,
/// `socket_inode`, `processes`, `warnings` (crossings since the last line).
pub fn near_full_line(warning: &NearFullWarning, percent: u32) -> String {
    let crossing = warning.crossing;
    let listener = crossing
        .listener
        .socket_addr()
        .map(|addr| serde_json::json!({ "addr": addr.ip().to_string(), "port": addr.port() }));
    let processes: Vec<_> = warning
        .processes
        .iter()
        .map(|p| serde_json::json!({ "pid": p.pid, "comm": p.comm }))
        .collect();
    serde_json::json!({
        "kind": "accept_queue_near_full",
        "time": clock::rfc3339(warning.time),
        "listener": listener,
        "accept_queue": { "len": crossing.queue_len, "max": crossing.queue_max },
        "threshold_percent": percent,
        "netns": warning.netns,
        "socket_inode": warning.socket_inode,
        "processes": processes,
        "warnings": crossing.new_warnings,
    })
    .to_string()
}

#[derive(Serialize)]
struct CountedKinds {
    syn_dropped_syn_queue_full: u64,
    syn_cookie_sent: u64,
    syn_dropped_accept_queue_full: u64,
}

#[derive(Serialize)]
struct CountedListenerJson {
    addr: IpAddr,
    port: u16,
    socket_inode: u64,
    /// Upper bound of the listener's drops: the kernel also counts
    /// segments it discards there.
    sk_drops: u64,
}

#[derive(Serialize)]
struct CountedJson<'a> {
    kind: &'static str,
    time: &'a str,
    /// Always false: counted by the kernel, not seen as events.
    traced: bool,
    netns: u64,
    host_netns: Option<bool>,
    /// The TcpExt counters' growth during the run.
    counters: &'a BTreeMap<String, u64>,
    /// Drops per kind derived from those counters.
    counts: CountedKinds,
    listeners: Vec<CountedListenerJson>,
}

#[derive(Serialize)]
struct AccountingJson {
    total: u64,
    events: u64,
    aggregated: u64,
    lost: u64,
}

#[derive(Serialize)]
struct PeerJson {
    addr: IpAddr,
    count: u64,
}

#[derive(Serialize)]
/// A holder in a summary: no cmdline there, even with --show-cmdline.
struct HolderJson<'a> {
    pid: u32,
    comm: &'a str,
}

#[derive(Serialize)]
struct SummaryJson<'a> {
    kind: &'static str,
    time: &'a str,
    listener: ListenerJson<'a>,
    netns: u32,
    socket_inode: u64,
    processes: Vec<HolderJson<'a>>,
    /// Drops by kind: the kernel's exact totals where it keeps them.
    counts: BTreeMap<&'static str, u64>,
    /// Per kind, where the drops went: `events` (own lines), `aggregated`
    /// (inside aggregate records), `lost` (ring buffer full); their sum is
    /// `total`, the kernel's count.
    accounting: BTreeMap<&'static str, AccountingJson>,
    backlog_requested: Option<i32>,
    backlog_limit: u32,
    somaxconn: Option<u32>,
    tcp_max_syn_backlog: Option<u32>,
    syncookies: Option<u32>,
    abort_on_overflow: Option<u32>,
    max_accept_queue_seen: u32,
    top_peers: Vec<PeerJson>,
    #[serde(flatten)]
    placement: &'a Placement,
    diagnosis: &'a str,
    /// Null when no accepted connection's arrival was seen.
    accept_wait_ms: Option<WaitMs>,
    accept_rate_per_s: Option<f64>,
    arrival_rate_per_s: Option<f64>,
    backlog_advice: Option<&'a Advice>,
    near_full_warnings: u64,
}

/// The listeners folded out of the summary (summary.rs's `Folded`), per
/// kind: what they showed, and where it went.
#[derive(Serialize)]
struct FoldedJson<'a> {
    kind: &'static str,
    time: &'a str,
    listeners: u64,
    counts: BTreeMap<&'static str, u64>,
    events: BTreeMap<&'static str, u64>,
    aggregated: BTreeMap<&'static str, u64>,
    lost: BTreeMap<&'static str, u64>,
}

/// The `listeners_folded` line; None while nothing was folded.
pub fn folded_line(time: &str, folded: &Folded) -> Option<String> {
    if folded.listeners == 0 {
        return None;
    }
    let by_kind = |map: &BTreeMap<DropKind, u64>| {
        map.iter()
            .map(|(kind, n)| (kind.as_str(), *n))
            .collect::<BTreeMap<_, _>>()
    };
    let json = FoldedJson {
        kind: "listeners_folded",
        time,
        listeners: folded.listeners,
        counts: by_kind(&folded.drops),
        events: by_kind(&folded.events),
        aggregated: by_kind(&folded.aggregated),
        lost: by_kind(&folded.lost),
    };
    serde_json::to_string(&json).ok()
}

#[derive(Serialize)]
struct KernelSkipJson<'a> {
    program: &'a str,
    observes: &'a [&'static str],
    runs: u64,
}

/// Runs of the agent's programs the kernel skipped since start: what
/// they would have seen is in no count (text.rs kernel_skips_line).
#[derive(Serialize)]
struct KernelSkipsJson<'a> {
    kind: &'static str,
    time: &'a str,
    runs: u64,
    programs: Vec<KernelSkipJson<'a>>,
}

/// The `kernel_skips` line; None while the kernel skipped nothing.
pub fn kernel_skips_line(time: &str, skips: &[KernelSkip]) -> Option<String> {
    if skips.is_empty() {
        return None;
    }
    let json = KernelSkipsJson {
        kind: "kernel_skips",
        time,
        runs: skips.iter().map(|s| s.runs).sum(),
        programs: skips
            .iter()
            .map(|s| KernelSkipJson {
                program: &s.program,
                observes: &s.observes,
                runs: s.runs,
            })
            .collect(),
    };
    serde_json::to_string(&json).ok()
}

/// The `listener_summary` line of one listener.
pub fn listener_summary_line(time: &str, report: &ListenerReport) -> String {
    let (key, stats, sysctls) = (&report.key, &report.stats, &report.sysctls);
    let json = SummaryJson {
        kind: "listener_summary",
        time,
        listener: match &key.listener {
            ListenerAddr::Inet(addr) => ListenerJson::Inet {
                addr: addr.ip().to_string(),
                port: addr.port(),
            },
            ListenerAddr::Unix(path) => ListenerJson::Unix { path },
        },
        netns: key.netns,
        socket_inode: key.socket_inode,
        processes: stats
            .processes
            .iter()
            .map(|p| HolderJson {
                pid: p.pid,
                comm: &p.comm,
            })
            .collect(),
        counts: stats
            .kind_counts()
            .into_iter()
            .map(|(kind, count)| (kind.as_str(), count))
            .collect(),
        accounting: stats
            .accounting
            .iter()
            .map(|(kind, c)| {
                (
                    kind.as_str(),
                    AccountingJson {
                        total: c.total,
                        events: c.sent,
                        aggregated: c.suppressed,
                        lost: c.lost,
                    },
                )
            })
            .collect(),
        backlog_requested: report.backlog_requested,
        backlog_limit: stats.accept_queue_limit,
        somaxconn: sysctls.somaxconn,
        tcp_max_syn_backlog: sysctls.tcp_max_syn_backlog,
        syncookies: sysctls.tcp_syncookies,
        abort_on_overflow: sysctls.tcp_abort_on_overflow,
        max_accept_queue_seen: stats.max_accept_queue_seen,
        top_peers: stats
            .top_peers(TOP_PEERS)
            .into_iter()
            .map(|(addr, count)| PeerJson { addr, count })
            .collect(),
        placement: &report.placement,
        diagnosis: report.diagnosis.as_deref().unwrap_or_default(),
        accept_wait_ms: stats.accept.as_ref().and_then(|a| a.wait_ms),
        accept_rate_per_s: stats.accept.as_ref().map(|a| a.accept_rate_per_s),
        arrival_rate_per_s: stats.accept.as_ref().and_then(|a| a.arrival_rate_per_s),
        backlog_advice: stats.advice.as_deref(),
        near_full_warnings: stats.accept.as_ref().map_or(0, |a| a.near_full_warnings),
    };
    serde_json::to_string(&json).unwrap_or_default()
}

/// The `netns_counters` line of one namespace.
pub fn counted_line(time: &str, counted: &CountedNetns) -> String {
    let delta = counted.delta;
    let json = CountedJson {
        kind: "netns_counters",
        time,
        traced: false,
        netns: delta.netns,
        host_netns: counted.host_netns,
        counters: &delta.counters,
        counts: CountedKinds {
            syn_dropped_syn_queue_full: counted.syn_dropped_syn_queue_full,
            syn_cookie_sent: counted.syn_cookie_sent,
            syn_dropped_accept_queue_full: counted.syn_dropped_accept_queue_full,
        },
        listeners: delta
            .listeners
            .iter()
            .map(|l| CountedListenerJson {
                addr: l.addr,
                port: l.port,
                socket_inode: l.inode,
                sk_drops: l.drops,
            })
            .collect(),
    };
    serde_json::to_string(&json).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::Value;

    use super::*;
    use crate::{
        flood::Aggregate,
        report::fixtures::{event, procs, time},
    };

    #[test]
    fn kernel_skips_line_for_log_pipelines() {
        assert_eq!(kernel_skips_line("t", &[]), None);
        let skips = [KernelSkip {
            program: "kprobe_syn_recv_sock_v6".into(),
            observes: vec!["ack_dropped_accept_queue_full"],
            runs: 5,
        }];
        let line: Value = serde_json::from_str(&kernel_skips_line("t", &skips).unwrap()).unwrap();
        assert_eq!(
            line,
            serde_json::json!({
                "kind": "kernel_skips",
                "time": "t",
                "runs": 5,
                "programs": [{
                    "program": "kprobe_syn_recv_sock_v6",
                    "observes": ["ack_dropped_accept_queue_full"],
                    "runs": 5
                }]
            })
        );
    }

    fn drop_line_of(
        event: &crate::decode::Event,
        processes: &[Process],
        placement: &Placement,
    ) -> String {
        let context = ListenerContext::new(processes.to_vec(), placement.clone());
        drop_line(&DropEvent {
            event,
            time: time(),
            listener: &context,
        })
    }

    #[test]
    fn json_keys_are_stable() {
        let placement = Placement {
            cgroup: Some("/system.slice/nginx.service".into()),
            container: None,
            host_netns: Some(true),
        };
        let v: Value = serde_json::from_str(&drop_line_of(&event(), &procs(), &placement)).unwrap();
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
            let context = ListenerContext::new(processes.clone(), placement.clone());
            let drop = DropEvent {
                event: e,
                time: time(),
                listener: &context,
            };
            let mut fast = Vec::new();
            write_drop(&mut fast, &drop, &clock::rfc3339(time()));
            let fast = String::from_utf8(fast).unwrap();
            assert_eq!(fast, format!("{}\n", drop_line(&drop)));
        }
    }

    #[test]
    fn json_unknown_peer_is_null() {
        let mut e = event();
        e.peer = None;
        let v: Value = serde_json::from_str(&drop_line_of(&e, &[], &Placement::default())).unwrap();
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
        let processes = procs();
        let record = AggregateRecord {
            aggregate: &aggregate,
            socket_inode: Some(555),
            processes: &processes,
        };
        let v: Value = serde_json::from_str(&aggregate_line(&record, 100)).unwrap();
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
            crate::report::text::aggregate_line(&record),
            "2026-11-22T03:00:01.000000Z syn_dropped_syn_queue_full aggregated count=41000 \
             over 1.0s listener=198.18.0.1:80 netns=7 top_peers=198.19.0.1x300 \
             processes=10/nginx,11/nginx"
        );
    }
}
