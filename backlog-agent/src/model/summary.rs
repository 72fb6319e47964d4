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

/// Peers counted per listener (see `ListenerStats::count_peer`).
pub const PEERS_KEPT: usize = 32;

/// A value per drop kind. The summary keeps three of these per listener
/// (10,000 listeners in a BTreeMap, whose nodes hold the values inline),
/// and nearly every listener has one kind: that one is held inline, and
/// only a second kind moves the values to a boxed slot per kind. Inline
/// slots for all seven kinds made a listener's entry 664 bytes, and the
/// summary 5.5 MB at 10,000 listeners. Iterates in the kinds' order.
#[derive(Clone, Debug, Default)]
pub struct KindMap<V> {
    /// A bit per kind present (by slot).
    present: u8,
    /// The value of the one kind present, while `all` is None.
    one: V,
    /// Every kind's slot, once two kinds were present at the same time
    /// (kept from then on: clearing and refilling must not reallocate).
    all: Option<Box<[V; DropKind::ALL.len()]>>,
}

/// [`KindMap::entry`]'s result, for `entry(kind).or_default()`.
pub struct KindEntry<'a, V> {
    map: &'a mut KindMap<V>,
    at: usize,
}

impl<'a, V: Copy + Default> KindEntry<'a, V> {
    pub fn or_default(self) -> &'a mut V {
        let map = self.map;
        let bit = 1u8 << self.at;
        if map.present & bit == 0 {
            map.put(self.at, V::default());
        }
        map.slot_mut(self.at)
    }
}

impl<V: Copy + Default> KindMap<V> {
    /// Slot of `kind`: its wire value less one (1..=7, asserted below).
    fn at(kind: DropKind) -> usize {
        kind as usize - 1
    }

    /// The value of slot `at`, which must be present.
    fn slot(&self, at: usize) -> &V {
        match &self.all {
            Some(all) => &all[at],
            None => &self.one,
        }
    }

    fn slot_mut(&mut self, at: usize) -> &mut V {
        match &mut self.all {
            Some(all) => &mut all[at],
            None => &mut self.one,
        }
    }

    /// Sets slot `at` (present or not) to `value`.
    fn put(&mut self, at: usize, value: V) {
        let bit = 1u8 << at;
        if self.all.is_none() && self.present & !bit != 0 {
            // A second kind: every value gets its own slot.
            let mut all = Box::new([V::default(); DropKind::ALL.len()]);
            let held = self.present.trailing_zeros() as usize;
            all[held] = self.one;
            self.all = Some(all);
        }
        self.present |= bit;
        *self.slot_mut(at) = value;
    }

    pub fn get(&self, kind: &DropKind) -> Option<&V> {
        let at = Self::at(*kind);
        (self.present & (1 << at) != 0).then(|| self.slot(at))
    }

    pub fn entry(&mut self, kind: DropKind) -> KindEntry<'_, V> {
        KindEntry {
            at: Self::at(kind),
            map: self,
        }
    }

    pub fn insert(&mut self, kind: DropKind, value: V) {
        self.put(Self::at(kind), value);
    }

    pub fn clear(&mut self) {
        self.present = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.present == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DropKind, &V)> + '_ {
        DropKind::ALL
            .iter()
            .filter_map(move |kind| self.get(kind).map(|value| (kind, value)))
    }

    pub fn keys(&self) -> impl Iterator<Item = &DropKind> + '_ {
        self.iter().map(|(kind, _)| kind)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.iter().map(|(_, value)| value)
    }
}

/// Equal when the same kinds hold the same values, however they are held.
impl<V: Copy + Default + PartialEq> PartialEq for KindMap<V> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl<V: Copy + Default + Eq> Eq for KindMap<V> {}

