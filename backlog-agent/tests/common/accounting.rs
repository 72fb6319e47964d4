//! Where the drops went, from the agent's JSON output: events printed,
//! drops inside aggregates, events lost, and the kernel's own total from
//! the listener summaries. The tests check the identity exactly; the
//! benchmarks print it.
//!
//! Exactly, save for one thing the agent cannot see but says: runs of its
//! programs the kernel skipped (its `kernel_skips` line). Such a drop is in
//! neither the events nor the kernel map's total, so the kernel's counter
//! may be ahead of both by at most the skipped runs of the programs that
//! observe the kinds; by more, or with nothing said, the identity fails.

use serde_json::Value;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accounted {
    pub events: u64,
    pub aggregated: u64,
    /// Aggregate records the `aggregated` drops came in.
    pub aggregates: u64,
    pub lost: u64,
    /// The kernel's total in the listener summaries.
    pub total: u64,
    /// Runs of the programs observing these kinds that the kernel skipped
    /// (the whole run's, whatever `matches` selected).
    pub skipped: u64,
}

impl Accounted {
    /// events + aggregated + lost.
    pub fn sum(&self) -> u64 {
        self.events + self.aggregated + self.lost
    }

    /// events + aggregated + lost = the kernel map's total = `counter`
    /// (short of `counter` by no more than the skipped runs).
    pub fn holds(&self, counter: u64) -> bool {
        self.sum() == self.total && explained(self.total, counter, self.skipped)
    }

    /// Asserts [`Accounted::holds`], naming what `counter` is.
    pub fn assert_holds(&self, what: &str, counter_name: &str, counter: u64) {
        assert!(
            explained(self.total, counter, self.skipped),
            "{what}: kernel total {} vs {counter_name} {counter} ({} skipped runs said)",
            self.total,
            self.skipped
        );
        assert_eq!(
            self.sum(),
            self.total,
            "{what}: events + aggregated + lost vs the kernel total ({counter_name} {counter}): \
             {self:?}"
        );
    }

    pub fn line(&self, counter_name: &str, counter: u64) -> String {
        format!(
            "events printed {}, aggregated {}, lost {}; kernel total {}; {counter_name} {counter}: identity {}",
            self.events,
            self.aggregated,
            self.lost,
            self.total,
            match (self.holds(counter), self.skipped) {
                (false, _) => "BROKEN".to_owned(),
                (true, 0) => "holds".to_owned(),
                (true, n) => format!("holds ({} short, {n} skipped runs said)", counter - self.total),
            }
        )
    }
}

/// `agent` drops counted against the kernel's `kernel`: equal, or short
/// by no more than the `skipped` runs the agent said the kernel skipped.
pub fn explained(agent: u64, kernel: u64, skipped: u64) -> bool {
    agent == kernel || (agent < kernel && kernel - agent <= skipped)
}

/// Runs the kernel skipped of the agent's programs that observe any of
/// `kinds`, from its last `kernel_skips` line (cumulative; 0 without one).
pub fn kernel_skipped(records: &[Value], kinds: &[&str]) -> u64 {
    let Some(line) = records.iter().rev().find(|r| r["kind"] == "kernel_skips") else {
        return 0;
    };
    let programs = line["programs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    programs
        .iter()
        .filter(|p| {
            p["observes"].as_array().is_some_and(|o| {
                o.iter()
                    .any(|k| k.as_str().is_some_and(|k| kinds.contains(&k)))
            })
        })
        .map(|p| p["runs"].as_u64().expect("kernel_skips runs"))
        .sum()
}

/// Sums, over the records `matches` selects (by listener or namespace),
/// what became of the drops of `kinds`.
pub fn accounted(records: &[Value], kinds: &[&str], matches: impl Fn(&Value) -> bool) -> Accounted {
    let mut a = Accounted {
        skipped: kernel_skipped(records, kinds),
        ..Accounted::default()
    };
    for record in records.iter().filter(|r| matches(r)) {
        for kind in kinds {
            if record["kind"] == "listener_summary" {
                let c = &record["accounting"][*kind];
                a.lost += c["lost"].as_u64().unwrap_or(0);
                a.total += c["total"].as_u64().unwrap_or(0);
            } else if record["kind"] == *kind && record["aggregated"] == true {
                a.aggregated += record["count"].as_u64().expect("aggregate count");
                a.aggregates += 1;
            } else if record["kind"] == *kind {
                a.events += 1;
            }
        }
    }
    a
}

/// Records of one network namespace.
pub fn in_netns(netns: u64) -> impl Fn(&Value) -> bool {
    move |r| r["netns"].as_u64() == Some(netns)
}
