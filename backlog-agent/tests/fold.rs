//! Privileged test of the summary's cap (issue 11): more UNIX listeners
//! with drops than the summary keeps one by one (`SUMMARY_CAP`), in a
//! private network namespace, all idle once they have dropped. The agent
//! must list at most `SUMMARY_CAP` of them, fold the rest into "other"
//! (the `listeners_folded` JSON line, the table's `other:` line, the
//! metrics' `listener="other"`), and lose nothing: the listed totals plus
//! the folded ones are the EAGAINs the client saw, which for UNIX is the
//! kernel's own count. And a path's total, shared by the listeners that
//! held it in turn, is counted once over them.
//!
//! Host only (xtask's HOST_ONLY_TESTS): folding is the agent's own
//! bookkeeping, the same on every kernel, and the UNIX EAGAIN hook it
//! counts with runs in the guests through flood.rs already.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    os::unix::net::UnixListener,
    path::Path,
    time::Duration,
};

use backlog_agent::model::summary::SUMMARY_CAP;
use common::{
    accounting::{accounted, in_netns},
    http, in_new_netns, netns_inode, privileged, serial, storm, Agent,
};
use serde_json::Value;

/// Listeners with drops: past the cap by enough that every one of them
/// exists in the summary before the first fold (which goes down to 3/4
/// of the cap).
const LISTENERS: usize = SUMMARY_CAP + 104;
/// connect()s tried per full listener: with one event a second allowed,
/// the first EAGAIN is an event and the others go into aggregates, so the
/// folded part has both.
const ATTEMPTS_EACH: u64 = 3;
const KIND: &str = "unix_connect_backlog_full";

/// The listeners, held full, and the EAGAINs the client saw per path.
struct Flooded {
    netns: u64,
    held: Vec<(UnixListener, Vec<i32>)>,
    eagain: BTreeMap<String, u64>,
}

/// In a new network namespace, `LISTENERS` UNIX listeners with backlog 0
/// under `dir`, each filled by one connect() and then tried
/// `ATTEMPTS_EACH` times without blocking.
fn flood_listeners(dir: &Path) -> Flooded {
    let dir = dir.to_owned();
    in_new_netns(move || {
        let mut held = Vec::with_capacity(LISTENERS);
        let mut eagain = BTreeMap::new();
        for i in 0..LISTENERS {
            let path = dir.join(format!("{i}.sock"));
            let (listener, fds) = storm::full_listener(&path, 0);
            let storm = storm::storm(&path, ATTEMPTS_EACH, Duration::from_secs(10));
            let path = path.to_str().expect("UTF-8 path").to_owned();
            eagain.insert(path, storm.eagain);
            held.push((listener, fds));
        }
        Flooded {
            netns: netns_inode(),
            held,
            eagain,
        }
    })
}

