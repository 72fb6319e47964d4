//! The running per-listener totals: what every drop, aggregate and
//! kernel total adds up to, for summaries and scrapes.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use backlog_common::{DropCounts, DropKind, DropTotalKey, UnixTotalKey};

use crate::{
    decode::Event,
    enrich::attribution::Process,
    flood::{self, Aggregate, FloodListener},
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

fn add_counts(stats: &mut ListenerStats, kind: DropKind, counts: &DropCounts) {
    let sum = stats.accounting.entry(kind).or_default();
    sum.total += counts.total;
    sum.sent += counts.sent;
    sum.suppressed += counts.suppressed;
    sum.lost += counts.lost;
}

#[derive(Clone, Debug, Default)]
pub struct ListenerStats {
    /// Events received per kind.
    pub counts: BTreeMap<DropKind, u64>,
    /// What the kernel counted per kind: every drop (`total`, may exceed
    /// `counts` under a flood), and how many were sent as events,
    /// suppressed by the rate limit, or lost with the ring buffer full.
    pub accounting: BTreeMap<DropKind, DropCounts>,
    /// Drops per kind that the agent wrote inside aggregate records.
    pub aggregated: BTreeMap<DropKind, u64>,
    pub processes: Vec<Process>,
    pub max_accept_queue_seen: u32,
    /// The same since the last metrics scrape, which resets it.
    pub max_accept_queue_since_scrape: u32,
    pub accept_queue_limit: u32,
    /// Drops per peer address, for the busiest peers.
    pub peers: BTreeMap<IpAddr, u64>,
    pub cgroup_id: u64,
    /// Accept-queue wait and rates (accept_wait.rs), set at each report.
    pub accept: Option<crate::enrich::accept_wait::AcceptFigures>,
    /// Backlog advice from those figures, set at each report.
    pub advice: Option<crate::enrich::advice::Advice>,
}

impl ListenerStats {
    /// Kernel total for `kind`, or the events seen when the kernel's
    /// totals were not read.
    pub fn count(&self, kind: DropKind) -> u64 {
        self.accounting
            .get(&kind)
            .map(|c| c.total)
            .unwrap_or_else(|| self.counts.get(&kind).copied().unwrap_or(0))
    }

    /// Kinds seen as events or in the kernel's totals, with their counts.
    pub fn kind_counts(&self) -> Vec<(DropKind, u64)> {
        let kinds: std::collections::BTreeSet<DropKind> = self
            .counts
            .keys()
            .chain(self.accounting.keys())
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

/// Flood mode over the whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodTotals {
    /// The kernel's count of drops over the rate limit.
    pub suppressed_in_kernel: u64,
    /// Drops the agent wrote inside aggregate records.
    pub aggregated: u64,
    /// Aggregate records written.
    pub records: u64,
}

#[derive(Default)]
pub struct Summary {
    pub listeners: BTreeMap<ListenerKey, ListenerStats>,
    pub events: u64,
    pub losses: Losses,
    pub flood: FloodTotals,
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
        // Compared before cloned: under a flood the holders rarely change.
        if !processes.is_empty() && stats.processes != processes {
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

    /// Replaces the per-listener accounting with the kernel's (cumulative)
    /// counts: TCP listeners by socket, UNIX ones by (client netns, path).
    pub fn apply_accounting(
        &mut self,
        inet: &[(DropTotalKey, DropCounts)],
        unix: &[(UnixTotalKey, DropCounts)],
    ) {
        for stats in self.listeners.values_mut() {
            stats.accounting.clear();
        }
        self.apply_totals(inet);
        self.apply_unix_totals(unix);
    }

    fn apply_totals(&mut self, totals: &[(DropTotalKey, DropCounts)]) {
        for (key, counts) in totals {
            let Some((kind, FloodListener::Inet { addr, .. })) = flood::inet_listener(key) else {
                continue;
            };
            let key = ListenerKey {
                netns: key.netns_inode,
                listener: ListenerAddr::Inet(addr),
                socket_inode: key.socket_inode,
            };
            add_counts(self.listeners.entry(key).or_default(), kind, counts);
        }
    }

    /// The kernel's UNIX EAGAIN accounting, keyed by (client netns, path),
    /// goes to the listener the events were attributed to.
    fn apply_unix_totals(&mut self, totals: &[(UnixTotalKey, DropCounts)]) {
        for (key, counts) in totals {
            let FloodListener::Unix { netns, path } = flood::unix_listener(key) else {
                continue;
            };
            let listener = ListenerAddr::Unix(path);
            let existing = self
                .listeners
                .keys()
                .find(|k| k.netns == netns && k.listener == listener)
                .cloned();
            let key = existing.unwrap_or(ListenerKey {
                netns,
                listener,
                socket_inode: 0,
            });
            let stats = self.listeners.entry(key).or_default();
            add_counts(stats, DropKind::UnixConnectBacklogFull, counts);
        }
    }

    /// Counts an aggregate record against its listener.
    pub fn record_aggregate(&mut self, aggregate: &Aggregate, socket_inode: u64) {
        self.flood.aggregated += aggregate.count;
        self.flood.records += 1;
        let (netns, listener, socket_inode) = match &aggregate.listener {
            FloodListener::Inet {
                netns,
                socket_inode,
                addr,
            } => (*netns, ListenerAddr::Inet(*addr), *socket_inode),
            FloodListener::Unix { netns, path } => {
                (*netns, ListenerAddr::Unix(path.clone()), socket_inode)
            }
        };
        let key = ListenerKey {
            netns,
            listener,
            socket_inode,
        };
        *self
            .listeners
            .entry(key)
            .or_default()
            .aggregated
            .entry(aggregate.kind)
            .or_default() += aggregate.count;
    }
}
