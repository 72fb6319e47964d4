//! The drain: ring-buffer records are decoded, enriched (holders through
//! the resolver, cgroup and container, namespace sysctls, UNIX listeners
//! by path) and turned into model values (model.rs), which a reporter
//! writes (report/). Holds the running per-listener totals that summaries
//! and metrics scrapes read, and makes events wait briefly for their
//! listener's holders so that a new listener's first lines name them.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    io::{self, Write},
    ops::Bound,
    path::Path,
    time::{Duration, Instant},
};

use backlog_common::DropKind;

use crate::{
    cli::OutputFormat,
    clock::MonotonicToWall,
    decode::{decode_record, DecodeError, Event, ListenCall, Record, UnixConnect},
    enrich::{
        accept_wait::{self, AcceptWait, NearFull, RowListener},
        advice::{self, Advice},
        attribution::Process,
        context::{self, CgroupResolver, NetnsSysctls},
        counted::{self, NetnsDelta},
        resolver::{Hint, Lookup, Resolver},
        unix_listeners::UnixListeners,
    },
    filter::RowFilter,
    flood::{Aggregate, FloodListener},
    model::{
        AggregateRecord, CountedNetns, DropEvent, ListenerAddr, ListenerContext, ListenerKey,
        ListenerReport, ListenerStats, NearFullWarning, Placement, Summary, UnixDrop,
        UnixListenerView,
    },
    report::{diagnosis, note, ReportOptions, Reporter},
};

/// How long a near-full warning waits for its listener's holders.
const NEAR_FULL_WAIT: Duration = Duration::from_millis(300);

/// Undecodable records are counted; only the first few are described, so
/// that a systematic problem cannot flood stderr.
const DECODE_ERRORS_SHOWN: u64 = 5;

/// Walks of /proc (off the drain path, see resolver.rs): at most one per
/// URGENT_WALK while events wait for an unknown listener's holders (and
/// never more than a quarter of a core's time), one per RELAXED_WALK to
/// refresh a known listener's holders.
const URGENT_WALK: Duration = Duration::from_millis(20);
const RELAXED_WALK: Duration = Duration::from_secs(5);
/// How long an event may wait for its listener's holders; the ring
/// buffer keeps draining meanwhile.
const ATTRIBUTION_WAIT: Duration = Duration::from_millis(100);
/// Beyond this many waiting events, new ones are written unattributed.
const MAX_WAITING: usize = 65536;

/// How long a listener's holders are reused before they are looked up
/// again (workers come and go); shorter while none is found.
const FRAGMENT_TTL: Duration = Duration::from_secs(5);
const FRAGMENT_TTL_UNATTRIBUTED: Duration = Duration::from_secs(1);
/// Bounds the fragment cache (one entry per listener seen recently).
const MAX_FRAGMENTS: usize = 16384;
/// Bounds the listen() calls kept (one per listener created while the
/// agent runs, kept while it may still drop; beyond it the oldest quarter
/// is forgotten) and the command lines (one per holder pid).
const MAX_LISTENS: usize = 16384;

struct ListenerFragment {
    context: ListenerContext,
    until: Instant,
}

pub struct Options {
    pub format: OutputFormat,
    pub show_cmdline: bool,
    /// The kernel's rate limit, named in aggregate records.
    pub max_events_per_sec: u32,
    /// `--near-full`, shown in the warning.
    pub near_full_percent: u32,
    /// `--client-timeout`, for the backlog advice.
    pub client_timeout: Duration,
}

