//! The text renderer: one readable line per event on stdout, and on
//! stderr the per-listener table with its diagnoses and the counts the
//! kernel kept where it could not trace.

use std::fmt::Write;

use backlog_common::DropKind;

use crate::{
    clock,
    enrich::attribution::Process,
    flood::FloodListener,
    kernel::probes::Outcome,
    model::{
        summary::KernelSkip, AggregateRecord, CountedNetns, DropEvent, ListenerAddr,
        NearFullWarning, Summary, UnixDrop,
    },
};

/// `pid/comm` list, or `?` when no holder was found.
pub fn process_list(processes: &[Process]) -> String {
    if processes.is_empty() {
        return "?".into();
    }
    let mut out = String::new();
    for (i, p) in processes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}/{}", p.pid, p.comm);
    }
    out
}

pub fn drop_line(drop: &DropEvent) -> String {
    let event = drop.event;
    let mut line = format!(
        "{} {} listener={} peer={} accept_queue={}/{} syn_queue={} netns={} processes={}",
        clock::rfc3339(drop.time),
        event.kind.as_str(),
        event.listener,
        event
            .peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into()),
        event.accept_queue_len,
        event.accept_queue_max,
        event.syn_queue_len,
        event.netns_inode,
        process_list(&drop.listener.processes),
    );
    if event.reset_sent {
        line.push_str(" rst_sent");
    }
    if event.partial {
        line.push_str(" (partial: some kernel fields were unreadable)");
    }
    line
}

pub fn unix_line(drop: &UnixDrop) -> String {
    format!(
        "{} {} listener=unix:{} client={}/{} accept_queue={} processes={}",
        clock::rfc3339(drop.time),
        DropKind::UnixConnectBacklogFull.as_str(),
        drop.event.path.as_deref().unwrap_or("?"),
        drop.event.pid,
        drop.event.comm,
        drop.listener
            .queue
            .map_or_else(|| "?".to_owned(), |(len, max)| format!("{len}/{max}")),
        process_list(drop.processes),
    )
}

pub fn aggregate_line(record: &AggregateRecord) -> String {
    let aggregate = record.aggregate;
    let seconds = aggregate
        .end
        .duration_since(aggregate.start)
        .unwrap_or_default()
        .as_secs_f64();
    let mut line = format!(
        "{} {} aggregated count={} over {seconds:.1}s listener={} netns={}",
        clock::rfc3339(aggregate.end),
        aggregate.kind.as_str(),
        aggregate.count,
        aggregate.listener,
        match &aggregate.listener {
            FloodListener::Inet { netns, .. } | FloodListener::Unix { netns, .. } => *netns,
        },
    );
    if !aggregate.top_peers.is_empty() {
        line.push_str(" top_peers=");
        for (i, (addr, count)) in aggregate.top_peers.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            let _ = write!(line, "{addr}x{count}");
        }
    }
    let _ = write!(line, " processes={}", process_list(record.processes));
    line
}

/// The warning as a text line, like the drop events.
pub fn near_full_line(warning: &NearFullWarning, percent: u32) -> String {
    let crossing = warning.crossing;
    let listener = match crossing.listener.socket_addr() {
        Some(addr) => addr.to_string(),
        None => "unix".to_owned(),
    };
    format!(
        "{} accept_queue_near_full listener={listener} accept_queue={}/{} threshold={percent}% \
         netns={} processes={}",
        clock::rfc3339(warning.time),
        crossing.queue_len,
        crossing.queue_max,
        warning.netns,
        process_list(warning.processes),
    )
}
/// The table printed to stderr at exit, as one string (tests).
#[cfg(test)]
pub fn summary_table(summary: &Summary) -> String {
    let mut out = String::new();
    write_summary_table(&mut out, summary);
    out
}

