//! Flood mode, the agent's half: the kernel sends at most
//! `--max-events-per-sec` full events per listener and kind and only counts
//! the rest ("suppressed", per listener and kind, exactly). Every interval
//! the agent reads those counts and writes one aggregate record per
//! listener and kind whose count grew, so a drop is either its own line or
//! inside one aggregate's `count`, and
//! events + aggregated + lost = the kernel's total, at any rate.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use backlog_common::{DropCounts, DropKind, DropTotalKey, PeerKey, UnixTotalKey, UNIX_PATH_MAX};

use crate::decode::{ip, unix_path};

/// Busiest peers named in an aggregate.
pub const TOP_PEERS: usize = 5;

/// Whose drops an aggregate counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FloodListener {
    Inet {
        netns: u32,
        socket_inode: u64,
        addr: SocketAddr,
    },
    /// Keyed as the kernel saw it: the client's netns and the path.
    Unix { netns: u32, path: String },
}

impl std::fmt::Display for FloodListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FloodListener::Inet { addr, .. } => write!(f, "{addr}"),
            FloodListener::Unix { path, .. } => write!(f, "unix:{path}"),
        }
    }
}

/// One interval's suppressed drops of one listener and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Aggregate {
    pub kind: DropKind,
    pub listener: FloodListener,
    pub count: u64,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Sources of the suppressed drops, busiest first (approximate counts;
    /// empty for UNIX sockets, whose clients have no address).
    pub top_peers: Vec<(IpAddr, u64)>,
}

/// The listener a kernel key names; None for keys that do not decode.
pub fn inet_listener(key: &DropTotalKey) -> Option<(DropKind, FloodListener)> {
    let kind = DropKind::from_u32(key.kind)?;
    let addr = ip(key.listener_family, key.listener_addr)?;
    Some((
        kind,
        FloodListener::Inet {
            netns: key.netns_inode,
            socket_inode: key.socket_inode,
            addr: SocketAddr::new(addr, key.listener_port),
        },
    ))
}

/// The path of a UNIX key as events show it ("?" when unreadable).
pub fn unix_listener(key: &UnixTotalKey) -> FloodListener {
    let len = (key.path_len as usize).min(UNIX_PATH_MAX);
    FloodListener::Unix {
        netns: key.netns_inode,
        path: unix_path(&key.path[..len]).unwrap_or_else(|| "?".into()),
    }
}

/// Turns the kernel's cumulative suppressed counts into per-interval
/// aggregates.
pub struct Aggregator {
    inet_seen: HashMap<DropTotalKey, u64>,
    unix_seen: HashMap<UnixTotalKey, u64>,
    window_start: SystemTime,
}

impl Aggregator {
    pub fn new(now: SystemTime) -> Self {
        Aggregator {
            inet_seen: HashMap::new(),
            unix_seen: HashMap::new(),
            window_start: now,
        }
    }

    /// Drops what is known of kernel rows that were deleted (expired).
    pub fn forget(&mut self, inet: &[DropTotalKey], unix: &[UnixTotalKey]) {
        for key in inet {
            self.inet_seen.remove(key);
        }
        for key in unix {
            self.unix_seen.remove(key);
        }
    }

