//! From ring-buffer records to what the user sees: event lines on stdout,
//! attributed to processes, cgroup and netns, and the per-listener summary
//! with a diagnosis at `--interval` and at exit.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    io::{self, BufWriter, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use backlog_common::DropKind;
use serde::Serialize;

use crate::{
    accept_wait::{self, AcceptWait, NearFull, RowListener},
    advice::{self, Advice},
    attribution::Process,
    cli::OutputFormat,
    clock::{self, MonotonicToWall, Rfc3339Cache},
    context::{self, CgroupResolver, NetnsSysctls},
    counted::{self, NetnsDelta},
    decode::{decode_record, DecodeError, Event, ListenCall, Record, UnixConnect},
    diagnosis::{self, diagnose, ListenerFacts},
    filter::RowFilter,
    flood::{Aggregate, FloodListener},
    output::{self, Placement, UnixListenerView},
    resolver::{Hint, Lookup, Resolver},
    sockdiag::{self, UnixListenerInfo},
    summary::{ListenerAddr, ListenerKey, ListenerStats, Summary},
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

/// UNIX listeners are looked up by path with a sock_diag dump; under a
/// burst of EAGAINs one dump serves a while.
const UNIX_DUMP_TTL: Duration = Duration::from_millis(200);

const TOP_PEERS: usize = 5;

const OUT_BUFFER: usize = 256 * 1024;

/// How long a listener's holders are reused before they are looked up
/// again (workers come and go); shorter while none is found.
const FRAGMENT_TTL: Duration = Duration::from_secs(5);
const FRAGMENT_TTL_UNATTRIBUTED: Duration = Duration::from_secs(1);
/// Bounds the fragment cache (one entry per listener seen recently).
const MAX_FRAGMENTS: usize = 16384;

struct ListenerFragment {
    processes: Vec<Process>,
    json: String,
    until: Instant,
}

fn note(message: impl std::fmt::Display) {
    eprintln!("backlog-agent: {message}");
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
    out: BufWriter<Box<dyn Write + Send>>,
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
    unix_dumps: HashMap<u64, (Instant, Vec<UnixListenerInfo>)>,
    /// UNIX listeners as their events found them, by (client netns, path):
    /// what an aggregate of the same path is attributed to.
    unix_seen: HashMap<(u32, String), (Option<u64>, Vec<Process>)>,
    /// Per listener (socket, netns, cgroup): its holders and the JSON
    /// fragment they render to, reused by every event for a while.
    fragments: HashMap<(u64, u32, u64), ListenerFragment>,
    /// The JSON line being written, reused.
    line: Vec<u8>,
    times: Rfc3339Cache,
    /// Listeners and kinds for which flood mode engaged (told once).
    flooded: HashSet<(FloodListener, DropKind)>,
    pub summary: Summary,
    pub stdout_closed: bool,
    /// Accept-queue figures, when the accept hooks are attached.
    pub accept: Option<AcceptWait>,
    /// The in-kernel filters, as they apply to accept-queue rows, which
    /// the kernel keeps before their listener is known (filter.rs).
    pub row_filter: RowFilter,
    /// Near-full warnings waiting for their listener's holders.
    near_full_waiting: Vec<(NearFull, Instant)>,
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
        Sink {
            options,
            // Large enough that a flood is written in few syscalls.
            out: BufWriter::with_capacity(OUT_BUFFER, out),
            clock: MonotonicToWall::now(),
            resolver: Resolver::start("/proc", URGENT_WALK, RELAXED_WALK),
            waiting: VecDeque::new(),
            waiting_inodes: HashMap::new(),
            listens: HashMap::new(),
            cgroups,
            host_netns: context::host_netns_inode(),
            own_netns: context::netns_inode(Path::new("/proc/self/ns/net")),
            cmdlines: HashMap::new(),
            netns_sysctls: HashMap::new(),
            unix_dumps: HashMap::new(),
            unix_seen: HashMap::new(),
            fragments: HashMap::new(),
            line: Vec::with_capacity(1024),
            times: Rfc3339Cache::default(),
            flooded: HashSet::new(),
            summary: Summary::default(),
            stdout_closed: false,
            accept: None,
            row_filter: RowFilter::default(),
            near_full_waiting: Vec::new(),
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
                    self.listens.insert(call.socket_inode, call);
                }
            }
            Err(err) => self.skip(&err),
        }
    }

    pub fn flush(&mut self) {
        if !self.stdout_closed && self.out.flush().is_err() {
            self.stdout_closed = true;
        }
    }

    fn write_line(&mut self, line: &str) {
        if !self.stdout_closed && writeln!(self.out, "{line}").is_err() {
            self.stdout_closed = true;
        }
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
                let comm = crate::attribution::process_comm(Path::new("/proc"), call.pid)
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

    /// Writes the waiting events whose holders are known by now, or whose
    /// wait is over; the others keep waiting (and keep their order).
    pub fn release_waiting(&mut self) {
        self.release(false);
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
                    json: output::json_listener_fragment(&processes, &placement),
                    processes,
                    until: now + ttl,
                },
            );
        }
        let Some(fragment) = self.fragments.get(&key) else {
            return;
        };
        let time = self.clock.wall(event.timestamp_ns);
        self.line.clear();
        match self.options.format {
            OutputFormat::Text => {
                self.line.extend_from_slice(
                    output::text_line(event, time, &fragment.processes).as_bytes(),
                );
                self.line.push(b'\n');
            }
            OutputFormat::Json => output::write_json_event(
                &mut self.line,
                event,
                self.times.format(time),
                &fragment.json,
            ),
            // --output none (metrics only): nothing on stdout.
            OutputFormat::None => {}
        }
        if !self.stdout_closed && self.out.write_all(&self.line).is_err() {
            self.stdout_closed = true;
        }
        self.summary.record(event, &fragment.processes);
    }

    fn unix_connect(&mut self, event: &UnixConnect) {
        let (netns, listener) = match event.path.as_deref() {
            Some(path) => self.unix_listener(event.pid, path),
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
        let time = self.clock.wall(event.timestamp_ns);
        let line = match self.options.format {
            OutputFormat::Text => Some(output::unix_text_line(event, time, &view, &processes)),
            OutputFormat::Json => Some(output::unix_json_line(event, time, &view, &processes)),
            OutputFormat::None => None,
        };
        if let Some(line) = line {
            self.write_line(&line);
        }
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
        );
    }

    /// The UNIX listener at `path` as seen from the client's network
    /// namespace (abstract names are per namespace), with its netns inode.
    fn unix_listener(
        &mut self,
        client_pid: u32,
        path: &str,
    ) -> (Option<u64>, Option<UnixListenerInfo>) {
        let netns_file = PathBuf::from(format!("/proc/{client_pid}/ns/net"));
        // A client that exited already: look in our own namespace.
        let (netns, netns_file) = match context::netns_inode(&netns_file) {
            Some(inode) => (Some(inode), Some(netns_file)),
            None => (self.own_netns, None),
        };
        let key = netns.unwrap_or(0);
        let fresh = |dump: &(Instant, Vec<UnixListenerInfo>)| {
            dump.0.elapsed() < UNIX_DUMP_TTL
                && dump.1.iter().any(|l| l.path.as_deref() == Some(path))
        };
        if !self.unix_dumps.get(&key).is_some_and(fresh) {
            let dump = match &netns_file {
                Some(file) if netns != self.own_netns => {
                    sockdiag::in_netns(file, sockdiag::unix_listeners).and_then(|r| r)
                }
                _ => sockdiag::unix_listeners(),
            };
            match dump {
                Ok(listeners) => {
                    self.unix_dumps.insert(key, (Instant::now(), listeners));
                }
                Err(err) => note(format_args!("cannot list UNIX listeners: {err}")),
            }
        }
        let found = self
            .unix_dumps
            .get(&key)
            .and_then(|(_, listeners)| listeners.iter().find(|l| l.path.as_deref() == Some(path)))
            .cloned();
        (netns, found)
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
            let line = match self.options.format {
                OutputFormat::Text => Some(output::aggregate_text_line(aggregate, &processes)),
                OutputFormat::Json => Some(output::aggregate_json_line(
                    aggregate,
                    socket_inode,
                    &processes,
                    self.options.max_events_per_sec,
                )),
                OutputFormat::None => None,
            };
            if let Some(line) = line {
                self.write_line(&line);
            }
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
                .filter_map(|p| task_in_netns(p.pid, netns))
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
        let mut text = format!("{heading}\n{}", self.summary.render());
        let listeners: Vec<(ListenerKey, ListenerStats)> = self
            .summary
            .listeners
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let time = clock::rfc3339(SystemTime::now());
        for (key, stats) in &listeners {
            self.remember_sysctls(key.netns, key.socket_inode, &stats.processes);
            // Unknown values stay unknown (None), never invented.
            let sysctls = self
                .netns_sysctls
                .get(&(key.netns, key.socket_inode))
                .copied()
                .unwrap_or_default();
            let requested = self
                .listens
                .get(&key.socket_inode)
                .map(|call| call.backlog_requested);
            let facts = ListenerFacts {
                kind_counts: stats
                    .kind_counts()
                    .into_iter()
                    .map(|(kind, count)| (kind.as_str().to_owned(), count))
                    .collect(),
                // listen() takes an int: -1 reads as u32::MAX, which the
                // diagnosis knows.
                backlog_requested: requested.map(|r| r as u32),
                backlog_limit: stats.accept_queue_limit,
                somaxconn: sysctls.somaxconn,
                tcp_max_syn_backlog: sysctls.tcp_max_syn_backlog,
                syncookies: sysctls.tcp_syncookies,
                abort_on_overflow: sysctls.tcp_abort_on_overflow,
                netns: u64::from(key.netns),
                process_name: stats.processes.first().map(|p| p.comm.clone()),
                max_accept_queue_seen: stats.max_accept_queue_seen,
                host_netns: self.host_netns.map(|host| host == u64::from(key.netns)),
                holder_pid: stats.processes.first().map(|p| p.pid),
                runtime: self.runtime(stats.cgroup_id, key.netns),
            };
            let drops = diagnose(&facts);
            let diagnosis = match (&stats.accept, &stats.advice) {
                (Some(figures), advice) if figures.worth_reporting() || advice.is_some() => {
                    let note = diagnosis::accept_queue_note(&facts, figures, advice.as_ref());
                    if facts.kind_counts.iter().any(|(_, count)| *count > 0) {
                        format!("{drops}; {note}")
                    } else {
                        note
                    }
                }
                _ => drops,
            };
            text.push_str(&format!("  {}: {diagnosis}\n", key.listener));
            if self.options.format == OutputFormat::Json {
                let placement = self.placement(stats.cgroup_id, key.netns);
                let line =
                    summary_json(&time, key, stats, &facts, requested, &placement, &diagnosis);
                self.write_line(&line);
            }
        }
        self.flush();
        eprint!("{text}");
    }
}

