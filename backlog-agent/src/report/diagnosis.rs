//! The one line an SRE can act on: from what a listener dropped and the
//! limits it ran under, name the cause and the knob, with its value.
//!
//! The order is most specific first: a backlog silently cut by
//! net.core.somaxconn explains every queue-limit drop at once, so it wins;
//! then real losses (accept queue, SYN queue, SYN backlog pressure, UNIX
//! EAGAIN, other SYN drops) before the warning-only SYN cookies. Facts we do not have are
//! said to be unknown, never guessed: a wrong sysctl value in an incident
//! channel costs more than a missing one.

use backlog_common::DropKind;
use serde::Serialize;

use crate::model::ListenerReport;

/// Everything known about one listener at report time.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ListenerFacts {
    /// Drops per kind, by [`DropKind::as_str`] name; a name may repeat.
    pub kind_counts: Vec<(String, u64)>,
    /// What the process passed to listen(), if seen. The kernel takes it
    /// as an int, so a u32 above `i32::MAX` is a negative request (-1 is
    /// the common "as many as allowed").
    pub backlog_requested: Option<u32>,
    /// `sk_max_ack_backlog`: min(requested, somaxconn at listen() time).
    /// It is both the accept-queue and (since 4.4) the SYN-queue limit.
    pub backlog_limit: u32,
    pub somaxconn: Option<u32>,
    pub tcp_max_syn_backlog: Option<u32>,
    pub syncookies: Option<u32>,
    pub abort_on_overflow: Option<u32>,
    /// Network namespace inode; 0 when unknown.
    pub netns: u64,
    /// `comm` of the owning process, e.g. "php-fpm".
    pub process_name: Option<String>,
    /// Largest `sk_ack_backlog` seen at a drop; 0 when never measured.
    pub max_accept_queue_seen: u32,
    /// Whether the listener's netns is the host's (None: unknown). A
    /// namespace of its own does not see `sysctl -w` run on the host.
    pub host_netns: Option<bool>,
    /// A process holding the listener, for `nsenter --net=/proc/PID/ns/net`.
    pub holder_pid: Option<u32>,
    /// What runs the listener's cgroup: "docker", "podman", "kubernetes"
    /// (a container in a pod), "containerd", "cri-o", "systemd".
    pub runtime: Option<String>,
}

/// Per-kind totals, summed over repeated names.
#[derive(Default)]
struct Counts {
    syn_queue_full: u64,
    cookies: u64,
    accept_queue_syn: u64,
    accept_queue_ack: u64,
    syn_backlog_pressure: u64,
    unix: u64,
    syn_other: u64,
    /// Names this version does not know (a newer eBPF side).
    unknown: Vec<(String, u64)>,
}

impl Counts {
    fn of(facts: &ListenerFacts) -> Counts {
        let mut counts = Counts::default();
        for (name, count) in &facts.kind_counts {
            let kind = DropKind::ALL.into_iter().find(|k| k.as_str() == name);
            let slot = match kind {
                Some(DropKind::SynDroppedSynQueueFull) => &mut counts.syn_queue_full,
                Some(DropKind::SynCookieSent) => &mut counts.cookies,
                Some(DropKind::SynDroppedAcceptQueueFull) => &mut counts.accept_queue_syn,
                Some(DropKind::AckDroppedAcceptQueueFull) => &mut counts.accept_queue_ack,
                Some(DropKind::SynDroppedSynBacklogPressure) => &mut counts.syn_backlog_pressure,
                Some(DropKind::UnixConnectBacklogFull) => &mut counts.unix,
                Some(DropKind::SynDroppedOther) => &mut counts.syn_other,
                None => {
                    if *count > 0 {
                        counts.unknown.push((name.clone(), *count));
                    }
                    continue;
                }
            };
            *slot = slot.saturating_add(*count);
        }
        counts
    }

    fn accept_queue(&self) -> u64 {
        self.accept_queue_syn.saturating_add(self.accept_queue_ack)
    }
}

