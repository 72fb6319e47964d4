//! Per-listener totals for the exit summary.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use backlog_common::{DropKind, DropTotalKey};

use crate::{
    attribution::Process,
    decode::{ip, Event},
    output::process_list,
};

/// Where a listener listens: a TCP address or a UNIX socket path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ListenerAddr {
    Inet(SocketAddr),
    Unix(String),
}

impl std::fmt::Display for ListenerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenerAddr::Inet(addr) => write!(f, "{addr}"),
            ListenerAddr::Unix(path) => write!(f, "unix:{path}"),
        }
    }
}

/// A listener is its socket; the address and netns make it readable and
/// keep listeners apart when the socket inode is unknown (0).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListenerKey {
    pub netns: u32,
    pub listener: ListenerAddr,
    pub socket_inode: u64,
}

#[derive(Clone, Debug, Default)]
pub struct ListenerStats {
    /// Events received per kind.
    pub counts: BTreeMap<DropKind, u64>,
    /// Exact drops per kind as counted in the kernel (may exceed `counts`
    /// when the ring buffer overflowed).
    pub totals: BTreeMap<DropKind, u64>,
    pub processes: Vec<Process>,
    pub max_accept_queue_seen: u32,
    /// The same since the last metrics scrape, which resets it.
    pub max_accept_queue_since_scrape: u32,
    pub accept_queue_limit: u32,
    /// Drops per peer address, for the busiest peers.
    pub peers: BTreeMap<IpAddr, u64>,
    pub cgroup_id: u64,
}

impl ListenerStats {
    /// Kernel total for `kind`, or the events seen when the kernel's
    /// totals were not read.
    pub fn count(&self, kind: DropKind) -> u64 {
        self.totals
            .get(&kind)
            .copied()
            .unwrap_or_else(|| self.counts.get(&kind).copied().unwrap_or(0))
    }

    /// Kinds seen as events or in the kernel's totals, with their counts.
    pub fn kind_counts(&self) -> Vec<(DropKind, u64)> {
        let kinds: std::collections::BTreeSet<DropKind> = self
            .counts
            .keys()
            .chain(self.totals.keys())
            .copied()
            .collect();
        kinds.into_iter().map(|k| (k, self.count(k))).collect()
    }

    /// The `n` peers with the most drops, busiest first.
    pub fn top_peers(&self, n: usize) -> Vec<(IpAddr, u64)> {
        let mut peers: Vec<_> = self.peers.iter().map(|(a, c)| (*a, *c)).collect();
        peers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        peers.truncate(n);
        peers
    }
}

/// Agent-side bookkeeping of what could not be reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Records that did not decode.
    pub undecodable: u64,
    /// Events the kernel could not queue (ring buffer full).
    pub lost_in_kernel: u64,
    /// Events with some unreadable kernel field.
    pub partial: u64,
}

#[derive(Default)]
pub struct Summary {
    pub listeners: BTreeMap<ListenerKey, ListenerStats>,
    pub events: u64,
    pub losses: Losses,
}

impl Summary {
    pub fn record(&mut self, event: &Event, processes: &[Process]) {
        self.events += 1;
        if event.partial {
            self.losses.partial += 1;
        }
        let key = ListenerKey {
            netns: event.netns_inode,
            listener: ListenerAddr::Inet(event.listener),
            socket_inode: event.socket_inode,
        };
        let stats = self.listeners.entry(key).or_default();
        if let Some(peer) = event.peer {
            *stats.peers.entry(peer.ip()).or_default() += 1;
        }
        if event.cgroup_id != 0 {
            stats.cgroup_id = event.cgroup_id;
        }
        *stats.counts.entry(event.kind).or_default() += 1;
        if !processes.is_empty() {
            stats.processes = processes.to_vec();
        }
        stats.max_accept_queue_seen = stats.max_accept_queue_seen.max(event.accept_queue_len);
        stats.max_accept_queue_since_scrape = stats
            .max_accept_queue_since_scrape
            .max(event.accept_queue_len);
        stats.accept_queue_limit = event.accept_queue_max;
    }

    /// Records a failed UNIX connect() against its listener (found by path;
    /// `inode` 0 and `queue` None when the listener was not found).
    pub fn record_unix(
        &mut self,
        netns: u32,
        path: &str,
        inode: u64,
        queue: Option<(u32, u32)>,
        processes: &[Process],
    ) {
        self.events += 1;
        let key = ListenerKey {
            netns,
            listener: ListenerAddr::Unix(path.to_owned()),
            socket_inode: inode,
        };
        let stats = self.listeners.entry(key).or_default();
        *stats
            .counts
            .entry(DropKind::UnixConnectBacklogFull)
            .or_default() += 1;
        if !processes.is_empty() {
            stats.processes = processes.to_vec();
        }
        if let Some((len, max)) = queue {
            stats.max_accept_queue_seen = stats.max_accept_queue_seen.max(len);
            stats.max_accept_queue_since_scrape = stats.max_accept_queue_since_scrape.max(len);
            stats.accept_queue_limit = max;
        }
    }

