//! backlog-agent: see `--help`. Errors leave as one line on stderr with a
//! non-zero exit code; everything the user should know about what is and
//! is not observed goes to stderr, events to stdout.

use std::{io, path::Path, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use backlog_agent::{
    btf::Btf,
    caps,
    cli::Cli,
    counted,
    filter::Filters,
    preflight,
    probes::{self, Outcome},
    sink::{Options, Sink},
    tracefs,
};
use backlog_common::DropKind;
use clap::Parser as _;
use tokio::{
    io::{unix::AsyncFd, Interest},
    signal::unix::{signal, SignalKind},
};

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
    let (mut probes, absent) = probes::start(
        cli.attach,
        cli.ring_buffer_kib,
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
    let ring = probes.take_events()?;
    let counters = probes.take_counters()?;
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
    });
    let deadline = cli.duration.map(|d| tokio::time::Instant::now() + d);
    note(format_args!(
        "ready: watching {attached} of {} drop kinds; Ctrl-C to stop",
        probes.outcomes.len()
    ));

    let mut interval = cli.interval.map(|every| {
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    });
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = until(deadline) => break,
            () = tick(&mut interval) => {
                sink.report(&format!(
                    "backlog-agent: summary after {:.1} s:",
                    started.elapsed().as_secs_f64()
                ));
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
    // Detach first so that nothing new arrives, then read what is queued.
    drop(probes);
    drain(ring.get_mut(), &mut sink);
    note("detached");

    match counters.events_lost() {
        Ok(lost) => sink.summary.losses.lost_in_kernel = lost,
        Err(err) => note(format_args!("cannot read the lost-event counter: {err}")),
    }
    match counters.totals() {
        Ok(totals) => sink.summary.apply_totals(&totals),
        Err(err) => note(format_args!("cannot read the per-listener totals: {err}")),
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
    let scans = sink.owners.stats();
    if scans.vanished + scans.unreadable > 0 {
        note(format_args!(
            "attribution: {} /proc scans; {} processes exited mid-scan, {} unreadable",
            scans.scans, scans.vanished, scans.unreadable
        ));
    }
    Ok(())
}

fn drain(ring: &mut RingBuf<MapData>, sink: &mut Sink) {
    while let Some(record) = ring.next() {
        sink.handle(&record);
    }
    sink.flush();
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