/// One line (no newline) naming the cause and what to change.
pub fn diagnose(f: &ListenerFacts) -> String {
    let counts = Counts::of(f);
    let who = process(f);

    if let Some(line) = backlog_cut(f, &counts, &who) {
        return line;
    }
    if counts.accept_queue() > 0 {
        return accept_queue_full(f, &counts, &who);
    }
    if counts.syn_queue_full > 0 {
        return syn_queue_full(f, &counts);
    }
    if counts.syn_backlog_pressure > 0 {
        return syn_backlog_pressure(f, &counts);
    }
    if counts.unix > 0 {
        return format!(
            "UNIX listener backlog full ({}): {} got EAGAIN; raise {}{}",
            fill(f),
            plural(counts.unix, "non-blocking connect()"),
            backlog_knob(&who),
            somaxconn_cap(f),
        );
    }
    if counts.syn_other > 0 {
        // tcp_conn_request's other exits: allocation failure, no route for
        // the SYN-ACK, an LSM veto. Still a ListenDrops, so say so before
        // someone tunes queues that were never full.
        return format!(
            "{} dropped with neither queue full (no memory, no route back, or a security \
             module){}: the backlog is not the cause; check dmesg and nstat's \
             TcpExtListenDrops against TcpExtListenOverflows",
            plural(counts.syn_other, "SYN"),
            in_netns(f.netns),
        );
    }
    if counts.cookies > 0 {
        return format!(
            "SYN queue overflowed, {} answered with SYN cookies: no connection lost yet, \
             but the listener is under SYN pressure (a flood, or a backlog of {} too small)",
            plural(counts.cookies, "SYN"),
            f.backlog_limit,
        );
    }
    if let Some((name, count)) = counts.unknown.first() {
        return format!(
            "{} of kind {name}: no diagnosis for this kind yet",
            plural(*count, "drop")
        );
    }
    "no drops recorded".to_owned()
}

/// What the diagnosis reads of a listener's report.
pub fn facts(report: &ListenerReport) -> ListenerFacts {
    let (key, stats, sysctls) = (&report.key, &report.stats, &report.sysctls);
    ListenerFacts {
        kind_counts: stats
            .kind_counts()
            .into_iter()
            .map(|(kind, count)| (kind.as_str().to_owned(), count))
            .collect(),
        // listen() takes an int: -1 reads as u32::MAX, which the
        // diagnosis knows.
        backlog_requested: report.backlog_requested.map(|r| r as u32),
        backlog_limit: stats.accept_queue_limit,
        somaxconn: sysctls.somaxconn,
        tcp_max_syn_backlog: sysctls.tcp_max_syn_backlog,
        syncookies: sysctls.tcp_syncookies,
        abort_on_overflow: sysctls.tcp_abort_on_overflow,
        netns: u64::from(key.netns),
        process_name: stats.processes.first().map(|p| p.comm.clone()),
        max_accept_queue_seen: stats.max_accept_queue_seen,
        host_netns: report.placement.host_netns,
        holder_pid: stats.processes.first().map(|p| p.pid),
        // For the somaxconn fix of a listener outside the host's netns.
        runtime: report.placement.container.as_ref().map(|container| {
            if container.pod.is_some() {
                "kubernetes".to_owned()
            } else {
                container.runtime.to_owned()
            }
        }),
    }
}

/// A listener's line in the summary: the diagnosis of its drops, then,
/// when its accept queue made connections wait or got close to full, what
/// was measured there and the backlog advice.
pub fn of(report: &ListenerReport) -> String {
    let facts = facts(report);
    let drops = diagnose(&facts);
    match (&report.stats.accept, &report.stats.advice) {
        (Some(figures), advice) if figures.worth_reporting() || advice.is_some() => {
            let note = accept_queue_note(&facts, figures, advice.as_deref());
            if facts.kind_counts.iter().any(|(_, count)| *count > 0) {
                format!("{drops}; {note}")
            } else {
                note
            }
        }
        _ => drops,
    }
}