pub struct Sink {
    options: Options,
    reporter: Reporter,
    clock: MonotonicToWall,
    pub resolver: Resolver,
    /// Events waiting (at most ATTRIBUTION_WAIT) for their listener's
    /// holders, in arrival order, with when they stop waiting.
    waiting: VecDeque<(Event, Instant)>,
    /// Socket inodes with events in `waiting`: their next events wait too,
    /// so that a listener's lines keep their order.
    waiting_inodes: HashMap<u64, usize>,
    /// listen() calls seen, by socket inode: who created a listener (even
    /// if it exited since) and the backlog it asked for.
    listens: HashMap<u64, ListenCall>,
    cgroups: Option<CgroupResolver>,
    host_netns: Option<u64>,
    own_netns: Option<u64>,
    cmdlines: HashMap<u32, Option<String>>,
    /// Sysctls of each listener's netns, read at its first drop: the
    /// namespace may be gone by the time the summary is written. Keyed by
    /// listener, not netns inode: a dead namespace's number is reused.
    netns_sysctls: HashMap<(u32, u64), NetnsSysctls>,
    unix_listeners: UnixListeners,
    /// UNIX listeners as their events found them, by (client netns, path):
    /// what an aggregate of the same path is attributed to.
    unix_seen: HashMap<(u32, String), (Option<u64>, Vec<Process>)>,
    /// Per listener (socket, netns, cgroup): its holders and placement,
    /// reused by every event for a while.
    fragments: HashMap<(u64, u32, u64), ListenerFragment>,
    /// When expired fragments are next forgotten (sweep_fragments).
    next_sweep: Instant,
    /// Listeners and kinds for which flood mode engaged (told once).
    flooded: HashSet<(FloodListener, DropKind)>,
    pub summary: Summary,
    /// Accept-queue figures, when the accept hooks are attached.
    pub accept: Option<AcceptWait>,
    /// The in-kernel filters, as they apply to accept-queue rows, which
    /// the kernel keeps before their listener is known (filter.rs).
    pub row_filter: RowFilter,
    /// Near-full warnings waiting for their listener's holders.
    near_full_waiting: Vec<(NearFull, Instant)>,
    /// When the summary's listeners may next be folded (agent.rs), after
    /// an attempt that found none idle enough.
    pub next_fold: Option<Instant>,
}

impl Sink {
    pub fn new(options: Options) -> Self {
        Sink::with_output(options, Box::new(io::stdout()))
    }

    /// A sink that writes its lines to `out` (the micro-benchmark writes
    /// to /dev/null through exactly the production path).
    pub fn with_output(options: Options, out: Box<dyn Write + Send>) -> Self {
        let cgroups = match CgroupResolver::system() {
            Ok(resolver) => Some(resolver),
            Err(err) => {
                note(format_args!("no cgroup paths: {err}"));
                None
            }
        };
        let reporter = Reporter::new(
            ReportOptions {
                format: options.format,
                max_events_per_sec: options.max_events_per_sec,
                near_full_percent: options.near_full_percent,
            },
            out,
        );
        let own_netns = context::netns_inode(Path::new("/proc/self/ns/net"));
        Sink {
            options,
            reporter,
            clock: MonotonicToWall::now(),
            resolver: Resolver::start("/proc", URGENT_WALK, RELAXED_WALK),
            waiting: VecDeque::new(),
            waiting_inodes: HashMap::new(),
            listens: HashMap::new(),
            cgroups,
            host_netns: context::host_netns_inode(),
            own_netns,
            cmdlines: HashMap::new(),
            netns_sysctls: HashMap::new(),
            unix_listeners: UnixListeners::new(own_netns),
            unix_seen: HashMap::new(),
            fragments: HashMap::new(),
            next_sweep: Instant::now() + FRAGMENT_TTL,
            flooded: HashSet::new(),
            summary: Summary::default(),
            accept: None,
            row_filter: RowFilter::default(),
            near_full_waiting: Vec::new(),
            next_fold: None,
        }
    }

