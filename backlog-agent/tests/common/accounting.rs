//! Where the drops went, from the agent's JSON output: events printed,
//! drops inside aggregates, events lost, and the kernel's own total from
//! the listener summaries. The tests check the identity exactly; the
//! benchmarks print it.

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
}

impl Accounted {
    /// events + aggregated + lost.
    pub fn sum(&self) -> u64 {
        self.events + self.aggregated + self.lost
    }

    /// events + aggregated + lost = `counter` = the kernel's total.
    pub fn holds(&self, counter: u64) -> bool {
        self.sum() == counter && self.total == counter
    }

    /// Asserts [`Accounted::holds`], naming what `counter` is.
    pub fn assert_holds(&self, what: &str, counter_name: &str, counter: u64) {
        assert_eq!(
            self.total, counter,
            "{what}: kernel total vs {counter_name}"
        );
        assert_eq!(
            self.sum(),
            counter,
            "{what}: events + aggregated + lost vs {counter_name}: {self:?}"
        );
    }

    pub fn line(&self, counter_name: &str, counter: u64) -> String {
        format!(
            "events printed {}, aggregated {}, lost {}; kernel total {}; {counter_name} {counter}: identity {}",
            self.events,
            self.aggregated,
            self.lost,
            self.total,
            if self.holds(counter) { "holds" } else { "BROKEN" }
        )
    }
}

/// Sums, over the records `matches` selects (by listener or namespace),
/// what became of the drops of `kinds`.
pub fn accounted(records: &[Value], kinds: &[&str], matches: impl Fn(&Value) -> bool) -> Accounted {
    let mut a = Accounted::default();
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