/// Before the drop: how long connections waited in the accept queue, how
/// close it came to full, and what backlog fits (one line, no newline).
pub fn accept_queue_note(
    f: &ListenerFacts,
    figures: &crate::enrich::accept_wait::AcceptFigures,
    advice: Option<&crate::enrich::advice::Advice>,
) -> String {
    use crate::enrich::advice::Action;
    let mut parts = Vec::new();
    if let Some(w) = figures.wait_ms {
        parts.push(format!(
            "connections waited in the accept queue p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, \
             max {:.1} ms",
            w.p50, w.p90, w.p99, w.max
        ));
    }
    if figures.near_full_warnings > 0 {
        parts.push(format!(
            "the accept queue reached {}/{} ({})",
            figures.max_queue_seen,
            f.backlog_limit,
            plural(figures.near_full_warnings, "near-full warning"),
        ));
    }
    if let Some(advice) = advice {
        let mut line = advice.reason.clone();
        if advice.action == Action::Raise {
            let who = process(f);
            line = format!("{line} ({})", backlog_knob(&who));
            match f.somaxconn {
                Some(max) if max >= advice.min => {}
                _ => line.push_str(&format!(
                    ", and net.core.somaxconn{} to at least {} ({})",
                    f.somaxconn
                        .map_or_else(String::new, |v| format!(" (now {v})")),
                    advice.min,
                    somaxconn_command(f, suggested_somaxconn(advice.min)),
                )),
            }
        }
        parts.push(line);
    }
    parts.join("; ")
}

/// listen(n) with n > somaxconn silently becomes somaxconn: the app's
/// configured backlog never took effect, whatever else is going on.
fn backlog_cut(f: &ListenerFacts, counts: &Counts, who: &Process) -> Option<String> {
    let requested = f.backlog_requested?;
    if requested <= f.backlog_limit {
        return None;
    }
    // Kinds bounded by sk_max_ack_backlog; SYN backlog pressure is bounded
    // by tcp_max_syn_backlog instead, which the cut does not explain.
    let symptom = if counts.accept_queue() > 0 {
        format!(
            "{} dropped with the accept queue full",
            plural(counts.accept_queue(), "connection")
        )
    } else if counts.syn_queue_full > 0 {
        format!(
            "{} dropped with the SYN queue full",
            plural(counts.syn_queue_full, "SYN")
        )
    } else if counts.unix > 0 {
        format!("{} got EAGAIN", plural(counts.unix, "connect()"))
    } else if counts.cookies > 0 {
        format!(
            "{} answered with SYN cookies",
            plural(counts.cookies, "SYN")
        )
    } else {
        return None;
    };
    let limit = f.backlog_limit;
    let netns = in_netns(f.netns);
    let restart = format!("then restart {} so it calls listen() again", who.name);
    // i32 as the kernel reads it: listen(-1) means "the most allowed".
    if requested > i32::MAX as u32 {
        return Some(format!(
            "listen(-1) asks for the most net.core.somaxconn allows, which was {limit}{netns} \
             ({symptom}); raise net.core.somaxconn (e.g. {}), {restart}",
            somaxconn_command(f, suggested_somaxconn(limit.saturating_add(1))),
        ));
    }
    let raise = format!(
        "raise net.core.somaxconn to at least {requested} ({})",
        somaxconn_command(f, suggested_somaxconn(requested))
    );
    Some(match f.somaxconn {
        Some(now) if now == limit => format!(
            "listen({requested}) was cut to {limit} by net.core.somaxconn={now}{netns} \
             ({symptom}); {raise}, {restart}"
        ),
        // Raised since the listener started: only a new listen() helps.
        Some(now) if now >= requested => format!(
            "listen({requested}) was cut to {limit} by an older net.core.somaxconn \
             (now {now}{netns}) ({symptom}); {restart}"
        ),
        Some(now) => format!(
            "listen({requested}) was cut to {limit} by net.core.somaxconn at listen() time \
             (now {now}{netns}, still below {requested}) ({symptom}); {raise}, {restart}"
        ),
        None => format!(
            "listen({requested}) was cut to {limit} by net.core.somaxconn (current value \
             unknown{netns}) ({symptom}); {raise}, {restart}"
        ),
    })
}

