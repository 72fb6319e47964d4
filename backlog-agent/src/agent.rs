//! Start and stop: everything the agent does before `ready` and after its
//! loop, so that main.rs holds the loop only. Start-up checks what must
//! hold, attaches a hook per drop kind and tells which (or why none), then
//! gives up the capabilities it no longer needs; stopping detaches, reads
//! what is still queued and writes the final summary.

use std::{
    collections::{BTreeMap, HashSet},
    io,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use backlog_common::{DropKind, ACCEPT_STATS_ENTRIES};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::mpsc,
};

use crate::{
    caps,
    cli::Cli,
    enrich::{
        accept_wait::{AcceptWait, RETIRED_ROWS},
        counted,
    },
    filter::Filters,
    flood::{self, Aggregator, FloodListener},
    http,
    kernel::bpfstats,
    kernel::{
        btf::Btf,
        expire::{Expiry, RETIRED_CAP},
        preflight,
        probes::{self, KernelCounters, Outcome, Probes},
        tracefs,
    },
    model::{
        summary::{KernelSkip, SUMMARY_CAP},
        ListenerAddr,
    },
    report::{
        metrics::{CountedDrops, Health, Metrics, Snapshot},
        note, text,
    },
    sink::{Options, Sink},
    wakeup::{AsleepFlag, Pace, Read, POLL},
};

/// Blocks from this size up get their own mapping (glibc's default
/// starting point, kept fixed: see `start`).
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 128 * 1024;

/// What the loop works with, from `start` to `stop`.
pub struct Running {
    pub started: Instant,
    /// Dropped first at `stop`: detaching ends the flow of events.
    pub probes: Probes,
    pub ring: AsyncFd<RingBuf<MapData>>,
    /// Whether the loop polls the ring or sleeps until woken.
    pub pace: Pace,
    pub counters: KernelCounters,
    pub sink: Sink,
    pub aggregator: Aggregator,
    /// The metrics state and the scrapes to answer (`--metrics-addr`).
    pub metrics: Option<(Metrics, mpsc::Receiver<http::Scrape>)>,
    /// TcpExt counters at start, where SYN-stage drops are only counted.
    pub counted_before: Option<counted::Snapshot>,
    pub filters: Filters,
}

