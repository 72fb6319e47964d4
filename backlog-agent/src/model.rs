//! The one output model: what a drop, an aggregate, a near-full warning
//! and a listener's summary are once enrichment (enrich/) has found their
//! holders, placement and namespace sysctls. The sink builds these values;
//! every renderer in report/ (text, JSON lines, metrics) reads only them,
//! so a format never reaches back into the sink or the kernel.
//!
//! Event values borrow what they describe: under a flood an event is
//! built and rendered a million times a second, and must not allocate.

pub mod summary;

use std::{cell::OnceCell, time::SystemTime};

use serde::Serialize;

use crate::{
    decode::{self, UnixConnect},
    enrich::{
        accept_wait::NearFull,
        attribution::Process,
        context::{NetnsSysctls, Workload},
        counted::NetnsDelta,
    },
    flood::Aggregate,
};
pub use summary::{ListenerAddr, ListenerKey, ListenerStats, Summary};

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

/// A listener's holders and place as enrichment found them, shared by
/// every event of that listener for a while (holders change rarely).
#[derive(Debug)]
pub struct ListenerContext {
    pub processes: Vec<Process>,
    pub placement: Placement,
    /// The JSON renderer's rendering of the two above, made at the first
    /// JSON event and reused by the next ones: it is the costly part of an
    /// event's line (report/json.rs).
    json: OnceCell<String>,
}

impl ListenerContext {
    pub fn new(processes: Vec<Process>, placement: Placement) -> Self {
        ListenerContext {
            processes,
            placement,
            json: OnceCell::new(),
        }
    }

    /// The cached rendering of this context, made by `render` once.
    pub fn rendered(&self, render: impl FnOnce(&ListenerContext) -> String) -> &str {
        self.json.get_or_init(|| render(self))
    }
}

/// One dropped TCP connection (SYN or final ACK), enriched.
pub struct DropEvent<'a> {
    pub event: &'a decode::Event,
    pub time: SystemTime,
    pub listener: &'a ListenerContext,
}

/// What is known of the UNIX listener a connect() failed on.
pub struct UnixListenerView {
    pub netns: Option<u32>,
    pub inode: Option<u64>,
    pub queue: Option<(u32, u32)>,
}

/// One UNIX connect() that got EAGAIN, enriched.
pub struct UnixDrop<'a> {
    pub event: &'a UnixConnect,
    pub time: SystemTime,
    pub listener: &'a UnixListenerView,
    pub processes: &'a [Process],
}

/// One aggregate record (flood mode): the drops of one listener and kind
/// over the rate limit in one window, with the listener's holders.
pub struct AggregateRecord<'a> {
    pub aggregate: &'a Aggregate,
    pub socket_inode: Option<u64>,
    pub processes: &'a [Process],
}

/// A listener's accept queue crossed `--near-full`, enriched.
pub struct NearFullWarning<'a> {
    pub crossing: &'a NearFull,
    pub time: SystemTime,
    pub netns: u32,
    /// 0 when the kernel's row did not name the socket.
    pub socket_inode: u64,
    pub processes: &'a [Process],
}

/// Everything known of one listener at a summary or a scrape: its running
/// totals and what enrichment adds to them.
#[derive(Clone, Debug)]
pub struct ListenerReport {
    pub key: ListenerKey,
    pub stats: ListenerStats,
    /// What the process passed to listen(), when the call was seen.
    pub backlog_requested: Option<i32>,
    pub placement: Placement,
    /// The listener's namespace sysctls, read at its first drop; unknown
    /// values stay None, never invented.
    pub sysctls: NetnsSysctls,
    /// The fullest accept queue a drop showed since the previous scrape
    /// (taken, so reset, by each scrape; 0 in summaries).
    pub accept_queue_max_since_scrape: u32,
    /// The one-line diagnosis (report/diagnosis.rs); made for summaries,
    /// None at scrapes, which do not show it.
    pub diagnosis: Option<String>,
}

/// Drops the kernel counted in one namespace during the run where they
/// could not be traced (enrich/counted.rs), by kind.
pub struct CountedNetns<'a> {
    pub delta: &'a NetnsDelta,
    pub syn_dropped_syn_queue_full: u64,
    pub syn_cookie_sent: u64,
    pub syn_dropped_accept_queue_full: u64,
    pub host_netns: Option<bool>,
}
