//! From ring-buffer records to what the user sees: event lines on stdout,
//! attributed to processes, cgroup and netns, and the per-listener summary
//! with a diagnosis at `--interval` and at exit.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, BufWriter, Stdout, Write as _},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use backlog_common::DropKind;
use serde::Serialize;

use crate::{
    attribution::{Process, SocketOwners},
    cli::OutputFormat,
    clock::{self, MonotonicToWall},
    context::{self, CgroupResolver, NetnsSysctls},
    counted::{self, NetnsDelta},
    decode::{decode_record, DecodeError, Event, ListenCall, Record, UnixConnect},
    diagnosis::{diagnose, ListenerFacts},
    output::{self, Placement, UnixListenerView},
    sockdiag::{self, UnixListenerInfo},
    summary::{ListenerAddr, ListenerKey, ListenerStats, Summary},
};

/// Undecodable records are counted; only the first few are described, so
/// that a systematic problem cannot flood stderr.
const DECODE_ERRORS_SHOWN: u64 = 5;

/// A listener that nobody holds (closed, or a process we cannot see) must
/// not turn every event into a full /proc scan.
const MIN_RESCAN: Duration = Duration::from_millis(200);

/// UNIX listeners are looked up by path with a sock_diag dump; under a
/// burst of EAGAINs one dump serves a while.
const UNIX_DUMP_TTL: Duration = Duration::from_millis(200);

const TOP_PEERS: usize = 5;

fn note(message: impl std::fmt::Display) {
    eprintln!("backlog-agent: {message}");
}

pub struct Options {
    pub format: OutputFormat,
    pub show_cmdline: bool,
}

pub struct Sink {
    options: Options,
    out: BufWriter<Stdout>,
    clock: MonotonicToWall,
    pub owners: SocketOwners,
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
    pub summary: Summary,
    pub stdout_closed: bool,
}

impl Sink {
    pub fn new(options: Options) -> Self {
        let cgroups = match CgroupResolver::system() {
            Ok(resolver) => Some(resolver),
            Err(err) => {
                note(format_args!("no cgroup paths: {err}"));
                None
            }
        };
        Sink {
            options,
            out: BufWriter::new(io::stdout()),
            clock: MonotonicToWall::now(),
            owners: SocketOwners::new("/proc", MIN_RESCAN),
            listens: HashMap::new(),
            cgroups,
            host_netns: context::host_netns_inode(),
            own_netns: context::netns_inode(Path::new("/proc/self/ns/net")),
            cmdlines: HashMap::new(),
            netns_sysctls: HashMap::new(),
            unix_dumps: HashMap::new(),
            summary: Summary::default(),
            stdout_closed: false,
        }
    }

    /// Handles every record in `records`, then flushes stdout once: lines
    /// reach a pipe promptly without a syscall per event under a flood.
    pub fn handle_batch<'a>(&mut self, records: impl Iterator<Item = &'a [u8]>) {
        for record in records {
            self.handle(record);
        }
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

    /// Holders of socket `inode`: from /proc, or, when none is left, the
    /// process seen calling listen() on it.
    fn processes(&mut self, inode: u64) -> Vec<Process> {
        let mut processes = self.owners.lookup(inode).to_vec();
        if processes.is_empty() {
            if let Some(call) = self.listens.get(&inode) {
                processes.push(Process {
                    pid: call.pid,
                    comm: call.comm.clone(),
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
        let processes = self.processes(event.socket_inode);
        self.remember_sysctls(event.netns_inode, event.socket_inode, &processes);
        let time = self.clock.wall(event.timestamp_ns);
        let line = match self.options.format {
            OutputFormat::Text => Some(output::text_line(event, time, &processes)),
            OutputFormat::Json => {
                let placement = self.placement(event.cgroup_id, event.netns_inode);
                Some(output::json_line(event, time, &processes, &placement))
            }
            OutputFormat::None => None,
        };
        if let Some(line) = line {
            self.write_line(&line);
        }
        self.summary.record(event, &processes);
    }

    fn unix_connect(&mut self, event: &UnixConnect) {
        let (netns, listener) = match event.path.as_deref() {
            Some(path) => self.unix_listener(event.pid, path),
            None => (None, None),
        };
        let view = UnixListenerView {
            netns: netns.and_then(|n| u32::try_from(n).ok()),
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
            };
            let diagnosis = diagnose(&facts);
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