/// Everything up to `ready`: checks, hooks, filters, capabilities, the
/// sink and the metrics endpoint. Says on stderr what is observed and how.
pub async fn start(cli: &Cli) -> Result<Running> {
    let started = Instant::now();
    // Start-up parses the kernel's BTF three times, one after the other
    // (offsets here; aya's loader; aya again for fentry/fexit), each a few
    // large Vecs. glibc raises its mmap threshold each time such a block
    // is freed, so the next parse lands on the brk heap, where growing
    // Vecs copy instead of mremap and what is freed stays resident: the
    // peak grew with each parse (36 MB). A fixed threshold keeps every
    // block over 128 KiB in its own mapping, unmapped when freed. (musl,
    // the static build's libc, maps large blocks by itself.)
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt has no preconditions; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
    preflight::memory_phase("start");
    let caps = caps::effective(&preflight::self_status());
    caps::check_start_up(caps)?;
    preflight::check_btf()?;
    for warning in caps::warnings(caps) {
        note(warning);
    }
    if let Err(err) = preflight::raise_memlock_limit(&preflight::kernel_release()) {
        note(format_args!(
            "could not raise RLIMIT_MEMLOCK ({err}); maps may fail to load before 5.11"
        ));
    }
    let tracefs = tracefs::ensure_mounted()?;
    let btf = Btf::from_file(Path::new(preflight::VMLINUX_BTF))?;
    preflight::memory_phase("reading the kernel's BTF");
    let filters = Filters::resolve(cli)?;
    let config = probes::config(cli.max_events_per_sec, cli.ring_buffer_kib);
    let (mut probes, absent) = probes::start(
        cli.attach,
        cli.ring_buffer_kib,
        &config,
        cli.near_full,
        &filters.config(),
        btf,
        &tracefs,
    )?;
    // Until the maps are filled an active filter matches nothing: no
    // event slips through before `ready`.
    filters.install(&mut probes.ebpf)?;
    if let Some(line) = filters.describe() {
        note(line);
    }
    for field in absent {
        note(format_args!(
            "this kernel has no {field}; the event field it feeds stays 0"
        ));
    }
    for line in text::outcomes(&probes.outcomes) {
        note(line);
    }
    match &probes.listen_calls {
        Ok(hook) => note(format_args!("listen() calls: {hook}")),
        Err(reason) => note(format_args!(
            "listen() calls: not observable ({reason}); requested backlogs stay unknown"
        )),
    }
    // Accept-queue wait and rates (accept_wait.rs): optional, told either way.
    let expire_after = (cli.expire_after > 0).then(|| Duration::from_secs(cli.expire_after));
    let accept_stats = match &probes.accept_wait {
        Ok(hook) => {
            note(format_args!("accept-queue wait and rates: {hook}"));
            match probes.take_accept_stats() {
                Ok(map) => Some(AcceptWait::new(map, expire_after)),
                Err(err) => {
                    note(format_args!("accept-queue wait and rates: {err}"));
                    None
                }
            }
        }
        Err(reason) => {
            note(format_args!(
                "accept-queue wait and rates: not observable ({reason})"
            ));
            None
        }
    };
    // Where SYN-stage drops cannot be traced, count them from the kernel's
    // own counters over the run instead.
    let untraced_syn_stage = probes.outcomes.iter().any(|(kind, outcome)| {
        *kind != DropKind::AckDroppedAcceptQueueFull
            && *kind != DropKind::UnixConnectBacklogFull
            && matches!(outcome, Outcome::NotObservable { .. })
    });
    // The kernel counts per namespace: a filter narrower than that
    // cannot be applied to its counters.
    let untraced_syn_stage = untraced_syn_stage && {
        let splittable = !filters.narrower_than_netns();
        if !splittable {
            note(
                "SYN-stage drops are not traced on this kernel, and the kernel's counters \
                 cannot be split by port, pid, cgroup or path: not reported with this filter",
            );
        }
        splittable
    };
    let counted_before = untraced_syn_stage.then(|| {
        note("SYN-stage drops will be counted from kernel counters, not traced");
        counted::snapshot(Path::new("/proc"))
    });
    match cli.max_events_per_sec {
        0 => note("rate limit: none (--max-events-per-sec 0): one line per drop"),
        n => note(format_args!(
            "rate limit: {n} events per second per listener and kind; beyond it (flood mode) \
             drops are counted exactly and written as one aggregate per listener and kind per second"
        )),
    }
    let ring = probes.take_events()?;
    let asleep_flag = probes
        .take_asleep_flag()
        .map_err(anyhow::Error::from)
        .and_then(|map| AsleepFlag::map(map).map_err(anyhow::Error::from));
    let asleep_flag = match asleep_flag {
        Ok(flag) => Some(flag),
        Err(err) => {
            note(format_args!(
                "cannot share the sleep flag with the kernel ({err:#}): reading the ring buffer \
                 every {} ms instead of sleeping until woken",
                POLL.as_millis()
            ));
            None
        }
    };
    let mut counters = probes.take_counters()?;
    preflight::memory_phase("mapping the ring buffer");
    counters.inet_expiry = Expiry::new(expire_after, RETIRED_CAP);
    counters.unix_expiry = Expiry::new(expire_after, RETIRED_CAP);
    // Everything that needed CAP_BPF, CAP_PERFMON or CAP_SYSLOG is done:
    // keep only what attribution and setns need (caps.rs).
    let kept = caps::run_time_set(caps);
    caps::drop_all_but(kept, caps)?;
    note(format_args!(
        "capabilities: kept {}; gave up the others",
        match kept.names().join(", ") {
            names if names.is_empty() => "none".to_owned(),
            names => names,
        }
    ));
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged,
    // for as long as it lives, and the AsyncFd owns the ring buffer.
    let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("cannot poll the ring buffer")?;
    // Before `ready`: setting up the sink may have things to say.
    let mut sink = Sink::new(Options {
        format: cli.output,
        show_cmdline: cli.show_cmdline,
        max_events_per_sec: cli.max_events_per_sec,
        near_full_percent: cli.near_full,
        client_timeout: cli.client_timeout,
    });
    let aggregator = Aggregator::new(SystemTime::now());
    preflight::memory_phase("setting up the sink");
    sink.accept = accept_stats;
    sink.row_filter = filters.row_filter();
    // --- metrics (issue 9): the endpoint, before `ready` so a scraper
    // can rely on it from then on ---
    let metrics = match cli.metrics_addr {
        Some(addr) => {
            let (bound, scrapes) = http::serve(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            note(format_args!("metrics: serving http://{bound}/metrics"));
            let metrics = Metrics::new(cli.metrics_max_listeners, &probes.outcomes);
            Some((metrics, scrapes))
        }
        None => None,
    };
    Ok(Running {
        started,
        probes,
        ring,
        pace: Pace::new(asleep_flag, Instant::now()),
        counters,
        sink,
        aggregator,
        metrics,
        counted_before,
        filters,
    })
}

/// Tells the user the agent is ready, and how much of it watches.
pub fn ready(running: &Running) {
    // The one walk of every process's fds belongs to start-up: from now
    // on attribution reads only what changes (resolver.rs).
    running.sink.resolver.wait_first_walk(FIRST_WALK_WAIT);
    preflight::memory_phase("the first walk of /proc");
    // Start-up parsed the kernel's BTF and tracefs formats and walked
    // /proc.
    give_back_freed();
    preflight::memory_phase("giving freed memory back");
    let outcomes = &running.probes.outcomes;
    let attached = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Attached { .. }))
        .count();
    note(format_args!(
        "ready: watching {attached} of {} drop kinds; Ctrl-C to stop",
        outcomes.len()
    ));
}

