//! Prometheus metrics: a plain [`Snapshot`] of what the agent knows at a
//! scrape, and its rendering in the OpenMetrics or Prometheus text format
//! with the prometheus-client crate.
//!
//! The snapshot is built in the agent's loop from what the sink, the
//! summary and the kernel's maps already hold (`Metrics::scrape`), and
//! rendered by the HTTP task (`render`), so the loop does no formatting.
//! Counters are the kernel's absolute totals, read at each scrape, so they
//! are written as constant metrics rather than incremented.
//!
//! Series are bounded: at most `--metrics-max-listeners` listeners get
//! their own; a listener admitted keeps its series for the whole run and
//! the others are added up under `listener="other"`, so every counter
//! stays monotonic. No series has a pid label.

use std::collections::{BTreeMap, HashSet};

use backlog_common::DropKind;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

use super::note;
use crate::{
    kernel::bpfstats::{self, ProgramStats},
    kernel::probes::Outcome,
    model::{summary::KernelSkip, ListenerAddr, ListenerReport},
};

/// The drops of one listener (all its sockets on one address in one
/// network namespace), with what identifies and attributes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerMetrics {
    /// `addr:port` (`[v6]:port`) or `unix:PATH`.
    pub listener: String,
    pub netns: u32,
    /// The main holder's command name.
    pub comm: Option<String>,
    pub container: Option<String>,
    /// The systemd unit, when the listener is in no container.
    pub unit: Option<String>,
    pub pod: Option<String>,
    /// Drops by kind name.
    pub drops: BTreeMap<&'static str, u64>,
    pub accept_queue_limit: u32,
    pub backlog_requested: Option<i64>,
    /// The fullest accept queue a drop showed since the previous scrape.
    pub accept_queue_max_seen: u32,
}

impl ListenerMetrics {
    fn total(&self) -> u64 {
        self.drops.values().sum()
    }
}

/// Drops the kernel counted in a namespace where they were not traced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountedDrops {
    pub netns: u64,
    pub kind: &'static str,
    pub count: u64,
}

/// The agent's own health.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub events: u64,
    pub events_lost: u64,
    pub events_undecodable: u64,
    pub events_partial: u64,
    /// Drops the kernel could not add to its per-listener totals (map full).
    pub drops_untracked: u64,
    /// Drops written inside aggregate records (flood mode, issue 11).
    pub events_aggregated: u64,
}

/// Which hook serves a drop kind (`family` "none" when none can).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookInfo {
    pub kind: &'static str,
    pub family: &'static str,
    pub hook: String,
}

/// Everything one scrape shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Listeners with series of their own.
    pub listeners: Vec<ListenerMetrics>,
    /// Drops of the listeners over the cap, by kind.
    pub other: BTreeMap<&'static str, u64>,
    pub counted: Vec<CountedDrops>,
    pub health: Health,
    /// kernel.bpf_stats_enabled (a BPF_ENABLE_STATS fd held by another
    /// tool also turns the accounting on, without showing there).
    pub bpf_stats_sysctl: bool,
    /// Empty while the kernel has accounted nothing: with the accounting
    /// off, zeros would read as "free".
    pub programs: Vec<ProgramStats>,
    /// Programs whose runs the kernel skipped, since start.
    pub kernel_skips: Vec<KernelSkip>,
    pub hooks: Vec<HookInfo>,
    pub version: &'static str,
    pub kernel: String,
}

/// The listeners that have series of their own, kept for the whole run.
#[derive(Debug)]
pub struct SeriesCap {
    max: usize,
    admitted: HashSet<(u32, String)>,
}

impl SeriesCap {
    pub fn new(max: usize) -> Self {
        SeriesCap {
            max,
            admitted: HashSet::new(),
        }
    }

    /// Splits `listeners` into those with their own series and the drops
    /// of the rest by kind. New listeners are admitted busiest first while
    /// there is room; an admitted one never leaves, so "other" only ever
    /// gains listeners and its sums never go down.
    pub fn apply(
        &mut self,
        mut listeners: Vec<ListenerMetrics>,
    ) -> (Vec<ListenerMetrics>, BTreeMap<&'static str, u64>) {
        listeners.sort_by(|a, b| {
            b.total()
                .cmp(&a.total())
                .then_with(|| (a.netns, &a.listener).cmp(&(b.netns, &b.listener)))
        });
        let mut kept = Vec::new();
        let mut other: BTreeMap<&'static str, u64> = BTreeMap::new();
        for listener in listeners {
            let key = (listener.netns, listener.listener.clone());
            let admitted = self.admitted.contains(&key)
                || (self.admitted.len() < self.max && self.admitted.insert(key));
            if admitted {
                kept.push(listener);
            } else {
                for (kind, count) in &listener.drops {
                    *other.entry(kind).or_default() += count;
                }
            }
        }
        kept.sort_by(|a, b| (a.netns, &a.listener).cmp(&(b.netns, &b.listener)));
        (kept, other)
    }
}

/// The metrics side of the agent's loop.
pub struct Metrics {
    cap: SeriesCap,
    hooks: Vec<HookInfo>,
    kernel: String,
    /// Problems already reported.
    warned: HashSet<String>,
}