impl<'a, V: Copy + Default> IntoIterator for &'a KindMap<V> {
    type Item = (&'a DropKind, &'a V);
    type IntoIter = Box<dyn Iterator<Item = (&'a DropKind, &'a V)> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

// KindMap's slots: the wire values are 1..=7, in ALL's (and Ord's) order.
const _: () = {
    let mut i = 0;
    while i < DropKind::ALL.len() {
        assert!(DropKind::ALL[i] as usize == i + 1);
        i += 1;
    }
};

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
    pub counts: KindMap<u64>,
    /// What the kernel counted per kind: every drop (`total`, may exceed
    /// `counts` under a flood), and how many were sent as events,
    /// suppressed by the rate limit, or lost with the ring buffer full.
    pub accounting: KindMap<DropCounts>,
    /// Drops per kind that the agent wrote inside aggregate records.
    pub aggregated: KindMap<u64>,
    pub processes: Vec<Process>,
    pub max_accept_queue_seen: u32,
    /// The same since the last metrics scrape, which resets it.
    pub max_accept_queue_since_scrape: u32,
    pub accept_queue_limit: u32,
    /// Drops per peer address, for the busiest peers: at most
    /// PEERS_KEPT of them (see `count_peer`).
    peers: Vec<(IpAddr, u64)>,
    pub cgroup_id: u64,
    /// Accept-queue wait and rates (accept_wait.rs), set at each report.
    /// Boxed, as the advice: few listeners have them, and inline they
    /// took 168 of every listener's bytes in the summary.
    pub accept: Option<Box<crate::enrich::accept_wait::AcceptFigures>>,
    /// Backlog advice from those figures, set at each report.
    pub advice: Option<Box<crate::enrich::advice::Advice>>,
    /// CLOCK_MONOTONIC ns of the last event, aggregate or change of the
    /// kernel's totals (0: none yet): what `Summary::evict_idle` reads.
    pub last_active_ns: u64,
    /// The kernel totals summed over kinds at the last accounting, to
    /// tell whether they moved.
    accounted_total: u64,
}

impl ListenerStats {
    /// Nothing but the kernel's totals: no event, aggregate, holder or
    /// accept-queue figure came for it.
    fn holds_only_accounting(&self) -> bool {
        self.counts.is_empty()
            && self.aggregated.is_empty()
            && self.processes.is_empty()
            && self.accept.is_none()
            && self.max_accept_queue_seen == 0
    }

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

    /// One more drop from `peer`. The list is bounded (a spoofed-source
    /// flood brings a new peer with every event, 100 a second per
    /// listener): once PEERS_KEPT are known, a new one takes the slot of
    /// the least counted and starts from its count ("space saving"), so
    /// the busiest stay and a count is at most overstated by what the
    /// slot held.
    pub fn count_peer(&mut self, peer: IpAddr) {
        if let Some(known) = self.peers.iter_mut().find(|(ip, _)| *ip == peer) {
            known.1 += 1;
        } else if self.peers.len() < PEERS_KEPT {
            self.peers.push((peer, 1));
        } else if let Some(least) = self.peers.iter_mut().min_by_key(|(_, count)| *count) {
            *least = (peer, least.1 + 1);
        }
    }

    /// The `n` peers with the most drops, busiest first.
    pub fn top_peers(&self, n: usize) -> Vec<(IpAddr, u64)> {
        let mut peers = self.peers.clone();
        peers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        peers.truncate(n);
        peers
    }
}

/// Listeners the summary keeps one by one; beyond, those idle for
/// `--expire-after` whose kernel rows are gone fold into [`Folded`], so
/// the summary (and the agent's memory) stays bounded with listeners
/// coming and going. Folding goes down to 3/4 of this, not at every one.
pub const SUMMARY_CAP: usize = 4096;

/// The listeners folded out of the summary, added up: every total stays
/// exact (the per-listener rows plus this are what was counted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    pub listeners: u64,
    /// Per kind: what the listeners showed (the kernel's totals, or the
    /// events where no total was read).
    pub drops: BTreeMap<DropKind, u64>,
    pub events: BTreeMap<DropKind, u64>,
    pub aggregated: BTreeMap<DropKind, u64>,
    pub lost: BTreeMap<DropKind, u64>,
    /// Final-ACK drops per netns, which the split of the kernel's
    /// counters into kinds needs (`Sink::traced_acks`).
    pub acks_by_netns: BTreeMap<u32, u64>,
}