    /// Handles every record in `records`, then flushes stdout once: lines
    /// reach a pipe promptly without a syscall per event under a flood.
    pub fn handle_batch<'a>(&mut self, records: impl Iterator<Item = &'a [u8]>) {
        for record in records {
            self.handle(record);
        }
        self.release_waiting();
        self.flush();
    }

    pub fn handle(&mut self, record: &[u8]) {
        match decode_record(record) {
            Ok(Record::Drop(event)) => self.drop_event(&event),
            Ok(Record::UnixConnect(event)) => self.unix_connect(&event),
            Ok(Record::Listen(call)) => {
                if call.socket_inode != 0 {
                    if self.listens.len() >= MAX_LISTENS {
                        forget_oldest_listens(&mut self.listens);
                    }
                    self.listens.insert(call.socket_inode, call);
                }
            }
            Err(err) => self.skip(&err),
        }
    }

    pub fn flush(&mut self) {
        self.reporter.flush();
    }

    /// Whether stdout was closed (the agent then stops).
    pub fn stdout_closed(&self) -> bool {
        self.reporter.closed
    }

    /// Where the resolver looks first for `inode`: the fd listen() was
    /// called on, in the calling process.
    fn hint(&self, inode: u64) -> Option<Hint> {
        self.listens.get(&inode).map(|call| Hint {
            pid: call.pid,
            fd: call.fd,
        })
    }

    /// Holders of socket `inode` as far as known now: from the last /proc
    /// walk, or else the process seen calling listen() on it. Never waits.
    fn processes(&mut self, inode: u64) -> Vec<Process> {
        let hint = self.hint(inode);
        let listen_known = hint.is_some();
        let mut processes = match self.resolver.lookup(inode, false, hint) {
            Lookup::Found(found) => found.to_vec(),
            Lookup::Pending | Lookup::NotFound => Vec::new(),
        };
        if processes.is_empty() && listen_known {
            if let Some(call) = self.listens.get(&inode) {
                // The process's name while it lives, as a /proc walk would
                // give it: the listen() record holds the calling thread's,
                // which may differ (a named thread).
                let comm = crate::enrich::attribution::process_comm(Path::new("/proc"), call.pid)
                    .unwrap_or_else(|| call.comm.clone());
                processes.push(Process {
                    pid: call.pid,
                    comm,
                    cmdline: None,
                });
            }
        }
        if self.options.show_cmdline {
            for process in &mut processes {
                process.cmdline = self
                    .cmdlines
                    .entry(process.pid)
                    .or_insert_with(|| context::cmdline(Path::new("/proc"), process.pid))
                    .clone();
            }
        }
        processes
    }

    /// Whether an event for socket `inode` should wait for a walk of
    /// /proc: its holders are unknown and a walk is coming. (A listen()
    /// call names only the process that called it, which may have handed
    /// the socket to workers since: it is the fallback after the wait.)
    fn must_wait(&mut self, inode: u64) -> bool {
        if self.waiting_inodes.contains_key(&inode) {
            return true;
        }
        if inode == 0 || self.waiting.len() >= MAX_WAITING {
            return false;
        }
        let hint = self.hint(inode);
        matches!(self.resolver.lookup(inode, true, hint), Lookup::Pending)
    }

    fn resolved(&mut self, inode: u64) -> bool {
        let hint = self.hint(inode);
        !matches!(self.resolver.lookup(inode, true, hint), Lookup::Pending)
    }

    /// Writes every waiting event (at exit). Events still waiting for
    /// their holders get the rest of their wait first, bounded by
    /// ATTRIBUTION_WAIT, so that stopping right after a burst does not
    /// print them without holders.
    pub fn release_all(&mut self) {
        let deadline = Instant::now() + ATTRIBUTION_WAIT;
        while !self.waiting.is_empty() && Instant::now() < deadline {
            self.release(false);
            if !self.waiting.is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.release(true);
        self.flush();
    }

    /// Whether events wait for their holders: only the next
    /// [`release_waiting`](Self::release_waiting) writes them, so the loop
    /// keeps reading while there are any.
    pub fn has_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Writes the waiting events whose holders are known by now, or whose
    /// wait is over; the others keep waiting (and keep their order). Runs
    /// after every drain, so it also forgets expired fragments.
    pub fn release_waiting(&mut self) {
        self.release(false);
        self.sweep_fragments(Instant::now());
    }

    /// Forgets the fragments past their time, at most once per
    /// FRAGMENT_TTL: an expired one is looked up again before use anyway,
    /// and 10,000 listeners that dropped once kept 2.5 MB here until the
    /// cache filled up.
    fn sweep_fragments(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + FRAGMENT_TTL;
        self.fragments.retain(|_, fragment| fragment.until > now);
        // The table keeps its size after a retain; give back most of it
        // once it is mostly empty.
        if self.fragments.capacity() > 4 * self.fragments.len() + 64 {
            self.fragments.shrink_to_fit();
        }
    }

    fn release(&mut self, all: bool) {
        if self.waiting.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut still = VecDeque::new();
        let mut blocked: HashSet<u64> = HashSet::new();
        while let Some((event, until)) = self.waiting.pop_front() {
            let inode = event.socket_inode;
            let ready = all || !blocked.contains(&inode) && (until <= now || self.resolved(inode));
            if ready {
                if let Some(n) = self.waiting_inodes.get_mut(&inode) {
                    *n -= 1;
                    if *n == 0 {
                        self.waiting_inodes.remove(&inode);
                    }
                }
                self.write_drop(&event);
            } else {
                blocked.insert(inode);
                still.push_back((event, until));
            }
        }
        self.waiting = still;
    }

    fn placement(&mut self, cgroup_id: u64, netns: u32) -> Placement {
        let cgroup = self
            .cgroups
            .as_mut()
            .and_then(|resolver| resolver.path(cgroup_id));
        Placement {
            container: cgroup.as_deref().and_then(context::workload),
            cgroup,
            host_netns: self.host_netns.map(|host| host == u64::from(netns)),
        }
    }

    fn drop_event(&mut self, event: &Event) {
        // The kernel's filter let this listener through.
        self.row_filter.admit(event.socket_inode);
        let key = (event.socket_inode, event.netns_inode, event.cgroup_id);
        let now = Instant::now();
        let fresh = self.fragments.get(&key).is_some_and(|f| f.until > now);
        if !fresh && self.must_wait(event.socket_inode) {
            *self.waiting_inodes.entry(event.socket_inode).or_default() += 1;
            self.waiting
                .push_back((event.clone(), now + ATTRIBUTION_WAIT));
            return;
        }
        self.write_drop(event);
    }

    fn write_drop(&mut self, event: &Event) {
        let key = (event.socket_inode, event.netns_inode, event.cgroup_id);
        let now = Instant::now();
        if self.fragments.get(&key).is_none_or(|f| f.until <= now) {
            let processes = self.processes(event.socket_inode);
            self.remember_sysctls(event.netns_inode, event.socket_inode, &processes);
            let placement = self.placement(event.cgroup_id, event.netns_inode);
            let ttl = if processes.is_empty() {
                FRAGMENT_TTL_UNATTRIBUTED
            } else {
                FRAGMENT_TTL
            };
            if self.fragments.len() >= MAX_FRAGMENTS {
                self.fragments.clear();
            }
            self.fragments.insert(
                key,
                ListenerFragment {
                    context: ListenerContext::new(processes, placement),
                    until: now + ttl,
                },
            );
        }
        let Some(fragment) = self.fragments.get(&key) else {
            return;
        };
        self.reporter.drop_event(&DropEvent {
            event,
            time: self.clock.wall(event.timestamp_ns),
            listener: &fragment.context,
        });
        self.summary.record(event, &fragment.context.processes);
    }

    fn unix_connect(&mut self, event: &UnixConnect) {
        let (netns, listener) = match event.path.as_deref() {
            Some(path) => {
                let kernel_netns = (event.netns_inode != 0).then_some(u64::from(event.netns_inode));
                self.unix_listeners
                    .for_client(event.pid, kernel_netns, path)
            }
            None => (None, None),
        };
        // The kernel's view of the client's namespace first: the client
        // may have exited before /proc could tell.
        let netns = match event.netns_inode {
            0 => netns.and_then(|n| u32::try_from(n).ok()),
            inode => Some(inode),
        };
        let view = UnixListenerView {
            netns,
            inode: listener.as_ref().map(|l| l.inode),
            queue: listener.as_ref().map(|l| (l.queue_len, l.queue_max)),
        };
        let processes = match &listener {
            Some(l) => self.processes(l.inode),
            None => Vec::new(),
        };
        self.reporter.unix_drop(&UnixDrop {
            event,
            time: self.clock.wall(event.timestamp_ns),
            listener: &view,
            processes: &processes,
        });
        self.unix_seen.insert(
            (
                view.netns.unwrap_or(0),
                event.path.clone().unwrap_or_else(|| "?".into()),
            ),
            (view.inode, processes.clone()),
        );
        self.summary.record_unix(
            view.netns.unwrap_or(0),
            event.path.as_deref().unwrap_or("?"),
            view.inode.unwrap_or(0),
            view.queue,
            &processes,
            event.timestamp_ns,
        );
    }

    /// Writes one aggregate record per listener and kind that went over
    /// the rate limit in the last interval, and says on stderr when flood
    /// mode engages for a listener.
    pub fn aggregates(&mut self, aggregates: &[Aggregate]) {
        for aggregate in aggregates {
            let (socket_inode, processes) = match &aggregate.listener {
                FloodListener::Inet { socket_inode, .. } => {
                    (Some(*socket_inode), self.processes(*socket_inode))
                }
                FloodListener::Unix { netns, path } => self
                    .unix_seen
                    .get(&(*netns, path.clone()))
                    .cloned()
                    .unwrap_or_default(),
            };
            if self
                .flooded
                .insert((aggregate.listener.clone(), aggregate.kind))
            {
                note(format_args!(
                    "flood mode: {} {} (netns {}): more than {} drops per second; \
                     further drops are counted and written as one aggregate per second",
                    aggregate.listener,
                    aggregate.kind.as_str(),
                    match &aggregate.listener {
                        FloodListener::Inet { netns, .. } | FloodListener::Unix { netns, .. } =>
                            *netns,
                    },
                    self.options.max_events_per_sec,
                ));
            }
            self.reporter.aggregate(&AggregateRecord {
                aggregate,
                socket_inode,
                processes: &processes,
            });
            self.summary
                .record_aggregate(aggregate, socket_inode.unwrap_or(0));
        }
        self.flush();
    }

    fn skip(&mut self, err: &DecodeError) {
        self.summary.losses.undecodable += 1;
        if self.summary.losses.undecodable <= DECODE_ERRORS_SHOWN {
            note(format_args!("skipped an undecodable record: {err}"));
        }
    }

    /// Reads the sysctls of `netns` once, from inside it. A process's
    /// threads may live in different namespaces, so the handle is the
    /// namespace file of a task (thread) of a holder that is in `netns`.
    fn remember_sysctls(&mut self, netns: u32, socket_inode: u64, processes: &[Process]) {
        if netns == 0 || self.netns_sysctls.contains_key(&(netns, socket_inode)) {
            return;
        }
        let sysctls = if self.own_netns == Some(u64::from(netns)) {
            Some(context::read_sysctls_here())
        } else {
            processes
                .iter()
                .filter_map(|p| context::task_in_netns(p.pid, netns))
                .find_map(|file| context::read_sysctls_in(&file).ok())
        };
        if let Some(sysctls) = sysctls {
            self.netns_sysctls.insert((netns, socket_inode), sysctls);
        }
    }

    /// The per-listener summary: a table and diagnoses on stderr, and with
    /// `--output json` one `listener_summary` line per listener on stdout.
    pub fn report(&mut self, heading: &str) {
        self.merge_accept_figures();
        let time = Reporter::summary_time();
        // The table needs only the running totals: it goes first, and
        // each listener's diagnosis follows it as soon as its report is
        // made, one listener at a time: its stats moved in and back,
        // never cloned, its key the only one copied. Every listener's
        // report at once took 9-12 MB more with 10,000 listeners, and
        // their diagnoses and keys, kept for after the table, 2 MB.
        let mut diagnoses = self.reporter.listener_summary_text(heading, &self.summary);
        let mut next = self.summary.listeners.keys().next().cloned();
        while let Some(key) = next {
            next = self
                .summary
                .listeners
                .range((Bound::Excluded(&key), Bound::Unbounded))
                .next()
                .map(|(key, _)| key.clone());
            let processes = self.summary.listeners[&key].processes.clone();
            self.remember_sysctls(key.netns, key.socket_inode, &processes);
            let stats = self
                .summary
                .listeners
                .get_mut(&key)
                .map(std::mem::take)
                .unwrap_or_default();
            let mut report = self.report_with(key, stats);
            report.diagnosis = Some(diagnosis::of(&report));
            self.reporter.listener_summary_line(&time, &report);
            diagnoses.write(&report.key.listener, report.diagnosis.as_deref());
            if let Some(stats) = self.summary.listeners.get_mut(&report.key) {
                *stats = report.stats;
            }
        }
        diagnoses.finish();
        self.reporter.folded_summary_line(&self.summary);
    }

    /// The model of one listener of the summary, as far as known now.
    fn listener_report(&mut self, key: ListenerKey) -> ListenerReport {
        let stats = self
            .summary
            .listeners
            .get(&key)
            .cloned()
            .unwrap_or_default();
        self.report_with(key, stats)
    }

    /// The model of one listener, around its `stats`.
    fn report_with(&mut self, key: ListenerKey, stats: ListenerStats) -> ListenerReport {
        ListenerReport {
            backlog_requested: self
                .listens
                .get(&key.socket_inode)
                .map(|call| call.backlog_requested),
            placement: self.placement(stats.cgroup_id, key.netns),
            // Unknown values stay unknown (None), never invented.
            sysctls: self
                .netns_sysctls
                .get(&(key.netns, key.socket_inode))
                .copied()
                .unwrap_or_default(),
            accept_queue_max_since_scrape: 0,
            diagnosis: None,
            key,
            stats,
        }
    }

    /// Every listener's model for a metrics scrape; takes the per-scrape
    /// maxima, so that each scrape shows the fullest queue since the last.
    pub fn scrape_reports(&mut self) -> Vec<ListenerReport> {
        let keys: Vec<ListenerKey> = self.summary.listeners.keys().cloned().collect();
        keys.into_iter()
            .map(|key| {
                let taken = self.summary.listeners.get_mut(&key).map_or(0, |stats| {
                    std::mem::take(&mut stats.max_accept_queue_since_scrape)
                });
                let mut report = self.listener_report(key);
                report.accept_queue_max_since_scrape = taken;
                report
            })
            .collect()
    }
}

