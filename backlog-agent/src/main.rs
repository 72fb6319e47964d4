//! backlog-agent: see `--help`. Errors leave as one line on stderr with a
//! non-zero exit code; everything the user should know about what is and
//! is not observed goes to stderr, events to stdout.
//!
//! This file is the loop: start (agent.rs), drain the ring buffer and
//! answer timers, scrapes and signals, stop.

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use backlog_agent::{
    agent::{self, AGGREGATE_WINDOW},
    cli::Cli,
    http,
    report::metrics::Metrics,
    wakeup::Read,
};
use clap::Parser as _;
use tokio::signal::unix::{signal, SignalKind};

/// How often the near-full warnings are read from the kernel's map.
const NEAR_FULL_POLL: Duration = Duration::from_millis(200);

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
    let mut running = agent::start(&cli).await?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    // Near-full crossings are read from a map, a few times a second.
    let mut near_full_poll = tokio::time::interval(NEAR_FULL_POLL);
    near_full_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = cli.duration.map(|d| tokio::time::Instant::now() + d);
    agent::ready(&running);

    let every = |period: Duration| {
        let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        timer
    };
    let mut interval = cli.interval.map(every);
    let mut window = every(AGGREGATE_WINDOW);
    loop {
        let r = &mut running;
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = until(deadline) => break,
            () = tick(&mut interval) => agent::summary(r),
            // Polling while records come, asleep once they stop (wakeup.rs).
            // (Events waiting for their holders keep it polling: only a
            // read releases them.)
            () = poll_at(r.pace.next_poll()) => {
                agent::read_ring(r.ring.get_mut(), &mut r.sink, &mut r.pace, Read::Polled);
            }
            _ = window.tick() => {
                agent::read_ring(r.ring.get_mut(), &mut r.sink, &mut r.pace, Read::Window);
                agent::aggregate(&mut r.counters, &mut r.aggregator, &mut r.sink);
            }
            _ = near_full_poll.tick() => r.sink.poll_near_full(false),
            Some((metrics, scrape)) = next_scrape(&mut r.metrics) => {
                let snapshot = agent::scrape(
                    metrics,
                    &mut r.sink,
                    &r.counters,
                    &r.probes,
                    r.counted_before.as_ref(),
                );
                // The HTTP task may have given up waiting: nothing to do.
                let _ = scrape.reply.send(snapshot);
            }
            guard = r.ring.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer failed")?;
                agent::read_ring(guard.get_inner_mut(), &mut r.sink, &mut r.pace, Read::Woken);
                guard.clear_ready();
            }
        }
        if running.sink.stdout_closed() {
            eprintln!("backlog-agent: stdout was closed; stopping");
            break;
        }
    }
    agent::stop(running);
    Ok(())
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

/// Ready at `at`; never while the loop sleeps until woken.
async fn poll_at(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