// ---- accept-queue wait, rates, advice and near-full warnings ----
impl Sink {
    /// "docker", "podman", "kubernetes" (a container of a pod), ... for the
    /// somaxconn fix of a listener outside the host's netns.
    fn runtime(&mut self, cgroup_id: u64, netns: u32) -> Option<String> {
        let container = self.placement(cgroup_id, netns).container?;
        Some(if container.pod.is_some() {
            "kubernetes".to_owned()
        } else {
            container.runtime.to_owned()
        })
    }

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
        let time = self.clock.wall(crossing.timestamp_ns);
        let line = match self.options.format {
            OutputFormat::Text => accept_wait::near_full_text(
                crossing,
                time,
                self.options.near_full_percent,
                netns,
                &processes,
            ),
            OutputFormat::Json => accept_wait::near_full_json(
                crossing,
                time,
                self.options.near_full_percent,
                netns,
                inode,
                &processes,
            ),
            // --output none (metrics only): nothing on stdout.
            OutputFormat::None => return,
        };
        self.write_line(&line);
    }

    /// Attaches the accept figures and advice to the summary's listeners,
    /// adding listeners that dropped nothing but made connections wait or
    /// got a near-full warning.
    fn merge_accept_figures(&mut self) {
        let Some(accept) = self.accept.as_mut() else {
            return;
        };
        let rows = accept.figures();
        for (row, figures) in rows {
            if !self.row_filter.wants(&row) {
                continue;
            }
            let mut matched = false;
            for (key, stats) in self.summary.listeners.iter_mut() {
                let same = match (&row, &key.listener) {
                    (RowListener::Tcp { netns, port, .. }, ListenerAddr::Inet(addr)) => {
                        *netns == key.netns && *port == addr.port()
                    }
                    (RowListener::Unix { socket_inode, .. }, ListenerAddr::Unix(_)) => {
                        *socket_inode != 0 && *socket_inode == key.socket_inode
                    }
                    _ => false,
                };
                if same {
                    stats.accept = Some(figures.clone());
                    matched = true;
                }
            }
            if matched || !figures.worth_reporting() {
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
                    self.unix_path(netns, socket_inode, &processes)
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
            stats.accept = Some(figures);
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
            stats.advice = advice_for(stats, figures, timeout);
        }
    }
}