/// Forgets the oldest quarter of `listens` (by the time of the call): the
/// map stays bounded however many listeners come and go, and what is
/// forgotten is the listeners least likely to still be open.
fn forget_oldest_listens(listens: &mut HashMap<u64, ListenCall>) {
    let mut times: Vec<u64> = listens.values().map(|call| call.timestamp_ns).collect();
    let quarter = times.len() / 4;
    if quarter == 0 {
        return;
    }
    // The quarter-th oldest time: it and every older one go (ties too).
    let (_, cut, _) = times.select_nth_unstable(quarter - 1);
    let cut = *cut;
    listens.retain(|_, call| call.timestamp_ns > cut);
}

impl Sink {
    /// Folds the summary's idle listeners beyond its cap (summary.rs's
    /// `evict_idle`) and forgets what the sink kept per listener for
    /// them; returns the folded keys, whose kernel rows the caller
    /// forgets too (their counts are in the folded totals now).
    pub fn evict_idle_listeners(
        &mut self,
        idle: Duration,
        live: impl Fn(&ListenerKey) -> bool,
    ) -> Vec<ListenerKey> {
        let now = crate::clock::monotonic_ns();
        let idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
        let evicted = self.summary.evict_idle(now, idle_ns, live);
        for key in &evicted {
            self.netns_sysctls.remove(&(key.netns, key.socket_inode));
            self.listens.remove(&key.socket_inode);
            if let ListenerAddr::Unix(path) = &key.listener {
                self.unix_seen.remove(&(key.netns, path.clone()));
            }
        }
        if !evicted.is_empty() {
            let gone: std::collections::BTreeSet<&ListenerKey> = evicted.iter().collect();
            self.flooded.retain(|(listener, _)| match listener {
                FloodListener::Inet {
                    netns,
                    socket_inode,
                    addr,
                } => !gone.contains(&ListenerKey {
                    netns: *netns,
                    listener: ListenerAddr::Inet(*addr),
                    socket_inode: *socket_inode,
                }),
                FloodListener::Unix { netns, path } => !evicted
                    .iter()
                    .any(|k| k.netns == *netns && k.listener == ListenerAddr::Unix(path.clone())),
            });
        }
        // listen() calls of listeners that never dropped: not in the
        // summary, so bounded here, keeping those the summary names.
        if self.listens.len() > MAX_LISTENS {
            let named: HashSet<u64> = self
                .summary
                .listeners
                .keys()
                .map(|k| k.socket_inode)
                .collect();
            self.listens.retain(|inode, _| named.contains(inode));
        }
        if self.cmdlines.len() > MAX_LISTENS {
            self.cmdlines.clear();
        }
        evicted
    }
}