fn accept_queue_full(f: &ListenerFacts, counts: &Counts, who: &Process) -> String {
    let mut line = format!(
        "accept queue full ({}): {} dropped because {} is not calling accept() fast enough; \
         add workers or raise {}{}",
        fill(f),
        plural(counts.accept_queue(), "connection"),
        who.name,
        backlog_knob(who),
        somaxconn_cap(f),
    );
    match f.abort_on_overflow {
        // SYNs dropped silently are retransmitted by the client anyway;
        // with abort_on_overflow=0 completed handshakes are too, so in
        // both cases clients wait rather than fail fast.
        Some(0) => line.push_str(
            "; clients were left hanging with no RST (net.ipv4.tcp_abort_on_overflow=0) \
             and retried with backoff",
        ),
        Some(value) if counts.accept_queue_ack > 0 => line.push_str(&format!(
            "; clients that completed the handshake got a RST \
             (net.ipv4.tcp_abort_on_overflow={value})"
        )),
        _ => {}
    }
    if counts.syn_queue_full > 0 {
        line.push_str(&format!(
            "; the SYN queue overflowed too ({} dropped)",
            plural(counts.syn_queue_full, "SYN")
        ));
    }
    if counts.cookies > 0 {
        line.push_str(&format!(
            "; {} answered with SYN cookies",
            plural(counts.cookies, "SYN")
        ));
    }
    line
}

fn syn_queue_full(f: &ListenerFacts, counts: &Counts) -> String {
    // The drops prove cookies were off when they happened; the value read
    // now may have been changed since.
    let (cookies, advice) = match f.syncookies {
        Some(0) => (
            format!("net.ipv4.tcp_syncookies=0{}", in_netns(f.netns)),
            "enable net.ipv4.tcp_syncookies=1 or raise the listen backlog",
        ),
        Some(now) => (
            format!("net.ipv4.tcp_syncookies is now {now}{}", in_netns(f.netns)),
            "keep cookies on or raise the listen backlog",
        ),
        None => (
            format!("net.ipv4.tcp_syncookies unknown{}", in_netns(f.netns)),
            "enable net.ipv4.tcp_syncookies=1 or raise the listen backlog",
        ),
    };
    format!(
        "SYN queue full (limit {}) and SYN cookies off ({cookies}): {} dropped, likely a SYN \
         flood or slow handshakes; {advice}{}",
        f.backlog_limit,
        plural(counts.syn_queue_full, "SYN"),
        somaxconn_cap_in(f, ""),
    )
}

/// tcp_conn_request drops a SYN from a peer it has no history with when
/// the SYN queue is past 3/4 of tcp_max_syn_backlog and cookies are off.
fn syn_backlog_pressure(f: &ListenerFacts, counts: &Counts) -> String {
    let (current, raise) = match f.tcp_max_syn_backlog {
        Some(max) => (
            format!("net.ipv4.tcp_max_syn_backlog={max}"),
            format!(
                "raise net.ipv4.tcp_max_syn_backlog (e.g. sysctl -w net.ipv4.tcp_max_syn_backlog={})",
                max.saturating_mul(2)
            ),
        ),
        None => (
            "net.ipv4.tcp_max_syn_backlog (value unknown)".to_owned(),
            "raise net.ipv4.tcp_max_syn_backlog".to_owned(),
        ),
    };
    format!(
        "SYN queue past 3/4 of {current}{} with SYN cookies off: {} dropped; {raise} or \
         enable net.ipv4.tcp_syncookies=1",
        in_netns(f.netns),
        plural(counts.syn_backlog_pressure, "SYN"),
    )
}

/// The owning process as the line names it; control characters (a comm
/// may hold any byte but NUL) would break the one-line promise.
struct Process {
    name: String,
    comm: Option<String>,
}

fn process(f: &ListenerFacts) -> Process {
    let comm = f
        .process_name
        .as_deref()
        .map(|name| {
            name.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect::<String>()
        })
        .filter(|name| !name.trim().is_empty());
    Process {
        name: comm
            .clone()
            .unwrap_or_else(|| "the listening process".to_owned()),
        comm,
    }
}

/// Where the listen backlog is configured, for the daemons that are
/// usually behind a full queue.
fn backlog_knob(who: &Process) -> String {
    let knob = match who.comm.as_deref() {
        Some(comm) if comm.starts_with("php-fpm") => "listen.backlog in the php-fpm pool",
        Some("nginx") => "backlog= on nginx's listen directive",
        Some("haproxy") => "the backlog of haproxy's bind line",
        Some(comm) if comm.starts_with("gunicorn") => "gunicorn's --backlog",
        Some(comm) if comm.starts_with("uwsgi") => "uwsgi's --listen",
        Some(comm) if comm.starts_with("redis") => "redis's tcp-backlog",
        _ => return "its listen backlog".to_owned(),
    };
    knob.to_owned()
}