impl Folded {
    fn absorb(&mut self, netns: u32, stats: &ListenerStats) {
        self.listeners += 1;
        let acks = stats.count(DropKind::AckDroppedAcceptQueueFull);
        if acks > 0 {
            *self.acks_by_netns.entry(netns).or_default() += acks;
        }
        for (kind, count) in stats.kind_counts() {
            *self.drops.entry(kind).or_default() += count;
        }
        for (kind, count) in &stats.counts {
            *self.events.entry(*kind).or_default() += count;
        }
        for (kind, count) in &stats.aggregated {
            *self.aggregated.entry(*kind).or_default() += count;
        }
        for (kind, counts) in &stats.accounting {
            *self.lost.entry(*kind).or_default() += counts.lost;
        }
    }
}

/// Listeners that fold together: the latest activity among them, whether
/// all are idle, and their keys.
type FoldGroup = (u64, bool, Vec<ListenerKey>);

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

/// Runs of one of the agent's programs that the kernel skipped (another
/// BPF program was running on that CPU): whatever they would have seen
/// is in no count, so the summary names them with what they observe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSkip {
    pub program: String,
    /// Drop kinds (their names) or other figures the program carries.
    pub observes: Vec<&'static str>,
    pub runs: u64,
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
    /// Since start, per program; empty while the kernel skipped nothing.
    pub kernel_skips: Vec<KernelSkip>,
    pub flood: FloodTotals,
    /// Idle listeners folded out of `listeners` (`evict_idle`).
    pub folded: Folded,
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
            stats.count_peer(peer.ip());
        }
        if event.cgroup_id != 0 {
            stats.cgroup_id = event.cgroup_id;
        }
        *stats.counts.entry(event.kind).or_default() += 1;
        stats.last_active_ns = stats.last_active_ns.max(event.timestamp_ns);
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
        timestamp_ns: u64,
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
        stats.last_active_ns = stats.last_active_ns.max(timestamp_ns);
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
        let now = crate::clock::monotonic_ns();
        for stats in self.listeners.values_mut() {
            let total = stats.accounting.values().map(|c| c.total).sum();
            if total != stats.accounted_total {
                stats.accounted_total = total;
                stats.last_active_ns = now;
            }
        }
    }

    /// Beyond [`SUMMARY_CAP`] listeners, folds those idle for `idle_ns`
    /// (as of `now_ns`) and not `live` in the kernel's maps into
    /// `folded`, least recently active first, down to 3/4 of the cap; the
    /// folded keys are returned. The accounting must be fresh (applied
    /// just before). UNIX listeners sharing a path share its kernel totals
    /// (`apply_unix_totals`): they fold together or not at all.
    pub fn evict_idle(
        &mut self,
        now_ns: u64,
        idle_ns: u64,
        live: impl Fn(&ListenerKey) -> bool,
    ) -> Vec<ListenerKey> {
        self.evict_idle_beyond(SUMMARY_CAP, now_ns, idle_ns, live)
    }

    fn evict_idle_beyond(
        &mut self,
        cap: usize,
        now_ns: u64,
        idle_ns: u64,
        live: impl Fn(&ListenerKey) -> bool,
    ) -> Vec<ListenerKey> {
        if self.listeners.len() <= cap {
            return Vec::new();
        }
        let keep = cap - cap / 4;
        // Group: a UNIX (netns, path), or the TCP listener itself.
        let mut groups: BTreeMap<(u32, ListenerAddr, u64), FoldGroup> = BTreeMap::new();
        for (key, stats) in &self.listeners {
            let group = match &key.listener {
                ListenerAddr::Unix(_) => (key.netns, key.listener.clone(), 0),
                ListenerAddr::Inet(_) => (key.netns, key.listener.clone(), key.socket_inode),
            };
            let idle = now_ns.saturating_sub(stats.last_active_ns) >= idle_ns && !live(key);
            let entry = groups.entry(group).or_insert((0, true, Vec::new()));
            entry.0 = entry.0.max(stats.last_active_ns);
            entry.1 &= idle;
            entry.2.push(key.clone());
        }
        let mut idle: Vec<(u64, Vec<ListenerKey>)> = groups
            .into_values()
            .filter(|(_, idle, _)| *idle)
            .map(|(last, _, keys)| (last, keys))
            .collect();
        idle.sort_by_key(|(last, _)| *last);
        let mut evicted = Vec::new();
        for (_, keys) in idle {
            if self.listeners.len() <= keep {
                break;
            }
            for key in keys {
                if let Some(stats) = self.listeners.remove(&key) {
                    self.folded.absorb(key.netns, &stats);
                    evicted.push(key);
                }
            }
        }
        evicted
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
        if totals.is_empty() {
            return;
        }
        // Where each (netns, path)'s total goes, found once (a search per
        // total would be quadratic with thousands of listeners): the
        // listener its events were attributed to, one whose socket is
        // known before one that was not found. A row made here for a
        // total that came before the path's first event (an --interval
        // summary or a scrape while the events were still on their way)
        // holds nothing else: it gives way to the listener, which would
        // otherwise show the drops as 0 beside an unattributed row.
        let mut first: std::collections::HashMap<(u32, String), ListenerKey> =
            std::collections::HashMap::new();
        let mut placeholders = Vec::new();
        for (key, stats) in &self.listeners {
            let ListenerAddr::Unix(path) = &key.listener else {
                continue;
            };
            if key.socket_inode == 0 && stats.holds_only_accounting() {
                placeholders.push(key.clone());
                continue;
            }
            let slot = first
                .entry((key.netns, path.clone()))
                .or_insert_with(|| key.clone());
            if slot.socket_inode == 0 && key.socket_inode != 0 {
                *slot = key.clone();
            }
        }
        for key in placeholders {
            let ListenerAddr::Unix(path) = &key.listener else {
                continue;
            };
            match first.entry((key.netns, path.clone())) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    self.listeners.remove(&key);
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(key);
                }
            }
        }
        let mut with_total = std::collections::HashSet::new();
        for (key, counts) in totals {
            let FloodListener::Unix { netns, path } = flood::unix_listener(key) else {
                continue;
            };
            let existing = first.get(&(netns, path.clone())).cloned();
            with_total.insert((netns, path.clone()));
            let listener = ListenerAddr::Unix(path);
            let key = existing.unwrap_or(ListenerKey {
                netns,
                listener,
                socket_inode: 0,
            });
            let stats = self.listeners.entry(key).or_default();
            add_counts(stats, DropKind::UnixConnectBacklogFull, counts);
        }
        // The other listeners of a path with a total (a restarted
        // listener, an EAGAIN whose listener was not found) hold none of
        // it: without an entry their count would fall back to their events
        // and count those drops twice, in the table, the metrics and the
        // folded part.
        for (key, stats) in self.listeners.iter_mut() {
            if let ListenerAddr::Unix(path) = &key.listener {
                if with_total.contains(&(key.netns, path.clone())) {
                    stats
                        .accounting
                        .entry(DropKind::UnixConnectBacklogFull)
                        .or_default();
                }
            }
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
        let stats = self.listeners.entry(key).or_default();
        *stats.aggregated.entry(aggregate.kind).or_default() += aggregate.count;
        stats.last_active_ns = crate::clock::monotonic_ns();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_stay_bounded_and_keep_the_busiest() {
        let mut stats = ListenerStats::default();
        let busy = IpAddr::from([198, 18, 0, 1]);
        for i in 0..10_000u32 {
            // A spoofed-source flood: every other drop from a new peer.
            stats.count_peer(IpAddr::from((0xc612_0100u32 + i).to_be_bytes()));
            stats.count_peer(busy);
        }
        assert!(stats.peers.len() <= PEERS_KEPT);
        let top = stats.top_peers(1);
        assert_eq!(top[0].0, busy);
        // Never understated; overstated by at most what a slot held.
        assert!(top[0].1 >= 10_000, "{top:?}");
    }

    #[test]
    fn kind_map_iterates_in_kind_order() {
        let mut map = KindMap::<u64>::default();
        assert!(map.is_empty());
        *map.entry(DropKind::UnixConnectBacklogFull).or_default() += 2;
        map.insert(DropKind::SynDroppedSynQueueFull, 5);
        *map.entry(DropKind::UnixConnectBacklogFull).or_default() += 1;
        let seen: Vec<(DropKind, u64)> = map.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(
            seen,
            vec![
                (DropKind::SynDroppedSynQueueFull, 5),
                (DropKind::UnixConnectBacklogFull, 3)
            ]
        );
        assert_eq!(map.get(&DropKind::SynCookieSent), None);
        map.clear();
        assert!(map.is_empty());
    }

    #[test]
    fn kind_map_keeps_values_when_a_second_kind_comes_and_after_clear() {
        let mut one = KindMap::<u64>::default();
        one.insert(DropKind::AckDroppedAcceptQueueFull, 7);
        let mut spilled = one.clone();
        *spilled.entry(DropKind::SynCookieSent).or_default() += 1;
        assert_eq!(spilled.get(&DropKind::AckDroppedAcceptQueueFull), Some(&7));
        assert_eq!(spilled.get(&DropKind::SynCookieSent), Some(&1));
        assert_ne!(one, spilled);
        // Cleared and refilled with the same kind: equal to the inline one.
        spilled.clear();
        assert_eq!(spilled.get(&DropKind::SynCookieSent), None);
        spilled.insert(DropKind::AckDroppedAcceptQueueFull, 7);
        assert_eq!(one, spilled);
        assert_eq!(spilled.iter().count(), 1);
    }

    fn key(port: u16) -> ListenerKey {
        ListenerKey {
            netns: 1,
            listener: ListenerAddr::Inet(SocketAddr::from(([127, 0, 0, 1], port))),
            socket_inode: u64::from(port),
        }
    }

    fn unix_key(path: &str, inode: u64) -> ListenerKey {
        ListenerKey {
            netns: 1,
            listener: ListenerAddr::Unix(path.into()),
            socket_inode: inode,
        }
    }

    /// The kernel's UNIX total for `path` in netns 1: `total` drops, of
    /// which `sent` went out as events and the rest were suppressed.
    fn unix_total(path: &str, total: u64, sent: u64) -> (UnixTotalKey, DropCounts) {
        let key = crate::testing::unix_total_key(1, path.as_bytes());
        let counts = DropCounts {
            total,
            sent,
            suppressed: total - sent,
            lost: 0,
        };
        (key, counts)
    }

    fn stats(events: u64, total: u64, last_active_ns: u64) -> ListenerStats {
        let kind = DropKind::AckDroppedAcceptQueueFull;
        let mut stats = ListenerStats {
            last_active_ns,
            ..ListenerStats::default()
        };
        stats.counts.insert(kind, events);
        stats.aggregated.insert(kind, total - events);
        stats.accounting.insert(
            kind,
            DropCounts {
                total,
                sent: events,
                suppressed: total - events,
                lost: 0,
            },
        );
        stats
    }

    fn total(summary: &Summary) -> u64 {
        let kind = DropKind::AckDroppedAcceptQueueFull;
        summary
            .listeners
            .values()
            .map(|s| s.count(kind))
            .sum::<u64>()
            + summary.folded.drops.get(&kind).copied().unwrap_or(0)
    }

    /// Over the cap, idle listeners that are not live fold into `folded`
    /// (least recently active first, down to 3/4 of the cap); the total
    /// over rows and folded part does not change; recent or live ones stay.
    #[test]
    fn idle_listeners_fold_beyond_the_cap_keeping_totals() {
        let mut summary = Summary::default();
        for port in 1..=12u16 {
            // Ports 1..=8 idle since t=port, 9..=12 active at t=100.
            let last = if port <= 8 { u64::from(port) } else { 100 };
            summary
                .listeners
                .insert(key(port), stats(2, 10 + u64::from(port), last));
        }
        let before = total(&summary);
        // Port 1 is still live in the kernel: never folded.
        let evicted = summary.evict_idle_beyond(8, 110, 50, |k| *k == key(1));
        assert_eq!(
            evicted,
            vec![key(2), key(3), key(4), key(5), key(6), key(7)]
        );
        assert_eq!(summary.listeners.len(), 6);
        assert!(summary.listeners.contains_key(&key(1)));
        assert_eq!(total(&summary), before);
        assert_eq!(summary.folded.listeners, 6);
        let kind = DropKind::AckDroppedAcceptQueueFull;
        assert_eq!(summary.folded.events[&kind], 12);
        // Within the cap: nothing happens.
        assert!(summary.evict_idle_beyond(8, 1000, 50, |_| false).is_empty());
    }

    /// A UNIX path with two listeners (php-fpm restarted: a new socket at
    /// the same path, or one EAGAIN whose listener was not found) has one
    /// kernel total: the listeners' counts and the folded part add up to
    /// it once, not once plus the other listener's events.
    #[test]
    fn a_unix_path_total_counts_once_over_its_listeners() {
        let mut summary = Summary::default();
        for (inode, t) in [(10, 1), (11, 2), (11, 3)] {
            summary.record_unix(1, "/a", inode, None, &[], t);
        }
        summary.apply_accounting(&[], &[unix_total("/a", 7, 3)]);
        let kind = DropKind::UnixConnectBacklogFull;
        let listed: u64 = summary.listeners.values().map(|s| s.count(kind)).sum();
        assert_eq!(listed, 7);
        // apply_accounting stamped them active now (monotonic): fold at "ever after".
        summary.evict_idle_beyond(0, u64::MAX, 1, |_| false);
        assert!(summary.listeners.is_empty());
        assert_eq!(summary.folded.drops[&kind], 7);
        assert_eq!(summary.folded.events[&kind], 3);
    }

    /// The kernel's UNIX total read before the path's first event (an
    /// --interval summary while the events were on their way: seen in the
    /// 6.12 guest) makes a row of its own, not attributed; once the events
    /// came, the total goes to their listener and that row goes away,
    /// instead of the listener showing 0 beside it.
    #[test]
    fn a_unix_total_before_the_first_event_joins_its_listener() {
        let mut summary = Summary::default();
        let total = unix_total("/a", 5, 5);
        summary.apply_accounting(&[], &[total]);
        assert_eq!(
            summary.listeners.keys().collect::<Vec<_>>(),
            [&unix_key("/a", 0)]
        );
        for t in 1..=5 {
            summary.record_unix(1, "/a", 7, Some((3, 2)), &[], t);
        }
        summary.apply_accounting(&[], &[total]);
        let rows = |summary: &Summary| -> Vec<(u64, u64)> {
            let kind = DropKind::UnixConnectBacklogFull;
            let rows = summary.listeners.iter();
            rows.map(|(key, stats)| (key.socket_inode, stats.count(kind)))
                .collect()
        };
        assert_eq!(rows(&summary), [(7, 5)]);
        // A listener that was not found (inode 0) keeps its row: its
        // events are its own, the total goes to the one that was found.
        summary.record_unix(1, "/a", 0, None, &[], 6);
        summary.apply_accounting(&[], &[total]);
        assert_eq!(rows(&summary), [(0, 0), (7, 5)]);
    }

    /// UNIX listeners of one path share the kernel's total: they fold
    /// together, and not while one of them is active.
    #[test]
    fn unix_listeners_of_one_path_fold_together() {
        let mut summary = Summary::default();
        summary.listeners.insert(unix_key("/a", 1), stats(1, 5, 1));
        summary
            .listeners
            .insert(unix_key("/a", 2), stats(1, 1, 100));
        summary.listeners.insert(unix_key("/b", 3), stats(1, 7, 1));
        summary.listeners.insert(unix_key("/b", 4), stats(1, 1, 2));
        let before = total(&summary);
        let evicted = summary.evict_idle_beyond(2, 110, 50, |_| false);
        assert_eq!(evicted, vec![unix_key("/b", 3), unix_key("/b", 4)]);
        assert_eq!(total(&summary), before);
    }
}