// ---- accept-queue wait, rates, advice and near-full warnings ----
impl Sink {
    /// Prints the near-full crossings the kernel recorded since the last
    /// poll, one line each.
    /// Reads new near-full crossings and writes the warnings whose
    /// listener's holders are known. Attribution runs off this thread
    /// (resolver.rs): a warning about a listener being resolved waits for
    /// it, at most NEAR_FULL_WAIT, like drop events do (`force` writes
    /// everything, at exit).
    pub fn poll_near_full(&mut self, force: bool) {
        let Some(accept) = self.accept.as_mut() else {
            return;
        };
        let mut crossings = accept.poll_near_full();
        crossings.retain(|crossing| self.row_filter.wants(&crossing.listener));
        let now = Instant::now();
        self.near_full_waiting
            .extend(crossings.into_iter().map(|c| (c, now + NEAR_FULL_WAIT)));
        let waiting = std::mem::take(&mut self.near_full_waiting);
        let mut written = false;
        for (crossing, until) in waiting {
            let (_, inode) = crossing.listener.netns_and_inode();
            let hint = self.hint(inode);
            let pending =
                inode != 0 && matches!(self.resolver.lookup(inode, true, hint), Lookup::Pending);
            if pending && !force && until > now {
                self.near_full_waiting.push((crossing, until));
                continue;
            }
            self.near_full(&crossing);
            written = true;
        }
        if written {
            self.flush();
        }
    }