impl Sink {
    /// The path of the UNIX listener with socket `inode`, from a sock_diag
    /// dump of its namespace (entered through a holder's thread).
    fn unix_path(&mut self, netns: u32, inode: u64, processes: &[Process]) -> Option<String> {
        let dump = if self.own_netns == Some(u64::from(netns)) {
            sockdiag::unix_listeners().ok()?
        } else {
            let file = processes.iter().find_map(|p| task_in_netns(p.pid, netns))?;
            sockdiag::in_netns(&file, sockdiag::unix_listeners)
                .ok()?
                .ok()?
        };
        dump.into_iter()
            .find(|l| l.inode == inode)
            .and_then(|l| l.path)
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

/// `/proc/PID/task/TID/ns/net` of a thread of `pid` that lives in `netns`.
fn task_in_netns(pid: u32, netns: u32) -> Option<PathBuf> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|task| {
        let file = task.path().join("ns/net");
        (context::netns_inode(&file) == Some(u64::from(netns))).then_some(file)
    })
}

impl Sink {
    /// Drops counted by the kernel during the run in namespaces where they
    /// could not be traced: per-kind totals derived from TcpExt, and each
    /// listener's sk_drops growth.
    pub fn report_counted(&mut self, deltas: &[NetnsDelta]) {
        let mut text = String::from(
            "counted by the kernel, not traced (this kernel cannot trace SYN-stage drops):\n",
        );
        if deltas.is_empty() {
            text.push_str("  no listen-queue counter moved in any network namespace\n");
        }
        let time = clock::rfc3339(SystemTime::now());
        for delta in deltas {
            let counter = |name: &str| delta.counters.get(name).copied().unwrap_or(0);
            let [(_, syn_queue_full), (_, cookies), (_, accept_queue_full)] =
                counted::kind_counts(delta, self.traced_acks(delta.netns));
            let kinds = CountedKinds {
                syn_dropped_syn_queue_full: syn_queue_full,
                syn_cookie_sent: cookies,
                syn_dropped_accept_queue_full: accept_queue_full,
            };
            text.push_str(&format!(
                "  netns {}: syn_dropped_syn_queue_full={} syn_cookie_sent={} \
                 syn_dropped_accept_queue_full={} (ListenOverflows +{}, ListenDrops +{})\n",
                delta.netns,
                kinds.syn_dropped_syn_queue_full,
                kinds.syn_cookie_sent,
                kinds.syn_dropped_accept_queue_full,
                counter("ListenOverflows"),
                counter("ListenDrops"),
            ));
            for l in &delta.listeners {
                text.push_str(&format!(
                    "    {}:{} socket {}: sk_drops +{}\n",
                    l.addr, l.port, l.inode, l.drops
                ));
            }
            if self.options.format == OutputFormat::Json {
                let json = CountedJson {
                    kind: "netns_counters",
                    time: &time,
                    traced: false,
                    netns: delta.netns,
                    host_netns: self.host_netns.map(|host| host == delta.netns),
                    counters: &delta.counters,
                    counts: kinds,
                    listeners: delta
                        .listeners
                        .iter()
                        .map(|l| CountedListenerJson {
                            addr: l.addr,
                            port: l.port,
                            socket_inode: l.inode,
                            sk_drops: l.drops,
                        })
                        .collect(),
                };
                let line = serde_json::to_string(&json).unwrap_or_default();
                self.write_line(&line);
            }
        }
        self.flush();
        eprint!("{text}");
    }
}

