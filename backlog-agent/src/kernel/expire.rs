//! Expiry of the kernel's per-listener accounting rows (issue 11).
//!
//! DROP_TOTALS and UNIX_TOTALS get one row per listener (and kind, or per
//! client netns and path) and the kernel never removes them: with churning
//! listeners they would fill (16,384 rows, then drops go uncounted) and the
//! agent would read every dead row every second. So a row that has not
//! changed for `--expire-after` is deleted from the kernel map by the agent
//! and its final counts move here, into a user-side "retired" part that
//! the totals keep adding in: every consumer (summary, metrics) still sees
//! the same monotonic, exact totals. If the kernel re-creates the row
//! later (same key, counting from 0), the live row adds to the retired one.

use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

use backlog_common::DropCounts;

/// Retired rows kept one per key; beyond this, a retired row's counts fold
/// into one "other" total per map, so memory stays bounded whatever the
/// churn (about 100 bytes a row).
pub const RETIRED_CAP: usize = 16_384;

fn add(a: DropCounts, b: DropCounts) -> DropCounts {
    DropCounts {
        total: a.total + b.total,
        sent: a.sent + b.sent,
        suppressed: a.suppressed + b.suppressed,
        lost: a.lost + b.lost,
    }
}

struct Row {
    last: DropCounts,
    changed: Instant,
}

/// What the agent knows of one per-listener map's rows.
pub struct Expiry<K> {
    /// None: never expire (`--expire-after 0`).
    after: Option<Duration>,
    /// Every live row's last value (summed over CPUs) and when it changed.
    rows: HashMap<K, Row>,
    retired: HashMap<K, DropCounts>,
    cap: usize,
    /// Retired rows beyond `cap`, folded together.
    pub other: DropCounts,
    /// Rows moved out of the kernel map since start.
    pub expired: u64,
}

impl<K: Copy + Eq + Hash> Expiry<K> {
    pub fn new(after: Option<Duration>, cap: usize) -> Self {
        Expiry {
            after,
            rows: HashMap::new(),
            retired: HashMap::new(),
            cap,
            other: DropCounts::ZERO,
            expired: 0,
        }
    }

    /// `--expire-after`, None for never.
    pub fn after(&self) -> Option<Duration> {
        self.after
    }

    /// Records the live rows as read at `now`; returns the keys unchanged
    /// for at least `after`, to be read once more and deleted.
    pub fn observe(&mut self, live: &[(K, DropCounts)], now: Instant) -> Vec<K> {
        let Some(after) = self.after else {
            return Vec::new();
        };
        // Rows gone from the map (deleted by us) must not keep state.
        if self.rows.len() > live.len() {
            let present: std::collections::HashSet<&K> = live.iter().map(|(k, _)| k).collect();
            self.rows.retain(|k, _| present.contains(k));
        }
        let mut idle = Vec::new();
        for (key, counts) in live {
            let row = self.rows.entry(*key).or_insert(Row {
                last: *counts,
                changed: now,
            });
            if row.last != *counts {
                row.last = *counts;
                row.changed = now;
            } else if now.duration_since(row.changed) >= after {
                idle.push(*key);
            }
        }
        idle
    }

    /// The value `observe` last saw for `key`: the row may be deleted only
    /// if a fresh read still equals it (nothing was counted since).
    pub fn last(&self, key: &K) -> Option<DropCounts> {
        self.rows.get(key).map(|r| r.last)
    }

    /// The row `key`, with these final counts, was deleted from the kernel.
    pub fn retire(&mut self, key: K, last: DropCounts) {
        self.rows.remove(&key);
        self.expired += 1;
        let cap = self.cap;
        let len = self.retired.len();
        match self.retired.get_mut(&key) {
            Some(sum) => *sum = add(*sum, last),
            None if len < cap => {
                self.retired.insert(key, last);
            }
            None => self.other = add(self.other, last),
        }
    }

    /// Drops the retired rows `gone` selects, without folding them into
    /// `other`: their counts were moved elsewhere (the summary's folded
    /// listeners, summary.rs).
    pub fn forget_retired(&mut self, gone: impl Fn(&K) -> bool) {
        self.retired.retain(|k, _| !gone(k));
    }

    /// The live rows with the retired parts added in, plus the retired rows
    /// that are not live: cumulative totals since the agent started.
    pub fn merged(&self, live: Vec<(K, DropCounts)>) -> Vec<(K, DropCounts)> {
        if self.retired.is_empty() {
            return live;
        }
        let mut out = Vec::with_capacity(live.len() + self.retired.len());
        let mut in_live = std::collections::HashSet::with_capacity(live.len());
        for (key, counts) in live {
            in_live.insert(key);
            let retired = self.retired.get(&key).copied().unwrap_or(DropCounts::ZERO);
            out.push((key, add(counts, retired)));
        }
        out.extend(
            self.retired
                .iter()
                .filter(|(k, _)| !in_live.contains(*k))
                .map(|(k, c)| (*k, *c)),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(n: u64) -> DropCounts {
        DropCounts {
            total: n,
            sent: n,
            suppressed: 0,
            lost: 0,
        }
    }

    fn total_of(rows: &[(u32, DropCounts)], key: u32) -> u64 {
        rows.iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, c)| c.total)
            .sum()
    }

    /// A row is expired only once idle for `after`, and its total stays
    /// monotonic across the delete and a re-created row counting from 0.
    #[test]
    fn totals_stay_monotonic_across_delete_and_recreate() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut e = Expiry::new(Some(s), 10);
        assert!(e.observe(&[(7, counts(5))], t0).is_empty());
        // Changed: not idle.
        assert!(e.observe(&[(7, counts(6))], t0 + s).is_empty());
        assert_eq!(e.observe(&[(7, counts(6))], t0 + 2 * s), vec![7]);
        assert_eq!(e.last(&7), Some(counts(6)));
        e.retire(7, counts(6));
        assert_eq!(e.expired, 1);
        // Gone from the kernel: the total is the retired part.
        assert_eq!(total_of(&e.merged(Vec::new()), 7), 6);
        assert!(e.observe(&[], t0 + 3 * s).is_empty());
        // Re-created by the kernel from 0: adds to the retired part.
        let live = vec![(7, counts(2))];
        assert!(e.observe(&live, t0 + 4 * s).is_empty());
        assert_eq!(total_of(&e.merged(live), 7), 8);
        e.retire(7, counts(2));
        assert_eq!(total_of(&e.merged(Vec::new()), 7), 8);
        assert_eq!(e.expired, 2);
    }

    #[test]
    fn never_expires_with_zero() {
        let t0 = Instant::now();
        let mut e: Expiry<u32> = Expiry::new(None, 10);
        e.observe(&[(1, counts(1))], t0);
        assert!(e
            .observe(&[(1, counts(1))], t0 + Duration::from_secs(3600))
            .is_empty());
    }

    /// Beyond the cap, retired rows fold into `other`; nothing is lost.
    #[test]
    fn retired_rows_are_bounded() {
        let mut e: Expiry<u32> = Expiry::new(Some(Duration::ZERO), 2);
        for key in 0..5 {
            e.retire(key, counts(10));
        }
        let merged = e.merged(Vec::new());
        assert_eq!(merged.len(), 2);
        let kept: u64 = merged.iter().map(|(_, c)| c.total).sum();
        assert_eq!(kept + e.other.total, 50);
    }
}
