//! backlog-agent: see `--help`. Errors leave as one line on stderr with a
//! non-zero exit code; everything the user should know about what is and
//! is not observed goes to stderr, events to stdout.

use std::{
    io,
    path::Path,
    process::ExitCode,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use backlog_agent::{
    accept_wait::AcceptWait,
    btf::Btf,
    caps,
    cli::Cli,
    counted,
    filter::Filters,
    flood::Aggregator,
    http,
    metrics::Metrics,
    preflight,
    probes::{self, KernelCounters, Outcome},
    sink::{Options, Sink},
    tracefs,
};
use backlog_common::DropKind;
use clap::Parser as _;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

/// How often the near-full warnings are read from the kernel's map.
const NEAR_FULL_POLL: std::time::Duration = std::time::Duration::from_millis(200);

fn note(message: impl std::fmt::Display) {
    eprintln!("backlog-agent: {message}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("backlog-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let started = Instant::now();
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
    let filters = Filters::resolve(&cli)?;
    let config = probes::config(cli.max_events_per_sec, cli.ring_buffer_kib);
    let (mut probes, absent) = probes::start(
        cli.attach,
        cli.ring_buffer_kib,
        &config,
        cli.near_full,
        &filters.config(),
        &btf,
        &tracefs,
    )?;
    // Until the maps are filled an active filter matches nothing: no
    // event slips through before `ready`.
    filters.install(&mut probes.ebpf)?;
    if let Some(line) = filters.describe() {
        note(line);
    }
    drop(btf);
    for field in absent {
        note(format_args!(
            "this kernel has no {field}; the event field it feeds stays 0"
        ));
    }
    report_outcomes(&probes.outcomes);
    match &probes.listen_calls {
        Ok(hook) => note(format_args!("listen() calls: {hook}")),
        Err(reason) => note(format_args!(
            "listen() calls: not observable ({reason}); requested backlogs stay unknown"
        )),
    }
    // Accept-queue wait and rates (accept_wait.rs): optional, told either way.
    let accept_stats = match &probes.accept_wait {
        Ok(hook) => {
            note(format_args!("accept-queue wait and rates: {hook}"));
            match probes.take_accept_stats() {
                Ok(map) => Some(AcceptWait::new(map)),
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
    let attached = probes
        .outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Attached { .. }))
        .count();
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
    let mut counters = probes.take_counters()?;
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
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(io::Error::from)
        .context("cannot poll the ring buffer")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    // Before `ready`: setting up the sink may have things to say.
    let mut sink = Sink::new(Options {
        format: cli.output,
        show_cmdline: cli.show_cmdline,
        max_events_per_sec: cli.max_events_per_sec,
        near_full_percent: cli.near_full,
        client_timeout: cli.client_timeout,
    });
    let mut aggregator = Aggregator::new(SystemTime::now());
    sink.accept = accept_stats;
    sink.row_filter = filters.row_filter();
    // Near-full crossings are read from a map, a few times a second.
    let mut near_full_poll = tokio::time::interval(NEAR_FULL_POLL);
    near_full_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // --- metrics (issue 9): the endpoint, before `ready` so a scraper
    // can rely on it from then on ---
    let mut metrics = match cli.metrics_addr {
        Some(addr) => {
            let (bound, scrapes) = http::serve(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            note(format_args!("metrics: serving http://{bound}/metrics"));
            let metrics = Metrics::new(
                cli.metrics_max_listeners,
                &probes.outcomes,
                counted_before.clone(),
            );
            Some((metrics, scrapes))
        }
        None => None,
    };
    let deadline = cli.duration.map(|d| tokio::time::Instant::now() + d);
    // The one walk of every process's fds belongs to start-up: from now
    // on attribution reads only what changes (resolver.rs).
    sink.resolver.wait_first_walk(FIRST_WALK_WAIT);
    // Start-up parsed the kernel's BTF and tracefs formats and walked
    // /proc; glibc keeps what they freed unless asked to give it back
    // (musl, the static build's libc, returns it by itself).
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    note(format_args!(
        "ready: watching {attached} of {} drop kinds; Ctrl-C to stop",
        probes.outcomes.len()
    ));

    let every = |period: Duration| {
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    };
    let mut interval = cli.interval.map(every);
    // The kernel wakes the agent only once enough is pending; this poll
    // bounds how long a lone event waits.
    let mut poll = every(POLL);
    let mut window = every(AGGREGATE_WINDOW);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = until(deadline) => break,
            () = tick(&mut interval) => {
                apply_accounting(&counters, &mut sink);
                sink.report(&format!(
                    "backlog-agent: summary after {:.1} s:",
                    started.elapsed().as_secs_f64()
                ));
            }
            _ = poll.tick() => drain(ring.get_mut(), &mut sink),
            _ = window.tick() => {
                drain(ring.get_mut(), &mut sink);
                aggregate(&mut counters, &mut aggregator, &mut sink);
            }
            _ = near_full_poll.tick() => sink.poll_near_full(false),
            Some((metrics, scrape)) = next_scrape(&mut metrics) => {
                let snapshot = metrics.scrape(&mut sink, &counters, &probes.ebpf);
                // The HTTP task may have given up waiting: nothing to do.
                let _ = scrape.reply.send(snapshot);
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer failed")?;
                drain(guard.get_inner_mut(), &mut sink);
                guard.clear_ready();
            }
        }
        if sink.stdout_closed {
            note("stdout was closed; stopping");
            break;
        }
    }
    // Detach first so that nothing new arrives, then read what is queued
    // and what was counted since the last aggregate.
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
    if let Ok(errors) = counters.read_errors() {
        if errors > 0 {
            note(format_args!(
                "{errors} events had unreadable kernel fields (flagged partial)"
            ));
        }
    }
    sink.report(&format!(
        "backlog-agent: summary after {:.1} s:",
        started.elapsed().as_secs_f64()
    ));
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
    // What attribution cost: full walks read every process, partial
    // walks only new descendants of holders (resolver.rs).
    let scans = sink.resolver.stats();
    note(format_args!(
        "attribution: {} full /proc walks, {} partial ({} processes read); \
         {} processes exited mid-scan, {} unreadable",
        scans.scans, scans.partial, scans.partial_reads, scans.vanished, scans.unreadable
    ));
    Ok(())
}

/// How long start-up waits for the first walk of /proc; a bigger machine
/// just gets its first answers later.
const FIRST_WALK_WAIT: Duration = Duration::from_secs(3);
/// How often the ring buffer is read when the kernel did not wake us.
const POLL: Duration = Duration::from_millis(5);
/// The interval of aggregate records.
const AGGREGATE_WINDOW: Duration = Duration::from_secs(1);

/// Writes the aggregates of the window that ends now.
fn aggregate(counters: &mut KernelCounters, aggregator: &mut Aggregator, sink: &mut Sink) {
    let (inet, unix) = match (counters.totals(), counters.unix_totals()) {
        (Ok(inet), Ok(unix)) => (inet, unix),
        (Err(err), _) | (_, Err(err)) => {
            note(format_args!("cannot read the per-listener counts: {err}"));
            return;
        }
    };
    let peers = counters.take_peers();
    let aggregates = aggregator.window(&inet, &unix, &peers, SystemTime::now());
    sink.aggregates(&aggregates);
}

fn apply_accounting(counters: &KernelCounters, sink: &mut Sink) {
    match (counters.totals(), counters.unix_totals()) {
        (Ok(inet), Ok(unix)) => sink.summary.apply_accounting(&inet, &unix),
        (Err(err), _) | (_, Err(err)) => {
            note(format_args!("cannot read the per-listener totals: {err}"));
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, sink: &mut Sink) {
    while let Some(record) = ring.next() {
        sink.handle(&record);
    }
    sink.release_waiting();
    sink.flush();
}

/// The next scrape to answer, with the metrics state that answers it;
/// never ready without `--metrics-addr`.
async fn next_scrape(
    metrics: &mut Option<(Metrics, tokio::sync::mpsc::Receiver<http::Scrape>)>,
) -> Option<(&mut Metrics, http::Scrape)> {
    match metrics {
        Some((metrics, scrapes)) => scrapes.recv().await.map(|scrape| (metrics, scrape)),
        None => std::future::pending().await,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(timer) => {
            timer.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Tells, per drop kind, which hook serves it or why none can, grouping
/// kinds that share an outcome (the five SYN-stage kinds share one hook).
fn report_outcomes(outcomes: &[(DropKind, Outcome)]) {
    let mut groups: Vec<(Vec<&'static str>, &Outcome)> = Vec::new();
    for (kind, outcome) in outcomes {
        match groups.iter_mut().find(|(_, o)| *o == outcome) {
            Some((kinds, _)) => kinds.push(kind.as_str()),
            None => groups.push((vec![kind.as_str()], outcome)),
        }
    }
    for (kinds, outcome) in groups {
        let kinds = kinds.join(", ");
        match outcome {
            Outcome::Attached { hook, skipped, .. } => {
                note(format_args!("{kinds}: {hook}"));
                for reason in skipped {
                    note(format_args!("  skipped: {reason}"));
                }
            }
            Outcome::NotObservable { reason } => {
                note(format_args!("{kinds}: not observable: {reason}"));
            }
        }
    }
}