/// Detaches, writes what is still queued and the final summary.
pub fn stop(running: Running) {
    // Detach first so that nothing new arrives, then read what is queued
    // and what was counted since the last aggregate.
    let Running {
        started,
        mut probes,
        mut ring,
        pace,
        mut counters,
        mut sink,
        mut aggregator,
        counted_before,
        filters,
        ..
    } = running;
    preflight::memory_phase("the run");
    // The programs outlive their links through these fds, so that their
    // skips are read once nothing can run any more.
    let held = bpfstats::hold(&probes.ebpf);
    let roles = std::mem::take(&mut probes.roles);
    drop(probes);
    drain(ring.get_mut(), &mut sink);
    sink.release_all();
    aggregate(&mut counters, &mut aggregator, &mut sink);
    sink.poll_near_full(true);
    note("detached");

    match counters.events_lost() {
        Ok(lost) => sink.summary.losses.lost_in_kernel = lost,
        Err(err) => note(format_args!("cannot read the lost-event counter: {err}")),
    }
    apply_accounting(&counters, &mut sink);
    apply_kernel_skips(bpfstats::skipped_held(&held), &roles, &mut sink);
    drop(held);
    match counters.events_suppressed() {
        Ok(n) => sink.summary.flood.suppressed_in_kernel = n,
        Err(err) => note(format_args!(
            "cannot read the suppressed-event counter: {err}"
        )),
    }
    if let Ok(full) = counters.totals_full() {
        if full > 0 {
            note(format_args!(
                "{full} drops could not be added to per-listener totals (too many listeners)"
            ));
        }
    }
    let expired = counters.inet_expiry.expired + counters.unix_expiry.expired;
    if expired > 0 {
        note(format_args!(
            "{expired} idle listener rows moved out of the kernel maps (their counts kept)"
        ));
    }
    let (other_inet, other_unix) = (counters.inet_expiry.other, counters.unix_expiry.other);
    if other_inet.total + other_unix.total > 0 {
        note(format_args!(
            "expired listeners beyond the {RETIRED_CAP} kept one by one: {} TCP drops \
             ({} aggregated, {} lost), {} UNIX EAGAINs ({} aggregated, {} lost)",
            other_inet.total,
            other_inet.suppressed,
            other_inet.lost,
            other_unix.total,
            other_unix.suppressed,
            other_unix.lost
        ));
    }
    if let Some(accept) = &sink.accept {
        if accept.expired > 0 {
            note(format_args!(
                "{} idle accept-queue rows moved out of the kernel map (their figures kept)",
                accept.expired
            ));
        }
        let folded = accept.folded;
        if folded.rows > 0 {
            note(format_args!(
                "expired accept-queue rows beyond the {RETIRED_ROWS} kept one by one: {} rows \
                 ({} accepts, {} waits measured) no longer shown per listener",
                folded.rows, folded.accepts, folded.waits
            ));
        }
    }
    if let Some(line) = counters
        .accept_stats_full()
        .ok()
        .and_then(accept_stats_full_note)
    {
        note(line);
    }
    if let Ok(errors) = counters.read_errors() {
        if errors > 0 {
            note(format_args!(
                "{errors} events had unreadable kernel fields (flagged partial)"
            ));
        }
    }
    sink.report(&summary_heading(started));
    // The summary's rows and lines were made and freed one listener at a
    // time, in the same heap as the live state.
    give_back_freed();
    preflight::memory_phase("the final summary");
    if let Some(before) = counted_before {
        let after = counted::snapshot(Path::new("/proc"));
        let mut deltas = counted::deltas(&before, &after);
        deltas.retain(|delta| filters.wants_netns(delta.netns));
        sink.report_counted(&deltas);
    }
    if let Some(errors) = sink
        .accept
        .as_ref()
        .map(|a| a.read_errors)
        .filter(|&e| e > 0)
    {
        note(format_args!(
            "{errors} accept-queue rows could not be read (removed while being read)"
        ));
    }
    // How the ring was read: records read at the once-a-second drain
    // while asleep would mean wakeups that did not come (wakeup.rs).
    let reads = pace.stats;
    note(format_args!(
        "ring buffer: {} records read when woken, {} while polling, {} at the once-a-second \
         drain; went to sleep {} times",
        reads.woken, reads.polled, reads.window, reads.sleeps
    ));
    // What attribution cost: full walks read every process, partial
    // walks only new descendants of holders (resolver.rs).
    let scans = sink.resolver.stats();
    note(format_args!(
        "attribution: {} full /proc walks, {} partial ({} processes read); \
         {} processes exited mid-scan, {} unreadable",
        scans.scans, scans.partial, scans.partial_reads, scans.vanished, scans.unreadable
    ));
}