    fn near_full(&mut self, crossing: &NearFull) {
        let (netns, inode) = crossing.listener.netns_and_inode();
        let processes = if inode != 0 {
            self.processes(inode)
        } else {
            Vec::new()
        };
        self.reporter.near_full(&NearFullWarning {
            crossing,
            time: self.clock.wall(crossing.timestamp_ns),
            netns,
            socket_inode: inode,
            processes: &processes,
        });
    }

    /// Attaches the accept figures and advice to the summary's listeners,
    /// adding listeners that dropped nothing but made connections wait or
    /// got a near-full warning.
    fn merge_accept_figures(&mut self) {
        let Some(accept) = self.accept.as_mut() else {
            return;
        };
        let rows: Vec<(RowListener, accept_wait::AcceptFigures)> = accept
            .figures()
            .into_iter()
            .filter(|(row, _)| self.row_filter.wants(row))
            .collect();
        // Each listener looks its row up, once: a scan of every listener
        // per row was 100 million comparisons at each summary with 10,000
        // listeners. Rows are unique per (netns, port) and per UNIX
        // socket inode (the map's key), so one row per entry.
        let index: HashMap<RowMatch, usize> = rows
            .iter()
            .enumerate()
            .filter_map(|(i, (row, _))| Some((RowMatch::of_row(row)?, i)))
            .collect();
        let mut matched = vec![false; rows.len()];
        for (key, stats) in self.summary.listeners.iter_mut() {
            if let Some(&i) = RowMatch::of_listener(key).and_then(|m| index.get(&m)) {
                stats.accept = Some(Box::new(rows[i].1.clone()));
                matched[i] = true;
            }
        }
        drop(index);
        for ((row, figures), matched) in rows.into_iter().zip(matched) {
            // Over the summary's cap, a listener idle this interval is not
            // brought back: it would be folded again at once (summary.rs).
            let idle = figures.accepts == 0 && figures.arrivals == 0;
            if matched
                || !figures.worth_reporting()
                || (idle && self.summary.listeners.len() >= crate::model::summary::SUMMARY_CAP)
            {
                continue;
            }
            let (netns, socket_inode) = row.netns_and_inode();
            let processes = if socket_inode != 0 {
                self.processes(socket_inode)
            } else {
                Vec::new()
            };
            let listener = match row.socket_addr() {
                Some(addr) => ListenerAddr::Inet(addr),
                None => ListenerAddr::Unix(
                    self.unix_listeners
                        .path_of(netns, socket_inode, &processes)
                        .unwrap_or_else(|| format!("socket:[{socket_inode}]")),
                ),
            };
            let key = ListenerKey {
                netns,
                listener,
                socket_inode,
            };
            let stats = self.summary.listeners.entry(key).or_default();
            stats.processes = processes;
            if !idle {
                stats.last_active_ns = crate::clock::monotonic_ns();
            }
            stats.accept = Some(Box::new(figures));
        }
        let timeout = self.options.client_timeout.as_secs_f64();
        for stats in self.summary.listeners.values_mut() {
            let Some(figures) = &stats.accept else {
                continue;
            };
            stats.max_accept_queue_seen = stats.max_accept_queue_seen.max(figures.max_queue_seen);
            if stats.accept_queue_limit == 0 {
                stats.accept_queue_limit = figures.queue_limit;
            }
            stats.advice = advice_for(stats, figures, timeout).map(Box::new);
        }
    }
}

