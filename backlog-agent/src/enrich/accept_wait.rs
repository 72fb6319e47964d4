//! Accept-queue wait, arrival and accept rates, and near-full warnings:
//! what `backlog-ebpf/src/accept.rs` keeps per listener in the
//! `ACCEPT_STATS` map, turned into percentiles and rates.
//!
//! Nothing comes through the ring buffer: the map is read at each summary,
//! and polled a few times a second for near-full crossings, which the
//! kernel already limits to one per listener per second.
//! (That limit is this module's own; it belongs on the per-listener token
//! bucket the flood-proof event path keeps, once there is one.)
//!
//! Expiry (issue 11): the kernel never removes a row, so once 1,024
//! listeners have come and gone a new one would get no figures. A row
//! whose counters have not moved for `--expire-after` is read once more
//! and deleted, and what it held moves into a user-side retired part that
//! every later read adds back (counters summed, histograms merged, maxima
//! kept): the figures stay cumulative, rates per interval stay right, and
//! a listener that was only idle comes back where it was. Retired parts
//! are bounded ([`RETIRED_ROWS`], histograms stored sparse); beyond that
//! a row's figures fold into [`FoldedRows`], and its key starts afresh.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use backlog_common::{
    wait_bucket_range, AcceptKey, AcceptOffsets, AcceptStats, KernelOffsets, ACCEPT_KEY_TCP,
    ACCEPT_KEY_UNIX, ACCEPT_STATS_ENTRIES, AF_UNIX, WAIT_BUCKETS,
};

use crate::{decode::ip, kernel::btf::Btf, kernel::tracefs::EventFormat};

/// Near-full threshold when `--near-full` is not given, in percent.
pub const DEFAULT_NEAR_FULL_PERCENT: u32 = 80;

/// A listener whose longest accept wait reached this gets a summary even
/// without drops: a slow acceptor is worth reporting before it drops.
pub const WAIT_WORTH_REPORTING_US: u64 = 1000;