/// How long start-up waits for the first walk of /proc; a bigger machine
/// just gets its first answers later.
const FIRST_WALK_WAIT: Duration = Duration::from_secs(3);

/// The interval of aggregate records.
pub const AGGREGATE_WINDOW: Duration = Duration::from_secs(1);

/// Writes the aggregates of the window that ends now.
pub fn aggregate(counters: &mut KernelCounters, aggregator: &mut Aggregator, sink: &mut Sink) {
    // The live rows only: the aggregator follows each kernel row from its
    // creation, and forgets it when it is expired (a re-created row starts
    // again from 0 on both sides).
    let (inet, unix) = match (counters.live_totals(), counters.live_unix_totals()) {
        (Ok(inet), Ok(unix)) => (inet, unix),
        (Err(err), _) | (_, Err(err)) => {
            note(format_args!("cannot read the per-listener counts: {err}"));
            return;
        }
    };
    let peers = counters.take_peers();
    let aggregates = aggregator.window(&inet, &unix, &peers, SystemTime::now());
    sink.aggregates(&aggregates);
    // After the window: the aggregator has seen the final value of every
    // row deleted now.
    let (gone_inet, gone_unix) = counters.expire(&inet, &unix, Instant::now());
    aggregator.forget(&gone_inet, &gone_unix);
    let gone = gone_inet.len() + gone_unix.len();
    if gone > 0 {
        note(format_args!(
            "expired {gone} idle listener rows (unchanged for --expire-after; counts kept)"
        ));
    }
    if let Some(after) = counters.inet_expiry.after() {
        fold_idle_listeners(counters, sink, after);
    }
    if let Some(accept) = sink.accept.as_mut() {
        let gone = accept.expire(Instant::now());
        if gone > 0 {
            note(format_args!(
                "expired {gone} idle accept-queue rows (unchanged for --expire-after; figures kept)"
            ));
        }
        // Said when it first happens, then at exit with the final count.
        if !accept.full_told {
            if let Some(line) = counters
                .accept_stats_full()
                .ok()
                .and_then(accept_stats_full_note)
            {
                accept.full_told = true;
                note(line);
            }
        }
    }
}