/// Each listener holds two fds here (the listener, the client that fills
/// it): raises the soft limit to the hard one when that is short.
fn raise_fd_limit(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < needed {
            limit.rlim_cur = limit.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    assert!(
        limit.rlim_cur >= needed,
        "RLIMIT_NOFILE {} is below the {needed} fds this test holds",
        limit.rlim_cur
    );
}

/// The sum of every `backlog_drops_total` series of `kind` in an
/// exposition, "other" included.
fn metrics_drops(exposition: &str, kind: &str) -> u64 {
    let label = format!("kind=\"{kind}\"");
    exposition
        .lines()
        .filter(|l| l.starts_with("backlog_drops_total{") && l.contains(&label))
        .map(|l| {
            let value = l.rsplit(' ').next().unwrap_or("");
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad sample {l:?}")) as u64
        })
        .sum()
}

/// How many `backlog_drops_total` series name a listener under `dir`.
fn own_series(exposition: &str, dir: &str) -> usize {
    let label = format!("listener=\"unix:{dir}");
    exposition
        .lines()
        .filter(|l| l.starts_with("backlog_drops_total{") && l.contains(&label))
        .count()
}

#[test]
fn idle_listeners_past_the_cap_fold_into_other_with_exact_totals() {
    if !privileged("idle_listeners_past_the_cap_fold_into_other_with_exact_totals") {
        return;
    }
    let _serial = serial();
    raise_fd_limit(2 * LISTENERS as u64 + 1024);
    // Rows unchanged for 1 s leave the kernel maps: the listeners are
    // idle and not live soon after their last EAGAIN, so they may fold.
    let mut agent = Agent::expect_ready(&[
        "--output",
        "json",
        "--max-events-per-sec",
        "1",
        "--expire-after",
        "1",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    let metrics = http::metrics_addr(&agent.startup());
    let dir = tempfile::tempdir().expect("tempdir");
    let flooded = flood_listeners(dir.path());
    // Before any fold: the first listeners get series of their own, which
    // folding takes away again (README), moving their drops to "other".
    let (status, before_fold) = http::get(metrics, "/metrics");
    assert_eq!(status, 200, "{before_fold}");
    let fold_note =
        agent.wait_for_stderr("into the summary's \"other\" row", Duration::from_secs(60));
    let (status, exposition) = http::get(metrics, "/metrics");
    assert_eq!(status, 200, "{exposition}");
    let run = agent.stop();
    for (listener, fds) in flooded.held {
        storm::release(fds);
        drop(listener);
    }
    assert!(run.status.success(), "{}", run.stderr);

    let eagain: u64 = flooded.eagain.values().sum();
    let dropping = flooded.eagain.values().filter(|n| **n > 0).count();
    assert_eq!(dropping, LISTENERS, "a listener saw no EAGAIN");
    let records = run.json_events();
    let dir_text = dir.path().to_str().expect("UTF-8 path");
    let ours = |r: &Value| {
        in_netns(flooded.netns)(r)
            && r["listener"]["path"]
                .as_str()
                .is_some_and(|p| p.starts_with(dir_text))
    };

    // (1) At most SUMMARY_CAP listeners one by one, plus one folded line.
    let summaries: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "listener_summary")
        .collect();
    assert!(
        summaries.len() <= SUMMARY_CAP,
        "{} listeners listed one by one",
        summaries.len()
    );
    let folded: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "listeners_folded")
        .collect();
    assert_eq!(folded.len(), 1, "one listeners_folded line at exit");
    let folded = folded[0];
    let of_kind = |field: &str| folded[field][KIND].as_u64().unwrap_or(0);
    let folded_listeners = folded["listeners"].as_u64().expect("folded listeners");

    // (2) Every listener that dropped is listed or folded, not both:
    // listed ones with their client's exact count.
    let mut listed: HashMap<String, u64> = HashMap::new();
    for summary in summaries.iter().filter(|r| ours(r)) {
        let path = summary["listener"]["path"].as_str().expect("a path");
        *listed.entry(path.to_owned()).or_default() +=
            summary["accounting"][KIND]["total"].as_u64().unwrap_or(0);
    }
    for (path, total) in &listed {
        assert_eq!(
            Some(total),
            flooded.eagain.get(path),
            "{path}: listed total vs the EAGAINs its client saw"
        );
    }
    assert_eq!(
        folded_listeners,
        (dropping - listed.len()) as u64,
        "folded vs listeners with drops ({dropping}) less those listed ({})",
        listed.len()
    );

    // (3) Listed plus folded = the EAGAINs the client saw, and so do
    // events + aggregated + lost, the folded part's own too.
    let a = accounted(&records, &[KIND], ours);
    common::figure(&format!(
        "fold: listeners={LISTENERS} eagain={eagain} summaries={} listed={} folded={folded_listeners} \
         listed_total={} folded_total={} events={} aggregated={} in {} records \
         lost={}+{} metrics={}/{} own_series={}/{} ({fold_note})",
        summaries.len(),
        listed.len(),
        a.total,
        of_kind("counts"),
        a.events,
        a.aggregated,
        a.aggregates,
        a.lost,
        of_kind("lost"),
        metrics_drops(&before_fold, KIND),
        metrics_drops(&exposition, KIND),
        own_series(&before_fold, dir_text),
        own_series(&exposition, dir_text)
    ));
    assert!(folded_listeners > 0, "nothing folded: {folded}");
    assert_eq!(
        a.total + of_kind("counts"),
        eagain,
        "listed + folded totals vs the EAGAINs the client saw"
    );
    assert_eq!(
        a.sum() + of_kind("lost"),
        eagain,
        "events + aggregated + lost vs the EAGAINs the client saw: {a:?}, folded {folded}"
    );
    assert_eq!(
        of_kind("events") + of_kind("aggregated") + of_kind("lost"),
        of_kind("counts"),
        "the folded part's own identity: {folded}"
    );
    assert!(a.aggregates > 0, "flood mode never engaged: {a:?}");

    // The table's "other" line says the same.
    let other = format!(
        "other: {folded_listeners} idle listeners folded (more than {SUMMARY_CAP} listeners): \
         {KIND} {} (",
        of_kind("counts")
    );
    assert!(
        run.stderr.lines().any(|l| l.starts_with(&other)),
        "no {other:?} line on stderr"
    );
    // The metrics, before and after the fold: every series of the kind,
    // "other" included, adds up to the same.
    for (when, scrape) in [("before", &before_fold), ("after", &exposition)] {
        assert_eq!(
            metrics_drops(scrape, KIND),
            eagain,
            "backlog_drops_total {when} the fold, \"other\" included"
        );
    }
}

/// A UNIX path whose listener was replaced (php-fpm restarted: a new
/// socket at the same path) has one kernel total for both listeners: the
/// summary's counts over the two add up to the EAGAINs the client saw,
/// once (the second listener's own events are not counted again).
#[test]
fn a_replaced_unix_listener_counts_its_path_once() {
    if !privileged("a_replaced_unix_listener_counts_its_path_once") {
        return;
    }
    let _serial = serial();
    // Under the rate limit: every EAGAIN is an event as well.
    let attempts = 5;
    let mut agent = Agent::expect_ready(&["--output", "json", "--expire-after", "1"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fpm.sock");
    let path_text = path.to_str().expect("UTF-8 path").to_owned();
    let storm_once = |path: &Path| {
        let (listener, held) = storm::full_listener(path, 0);
        let storm = storm::storm(path, attempts, Duration::from_secs(10));
        (listener, held, storm.eagain)
    };
    let (first, held, eagain_first) = storm_once(&path);
    let of_path = |r: &Value| r["listener"]["path"] == path_text.as_str();
    agent.wait_for_events(eagain_first as usize, Duration::from_secs(30), |r| {
        r["kind"] == KIND && of_path(r)
    });
    // Once the first listener's row expired (after 1 s), the agent's
    // cached view of the path is stale too: the next EAGAINs find the
    // new listener.
    agent.wait_for_stderr("idle listener rows", Duration::from_secs(30));
    storm::release(held);
    drop(first);
    std::fs::remove_file(&path).expect("remove the first socket");
    let (second, held, eagain_second) = storm_once(&path);
    agent.wait_for_events(
        (eagain_first + eagain_second) as usize,
        Duration::from_secs(30),
        |r| r["kind"] == KIND && of_path(r),
    );
    let run = agent.stop();
    storm::release(held);
    drop(second);
    assert!(run.status.success(), "{}", run.stderr);
    let records = run.json_events();
    let summaries: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "listener_summary" && of_path(r))
        .collect();
    let inodes: std::collections::BTreeSet<u64> = summaries
        .iter()
        .filter_map(|r| r["socket_inode"].as_u64())
        .collect();
    let counted: u64 = summaries
        .iter()
        .map(|r| r["counts"][KIND].as_u64().unwrap_or(0))
        .sum();
    let eagain = eagain_first + eagain_second;
    common::figure(&format!(
        "replaced UNIX listener: eagain={eagain_first}+{eagain_second} listeners={} \
         (inodes {inodes:?}) counted={counted}",
        summaries.len()
    ));
    assert_eq!(
        inodes.len(),
        2,
        "not two listeners at the path: {summaries:?}"
    );
    assert_eq!(counted, eagain, "the path's counts over its listeners");
    let a = accounted(&records, &[KIND], of_path);
    a.assert_holds("replaced listener", "EAGAINs the client saw", eagain);
}