/// The offsets the accept programs need: struct fields from what the drop
/// programs resolved, the socket state from BTF, and the tracepoint record
/// layouts from tracefs. An error names what is missing; the accept hooks
/// are then not attached.
pub fn resolve(
    kernel: &KernelOffsets,
    btf: &Btf,
    tracefs: &Path,
    near_full_percent: u32,
) -> Result<AcceptOffsets, String> {
    let format = |category: &str, name: &str| {
        EventFormat::read(tracefs, category, name).map_err(|e| e.to_string())
    };
    let field = |format: &EventFormat, name: &str, size: u32| {
        format
            .field(name)
            .filter(|f| f.size == size)
            .map(|f| f.offset)
            .ok_or_else(|| format!("tracepoint has no {size}-byte `{name}` field"))
    };
    let state = format("sock", "inet_sock_set_state")?;
    let enter_accept4 = format("syscalls", "sys_enter_accept4")?;
    let enter_accept = format("syscalls", "sys_enter_accept")?;
    let enter_listen = format("syscalls", "sys_enter_listen")?;
    let exit_accept4 = format("syscalls", "sys_exit_accept4")?;
    let exit_accept = format("syscalls", "sys_exit_accept")?;
    // UNIX waits only; TCP ones do without it.
    let unix_peer = btf
        .field("unix_sock.peer")
        .ok()
        .filter(|f| f.size == 8)
        .map_or(backlog_common::OFFSET_ABSENT, |f| f.offset);
    let fd = field(&enter_accept4, "fd", 8)?;
    // One program reads `fd` for all three syscalls.
    if field(&enter_accept, "fd", 8)? != fd || field(&enter_listen, "fd", 8)? != fd {
        return Err("accept(), accept4() and listen() records differ in where `fd` is".into());
    }
    let ret = field(&exit_accept4, "ret", 8)?;
    // One program reads `ret` for both exits.
    if field(&exit_accept, "ret", 8)? != ret {
        return Err("accept() and accept4() exit records differ in where `ret` is".into());
    }
    let sk_state = btf
        .field("sock.__sk_common.skc_state")
        .map_err(|e| e.to_string())?;
    if sk_state.size != 1 {
        return Err(format!("skc_state is {} bytes, expected 1", sk_state.size));
    }
    let o = AcceptOffsets {
        tp_state_skaddr: field(&state, "skaddr", 8)?,
        tp_state_oldstate: field(&state, "oldstate", 4)?,
        tp_state_newstate: field(&state, "newstate", 4)?,
        tp_state_sport: field(&state, "sport", 2)?,
        tp_state_protocol: field(&state, "protocol", 2)?,
        tp_accept_fd: fd,
        tp_listen_fd: fd,
        tp_sys_exit_ret: ret,
        sk_state: sk_state.offset,
        sk_family: kernel.sk_family,
        sk_num: kernel.sk_num,
        sk_rcv_saddr: kernel.sk_rcv_saddr,
        sk_v6_rcv_saddr: kernel.sk_v6_rcv_saddr,
        sk_net: kernel.sk_net,
        sk_socket: kernel.sk_socket,
        sk_ack_backlog: kernel.sk_ack_backlog,
        sk_max_ack_backlog: kernel.sk_max_ack_backlog,
        net_ns_inum: kernel.net_ns_inum,
        socket_to_inode: kernel.socket_to_inode,
        inode_i_ino: kernel.inode_i_ino,
        task_files: kernel.task_files,
        files_fdt: kernel.files_fdt,
        fdtable_max_fds: kernel.fdtable_max_fds,
        fdtable_fd: kernel.fdtable_fd,
        file_private_data: kernel.file_private_data,
        socket_sk: kernel.socket_sk,
        near_full_percent,
        unix_peer,
        // Only the tp_btf arrivals program needs it (see probes.rs).
        sk_protocol: btf
            .field("sock.sk_protocol")
            .ok()
            .filter(|f| f.size == 2)
            .map_or(backlog_common::OFFSET_ABSENT, |f| f.offset),
    };
    let needed = [
        ("task_struct.files", o.task_files),
        ("files_struct.fdt", o.files_fdt),
        ("fdtable.fd", o.fdtable_fd),
        ("file.private_data", o.file_private_data),
        ("socket.sk", o.socket_sk),
        ("sock.__sk_common.skc_net", o.sk_net),
    ];
    if let Some((name, _)) = needed
        .iter()
        .find(|(_, offset)| *offset == backlog_common::OFFSET_ABSENT)
    {
        return Err(format!("this kernel's BTF has no {name}"));
    }
    Ok(o)
}

/// Wait percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct WaitMs {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The value below which `quantile` of the waits fall, in microseconds,
/// read at the middle of its bucket (buckets are at most 1/16 wide, see
/// `backlog_common::wait_bucket`), never above the largest wait seen.
pub fn percentile_us(buckets: &[u64], quantile: f64, max_us: u64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the sample that `quantile` names, 1-based.
    let rank = ((quantile * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (bucket, &count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            let (low, width) = wait_bucket_range(bucket);
            let middle = low as f64 + (width as f64 - 1.0) / 2.0;
            return Some(middle.min(max_us as f64));
        }
    }
    None
}

/// What a summary shows for one listener, over one interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AcceptFigures {
    /// None when no accepted connection's arrival was seen.
    pub wait_ms: Option<WaitMs>,
    /// Averages over the interval; arrivals are unknown for UNIX
    /// listeners (None).
    pub accept_rate_per_s: f64,
    pub arrival_rate_per_s: Option<f64>,
    /// Busiest one-second windows since the start.
    pub peak_accept_rate_per_s: u64,
    pub peak_arrival_rate_per_s: u64,
    /// Over the interval.
    pub accepts: u64,
    pub arrivals: u64,
    /// Since the start.
    pub max_queue_seen: u32,
    pub queue_limit: u32,
    pub near_full_warnings: u64,
    pub wait_max_us: u64,
    /// Seconds the rates are averaged over.
    pub interval_s: f64,
}

impl AcceptFigures {
    /// Whether this listener deserves a summary although nothing dropped.
    pub fn worth_reporting(&self) -> bool {
        self.wait_max_us >= WAIT_WORTH_REPORTING_US || self.near_full_warnings > 0
    }
}

