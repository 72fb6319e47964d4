//! Accept-queue wait, arrival and accept rates, and near-full warnings:
//! what `backlog-ebpf/src/accept.rs` keeps per listener in the
//! `ACCEPT_STATS` map, turned into percentiles and rates.
//!
//! Nothing comes through the ring buffer: the map is read at each summary,
//! and polled a few times a second for near-full crossings, which the
//! kernel already limits to one per listener per second.
//! (That limit is this module's own; it belongs on the per-listener token
//! bucket the flood-proof event path keeps, once there is one.)

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Instant,
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use backlog_common::{
    wait_bucket_range, AcceptKey, AcceptOffsets, AcceptStats, KernelOffsets, ACCEPT_KEY_TCP,
    ACCEPT_KEY_UNIX, AF_UNIX, WAIT_BUCKETS,
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
        tp_sys_exit_ret: field(&exit_accept4, "ret", 8)?,
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

/// The agent's handle on `ACCEPT_STATS`, with what it last reported.
pub struct AcceptWait {
    map: BpfHashMap<MapData, AcceptKey, AcceptStats>,
    /// Counters at the previous summary, for per-interval rates.
    previous: HashMap<AcceptKey, (u64, u64)>,
    previous_at: Instant,
    /// Near-full warnings already printed, per row.
    warned: HashMap<AcceptKey, u64>,
    pub read_errors: u64,
}

impl AcceptWait {
    pub fn new(map: BpfHashMap<MapData, AcceptKey, AcceptStats>) -> Self {
        AcceptWait {
            map,
            previous: HashMap::new(),
            previous_at: Instant::now(),
            warned: HashMap::new(),
            read_errors: 0,
        }
    }

    fn rows(&mut self) -> Vec<(AcceptKey, AcceptStats)> {
        let mut rows = Vec::new();
        for entry in self.map.iter() {
            match entry {
                Ok(row) => rows.push(row),
                // A row deleted between two reads: skip it, count it.
                Err(_) => self.read_errors += 1,
            }
        }
        rows
    }

    /// Near-full crossings since the previous poll.
    pub fn poll_near_full(&mut self) -> Vec<NearFull> {
        let mut out = Vec::new();
        for (key, stats) in self.rows() {
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
    /// previous call, the rest since the start.
    pub fn figures(&mut self) -> Vec<(RowListener, AcceptFigures)> {
        let elapsed = self.previous_at.elapsed().as_secs_f64().max(1e-3);
        self.previous_at = Instant::now();
        let mut out = Vec::new();
        for (key, stats) in self.rows() {
            let (accepts_before, arrivals_before) = self
                .previous
                .insert(key, (stats.accepts, stats.arrivals))
                .unwrap_or((0, 0));
            let Some(listener) = RowListener::of(&key, &stats) else {
                continue;
            };
            out.push((
                listener,
                figures_of(&key, &stats, accepts_before, arrivals_before, elapsed),
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
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

    #[test]
    fn small_waits_are_exact_and_empty_is_none() {
        let buckets = histogram(&[3, 3, 3, 7]);
        assert_eq!(percentile_us(&buckets, 0.5, 7), Some(3.0));
        assert_eq!(percentile_us(&buckets, 0.99, 7), Some(7.0));
        assert_eq!(percentile_us(&vec![0; WAIT_BUCKETS], 0.5, 0), None);
    }
}