/// Beyond the summary's cap, folds the listeners idle for `after` whose
/// kernel rows are gone (expired), and forgets their retired rows: their
/// counts now live in the summary's folded totals, so every total stays
/// exact while the summary, the sink and the retired rows stay bounded.
fn fold_idle_listeners(counters: &mut KernelCounters, sink: &mut Sink, after: Duration) {
    let now = Instant::now();
    if sink.summary.listeners.len() <= SUMMARY_CAP || sink.next_fold.is_some_and(|t| now < t) {
        return;
    }
    let (live_inet, live_unix) = match (counters.live_totals(), counters.live_unix_totals()) {
        (Ok(inet), Ok(unix)) => (inet, unix),
        _ => return,
    };
    // The folded part must be the kernel's latest totals.
    apply_accounting(counters, sink);
    let inet: HashSet<(u32, u64, SocketAddr)> = live_inet
        .iter()
        .filter_map(|(key, _)| match flood::inet_listener(key) {
            Some((
                _,
                FloodListener::Inet {
                    netns,
                    socket_inode,
                    addr,
                },
            )) => Some((netns, socket_inode, addr)),
            _ => None,
        })
        .collect();
    let unix: HashSet<(u32, String)> = live_unix
        .iter()
        .filter_map(|(key, _)| match flood::unix_listener(key) {
            FloodListener::Unix { netns, path } => Some((netns, path)),
            FloodListener::Inet { .. } => None,
        })
        .collect();
    let evicted = sink.evict_idle_listeners(after, |key| match &key.listener {
        ListenerAddr::Inet(addr) => inet.contains(&(key.netns, key.socket_inode, *addr)),
        ListenerAddr::Unix(path) => unix.contains(&(key.netns, path.clone())),
    });
    if evicted.is_empty() {
        // Nothing idle long enough yet: reading every total each second
        // would find the same.
        sink.next_fold = Some(now + (after / 4).max(AGGREGATE_WINDOW));
        return;
    }
    let gone_inet: HashSet<(u32, u64, SocketAddr)> = evicted
        .iter()
        .filter_map(|key| match key.listener {
            ListenerAddr::Inet(addr) => Some((key.netns, key.socket_inode, addr)),
            ListenerAddr::Unix(_) => None,
        })
        .collect();
    let gone_unix: HashSet<(u32, String)> = evicted
        .iter()
        .filter_map(|key| match &key.listener {
            ListenerAddr::Unix(path) => Some((key.netns, path.clone())),
            ListenerAddr::Inet(_) => None,
        })
        .collect();
    counters
        .inet_expiry
        .forget_retired(|key| match flood::inet_listener(key) {
            Some((
                _,
                FloodListener::Inet {
                    netns,
                    socket_inode,
                    addr,
                },
            )) => gone_inet.contains(&(netns, socket_inode, addr)),
            _ => false,
        });
    counters
        .unix_expiry
        .forget_retired(|key| match flood::unix_listener(key) {
            FloodListener::Unix { netns, path } => gone_unix.contains(&(netns, path)),
            FloodListener::Inet { .. } => false,
        });
    note(format_args!(
        "folded {} idle listeners into the summary's \"other\" row (more than {SUMMARY_CAP}; \
         totals kept)",
        evicted.len()
    ));
}

/// The line that says `ACCEPT_STATS` was full `n` times; None for 0.
fn accept_stats_full_note(n: u64) -> Option<String> {
    (n > 0).then(|| {
        format!(
            "{n} accept-queue updates found the kernel's table full ({ACCEPT_STATS_ENTRIES} \
             listeners): those listeners lack wait and rate figures until idle rows expire \
             (--expire-after)"
        )
    })
}

/// The kernel's skipped runs of the agent's programs (bpfstats.rs), with
/// what each program observes, into the summary; an fd that cannot be
/// asked leaves the last figures and is said.
fn apply_kernel_skips(
    skipped: Result<Vec<bpfstats::Skipped>, String>,
    roles: &BTreeMap<&'static str, Vec<&'static str>>,
    sink: &mut Sink,
) {
    match skipped {
        Ok(skipped) => sink.summary.kernel_skips = kernel_skips(skipped, roles),
        Err(err) => note(format_args!("cannot read the kernel's skipped runs: {err}")),
    }
}

fn kernel_skips(
    skipped: Vec<bpfstats::Skipped>,
    roles: &BTreeMap<&'static str, Vec<&'static str>>,
) -> Vec<KernelSkip> {
    skipped
        .into_iter()
        .map(|s| KernelSkip {
            observes: roles.get(s.program.as_str()).cloned().unwrap_or_default(),
            program: s.program,
            runs: s.runs,
        })
        .collect()
}

fn apply_accounting(counters: &KernelCounters, sink: &mut Sink) {
    match (counters.totals(), counters.unix_totals()) {
        (Ok(inet), Ok(unix)) => sink.summary.apply_accounting(&inet, &unix),
        (Err(err), _) | (_, Err(err)) => {
            note(format_args!("cannot read the per-listener totals: {err}"));
        }
    }
}