/// Where a row of the map listens, as the summary names listeners.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowListener {
    /// A TCP port in a netns; `addr` from the last accept()/listen(), if any.
    Tcp {
        netns: u32,
        port: u16,
        addr: Option<IpAddr>,
        socket_inode: u64,
    },
    Unix {
        netns: u32,
        socket_inode: u64,
    },
}

impl RowListener {
    /// The listener's netns and socket inode (0 while unknown).
    pub fn netns_and_inode(&self) -> (u32, u64) {
        match *self {
            RowListener::Tcp {
                netns,
                socket_inode,
                ..
            }
            | RowListener::Unix {
                netns,
                socket_inode,
            } => (netns, socket_inode),
        }
    }

    fn of(key: &AcceptKey, stats: &AcceptStats) -> Option<RowListener> {
        match key.kind {
            ACCEPT_KEY_TCP => Some(RowListener::Tcp {
                netns: key.netns_inode,
                port: key.port,
                addr: if stats.listener_family == AF_UNIX || stats.listener_family == 0 {
                    None
                } else {
                    ip(stats.listener_family, stats.listener_addr)
                },
                socket_inode: stats.listener_inode,
            }),
            ACCEPT_KEY_UNIX => Some(RowListener::Unix {
                netns: key.netns_inode,
                socket_inode: key.socket_inode,
            }),
            _ => None,
        }
    }

    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            RowListener::Tcp { port, addr, .. } => Some(SocketAddr::new(
                addr.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                *port,
            )),
            RowListener::Unix { .. } => None,
        }
    }
}

/// A near-full crossing to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NearFull {
    pub listener: RowListener,
    /// CLOCK_MONOTONIC of the last crossing.
    pub timestamp_ns: u64,
    pub queue_len: u32,
    pub queue_max: u32,
    /// Crossings since the previous poll (more than 1 when polls are slow).
    pub new_warnings: u64,
}

/// Retired rows kept one per listener: as many as the kernel map holds,
/// so that a burst of idle listeners can all come back where they were.
/// A retired row is about 150 bytes plus 16 per wait bucket in use.
pub const RETIRED_ROWS: usize = ACCEPT_STATS_ENTRIES as usize;

/// What a row counts that can only grow while it lives; a row whose
/// fingerprint has not changed for `--expire-after` is idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Fingerprint {
    arrivals: u64,
    accepts: u64,
    waits: u64,
    near_full_count: u64,
    max_queue_seen: u32,
    listener_inode: u64,
}

impl Fingerprint {
    fn of(stats: &AcceptStats) -> Self {
        Fingerprint {
            arrivals: stats.arrivals,
            accepts: stats.accepts,
            waits: stats.waits,
            near_full_count: stats.near_full_count,
            max_queue_seen: stats.max_queue_seen,
            listener_inode: stats.listener_inode,
        }
    }
}

/// A deleted row's figures, kept to be added back to the key's later reads.
/// The histogram is sparse: a closed listener's waits rarely spread over
/// more than a few dozen of the 528 buckets.
#[derive(Clone, Debug)]
struct Retired {
    /// The row as deleted, but for its histogram (a full row is 4.4 kB).
    stats: RetiredFigures,
    buckets: Vec<(u16, u64)>,
}

/// The fields of `AcceptStats` a retired part adds back.
#[derive(Clone, Copy, Debug)]
struct RetiredFigures {
    arrivals: u64,
    accepts: u64,
    waits: u64,
    wait_sum_us: u64,
    wait_max_us: u64,
    max_queue_seen: u32,
    queue_limit: u32,
    arrival_window_peak: u64,
    accept_window_peak: u64,
    near_full_count: u64,
    near_full_last_ns: u64,
    near_full_len: u32,
    near_full_max: u32,
    listener_inode: u64,
    listener_family: u16,
    listener_addr: [u8; 16],
}