#[derive(Serialize)]
struct CountedKinds {
    syn_dropped_syn_queue_full: u64,
    syn_cookie_sent: u64,
    syn_dropped_accept_queue_full: u64,
}

#[derive(Serialize)]
struct CountedListenerJson {
    addr: IpAddr,
    port: u16,
    socket_inode: u64,
    /// Upper bound of the listener's drops: the kernel also counts
    /// segments it discards there.
    sk_drops: u64,
}

#[derive(Serialize)]
struct CountedJson<'a> {
    kind: &'static str,
    time: &'a str,
    /// Always false: counted by the kernel, not seen as events.
    traced: bool,
    netns: u64,
    host_netns: Option<bool>,
    /// The TcpExt counters' growth during the run.
    counters: &'a BTreeMap<String, u64>,
    /// Drops per kind derived from those counters.
    counts: CountedKinds,
    listeners: Vec<CountedListenerJson>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ListenerJson<'a> {
    Inet { addr: String, port: u16 },
    Unix { path: &'a str },
}

#[derive(Serialize)]
struct AccountingJson {
    total: u64,
    events: u64,
    aggregated: u64,
    lost: u64,
}

#[derive(Serialize)]
struct PeerJson {
    addr: IpAddr,
    count: u64,
}

#[derive(Serialize)]
struct ProcessJson<'a> {
    pid: u32,
    comm: &'a str,
}