impl Metrics {
    pub fn new(max_listeners: usize, outcomes: &[(DropKind, Outcome)]) -> Self {
        let hooks = outcomes
            .iter()
            .map(|(kind, outcome)| match outcome {
                Outcome::Attached { family, hook, .. } => HookInfo {
                    kind: kind.as_str(),
                    family: family.as_str(),
                    hook: hook.clone(),
                },
                Outcome::NotObservable { .. } => HookInfo {
                    kind: kind.as_str(),
                    family: "none",
                    hook: String::new(),
                },
            })
            .collect();
        Metrics {
            cap: SeriesCap::new(max_listeners),
            hooks,
            kernel: crate::kernel::preflight::kernel_release(),
            warned: HashSet::new(),
        }
    }

    /// The snapshot of one scrape, from the listeners' model and the
    /// agent's totals; the series cap is applied here.
    pub fn snapshot(
        &mut self,
        listeners: &[ListenerReport],
        health: Health,
        counted: Vec<CountedDrops>,
        programs: Vec<ProgramStats>,
    ) -> Snapshot {
        let (listeners, other) = self.cap.apply(listener_series(listeners));
        Snapshot {
            listeners,
            other,
            counted,
            health,
            bpf_stats_sysctl: bpfstats::sysctl_enabled(),
            programs,
            kernel_skips: Vec::new(),
            hooks: self.hooks.clone(),
            version: env!("CARGO_PKG_VERSION"),
            kernel: self.kernel.clone(),
        }
    }

    /// Says what went wrong once, not at every scrape.
    pub fn warn(&mut self, message: String) {
        if self.warned.insert(message.clone()) {
            note(format_args!("metrics: {message}"));
        }
    }
}

/// One series per listener: all sockets on one address in one namespace
/// are one listener here (SO_REUSEPORT groups, a restarted server).
fn listener_series(reports: &[ListenerReport]) -> Vec<ListenerMetrics> {
    let mut merged: BTreeMap<(u32, String), ListenerMetrics> = BTreeMap::new();
    for report in reports {
        let (key, stats) = (&report.key, &report.stats);
        let label = match &key.listener {
            ListenerAddr::Inet(addr) => addr.to_string(),
            ListenerAddr::Unix(_) => key.listener.to_string(),
        };
        let entry = merged
            .entry((key.netns, label.clone()))
            .or_insert_with(|| ListenerMetrics {
                listener: label,
                netns: key.netns,
                ..ListenerMetrics::default()
            });
        for (kind, count) in stats.kind_counts() {
            *entry.drops.entry(kind.as_str()).or_default() += count;
        }
        if entry.comm.is_none() {
            entry.comm = stats.processes.first().map(|p| p.comm.clone());
        }
        if let Some(workload) = &report.placement.container {
            if entry.container.is_none() && entry.unit.is_none() {
                if workload.runtime == "systemd" {
                    entry.unit = Some(workload.id.clone());
                } else {
                    entry.container = Some(workload.id.clone());
                }
                entry.pod = workload.pod.clone();
            }
        }
        entry.accept_queue_limit = entry.accept_queue_limit.max(stats.accept_queue_limit);
        entry.backlog_requested = entry
            .backlog_requested
            .max(report.backlog_requested.map(i64::from));
        entry.accept_queue_max_seen = entry
            .accept_queue_max_seen
            .max(report.accept_queue_max_since_scrape);
    }
    merged.into_values().collect()
}

/// The Content-Type of [`render`]'s output.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    }
}

/// The snapshot in the OpenMetrics text format (what Prometheus asks for)
/// or the Prometheus text format 0.0.4 (what plain clients get).
pub fn render(snapshot: Snapshot, openmetrics: bool) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    }
    Ok(out)
}