/// How to set net.core.somaxconn where the listener lives. It is a
/// per-namespace sysctl, and a new namespace starts from the kernel
/// default (4096 since 5.4), not from the host's value: `sysctl -w` on
/// the host does not reach a container's namespace.
fn somaxconn_command(f: &ListenerFacts, value: u32) -> String {
    if f.host_netns != Some(false) {
        return format!("sysctl -w net.core.somaxconn={value}");
    }
    let pid = f
        .holder_pid
        .map_or_else(|| "PID".to_owned(), |pid| pid.to_string());
    let kubernetes = format!(
        "a Kubernetes pod's securityContext.sysctls (net.core.somaxconn=\"{value}\"; a \
         namespaced sysctl the kubelet must allow with --allowed-unsafe-sysctls)"
    );
    let runtime = match f.runtime.as_deref() {
        Some("kubernetes") => kubernetes,
        Some(tool @ ("docker" | "podman")) => {
            format!("{tool} run --sysctl net.core.somaxconn={value}")
        }
        _ => format!("docker run --sysctl net.core.somaxconn={value} or {kubernetes}"),
    };
    let netns = match f.netns {
        0 => "the listener's netns".to_owned(),
        inode => format!("netns {inode}"),
    };
    format!(
        "{netns} is not the host's, so sysctl -w on the host does not reach it: set it with \
         {runtime}; to test now, nsenter --net=/proc/{pid}/ns/net sysctl -w \
         net.core.somaxconn={value}"
    )
}

/// What a bigger listen backlog would be capped at.
fn somaxconn_cap(f: &ListenerFacts) -> String {
    somaxconn_cap_in(f, &in_netns(f.netns))
}

/// [`somaxconn_cap`] for lines that already named the netns.
fn somaxconn_cap_in(f: &ListenerFacts, netns: &str) -> String {
    match f.somaxconn {
        Some(max) if max <= f.backlog_limit => {
            format!(" and net.core.somaxconn={max}{netns}, which caps it")
        }
        Some(max) => format!(" (net.core.somaxconn={max}{netns} allows up to {max})"),
        None => format!(" (and net.core.somaxconn, unknown{netns}, which caps it)"),
    }
}

/// "128/128" from the queue length seen at a drop, or just the limit when
/// no length was measured.
fn fill(f: &ListenerFacts) -> String {
    match f.max_accept_queue_seen {
        0 => format!("limit {}", f.backlog_limit),
        seen => format!("{seen}/{}", f.backlog_limit),
    }
}

fn in_netns(netns: u64) -> String {
    match netns {
        0 => String::new(),
        inode => format!(" in netns {inode}"),
    }
}

/// A round somaxconn that covers `needed`: at least 1024, a power of two.
fn suggested_somaxconn(needed: u32) -> u32 {
    needed
        .max(1024)
        .checked_next_power_of_two()
        .unwrap_or(needed)
}

fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETNS: u64 = 4026531840;

    fn facts(kinds: &[(DropKind, u64)]) -> ListenerFacts {
        ListenerFacts {
            kind_counts: kinds
                .iter()
                .map(|(kind, count)| (kind.as_str().to_owned(), *count))
                .collect(),
            backlog_requested: Some(128),
            backlog_limit: 128,
            somaxconn: Some(128),
            tcp_max_syn_backlog: Some(256),
            syncookies: Some(1),
            abort_on_overflow: Some(0),
            netns: NETNS,
            process_name: Some("php-fpm".to_owned()),
            max_accept_queue_seen: 128,
            host_netns: Some(true),
            holder_pid: Some(4242),
            runtime: None,
        }
    }

    /// A docker-like container with its own netns and somaxconn 16: the
    /// fix must name the container's way, not a host sysctl.
    #[test]
    fn somaxconn_fix_names_the_namespace_owner() {
        let mut f = facts(&[(DropKind::AckDroppedAcceptQueueFull, 9)]);
        f.backlog_requested = Some(511);
        f.backlog_limit = 16;
        f.somaxconn = Some(16);
        f.host_netns = Some(false);
        f.runtime = Some("docker".into());
        let line = diagnose(&f);
        check(
            &line,
            &[
                "cut to 16 by net.core.somaxconn=16",
                "is not the host's, so sysctl -w on the host does not reach it",
                "docker run --sysctl net.core.somaxconn=1024",
                "nsenter --net=/proc/4242/ns/net sysctl -w net.core.somaxconn=1024",
            ],
        );
        f.runtime = Some("kubernetes".into());
        let line = diagnose(&f);
        check(&line, &["securityContext.sysctls", "kubelet must allow"]);
        assert!(!line.contains("docker run"), "{line}");
        f.runtime = None;
        f.holder_pid = None;
        let line = diagnose(&f);
        check(
            &line,
            &[
                "docker run --sysctl",
                "securityContext.sysctls",
                "/proc/PID/ns/net",
            ],
        );
    }

    /// One line, and every piece expected in it.
    fn check(line: &str, pieces: &[&str]) {
        assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
        for piece in pieces {
            assert!(line.contains(piece), "missing {piece:?} in {line:?}");
        }
    }

    #[test]
    fn backlog_cut_by_somaxconn_comes_first() {
        let mut f = facts(&[
            (DropKind::AckDroppedAcceptQueueFull, 30),
            (DropKind::SynDroppedAcceptQueueFull, 10),
            (DropKind::SynCookieSent, 5),
        ]);
        f.backlog_requested = Some(511);
        let line = diagnose(&f);
        assert!(
            line.starts_with("listen(511) was cut to 128 by net.core.somaxconn=128"),
            "{line}"
        );
        check(
            &line,
            &[
                "in netns 4026531840",
                "40 connections dropped with the accept queue full",
                "raise net.core.somaxconn to at least 511",
                "sysctl -w net.core.somaxconn=1024",
                "restart php-fpm",
            ],
        );
        eprintln!("{line}");
    }

    #[test]
    fn backlog_cut_explains_syn_queue_unix_and_cookie_symptoms_too() {
        for (kind, symptom) in [
            (
                DropKind::SynDroppedSynQueueFull,
                "3 SYNs dropped with the SYN queue full",
            ),
            (DropKind::UnixConnectBacklogFull, "3 connect()s got EAGAIN"),
            (DropKind::SynCookieSent, "3 SYNs answered with SYN cookies"),
        ] {
            let mut f = facts(&[(kind, 3)]);
            f.backlog_requested = Some(4096);
            let line = diagnose(&f);
            check(
                &line,
                &[
                    "listen(4096) was cut to 128",
                    symptom,
                    "net.core.somaxconn=4096",
                ],
            );
        }
        // Pressure against tcp_max_syn_backlog is not the cut's doing.
        let mut f = facts(&[(DropKind::SynDroppedSynBacklogPressure, 3)]);
        f.backlog_requested = Some(4096);
        assert!(diagnose(&f).starts_with("SYN queue past 3/4"));
    }

    #[test]
    fn backlog_cut_when_somaxconn_changed_or_unknown() {
        let mut f = facts(&[(DropKind::AckDroppedAcceptQueueFull, 2)]);
        f.backlog_requested = Some(511);
        // Raised after the listener started: a restart is all it takes.
        f.somaxconn = Some(4096);
        let line = diagnose(&f);
        check(
            &line,
            &[
                "older net.core.somaxconn (now 4096 in netns 4026531840)",
                "restart php-fpm",
            ],
        );
        assert!(!line.contains("sysctl -w"), "{line}");
        // Raised, but not enough.
        f.somaxconn = Some(256);
        check(
            &diagnose(&f),
            &[
                "now 256 in netns 4026531840, still below 511",
                "at least 511",
                "restart php-fpm",
            ],
        );
        f.somaxconn = None;
        check(
            &diagnose(&f),
            &["listen(511) was cut to 128", "current value unknown"],
        );
        // listen(-1) as the eBPF side sees it: an int read as u32.
        f.backlog_requested = Some(u32::MAX);
        f.somaxconn = Some(128);
        check(
            &diagnose(&f),
            &[
                "listen(-1) asks for the most net.core.somaxconn allows, which was 128",
                "=1024",
            ],
        );
    }

    #[test]
    fn accept_queue_full_names_the_process_and_the_hang() {
        let f = facts(&[(DropKind::AckDroppedAcceptQueueFull, 7)]);
        let line = diagnose(&f);
        assert!(line.starts_with("accept queue full (128/128)"), "{line}");
        check(
            &line,
            &[
                "7 connections dropped",
                "php-fpm is not calling accept() fast enough",
                "listen.backlog in the php-fpm pool",
                "net.core.somaxconn=128 in netns 4026531840, which caps it",
                "left hanging with no RST (net.ipv4.tcp_abort_on_overflow=0)",
            ],
        );
        eprintln!("{line}");

        let mut f = facts(&[(DropKind::AckDroppedAcceptQueueFull, 1)]);
        f.abort_on_overflow = Some(1);
        f.somaxconn = Some(4096);
        f.process_name = Some("nginx".to_owned());
        let line = diagnose(&f);
        check(
            &line,
            &[
                "1 connection dropped",
                "backlog= on nginx's listen directive",
                "net.core.somaxconn=4096 in netns 4026531840 allows up to 4096",
                "got a RST (net.ipv4.tcp_abort_on_overflow=1)",
            ],
        );
        assert!(!line.contains("hanging"), "{line}");
    }

    #[test]
    fn accept_queue_full_at_syn_time_mentions_companions() {
        let f = facts(&[
            (DropKind::SynDroppedAcceptQueueFull, 4),
            (DropKind::SynDroppedSynQueueFull, 2),
            (DropKind::SynCookieSent, 9),
        ]);
        let line = diagnose(&f);
        assert!(line.starts_with("accept queue full"), "{line}");
        check(
            &line,
            &[
                "4 connections dropped",
                "SYN queue overflowed too (2 SYNs dropped)",
                "9 SYNs answered with SYN cookies",
            ],
        );
        // Only SYN-stage drops with abort_on_overflow=1: no RST was sent.
        let mut f = facts(&[(DropKind::SynDroppedAcceptQueueFull, 4)]);
        f.abort_on_overflow = Some(1);
        assert!(!diagnose(&f).contains("RST"));
    }

    #[test]
    fn syn_queue_full_with_cookies_off() {
        let mut f = facts(&[(DropKind::SynDroppedSynQueueFull, 42)]);
        f.syncookies = Some(0);
        let line = diagnose(&f);
        assert!(
            line.starts_with("SYN queue full (limit 128) and SYN cookies off"),
            "{line}"
        );
        check(
            &line,
            &[
                "net.ipv4.tcp_syncookies=0 in netns 4026531840",
                "42 SYNs dropped",
                "SYN flood",
                "enable net.ipv4.tcp_syncookies=1",
            ],
        );
        assert_eq!(line.matches("netns").count(), 1, "{line}");
        eprintln!("{line}");
        // Turned on since the drops.
        f.syncookies = Some(1);
        check(
            &diagnose(&f),
            &["net.ipv4.tcp_syncookies is now 1", "keep cookies on"],
        );
    }

    #[test]
    fn syn_backlog_pressure_names_tcp_max_syn_backlog() {
        let mut f = facts(&[(DropKind::SynDroppedSynBacklogPressure, 5)]);
        f.syncookies = Some(0);
        let line = diagnose(&f);
        check(
            &line,
            &[
                "SYN queue past 3/4 of net.ipv4.tcp_max_syn_backlog=256 in netns 4026531840",
                "5 SYNs dropped",
                "sysctl -w net.ipv4.tcp_max_syn_backlog=512",
                "net.ipv4.tcp_syncookies=1",
            ],
        );
        eprintln!("{line}");
    }

    #[test]
    fn other_syn_drops_point_away_from_the_backlog() {
        let line = diagnose(&facts(&[
            (DropKind::SynDroppedOther, 2),
            (DropKind::SynCookieSent, 1),
        ]));
        assert!(
            line.starts_with("2 SYNs dropped with neither queue full"),
            "{line}"
        );
        check(
            &line,
            &[
                "in netns 4026531840",
                "the backlog is not the cause",
                "dmesg",
            ],
        );
        // A cut backlog is not what dropped these.
        let mut f = facts(&[(DropKind::SynDroppedOther, 2)]);
        f.backlog_requested = Some(511);
        assert!(diagnose(&f).starts_with("2 SYNs dropped with neither queue full"));
        eprintln!("{line}");
    }

    #[test]
    fn syn_cookies_only_is_a_warning() {
        let line = diagnose(&facts(&[(DropKind::SynCookieSent, 1)]));
        assert!(
            line.starts_with("SYN queue overflowed, 1 SYN answered with SYN cookies"),
            "{line}"
        );
        check(&line, &["no connection lost yet", "backlog of 128"]);
        eprintln!("{line}");
    }

    #[test]
    fn unix_backlog_full() {
        let mut f = facts(&[(DropKind::UnixConnectBacklogFull, 12)]);
        f.backlog_requested = None;
        let line = diagnose(&f);
        assert!(
            line.starts_with("UNIX listener backlog full (128/128)"),
            "{line}"
        );
        check(
            &line,
            &[
                "12 non-blocking connect()s got EAGAIN",
                "listen.backlog in the php-fpm pool",
                "net.core.somaxconn=128",
            ],
        );
        eprintln!("{line}");
    }

    #[test]
    fn unknown_facts_are_said_unknown_not_invented() {
        let f = ListenerFacts {
            kind_counts: vec![
                ("ack_dropped_accept_queue_full".to_owned(), 2),
                // The same kind reported twice is summed.
                ("ack_dropped_accept_queue_full".to_owned(), 1),
            ],
            backlog_limit: 64,
            ..ListenerFacts::default()
        };
        let line = diagnose(&f);
        check(
            &line,
            &[
                "accept queue full (limit 64)",
                "3 connections dropped",
                "the listening process",
                "its listen backlog",
                "net.core.somaxconn, unknown, which caps it",
            ],
        );
        for invented in [
            "netns",
            "tcp_abort_on_overflow",
            "RST",
            "hanging",
            "=0",
            "listen(",
        ] {
            assert!(!line.contains(invented), "{invented:?} in {line:?}");
        }
        eprintln!("{line}");

        let f = ListenerFacts {
            kind_counts: vec![("syn_dropped_syn_queue_full".to_owned(), 1)],
            ..ListenerFacts::default()
        };
        check(
            &diagnose(&f),
            &["net.ipv4.tcp_syncookies unknown", "1 SYN dropped"],
        );
        let f = ListenerFacts {
            kind_counts: vec![("syn_dropped_syn_backlog_pressure".to_owned(), 1)],
            ..ListenerFacts::default()
        };
        let line = diagnose(&f);
        check(&line, &["tcp_max_syn_backlog (value unknown)"]);
        assert!(!line.contains("sysctl -w"), "{line}");
    }

    #[test]
    fn no_drops_unknown_kinds_and_hostile_names() {
        assert_eq!(diagnose(&ListenerFacts::default()), "no drops recorded");
        let zero = facts(&[(DropKind::AckDroppedAcceptQueueFull, 0)]);
        assert_eq!(diagnose(&zero), "no drops recorded");
        let f = ListenerFacts {
            kind_counts: vec![("tcp_new_kind".to_owned(), 4)],
            ..ListenerFacts::default()
        };
        assert_eq!(
            diagnose(&f),
            "4 drops of kind tcp_new_kind: no diagnosis for this kind yet"
        );
        // prctl(PR_SET_NAME) accepts newlines.
        let mut f = facts(&[(DropKind::AckDroppedAcceptQueueFull, 1)]);
        f.process_name = Some("evil\nname\r".to_owned());
        check(&diagnose(&f), &["evil?name?"]);
        f.process_name = Some("  ".to_owned());
        check(&diagnose(&f), &["the listening process"]);
    }

    #[test]
    fn suggested_somaxconn_is_round_and_sufficient() {
        assert_eq!(suggested_somaxconn(511), 1024);
        assert_eq!(suggested_somaxconn(1500), 2048);
        assert_eq!(suggested_somaxconn(4096), 4096);
        assert_eq!(suggested_somaxconn(i32::MAX as u32), 1 << 31);
        assert_eq!(suggested_somaxconn(u32::MAX), u32::MAX);
    }
}