#[derive(Serialize)]
struct SummaryJson<'a> {
    kind: &'static str,
    time: &'a str,
    listener: ListenerJson<'a>,
    netns: u32,
    socket_inode: u64,
    processes: Vec<ProcessJson<'a>>,
    /// Drops by kind: the kernel's exact totals where it keeps them.
    counts: BTreeMap<&'static str, u64>,
    /// Per kind, where the drops went: `events` (own lines), `aggregated`
    /// (inside aggregate records), `lost` (ring buffer full); their sum is
    /// `total`, the kernel's count.
    accounting: BTreeMap<&'static str, AccountingJson>,
    backlog_requested: Option<i32>,
    backlog_limit: u32,
    somaxconn: Option<u32>,
    tcp_max_syn_backlog: Option<u32>,
    syncookies: Option<u32>,
    abort_on_overflow: Option<u32>,
    max_accept_queue_seen: u32,
    top_peers: Vec<PeerJson>,
    #[serde(flatten)]
    placement: &'a Placement,
    diagnosis: &'a str,
    /// Null when no accepted connection's arrival was seen.
    accept_wait_ms: Option<accept_wait::WaitMs>,
    accept_rate_per_s: Option<f64>,
    arrival_rate_per_s: Option<f64>,
    backlog_advice: Option<&'a Advice>,
    near_full_warnings: u64,
}

fn summary_json(
    time: &str,
    key: &ListenerKey,
    stats: &ListenerStats,
    facts: &ListenerFacts,
    requested: Option<i32>,
    placement: &Placement,
    diagnosis: &str,
) -> String {
    let json = SummaryJson {
        kind: "listener_summary",
        time,
        listener: match &key.listener {
            ListenerAddr::Inet(addr) => ListenerJson::Inet {
                addr: addr.ip().to_string(),
                port: addr.port(),
            },
            ListenerAddr::Unix(path) => ListenerJson::Unix { path },
        },
        netns: key.netns,
        socket_inode: key.socket_inode,
        processes: stats
            .processes
            .iter()
            .map(|p| ProcessJson {
                pid: p.pid,
                comm: &p.comm,
            })
            .collect(),
        counts: stats
            .kind_counts()
            .into_iter()
            .map(|(kind, count)| (kind.as_str(), count))
            .collect(),
        accounting: stats
            .accounting
            .iter()
            .map(|(kind, c)| {
                (
                    kind.as_str(),
                    AccountingJson {
                        total: c.total,
                        events: c.sent,
                        aggregated: c.suppressed,
                        lost: c.lost,
                    },
                )
            })
            .collect(),
        backlog_requested: requested,
        backlog_limit: stats.accept_queue_limit,
        somaxconn: facts.somaxconn,
        tcp_max_syn_backlog: facts.tcp_max_syn_backlog,
        syncookies: facts.syncookies,
        abort_on_overflow: facts.abort_on_overflow,
        max_accept_queue_seen: stats.max_accept_queue_seen,
        top_peers: stats
            .top_peers(TOP_PEERS)
            .into_iter()
            .map(|(addr, count)| PeerJson { addr, count })
            .collect(),
        placement,
        diagnosis,
        accept_wait_ms: stats.accept.as_ref().and_then(|a| a.wait_ms),
        accept_rate_per_s: stats.accept.as_ref().map(|a| a.accept_rate_per_s),
        arrival_rate_per_s: stats.accept.as_ref().and_then(|a| a.arrival_rate_per_s),
        backlog_advice: stats.advice.as_ref(),
        near_full_warnings: stats.accept.as_ref().map_or(0, |a| a.near_full_warnings),
    };
    serde_json::to_string(&json).unwrap_or_default()
}

// --- metrics (issue 9): what the metrics snapshot needs from the sink ---
impl Sink {
    /// The backlog the process asked for in listen(), when the call was seen.
    pub fn backlog_requested(&self, socket_inode: u64) -> Option<i32> {
        self.listens
            .get(&socket_inode)
            .map(|call| call.backlog_requested)
    }

    /// Final-ACK overflows traced in `netns`: the part of ListenOverflows
    /// that was not a SYN.
    pub fn traced_acks(&self, netns: u64) -> u64 {
        self.summary
            .listeners
            .iter()
            .filter(|(key, _)| u64::from(key.netns) == netns)
            .map(|(_, stats)| stats.count(DropKind::AckDroppedAcceptQueueFull))
            .sum()
    }

    /// Cgroup, container or unit, and pod of a listener, as events show them.
    pub fn placement_of(&mut self, cgroup_id: u64, netns: u32) -> Placement {
        self.placement(cgroup_id, netns)
    }
}