/// One read of the ring buffer, for whichever reason `read` says, and the
/// pace after it (poll on, or sleep until woken: wakeup.rs).
pub fn read_ring(ring: &mut RingBuf<MapData>, sink: &mut Sink, pace: &mut Pace, read: Read) {
    let records = drain(ring, sink);
    let waiting = sink.has_waiting();
    pace.after_read(read, records, waiting, Instant::now(), || {
        (drain(ring, sink), sink.has_waiting())
    });
}

/// Reads every record the ring holds; how many it read.
pub fn drain(ring: &mut RingBuf<MapData>, sink: &mut Sink) -> usize {
    let mut records = 0;
    while let Some(record) = ring.next() {
        sink.handle(&record);
        records += 1;
    }
    sink.release_waiting();
    sink.flush();
    records
}

/// The summary at `--interval`, with the kernel's totals as of now.
pub fn summary(running: &mut Running) {
    apply_accounting(&running.counters, &mut running.sink);
    apply_kernel_skips(
        bpfstats::skipped(&running.probes.ebpf),
        &running.probes.roles,
        &mut running.sink,
    );
    running.sink.report(&summary_heading(running.started));
    give_back_freed();
}

/// Returns to the kernel what glibc keeps of the memory freed since (the
/// free pages inside its heaps too, not only the top): it keeps them
/// otherwise, in the resident set. musl, the static build's libc, returns
/// large blocks by itself.
fn give_back_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn summary_heading(started: Instant) -> String {
    format!(
        "backlog-agent: summary after {:.1} s:",
        started.elapsed().as_secs_f64()
    )
}

/// Answers a metrics scrape: reads the kernel's totals into the summary,
/// then renders the listeners' model and the agent's totals as a snapshot
/// (taking the per-scrape maxima). A map that cannot be read leaves its
/// numbers as they were (said once on stderr).
pub fn scrape(
    metrics: &mut Metrics,
    sink: &mut Sink,
    counters: &KernelCounters,
    probes: &Probes,
    counted_before: Option<&counted::Snapshot>,
) -> Snapshot {
    // The kernel's exact per-listener accounting (issue 11): totals for
    // TCP listeners and UNIX paths alike, whatever was rate-limited or
    // lost on the way to the agent.
    match (counters.totals(), counters.unix_totals()) {
        (Ok(inet), Ok(unix)) => sink.summary.apply_accounting(&inet, &unix),
        (Err(err), _) | (_, Err(err)) => {
            metrics.warn(format!("cannot read per-listener totals: {err}"))
        }
    }
    match counters.events_lost() {
        Ok(lost) => sink.summary.losses.lost_in_kernel = lost,
        Err(err) => metrics.warn(format!("cannot read lost events: {err}")),
    }
    match bpfstats::skipped(&probes.ebpf) {
        Ok(skipped) => sink.summary.kernel_skips = kernel_skips(skipped, &probes.roles),
        Err(err) => metrics.warn(format!("cannot read the kernel's skipped runs: {err}")),
    }
    let drops_untracked = counters.totals_full().unwrap_or(0);
    let listeners = sink.scrape_reports();
    let counted = counted_drops(counted_before, sink);
    let losses = sink.summary.losses;
    let health = Health {
        events: sink.summary.events,
        events_lost: losses.lost_in_kernel,
        events_undecodable: losses.undecodable,
        events_partial: losses.partial,
        drops_untracked,
        events_aggregated: sink.summary.flood.aggregated,
    };
    let mut snapshot = metrics.snapshot(
        &listeners,
        health,
        counted,
        bpfstats::accounted(&probes.ebpf),
    );
    snapshot.kernel_skips = sink.summary.kernel_skips.clone();
    // Listeners folded out of the summary count under "other" from then
    // on: every sum stays monotonic.
    for (kind, count) in &sink.summary.folded.drops {
        *snapshot.other.entry(kind.as_str()).or_default() += count;
    }
    snapshot
}

/// SYN-stage drops counted by the kernel since start, per namespace,
/// where they cannot be traced.
fn counted_drops(before: Option<&counted::Snapshot>, sink: &Sink) -> Vec<CountedDrops> {
    let Some(before) = before else {
        return Vec::new();
    };
    let after = counted::snapshot(Path::new("/proc"));
    let mut out = Vec::new();
    for delta in counted::deltas(before, &after) {
        let traced_acks = sink.traced_acks(delta.netns);
        for (kind, count) in counted::kind_counts(&delta, traced_acks) {
            out.push(CountedDrops {
                netns: delta.netns,
                kind: kind.as_str(),
                count,
            });
        }
    }
    out
}