impl Retired {
    fn of(stats: &AcceptStats) -> Self {
        let buckets = stats
            .wait_buckets
            .iter()
            .enumerate()
            .filter(|(_, &n)| n != 0)
            .map(|(i, &n)| (i as u16, n))
            .collect();
        let figures = RetiredFigures {
            arrivals: stats.arrivals,
            accepts: stats.accepts,
            waits: stats.waits,
            wait_sum_us: stats.wait_sum_us,
            wait_max_us: stats.wait_max_us,
            max_queue_seen: stats.max_queue_seen,
            queue_limit: stats.queue_limit,
            arrival_window_peak: stats.arrival_window_peak,
            accept_window_peak: stats.accept_window_peak,
            near_full_count: stats.near_full_count,
            near_full_last_ns: stats.near_full_last_ns,
            near_full_len: stats.near_full_len,
            near_full_max: stats.near_full_max,
            listener_inode: stats.listener_inode,
            listener_family: stats.listener_family,
            listener_addr: stats.listener_addr,
        };
        Retired {
            stats: figures,
            buckets,
        }
    }

    /// Adds a later row of the same key (deleted again) into this one.
    fn absorb(&mut self, later: &AcceptStats) {
        let merged = self.merged_with(later);
        *self = Retired::of(&merged);
    }

    /// `live` (counting from 0 since its re-creation) with this part added.
    fn merged_with(&self, live: &AcceptStats) -> AcceptStats {
        let old = &self.stats;
        let mut out = *live;
        out.arrivals += old.arrivals;
        out.accepts += old.accepts;
        out.waits += old.waits;
        out.wait_sum_us += old.wait_sum_us;
        out.wait_max_us = out.wait_max_us.max(old.wait_max_us);
        out.max_queue_seen = out.max_queue_seen.max(old.max_queue_seen);
        out.arrival_window_peak = out.arrival_window_peak.max(old.arrival_window_peak);
        out.accept_window_peak = out.accept_window_peak.max(old.accept_window_peak);
        out.near_full_count += old.near_full_count;
        if live.near_full_count == 0 {
            out.near_full_last_ns = old.near_full_last_ns;
            out.near_full_len = old.near_full_len;
            out.near_full_max = old.near_full_max;
        }
        if live.queue_limit == 0 {
            out.queue_limit = old.queue_limit;
        }
        // Who listens: the live row's once it knows, else the last known.
        if live.listener_family == 0 {
            out.listener_inode = old.listener_inode;
            out.listener_family = old.listener_family;
            out.listener_addr = old.listener_addr;
        }
        for &(bucket, count) in &self.buckets {
            if let Some(slot) = out.wait_buckets.get_mut(usize::from(bucket)) {
                *slot += count;
            }
        }
        out
    }
}

/// Rows retired beyond [`RETIRED_ROWS`]: no longer kept per listener, only
/// counted, so that the final notes can say what they held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldedRows {
    pub rows: u64,
    pub accepts: u64,
    pub waits: u64,
}

/// The agent's handle on `ACCEPT_STATS`, with what it last reported.
pub struct AcceptWait {
    map: BpfHashMap<MapData, AcceptKey, AcceptStats>,
    /// Counters at the previous summary, for per-interval rates.
    previous: HashMap<AcceptKey, (u64, u64)>,
    previous_at: Instant,
    /// Near-full warnings already printed, per row.
    warned: HashMap<AcceptKey, u64>,
    pub read_errors: u64,
    /// None: rows are never deleted (`--expire-after 0`).
    expire_after: Option<Duration>,
    /// Each live row's fingerprint and when it last changed.
    seen: HashMap<AcceptKey, (Fingerprint, Instant)>,
    retired: HashMap<AcceptKey, Retired>,
    pub folded: FoldedRows,
    /// Rows deleted from the kernel map since start.
    pub expired: u64,
    /// Whether the map's being full was said already (agent.rs).
    pub full_told: bool,
}