    /// Merges the kernel's exact per-listener totals.
    pub fn apply_totals(&mut self, totals: &[(DropTotalKey, u64)]) {
        for (key, total) in totals {
            let (Some(kind), Some(ip)) = (
                DropKind::from_u32(key.kind),
                ip(key.listener_family, key.listener_addr),
            ) else {
                continue;
            };
            let key = ListenerKey {
                netns: key.netns_inode,
                listener: ListenerAddr::Inet(SocketAddr::new(ip, key.listener_port)),
                socket_inode: key.socket_inode,
            };
            self.listeners
                .entry(key)
                .or_default()
                .totals
                .insert(kind, *total);
        }
    }

    /// The table printed to stderr at exit.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.listeners.is_empty() {
            out.push_str("no drops seen\n");
        } else {
            let _ = writeln!(
                out,
                "{:<28} {:>10} {:>9} {:<32} {:>8}  PROCESSES",
                "LISTENER", "NETNS", "ACCEPTQ", "KIND", "COUNT"
            );
            for (key, stats) in &self.listeners {
                for (kind, count) in stats.kind_counts() {
                    let reported = stats.counts.get(&kind).copied().unwrap_or(0);
                    // Say when the ring buffer lost some of this listener's
                    // events: the count is the kernel's, the lines fewer.
                    let unreported = if reported < count {
                        format!(" ({} not reported as events)", count - reported)
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        out,
                        "{:<28} {:>10} {:>9} {:<32} {:>8}  {}{unreported}",
                        key.listener.to_string(),
                        key.netns,
                        format!(
                            "{}/{}",
                            stats.max_accept_queue_seen, stats.accept_queue_limit
                        ),
                        kind.as_str(),
                        count,
                        process_list(&stats.processes)
                    );
                }
            }
        }
        let l = self.losses;
        let _ = writeln!(
            out,
            "events: {} reported, {} lost in the kernel (ring buffer full), {} undecodable, {} partial",
            self.events, l.lost_in_kernel, l.undecodable, l.partial
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: DropKind, port: u16, inode: u64) -> Event {
        Event {
            kind,
            timestamp_ns: 0,
            cpu: 0,
            listener: SocketAddr::from(([0, 0, 0, 0], port)),
            local: None,
            peer: None,
            accept_queue_len: 9,
            accept_queue_max: 8,
            syn_queue_len: 0,
            netns_inode: 1,
            socket_inode: inode,
            cgroup_id: 0,
            partial: false,
            reset_sent: false,
        }
    }

    #[test]
    fn kernel_totals_win_and_losses_show() {
        let mut s = Summary::default();
        s.record(&event(DropKind::SynCookieSent, 80, 10), &[]);
        let mut key = DropTotalKey {
            socket_inode: 10,
            netns_inode: 1,
            kind: DropKind::SynCookieSent as u32,
            listener_addr: [0; 16],
            listener_port: 80,
            listener_family: backlog_common::AF_INET,
            _pad0: 0,
        };
        let other = DropTotalKey {
            kind: DropKind::SynDroppedOther as u32,
            ..key
        };
        key.listener_addr[..4].copy_from_slice(&[0, 0, 0, 0]);
        s.apply_totals(&[(key, 5), (other, 2)]);
        assert_eq!(s.listeners.len(), 1, "totals merge into the same listener");
        let table = s.render();
        assert!(
            table.contains("syn_cookie_sent                         5  ?"),
            "{table}"
        );
        assert!(table.contains("(4 not reported as events)"), "{table}");
        assert!(
            table.contains("syn_dropped_other                       2"),
            "{table}"
        );
    }

    #[test]
    fn counts_per_listener_and_kind() {
        let mut s = Summary::default();
        let p = [Process {
            pid: 5,
            comm: "srv".into(),
            cmdline: None,
        }];
        for _ in 0..3 {
            s.record(&event(DropKind::AckDroppedAcceptQueueFull, 80, 10), &p);
        }
        s.record(&event(DropKind::SynDroppedAcceptQueueFull, 80, 10), &p);
        s.record(&event(DropKind::AckDroppedAcceptQueueFull, 81, 11), &[]);
        assert_eq!(s.events, 5);
        assert_eq!(s.listeners.len(), 2);
        let table = s.render();
        assert!(
            table.contains("ack_dropped_accept_queue_full           3  5/srv"),
            "{table}"
        );
        assert!(
            table.contains("syn_dropped_accept_queue_full           1  5/srv"),
            "{table}"
        );
        assert!(table.contains("0.0.0.0:81"), "{table}");
        assert!(table.contains("events: 5 reported, 0 lost"), "{table}");
    }
}
