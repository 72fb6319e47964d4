//! Per-listener totals for the exit summary.

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use backlog_common::DropKind;

use crate::{attribution::Process, decode::Event, output::process_list};

/// A listener is its socket; the address and netns make it readable and
/// keep listeners apart when the socket inode is unknown (0).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListenerKey {
    pub netns: u32,
    pub listener: SocketAddr,
    pub socket_inode: u64,
}

#[derive(Clone, Debug, Default)]
pub struct ListenerStats {
    pub counts: BTreeMap<DropKind, u64>,
    pub processes: Vec<Process>,
    pub max_accept_queue_seen: u32,
    pub accept_queue_limit: u32,
}

/// Agent-side bookkeeping of what could not be reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Losses {
    /// Records that did not decode.
    pub undecodable: u64,
    /// Events the kernel could not queue (ring buffer full).
    pub lost_in_kernel: u64,
    /// Events with some unreadable kernel field.
    pub partial: u64,
}

#[derive(Default)]
pub struct Summary {
    pub listeners: BTreeMap<ListenerKey, ListenerStats>,
    pub events: u64,
    pub losses: Losses,
}

impl Summary {
    pub fn record(&mut self, event: &Event, processes: &[Process]) {
        self.events += 1;
        if event.partial {
            self.losses.partial += 1;
        }
        let key = ListenerKey {
            netns: event.netns_inode,
            listener: event.listener,
            socket_inode: event.socket_inode,
        };
        let stats = self.listeners.entry(key).or_default();
        *stats.counts.entry(event.kind).or_default() += 1;
        if !processes.is_empty() {
            stats.processes = processes.to_vec();
        }
        stats.max_accept_queue_seen = stats.max_accept_queue_seen.max(event.accept_queue_len);
        stats.accept_queue_limit = event.accept_queue_max;
    }

    /// The table printed to stderr at exit.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.listeners.is_empty() {
            out.push_str("no drops seen\n");
        } else {
            let _ = writeln!(
                out,
                "{:<28} {:>10} {:>9} {:<32} {:>8}  PROCESSES",
                "LISTENER", "NETNS", "ACCEPTQ", "KIND", "COUNT"
            );
            for (key, stats) in &self.listeners {
                for (kind, count) in &stats.counts {
                    let _ = writeln!(
                        out,
                        "{:<28} {:>10} {:>9} {:<32} {:>8}  {}",
                        key.listener.to_string(),
                        key.netns,
                        format!(
                            "{}/{}",
                            stats.max_accept_queue_seen, stats.accept_queue_limit
                        ),
                        kind.as_str(),
                        count,
                        process_list(&stats.processes)
                    );
                }
            }
        }
        let l = self.losses;
        let _ = writeln!(
            out,
            "events: {} reported, {} lost in the kernel (ring buffer full), {} undecodable, {} partial",
            self.events, l.lost_in_kernel, l.undecodable, l.partial
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: DropKind, port: u16, inode: u64) -> Event {
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
        }
    }

    #[test]
    fn counts_per_listener_and_kind() {
        let mut s = Summary::default();
        let p = [Process {
            pid: 5,
            comm: "srv".into(),
        }];
        for _ in 0..3 {
            s.record(&event(DropKind::AckDroppedAcceptQueueFull, 80, 10), &p);
        }
        s.record(&event(DropKind::SynDroppedAcceptQueueFull, 80, 10), &p);
        s.record(&event(DropKind::AckDroppedAcceptQueueFull, 81, 11), &[]);
        assert_eq!(s.events, 5);
        assert_eq!(s.listeners.len(), 2);
        let table = s.render();
        assert!(
            table.contains("ack_dropped_accept_queue_full           3  5/srv"),
            "{table}"
        );
        assert!(
            table.contains("syn_dropped_accept_queue_full           1  5/srv"),
            "{table}"
        );
        assert!(table.contains("0.0.0.0:81"), "{table}");
        assert!(table.contains("events: 5 reported, 0 lost"), "{table}");
    }
}