impl AcceptWait {
    pub fn new(
        map: BpfHashMap<MapData, AcceptKey, AcceptStats>,
        expire_after: Option<Duration>,
    ) -> Self {
        AcceptWait {
            map,
            previous: HashMap::new(),
            previous_at: Instant::now(),
            warned: HashMap::new(),
            read_errors: 0,
            expire_after,
            seen: HashMap::new(),
            retired: HashMap::new(),
            folded: FoldedRows::default(),
            expired: 0,
            full_told: false,
        }
    }

    /// Deletes the rows whose counters have not changed for
    /// `--expire-after`, keeping their figures; returns how many went.
    ///
    /// Each is read once more and deleted only if still unchanged. An
    /// accept() that updates the row between that read and the delete is
    /// lost from the figures (a window of two syscalls, on a row idle for
    /// minutes), as for the drop totals (kernel/expire.rs).
    pub fn expire(&mut self, now: Instant) -> usize {
        let Some(after) = self.expire_after else {
            return 0;
        };
        // Fingerprints only: a full row is 4.4 kB, the table 4.5 MB.
        let mut live = Vec::new();
        for entry in self.map.iter() {
            match entry {
                Ok((key, stats)) => live.push((key, Fingerprint::of(&stats))),
                Err(_) => self.read_errors += 1,
            }
        }
        let present: HashSet<AcceptKey> = live.iter().map(|(k, _)| *k).collect();
        self.seen.retain(|k, _| present.contains(k));
        let mut idle = Vec::new();
        for (key, print) in live {
            let entry = self.seen.entry(key).or_insert((print, now));
            if entry.0 != print {
                *entry = (print, now);
            } else if now.duration_since(entry.1) >= after {
                idle.push(key);
            }
        }
        let mut gone = 0;
        for key in idle {
            let Ok(last) = self.map.get(&key, 0) else {
                continue;
            };
            let unchanged = self.seen.get(&key).map(|(p, _)| *p) == Some(Fingerprint::of(&last));
            if !unchanged || self.map.remove(&key).is_err() {
                continue;
            }
            self.seen.remove(&key);
            self.retire(key, &last);
            gone += 1;
        }
        gone
    }

    fn retire(&mut self, key: AcceptKey, last: &AcceptStats) {
        self.expired += 1;
        let room = self.retired.len() < RETIRED_ROWS;
        match self.retired.get_mut(&key) {
            Some(part) => part.absorb(last),
            None if room => {
                self.retired.insert(key, Retired::of(last));
            }
            None => {
                // Not kept: a re-created row starts afresh, so what was
                // reported of this key is forgotten too (its rates and
                // warnings then count from 0 again, never below).
                self.folded.rows += 1;
                self.folded.accepts += last.accepts;
                self.folded.waits += last.waits;
                self.previous.remove(&key);
                self.warned.remove(&key);
            }
        }
    }

    /// Near-full crossings since the previous poll.
    pub fn poll_near_full(&mut self) -> Vec<NearFull> {
        let mut out = Vec::new();
        // A retired row that is not live again has no new crossing: only
        // the live rows are read (with their retired parts, so that the
        // counts compare with what was warned before).
        // One row at a time: the table is 4.5 MB when full.
        for entry in self.map.iter() {
            let (key, stats) = match entry {
                Ok(row) => row,
                Err(_) => {
                    self.read_errors += 1;
                    continue;
                }
            };
            let stats = match self.retired.get(&key) {
                Some(part) => part.merged_with(&stats),
                None => stats,
            };
            let seen = self.warned.entry(key).or_insert(0);
            if stats.near_full_count > *seen {
                if let Some(listener) = RowListener::of(&key, &stats) {
                    out.push(NearFull {
                        listener,
                        timestamp_ns: stats.near_full_last_ns,
                        queue_len: stats.near_full_len,
                        queue_max: stats.near_full_max,
                        new_warnings: stats.near_full_count - *seen,
                    });
                }
                *seen = stats.near_full_count;
            }
        }
        out
    }