    /// The aggregates of the interval that ends `now`, from the kernel's
    /// counts (cumulative, summed over CPUs) and the peers of suppressed
    /// drops since the last call.
    pub fn window(
        &mut self,
        inet: &[(DropTotalKey, DropCounts)],
        unix: &[(UnixTotalKey, DropCounts)],
        peers: &[(PeerKey, u64)],
        now: SystemTime,
    ) -> Vec<Aggregate> {
        let mut grown: BTreeMap<(FloodListener, DropKind), u64> = BTreeMap::new();
        let mut by_socket: HashMap<(u64, u32, u32), (FloodListener, DropKind)> = HashMap::new();
        for (key, counts) in inet {
            let seen = self.inet_seen.entry(*key).or_insert(0);
            let delta = counts.suppressed.saturating_sub(*seen);
            *seen = counts.suppressed;
            if delta == 0 {
                continue;
            }
            if let Some((kind, listener)) = inet_listener(key) {
                by_socket.insert(
                    (key.socket_inode, key.kind, key.netns_inode),
                    (listener.clone(), kind),
                );
                *grown.entry((listener, kind)).or_default() += delta;
            }
        }
        for (key, counts) in unix {
            let seen = self.unix_seen.entry(*key).or_insert(0);
            let delta = counts.suppressed.saturating_sub(*seen);
            *seen = counts.suppressed;
            if delta > 0 {
                let kind = DropKind::UnixConnectBacklogFull;
                *grown.entry((unix_listener(key), kind)).or_default() += delta;
            }
        }
        let mut peer_counts: HashMap<(FloodListener, DropKind), Vec<(IpAddr, u64)>> =
            HashMap::new();
        for (peer, count) in peers {
            let Some(listener) = by_socket.get(&(peer.socket_inode, peer.kind, peer.netns_inode))
            else {
                continue;
            };
            if let Some(addr) = ip(peer.family, peer.addr) {
                peer_counts
                    .entry(listener.clone())
                    .or_default()
                    .push((addr, *count));
            }
        }
        let start = self.window_start;
        self.window_start = now;
        grown
            .into_iter()
            .map(|((listener, kind), count)| {
                let mut top_peers = peer_counts
                    .remove(&(listener.clone(), kind))
                    .unwrap_or_default();
                top_peers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                top_peers.truncate(TOP_PEERS);
                Aggregate {
                    kind,
                    listener,
                    count,
                    start,
                    end: now,
                    top_peers,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use backlog_common::AF_INET;

    use super::*;
    use crate::testing::unix_total_key;

    fn inet_key(port: u16, kind: DropKind) -> DropTotalKey {
        let mut key = DropTotalKey {
            socket_inode: 77,
            netns_inode: 5,
            kind: kind as u32,
            listener_addr: [0; 16],
            listener_port: port,
            listener_family: AF_INET,
            _pad0: 0,
        };
        key.listener_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        key
    }

    fn counts(total: u64, sent: u64, suppressed: u64) -> DropCounts {
        DropCounts {
            total,
            sent,
            suppressed,
            lost: total - sent - suppressed,
        }
    }

    #[test]
    fn one_aggregate_per_listener_and_kind_per_window_from_the_growth() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let t1 = t0 + Duration::from_secs(1);
        let t2 = t1 + Duration::from_secs(1);
        let mut agg = Aggregator::new(t0);
        let syn = inet_key(80, DropKind::SynDroppedSynQueueFull);
        let quiet = inet_key(81, DropKind::SynDroppedSynQueueFull);
        let mut peer = PeerKey {
            socket_inode: 77,
            kind: syn.kind,
            netns_inode: 5,
            family: AF_INET,
            _pad0: [0; 6],
            addr: [0; 16],
        };
        peer.addr[..4].copy_from_slice(&[198, 19, 0, 1]);
        let mut other = peer;
        other.addr[3] = 2;
        // Two raw paths that name one socket: with and without the NUL.
        let php = unix_total_key(9, b"/run/php.sock");
        let php_nul = unix_total_key(9, b"/run/php.sock\0");
        let first = agg.window(
            &[(syn, counts(500, 100, 400)), (quiet, counts(3, 3, 0))],
            &[(php, counts(150, 100, 50)), (php_nul, counts(10, 0, 10))],
            &[(peer, 300), (other, 100)],
            t1,
        );
        assert_eq!(first.len(), 2, "{first:?}");
        let tcp = first
            .iter()
            .find(|a| a.kind == DropKind::SynDroppedSynQueueFull)
            .unwrap();
        assert_eq!((tcp.count, tcp.start, tcp.end), (400, t0, t1));
        assert_eq!(
            tcp.top_peers,
            vec![
                ("198.19.0.1".parse().unwrap(), 300),
                ("198.19.0.2".parse().unwrap(), 100)
            ]
        );
        let unix = first
            .iter()
            .find(|a| a.kind == DropKind::UnixConnectBacklogFull)
            .unwrap();
        assert_eq!(unix.count, 60);
        assert_eq!(
            unix.listener,
            FloodListener::Unix {
                netns: 9,
                path: "/run/php.sock".into()
            }
        );
        // Only the growth since the last window; nothing when none.
        let second = agg.window(&[(syn, counts(520, 100, 420))], &[], &[], t2);
        assert_eq!(second.len(), 1);
        assert_eq!((second[0].count, second[0].start), (20, t1));
        assert!(agg
            .window(&[(syn, counts(520, 100, 420))], &[], &[], t2)
            .is_empty());
    }
}