/// What ties a summary listener to its accept-queue row: the port in a
/// netns for TCP (every address of the port shares the row), the socket
/// inode for UNIX.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum RowMatch {
    Tcp { netns: u32, port: u16 },
    Unix { socket_inode: u64 },
}

impl RowMatch {
    fn of_row(row: &RowListener) -> Option<RowMatch> {
        match *row {
            RowListener::Tcp { netns, port, .. } => Some(RowMatch::Tcp { netns, port }),
            RowListener::Unix { socket_inode, .. } => {
                (socket_inode != 0).then_some(RowMatch::Unix { socket_inode })
            }
        }
    }

    fn of_listener(key: &ListenerKey) -> Option<RowMatch> {
        match &key.listener {
            ListenerAddr::Inet(addr) => Some(RowMatch::Tcp {
                netns: key.netns,
                port: addr.port(),
            }),
            ListenerAddr::Unix(_) => (key.socket_inode != 0).then_some(RowMatch::Unix {
                socket_inode: key.socket_inode,
            }),
        }
    }
}

/// The advice needs a measured accept rate or wait; without them it would
/// be a guess.
fn advice_for(
    stats: &ListenerStats,
    figures: &accept_wait::AcceptFigures,
    timeout_s: f64,
) -> Option<Advice> {
    if figures.accepts == 0 && figures.wait_ms.is_none() {
        return None;
    }
    let drops: u64 = stats
        .kind_counts()
        .iter()
        .filter(|(kind, _)| {
            matches!(
                kind,
                DropKind::AckDroppedAcceptQueueFull
                    | DropKind::SynDroppedAcceptQueueFull
                    | DropKind::UnixConnectBacklogFull
            )
        })
        .map(|(_, count)| count)
        .sum();
    Some(advice::advise(&advice::Measured {
        backlog_limit: stats.accept_queue_limit,
        peak_arrival_per_s: figures.peak_arrival_rate_per_s as f64,
        peak_accept_per_s: figures.peak_accept_rate_per_s as f64,
        // Offered load: completed handshakes (accepts where they are not
        // seen: UNIX) plus the connections turned away.
        arrival_per_s: figures
            .arrival_rate_per_s
            .unwrap_or(figures.accept_rate_per_s)
            + drops as f64 / figures.interval_s.max(1e-3),
        accept_per_s: figures.accept_rate_per_s,
        longest_wait_s: figures.wait_max_us as f64 / 1e6,
        max_queue_seen: stats.max_accept_queue_seen,
        drops,
        client_timeout_s: timeout_s,
        interval_s: figures.interval_s,
    }))
}