    /// Figures per listener for a summary: rates over the time since the
    /// previous call, the rest since the start. The rows are read one at
    /// a time (a row is 4.4 kB): reading the whole table first held up to
    /// 4.5 MB more at each summary, the agent's peak.
    pub fn figures(&mut self) -> Vec<(RowListener, AcceptFigures)> {
        let elapsed = self.previous_at.elapsed().as_secs_f64().max(1e-3);
        self.previous_at = Instant::now();
        let mut out = Vec::new();
        let mut read_errors = 0;
        let live = self.map.iter().filter_map(|entry| {
            // A row deleted between two reads: skip it, count it.
            entry.map_err(|_| read_errors += 1).ok()
        });
        each_with_retired(&self.retired, live, |key, stats| {
            let (accepts_before, arrivals_before) = self
                .previous
                .insert(key, (stats.accepts, stats.arrivals))
                .unwrap_or((0, 0));
            if let Some(listener) = RowListener::of(&key, stats) {
                let figures = figures_of(&key, stats, accepts_before, arrivals_before, elapsed);
                out.push((listener, figures));
            }
        });
        self.read_errors += read_errors;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Calls `each` with every listener's stats since start: each of the
/// `live` rows with its retired part added, then the retired rows not live
/// again; one row at a time.
fn each_with_retired(
    retired: &HashMap<AcceptKey, Retired>,
    live: impl Iterator<Item = (AcceptKey, AcceptStats)>,
    mut each: impl FnMut(AcceptKey, &AcceptStats),
) {
    let mut in_live = HashSet::new();
    for (key, stats) in live {
        match retired.get(&key) {
            Some(part) => {
                in_live.insert(key);
                each(key, &part.merged_with(&stats));
            }
            None => each(key, &stats),
        }
    }
    if retired.is_empty() {
        return;
    }
    let zero = zeroed_stats();
    for (key, part) in retired {
        if !in_live.contains(key) {
            each(*key, &part.merged_with(&zero));
        }
    }
}

fn zeroed_stats() -> AcceptStats {
    AcceptStats {
        arrivals: 0,
        accepts: 0,
        waits: 0,
        wait_sum_us: 0,
        wait_max_us: 0,
        listener_inode: 0,
        listener_addr: [0; 16],
        listener_family: 0,
        _pad0: 0,
        max_queue_seen: 0,
        queue_limit: 0,
        _pad1: 0,
        arrival_window_start_ns: 0,
        arrival_window_count: 0,
        arrival_window_peak: 0,
        accept_window_start_ns: 0,
        accept_window_count: 0,
        accept_window_peak: 0,
        near_full_count: 0,
        near_full_last_ns: 0,
        near_full_len: 0,
        near_full_max: 0,
        wait_buckets: [0; WAIT_BUCKETS],
    }
}

fn figures_of(
    key: &AcceptKey,
    stats: &AcceptStats,
    accepts_before: u64,
    arrivals_before: u64,
    elapsed_s: f64,
) -> AcceptFigures {
    let buckets = &stats.wait_buckets[..WAIT_BUCKETS];
    let ms = |us: f64| (us / 1000.0 * 1000.0).round() / 1000.0;
    let wait_ms = (|| {
        let max = stats.wait_max_us;
        Some(WaitMs {
            p50: ms(percentile_us(buckets, 0.50, max)?),
            p90: ms(percentile_us(buckets, 0.90, max)?),
            p99: ms(percentile_us(buckets, 0.99, max)?),
            max: ms(max as f64),
        })
    })();
    let accepts = stats.accepts.saturating_sub(accepts_before);
    let arrivals = stats.arrivals.saturating_sub(arrivals_before);
    let per_s = |count: u64| (count as f64 / elapsed_s * 10.0).round() / 10.0;
    AcceptFigures {
        wait_ms,
        accept_rate_per_s: per_s(accepts),
        arrival_rate_per_s: (key.kind == ACCEPT_KEY_TCP).then(|| per_s(arrivals)),
        peak_accept_rate_per_s: stats.accept_window_peak,
        peak_arrival_rate_per_s: stats.arrival_window_peak,
        accepts,
        arrivals,
        max_queue_seen: stats.max_queue_seen,
        queue_limit: stats.queue_limit,
        near_full_warnings: stats.near_full_count,
        wait_max_us: stats.wait_max_us,
        interval_s: elapsed_s,
    }
}

#[cfg(test)]
mod tests {
    use backlog_common::wait_bucket;

    use super::*;

    fn histogram(waits_us: &[u64]) -> Vec<u64> {
        let mut buckets = vec![0; WAIT_BUCKETS];
        for &us in waits_us {
            buckets[wait_bucket(us)] += 1;
        }
        buckets
    }

    /// The exact percentile by the same rank rule.
    fn exact(waits: &[u64], quantile: f64) -> f64 {
        let mut sorted = waits.to_vec();
        sorted.sort_unstable();
        let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1] as f64
    }

    #[test]
    fn percentiles_within_four_percent_of_exact() {
        // Waits of a server accepting one connection every 20 ms.
        let waits: Vec<u64> = (1..=40).map(|i| i * 20_000 + 137).collect();
        let buckets = histogram(&waits);
        let max = *waits.iter().max().unwrap();
        for q in [0.5, 0.9, 0.99] {
            let got = percentile_us(&buckets, q, max).unwrap();
            let want = exact(&waits, q);
            assert!(
                (got - want).abs() <= want * 0.04,
                "p{q}: {got} vs exact {want}"
            );
        }
        assert_eq!(percentile_us(&buckets, 1.0, max), Some(max as f64));
    }

    fn row_with(waits_us: &[u64], accepts: u64) -> AcceptStats {
        let mut stats = zeroed_stats();
        for &us in waits_us {
            stats.wait_buckets[wait_bucket(us)] += 1;
            stats.waits += 1;
            stats.wait_sum_us += us;
            stats.wait_max_us = stats.wait_max_us.max(us);
        }
        stats.accepts = accepts;
        stats
    }

    fn key(port: u16) -> AcceptKey {
        AcceptKey {
            socket_inode: 0,
            netns_inode: 1,
            port,
            kind: ACCEPT_KEY_TCP,
        }
    }

    /// A retired row added to the re-created one gives the figures of one
    /// row that saw every wait: counters summed, histogram merged, maxima
    /// kept; and twice retired, nothing is counted twice.
    #[test]
    fn retired_part_adds_back_exactly() {
        let before = [400_000, 300_000, 200_000];
        let after = [5_000, 10_000];
        let mut part = Retired::of(&row_with(&before, 3));
        let mut live = row_with(&after, 2);
        live.listener_family = backlog_common::AF_INET;
        let merged = part.merged_with(&live);
        let all: Vec<u64> = before.iter().chain(&after).copied().collect();
        assert_eq!(merged, {
            let mut one = row_with(&all, 5);
            one.listener_family = backlog_common::AF_INET;
            one
        });
        part.absorb(&live);
        let again = part.merged_with(&zeroed_stats());
        assert_eq!((again.accepts, again.waits), (5, 5));
        assert_eq!(again.wait_buckets, row_with(&all, 5).wait_buckets);
        // Sparse: only the buckets in use are kept.
        assert_eq!(part.buckets.len(), 5);
    }

    /// Retired rows not live again are still read; live ones get theirs.
    #[test]
    fn merge_keeps_retired_rows_that_are_not_live() {
        let mut retired = HashMap::new();
        retired.insert(key(1), Retired::of(&row_with(&[1000], 1)));
        retired.insert(key(2), Retired::of(&row_with(&[2000], 1)));
        let mut accepts: Vec<(u16, u64)> = Vec::new();
        let live = vec![(key(1), row_with(&[3000], 1))];
        each_with_retired(&retired, live.into_iter(), |k, s| {
            accepts.push((k.port, s.accepts))
        });
        accepts.sort_unstable();
        assert_eq!(accepts, vec![(1, 2), (2, 1)]);
    }

    #[test]
    fn small_waits_are_exact_and_empty_is_none() {
        let buckets = histogram(&[3, 3, 3, 7]);
        assert_eq!(percentile_us(&buckets, 0.5, 7), Some(3.0));
        assert_eq!(percentile_us(&buckets, 0.99, 7), Some(7.0));
        assert_eq!(percentile_us(&vec![0; WAIT_BUCKETS], 0.5, 0), None);
    }
}