type Labels = Vec<(&'static str, String)>;

/// Labels with unknown values left out: Prometheus treats an empty label
/// as an absent one, and absent is shorter.
fn labels<const N: usize>(pairs: [(&'static str, Option<String>); N]) -> Labels {
    pairs
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
        .collect()
}

fn listener_labels(l: &ListenerMetrics) -> Labels {
    labels([
        ("listener", Some(l.listener.clone())),
        ("netns", Some(l.netns.to_string())),
    ])
}

/// One metric family: a descriptor and its samples.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut samples = samples.into_iter().peekable();
    // A family without samples would print a bare HELP/TYPE.
    let Some((_, first)) = samples.peek() else {
        return Ok(());
    };
    let metric_type = first.metric_type();
    let mut family = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn gauge(value: i64) -> ConstGauge<i64> {
    ConstGauge::new(value)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let mut drops: Vec<(Labels, ConstCounter<u64>)> = Vec::new();
        for l in &self.listeners {
            for (kind, count) in &l.drops {
                let labels = labels([
                    ("kind", Some((*kind).to_owned())),
                    ("listener", Some(l.listener.clone())),
                    ("netns", Some(l.netns.to_string())),
                    ("comm", l.comm.clone()),
                    ("container", l.container.clone()),
                    ("unit", l.unit.clone()),
                    ("pod", l.pod.clone()),
                ]);
                drops.push((labels, counter(*count)));
            }
        }
        for (kind, count) in &self.other {
            let labels = labels([
                ("kind", Some((*kind).to_owned())),
                ("listener", Some("other".to_owned())),
            ]);
            drops.push((labels, counter(*count)));
        }
        family(
            e,
            "backlog_drops",
            "Connections a listener dropped, by kind: the kernel's exact per-listener totals \
             (UNIX listeners: EAGAINs counted per path and the clients' netns)",
            None,
            drops,
        )?;
        family(
            e,
            "backlog_accept_queue_limit",
            "The listener's accept-queue limit (the backlog after net.core.somaxconn)",
            None,
            self.listeners
                .iter()
                .filter(|l| l.accept_queue_limit > 0)
                .map(|l| (listener_labels(l), gauge(i64::from(l.accept_queue_limit)))),
        )?;
        family(
            e,
            "backlog_listen_backlog_requested",
            "The backlog the process passed to listen(), where the agent saw the call",
            None,
            self.listeners.iter().filter_map(|l| {
                l.backlog_requested
                    .map(|requested| (listener_labels(l), gauge(requested)))
            }),
        )?;
        family(
            e,
            "backlog_accept_queue_max_seen",
            "The fullest accept queue a drop showed since the previous scrape (0: no drop)",
            None,
            self.listeners.iter().map(|l| {
                (
                    listener_labels(l),
                    gauge(i64::from(l.accept_queue_max_seen)),
                )
            }),
        )?;
        family(
            e,
            "backlog_netns_counted_drops",
            "SYN-stage drops the kernel counted in a network namespace where this kernel \
             cannot trace them (TcpExt deltas since the agent started)",
            None,
            self.counted.iter().map(|c| {
                let labels = labels([
                    ("kind", Some(c.kind.to_owned())),
                    ("netns", Some(c.netns.to_string())),
                ]);
                (labels, counter(c.count))
            }),
        )?;
        let health = [
            (
                "backlog_events",
                "Events received from the kernel",
                self.health.events,
            ),
            (
                "backlog_events_lost",
                "Events the kernel could not queue (ring buffer full)",
                self.health.events_lost,
            ),
            (
                "backlog_events_undecodable",
                "Records the agent could not decode",
                self.health.events_undecodable,
            ),
            (
                "backlog_events_partial",
                "Events with an unreadable kernel field",
                self.health.events_partial,
            ),
            (
                "backlog_drops_untracked",
                "Drops the kernel could not add to its per-listener totals (too many listeners)",
                self.health.drops_untracked,
            ),
            (
                "backlog_events_aggregated",
                "Drops over the rate limit, written inside aggregate records",
                self.health.events_aggregated,
            ),
        ];
        for (name, help, value) in health {
            family(e, name, help, None, [(Labels::new(), counter(value))])?;
        }
        family(
            e,
            "backlog_bpf_stats_enabled",
            "kernel.bpf_stats_enabled: 1 while the kernel accounts eBPF program run times",
            None,
            [(Labels::new(), gauge(i64::from(self.bpf_stats_sysctl)))],
        )?;
        let programs = &self.programs;
        family(
            e,
            "backlog_bpf_program_run_time",
            "Time the kernel spent in each of the agent's eBPF programs",
            Some(&Unit::Seconds),
            programs.iter().map(|p| {
                (
                    labels([("program", Some(p.name.clone()))]),
                    ConstCounter::new(p.run_time_ns as f64 / 1e9),
                )
            }),
        )?;
        family(
            e,
            "backlog_bpf_program_runs",
            "Runs of each of the agent's eBPF programs",
            None,
            programs.iter().map(|p| {
                (
                    labels([("program", Some(p.name.clone()))]),
                    counter(p.run_count),
                )
            }),
        )?;
        family(
            e,
            "backlog_bpf_program_skipped_runs",
            "Runs of each of the agent's eBPF programs that the kernel skipped because they would \
             have nested in a BPF program already running on that CPU: what they would have seen \
             (`observes`) is in no other count. Only programs with skips have a series",
            None,
            self.kernel_skips.iter().map(|s| {
                (
                    labels([
                        ("program", Some(s.program.clone())),
                        ("observes", Some(s.observes.join(","))),
                    ]),
                    counter(s.runs),
                )
            }),
        )?;
        family(
            e,
            "backlog_hook_info",
            "The hook that observes each drop kind on this kernel (family \"none\": not observable)",
            None,
            self.hooks.iter().map(|h| {
                let labels = labels([
                    ("kind", Some(h.kind.to_owned())),
                    ("family", Some(h.family.to_owned())),
                    ("hook", Some(h.hook.clone()).filter(|h| !h.is_empty())),
                ]);
                (labels, gauge(1))
            }),
        )?;
        family(
            e,
            "backlog_build_info",
            "The agent's version and the kernel it runs on",
            None,
            [(
                labels([
                    ("version", Some(self.version.to_owned())),
                    ("kernel", Some(self.kernel.clone())),
                ]),
                gauge(1),
            )],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