impl Sink {
    /// Drops counted by the kernel during the run in namespaces where they
    /// could not be traced: per-kind totals derived from TcpExt, and each
    /// listener's sk_drops growth.
    pub fn report_counted(&mut self, deltas: &[NetnsDelta]) {
        let namespaces: Vec<CountedNetns> = deltas
            .iter()
            .map(|delta| {
                let [(_, syn_queue_full), (_, cookies), (_, accept_queue_full)] =
                    counted::kind_counts(delta, self.traced_acks(delta.netns));
                CountedNetns {
                    delta,
                    syn_dropped_syn_queue_full: syn_queue_full,
                    syn_cookie_sent: cookies,
                    syn_dropped_accept_queue_full: accept_queue_full,
                    host_netns: self.host_netns.map(|host| host == delta.netns),
                }
            })
            .collect();
        self.reporter.counted(&namespaces);
    }
}

impl Sink {
    /// Final-ACK overflows traced in `netns`: the part of ListenOverflows
    /// that was not a SYN.
    pub fn traced_acks(&self, netns: u64) -> u64 {
        self.summary
            .listeners
            .iter()
            .filter(|(key, _)| u64::from(key.netns) == netns)
            .map(|(_, stats)| stats.count(DropKind::AckDroppedAcceptQueueFull))
            .sum::<u64>()
            + u32::try_from(netns)
                .ok()
                .and_then(|netns| self.summary.folded.acks_by_netns.get(&netns))
                .copied()
                .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen_call(socket_inode: u64, timestamp_ns: u64) -> ListenCall {
        ListenCall {
            timestamp_ns,
            socket_inode,
            pid: 1,
            comm: "nginx".into(),
            netns_inode: 1,
            backlog_requested: 511,
            backlog_applied: 511,
            family: 2,
            port: 80,
            fd: 3,
        }
    }

    #[test]
    fn the_oldest_listen_calls_are_forgotten_first() {
        // Inodes and times in opposite orders: the time decides.
        let mut listens: HashMap<u64, ListenCall> = (0..100)
            .map(|i| (1000 - i, listen_call(1000 - i, i)))
            .collect();
        forget_oldest_listens(&mut listens);
        assert_eq!(listens.len(), 75);
        assert!(listens.values().all(|call| call.timestamp_ns >= 25));
        let mut few: HashMap<u64, ListenCall> = [(1, listen_call(1, 5))].into();
        forget_oldest_listens(&mut few);
        assert_eq!(few.len(), 1);
    }

    fn fragment(until: Instant) -> ListenerFragment {
        ListenerFragment {
            context: ListenerContext::new(Vec::new(), Placement::default()),
            until,
        }
    }

    #[test]
    fn expired_fragments_are_swept_at_most_once_per_ttl() {
        let mut sink = Sink::with_output(
            Options {
                format: OutputFormat::Json,
                show_cmdline: false,
                max_events_per_sec: 100,
                near_full_percent: 80,
                client_timeout: Duration::from_secs(10),
            },
            Box::new(io::sink()),
        );
        let now = Instant::now();
        sink.fragments.insert((1, 1, 0), fragment(now));
        sink.fragments
            .insert((2, 1, 0), fragment(now + FRAGMENT_TTL));
        // Not yet time to sweep.
        sink.sweep_fragments(now);
        assert_eq!(sink.fragments.len(), 2);
        let later = sink.next_sweep;
        sink.sweep_fragments(later);
        assert_eq!(sink.fragments.len(), 1);
        assert!(sink.fragments.contains_key(&(2, 1, 0)));
        // Swept just now: the next sweep waits another FRAGMENT_TTL.
        sink.fragments.insert((3, 1, 0), fragment(later));
        sink.sweep_fragments(later + Duration::from_millis(1));
        assert_eq!(sink.fragments.len(), 2);
    }
}
