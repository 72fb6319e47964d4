//! "Counted, not traced": on a kernel where SYN-stage drops cannot be
//! traced (no kprobes, fentry refused), the agent still reports what the
//! kernel counted during the run, per network namespace (TcpExt counters
//! of /proc/net/netstat) and per TCP listener (`sk_drops` via sock_diag).
//!
//! The TcpExt deltas are exact per kind: TCPReqQFullDrop is
//! syn_dropped_syn_queue_full, TCPReqQFullDoCookies is syn_cookie_sent,
//! and ListenOverflows minus the final-ACK overflows that were traced is
//! syn_dropped_accept_queue_full. `sk_drops` is an upper bound of a
//! listener's drops: the kernel also adds segments it discards there.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use backlog_common::DropKind;

use crate::enrich::sockdiag;

/// The TcpExt counters that tell listen-queue drops apart.
pub const COUNTERS: [&str; 4] = [
    "ListenOverflows",
    "ListenDrops",
    "TCPReqQFullDrop",
    "TCPReqQFullDoCookies",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerDrops {
    pub addr: std::net::IpAddr,
    pub port: u16,
    pub inode: u64,
    pub drops: u64,
}

/// What the kernel had counted at one moment, per namespace.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub netstat: BTreeMap<u64, BTreeMap<String, u64>>,
    pub listeners: BTreeMap<u64, Vec<ListenerDrops>>,
}

/// One namespace's counts over the run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsDelta {
    pub netns: u64,
    pub counters: BTreeMap<String, u64>,
    /// Listeners whose sk_drops grew, with the growth.
    pub listeners: Vec<ListenerDrops>,
}

/// Every network namespace a task (thread) is in, with a namespace file
/// to enter it: threads, not just processes, since a thread may sit in a
/// namespace of its own.
pub fn namespaces(proc_root: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: HashMap<u64, PathBuf> = HashMap::new();
    let Ok(processes) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    for process in processes.flatten() {
        if !process
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(tasks) = fs::read_dir(process.path().join("task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let file = task.path().join("ns/net");
            if let Ok(meta) = fs::metadata(&file) {
                found.entry(meta.ino()).or_insert(file);
            }
        }
    }
    let mut found: Vec<_> = found.into_iter().collect();
    found.sort();
    found
}

/// Parses the TcpExt lines of a netstat file (a names line, a values line).
pub fn parse_tcp_ext(text: &str) -> BTreeMap<String, u64> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter(|(name, _)| COUNTERS.contains(name))
        .filter_map(|(name, value)| Some((name.to_owned(), value.parse().ok()?)))
        .collect()
}

/// Drops per SYN-stage kind derived from one namespace's TcpExt growth.
/// ListenOverflows counts final-ACK and SYN overflows alike; the final-ACK
/// ones were traced (`traced_acks`), so the rest were SYNs.
pub fn kind_counts(delta: &NetnsDelta, traced_acks: u64) -> [(DropKind, u64); 3] {
    let counter = |name: &str| delta.counters.get(name).copied().unwrap_or(0);
    [
        (DropKind::SynDroppedSynQueueFull, counter("TCPReqQFullDrop")),
        (DropKind::SynCookieSent, counter("TCPReqQFullDoCookies")),
        (
            DropKind::SynDroppedAcceptQueueFull,
            counter("ListenOverflows").saturating_sub(traced_acks),
        ),
    ]
}

/// Reads the counters of every namespace. Namespaces that vanish or
/// cannot be entered are skipped: they are reported as not counted.
pub fn snapshot(proc_root: &Path) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (netns, file) in namespaces(proc_root) {
        let read = sockdiag::in_netns(&file, || {
            let netstat = fs::read_to_string("/proc/thread-self/net/netstat")
                .map(|text| parse_tcp_ext(&text))
                .unwrap_or_default();
            let listeners = sockdiag::tcp_listeners().unwrap_or_default();
            (netstat, listeners)
        });
        let Ok((netstat, listeners)) = read else {
            continue;
        };
        snapshot.netstat.insert(netns, netstat);
        snapshot.listeners.insert(
            netns,
            listeners
                .into_iter()
                .map(|l| ListenerDrops {
                    addr: l.addr,
                    port: l.port,
                    inode: l.inode,
                    drops: l.drops.unwrap_or(0),
                })
                .collect(),
        );
    }
    snapshot
}

/// Growth of the counters between two snapshots, for namespaces present in
/// both (a namespace created during the run starts from zero: its counters
/// were zero when it was made).
pub fn deltas(before: &Snapshot, after: &Snapshot) -> Vec<NetnsDelta> {
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    for (netns, now) in &after.netstat {
        let then = before.netstat.get(netns).unwrap_or(&empty);
        let counters: BTreeMap<String, u64> = now
            .iter()
            .map(|(name, value)| {
                let grown = value.saturating_sub(then.get(name).copied().unwrap_or(0));
                (name.clone(), grown)
            })
            .collect();
        let old = before.listeners.get(netns);
        let listeners: Vec<ListenerDrops> = after
            .listeners
            .get(netns)
            .into_iter()
            .flatten()
            .filter_map(|l| {
                let was = old
                    .and_then(|old| old.iter().find(|o| o.inode == l.inode))
                    .map_or(0, |o| o.drops);
                let grown = l.drops.saturating_sub(was);
                (grown > 0).then(|| ListenerDrops {
                    drops: grown,
                    ..l.clone()
                })
            })
            .collect();
        if counters.values().any(|&v| v > 0) || !listeners.is_empty() {
            out.push(NetnsDelta {
                netns: *netns,
                counters,
                listeners,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_the_listen_counters() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPReqQFullDrop TCPReqQFullDoCookies\n\
                    TcpExt: 1 2 3 4 5\nIpExt: InNoRoutes\nIpExt: 0\n";
        let counters = parse_tcp_ext(text);
        assert_eq!(counters.len(), 4);
        assert_eq!(counters["ListenOverflows"], 2);
        assert_eq!(counters["TCPReqQFullDoCookies"], 5);
        assert!(parse_tcp_ext("garbage").is_empty());
    }

    #[test]
    fn deltas_cover_new_namespaces_and_grown_listeners() {
        let listener = |inode, drops| ListenerDrops {
            addr: "127.0.0.1".parse().unwrap(),
            port: 80,
            inode,
            drops,
        };
        let mut before = Snapshot::default();
        before
            .netstat
            .insert(1, [("ListenDrops".to_owned(), 10)].into_iter().collect());
        before
            .listeners
            .insert(1, vec![listener(7, 3), listener(8, 1)]);
        let mut after = before.clone();
        after
            .netstat
            .insert(1, [("ListenDrops".to_owned(), 15)].into_iter().collect());
        after
            .listeners
            .insert(1, vec![listener(7, 9), listener(8, 1)]);
        after
            .netstat
            .insert(2, [("TCPReqQFullDrop".to_owned(), 4)].into_iter().collect());
        let d = deltas(&before, &after);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].counters["ListenDrops"], 5);
        assert_eq!(d[0].listeners, vec![listener(7, 6)]);
        assert_eq!(d[1].netns, 2);
        assert_eq!(d[1].counters["TCPReqQFullDrop"], 4);
    }

    #[test]
    fn finds_this_threads_namespace() {
        let own = fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        assert!(namespaces(Path::new("/proc"))
            .iter()
            .any(|(n, _)| *n == own));
    }
}