/// The table printed to stderr at exit, written line by line: with
/// thousands of listeners, building it as one string was megabytes held
/// at once at the end of the run.
pub fn write_summary_table(out: &mut impl Write, summary: &Summary) {
    if summary.listeners.is_empty() {
        let _ = out.write_str("no drops seen\n");
    } else {
        let _ = writeln!(
            out,
            "{:<28} {:>10} {:>9} {:<32} {:>8} {:>27}  PROCESSES",
            "LISTENER", "NETNS", "ACCEPTQ", "KIND", "COUNT", "WAIT ms p50/p90/p99/max"
        );
        for (key, stats) in &summary.listeners {
            let wait = stats.accept.as_ref().and_then(|a| a.wait_ms).map_or_else(
                || "-".to_owned(),
                |w| format!("{:.1}/{:.1}/{:.1}/{:.1}", w.p50, w.p90, w.p99, w.max),
            );
            let mut kinds: Vec<(Option<DropKind>, u64)> = stats
                .kind_counts()
                .into_iter()
                .map(|(kind, count)| (Some(kind), count))
                .collect();
            // A slow acceptor with no drops still gets its row.
            if kinds.is_empty() {
                kinds.push((None, 0));
            }
            for (kind, count) in kinds {
                let reported = kind
                    .and_then(|kind| stats.counts.get(&kind).copied())
                    .unwrap_or(0);
                // Say where the drops that are not their own line went:
                // the count is the kernel's, the lines fewer.
                let unreported = if reported < count {
                    let aggregated = kind
                        .and_then(|kind| stats.aggregated.get(&kind).copied())
                        .unwrap_or(0);
                    let lost = kind
                        .and_then(|kind| stats.accounting.get(&kind))
                        .map_or(0, |c| c.lost);
                    format!(" ({reported} events, {aggregated} aggregated, {lost} lost)")
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "{:<28} {:>10} {:>9} {:<32} {:>8} {:>27}  {}{unreported}",
                    key.listener.to_string(),
                    key.netns,
                    format!(
                        "{}/{}",
                        stats.max_accept_queue_seen, stats.accept_queue_limit
                    ),
                    kind.map_or("-", DropKind::as_str),
                    count,
                    wait,
                    process_list(&stats.processes)
                );
            }
        }
    }
    let folded = &summary.folded;
    if folded.listeners > 0 {
        let kinds: Vec<String> = folded
            .drops
            .iter()
            .map(|(kind, n)| {
                let events = folded.events.get(kind).copied().unwrap_or(0);
                let aggregated = folded.aggregated.get(kind).copied().unwrap_or(0);
                let lost = folded.lost.get(kind).copied().unwrap_or(0);
                format!(
                    "{} {n} ({events} events, {aggregated} aggregated, {lost} lost)",
                    kind.as_str()
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "other: {} idle listeners folded (more than {} listeners): {}",
            folded.listeners,
            crate::model::summary::SUMMARY_CAP,
            if kinds.is_empty() {
                "no drops".to_owned()
            } else {
                kinds.join(", ")
            }
        );
    }
    let l = summary.losses;
    let _ = writeln!(
        out,
        "events: {} reported, {} lost in the kernel (ring buffer full), {} undecodable, {} partial",
        summary.events, l.lost_in_kernel, l.undecodable, l.partial
    );
    if let Some(line) = kernel_skips_line(&summary.kernel_skips) {
        let _ = writeln!(out, "{line}");
    }
    let f = summary.flood;
    if f.suppressed_in_kernel > 0 || f.records > 0 {
        let engaged: Vec<String> = summary
            .listeners
            .iter()
            .flat_map(|(key, stats)| {
                stats
                    .aggregated
                    .iter()
                    .map(move |(kind, n)| format!("{} {} ({n})", key.listener, kind.as_str()))
            })
            .collect();
        let _ = writeln!(
            out,
            "flood mode: {} drops over the rate limit, {} of them in {} aggregate records; engaged for {}",
            f.suppressed_in_kernel,
            f.aggregated,
            f.records,
            if engaged.is_empty() { "none".to_owned() } else { engaged.join(", ") }
        );
    }
}

/// What the kernel skipped, or None while it skipped nothing. A skipped
/// run is a drop (or an arrival) that may be in no count at all, not even
/// as lost: the line says up to how many.
pub fn kernel_skips_line(skips: &[KernelSkip]) -> Option<String> {
    if skips.is_empty() {
        return None;
    }
    let total: u64 = skips.iter().map(|s| s.runs).sum();
    let each: Vec<String> = skips
        .iter()
        .map(|s| {
            let observes = if s.observes.is_empty() {
                "nothing attached".to_owned()
            } else {
                s.observes.join(", ")
            };
            format!("{} {} ({observes})", s.program, s.runs)
        })
        .collect();
    Some(format!(
        "skipped by the kernel: {total} runs of the agent's programs, because they would have \
         nested in a BPF program already running on that CPU; what those runs would have seen is in no \
         count (up to that many of what each observes missing): {}",
        each.join(", ")
    ))
}

/// The summary for stderr: `heading` and the table; each listener's
/// diagnosis follows (`write_diagnosis`).
pub fn write_summary_head(out: &mut impl Write, heading: &str, summary: &Summary) {
    let _ = writeln!(out, "{heading}");
    write_summary_table(out, summary);
}

/// One listener's diagnosis line, after the table.
pub fn write_diagnosis(out: &mut impl Write, listener: &ListenerAddr, diagnosis: &str) {
    let _ = writeln!(out, "  {listener}: {diagnosis}");
}

/// Drops counted by the kernel where they could not be traced: per-kind
/// totals derived from TcpExt, and each listener's sk_drops growth.
pub fn counted(namespaces: &[CountedNetns]) -> String {
    let mut text = String::from(
        "counted by the kernel, not traced (this kernel cannot trace SYN-stage drops):\n",
    );
    if namespaces.is_empty() {
        text.push_str("  no listen-queue counter moved in any network namespace\n");
    }
    for counted in namespaces {
        let delta = counted.delta;
        let counter = |name: &str| delta.counters.get(name).copied().unwrap_or(0);
        let _ = writeln!(
            text,
            "  netns {}: syn_dropped_syn_queue_full={} syn_cookie_sent={} \
             syn_dropped_accept_queue_full={} (ListenOverflows +{}, ListenDrops +{})",
            delta.netns,
            counted.syn_dropped_syn_queue_full,
            counted.syn_cookie_sent,
            counted.syn_dropped_accept_queue_full,
            counter("ListenOverflows"),
            counter("ListenDrops"),
        );
        for l in &delta.listeners {
            let _ = writeln!(
                text,
                "    {}:{} socket {}: sk_drops +{}",
                l.addr, l.port, l.inode, l.drops
            );
        }
    }
    text
}

/// Tells, per drop kind, which hook serves it or why none can, grouping
/// kinds that share an outcome (the five SYN-stage kinds share one hook):
/// the lines of the start-up notes.
pub fn outcomes(outcomes: &[(DropKind, Outcome)]) -> Vec<String> {
    let mut groups: Vec<(Vec<&'static str>, &Outcome)> = Vec::new();
    for (kind, outcome) in outcomes {
        match groups.iter_mut().find(|(_, o)| *o == outcome) {
            Some((kinds, _)) => kinds.push(kind.as_str()),
            None => groups.push((vec![kind.as_str()], outcome)),
        }
    }
    let mut lines = Vec::new();
    for (kinds, outcome) in groups {
        let kinds = kinds.join(", ");
        match outcome {
            Outcome::Attached { hook, skipped, .. } => {
                lines.push(format!("{kinds}: {hook}"));
                for reason in skipped {
                    lines.push(format!("  skipped: {reason}"));
                }
            }
            Outcome::NotObservable { reason } => {
                lines.push(format!("{kinds}: not observable: {reason}"));
            }
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use backlog_common::{DropCounts, DropTotalKey};

    use crate::{
        decode::Event,
        model::{ListenerContext, Placement},
        report::fixtures::{event, procs, time},
    };

    #[test]
    fn kernel_skips_are_said_with_what_they_missed() {
        assert_eq!(kernel_skips_line(&[]), None);
        let skips = [
            KernelSkip {
                program: "kfree_skb_listen_overflow".into(),
                observes: vec!["ack_dropped_accept_queue_full"],
                runs: 7,
            },
            KernelSkip {
                program: "orphan".into(),
                observes: vec![],
                runs: 2,
            },
        ];
        let line = kernel_skips_line(&skips).unwrap();
        assert!(line.starts_with("skipped by the kernel: 9 runs"), "{line}");
        assert!(
            line.ends_with(
                "kfree_skb_listen_overflow 7 (ack_dropped_accept_queue_full), \
                 orphan 2 (nothing attached)"
            ),
            "{line}"
        );
        let summary = Summary {
            kernel_skips: skips.to_vec(),
            ..Summary::default()
        };
        let mut table = String::new();
        write_summary_table(&mut table, &summary);
        assert!(table.contains(&line), "{table}");
    }

    fn line(event: &Event, processes: &[Process]) -> String {
        let context = ListenerContext::new(processes.to_vec(), Placement::default());
        drop_line(&DropEvent {
            event,
            time: time(),
            listener: &context,
        })
    }

    #[test]
    fn text_line_reads_well() {
        assert_eq!(
            line(&event(), &procs()),
            "2026-11-22T03:00:00.000000Z ack_dropped_accept_queue_full listener=[::]:8080 \
             peer=127.0.0.1:40000 accept_queue=9/8 syn_queue=2 netns=4026531840 \
             processes=10/nginx,11/nginx"
        );
        let mut e = event();
        e.peer = None;
        e.partial = true;
        let line = line(&e, &[]);
        assert!(line.contains("peer=? "), "{line}");
        assert!(line.contains("processes=?"), "{line}");
        assert!(line.ends_with("(partial: some kernel fields were unreadable)"));
    }

    // The table, from what the running totals add up to.

    fn drop_at(kind: DropKind, port: u16, inode: u64) -> Event {
        Event {
            kind,
            timestamp_ns: 0,
            cpu: 0,
            listener: SocketAddr::from(([0, 0, 0, 0], port)),
            local: None,
            peer: None,
            accept_queue_len: 9,
            accept_queue_max: 8,
            syn_queue_len: 0,
            netns_inode: 1,
            socket_inode: inode,
            cgroup_id: 0,
            partial: false,
            reset_sent: false,
        }
    }

    /// Folded listeners get one "other" line with where their drops went.
    #[test]
    fn folded_listeners_show_as_other() {
        let mut s = Summary::default();
        s.record(&drop_at(DropKind::SynCookieSent, 80, 10), &[]);
        let kind = DropKind::AckDroppedAcceptQueueFull;
        s.folded.listeners = 3;
        s.folded.drops.insert(kind, 50);
        s.folded.events.insert(kind, 20);
        s.folded.aggregated.insert(kind, 30);
        let table = summary_table(&s);
        assert!(
            table.contains(
                "other: 3 idle listeners folded (more than 4096 listeners): \
                 ack_dropped_accept_queue_full 50 (20 events, 30 aggregated, 0 lost)"
            ),
            "{table}"
        );
        let line = crate::report::json::folded_line("t", &s.folded).expect("a line");
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(json["kind"], "listeners_folded");
        assert_eq!(json["counts"]["ack_dropped_accept_queue_full"], 50);
        assert_eq!(json["aggregated"]["ack_dropped_accept_queue_full"], 30);
        assert!(crate::report::json::folded_line("t", &Summary::default().folded).is_none());
    }

    #[test]
    fn kernel_totals_win_and_losses_show() {
        let mut s = Summary::default();
        s.record(&drop_at(DropKind::SynCookieSent, 80, 10), &[]);
        let mut key = DropTotalKey {
            socket_inode: 10,
            netns_inode: 1,
            kind: DropKind::SynCookieSent as u32,
            listener_addr: [0; 16],
            listener_port: 80,
            listener_family: backlog_common::AF_INET,
            _pad0: 0,
        };
        let other = DropTotalKey {
            kind: DropKind::SynDroppedOther as u32,
            ..key
        };
        key.listener_addr[..4].copy_from_slice(&[0, 0, 0, 0]);
        let c = |total, sent| DropCounts {
            total,
            sent,
            suppressed: 0,
            lost: total - sent,
        };
        s.apply_accounting(&[(key, c(5, 1)), (other, c(2, 2))], &[]);
        assert_eq!(s.listeners.len(), 1, "totals merge into the same listener");
        let table = summary_table(&s);
        assert!(
            table.contains(
                "syn_cookie_sent                         5                           -  ?"
            ),
            "{table}"
        );
        assert!(
            table.contains("(1 events, 0 aggregated, 4 lost)"),
            "{table}"
        );
        assert!(
            table.contains("syn_dropped_other                       2"),
            "{table}"
        );
    }

    #[test]
    fn counts_per_listener_and_kind() {
        let mut s = Summary::default();
        let p = [Process {
            pid: 5,
            comm: "srv".into(),
            cmdline: None,
        }];
        for _ in 0..3 {
            s.record(&drop_at(DropKind::AckDroppedAcceptQueueFull, 80, 10), &p);
        }
        s.record(&drop_at(DropKind::SynDroppedAcceptQueueFull, 80, 10), &p);
        s.record(&drop_at(DropKind::AckDroppedAcceptQueueFull, 81, 11), &[]);
        assert_eq!(s.events, 5);
        assert_eq!(s.listeners.len(), 2);
        let table = summary_table(&s);
        assert!(
            table.contains(
                "ack_dropped_accept_queue_full           3                           -  5/srv"
            ),
            "{table}"
        );
        assert!(
            table.contains(
                "syn_dropped_accept_queue_full           1                           -  5/srv"
            ),
            "{table}"
        );
        assert!(table.contains("0.0.0.0:81"), "{table}");
        assert!(table.contains("events: 5 reported, 0 lost"), "{table}");
    }
}
