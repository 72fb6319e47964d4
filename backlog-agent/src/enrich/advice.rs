//! What listen backlog a service needs, from what was measured. Pure
//! arithmetic, so that every rule is unit-tested with numbers.
//!
//! The rules (AIX tuning guide; the php-fpm backlog change from 65535 to
//! 511):
//! - a queue absorbs a burst if it holds what arrives while the acceptor
//!   stalls: about the peak arrival rate times the longest stall (and at
//!   least the deepest queue actually seen);
//! - a queue deeper than the accept rate times the client's (or proxy's)
//!   timeout only turns quick drops into timeouts: at 5,000 accepts/s a
//!   full 65,535-deep queue takes 13 s to drain, so nginx gives up (504)
//!   and php-fpm then writes to a closed socket;
//! - when accept() stays below the arrival rate, no backlog helps: the
//!   queue fills whatever its size; it takes more workers or a faster
//!   handler.

use serde::Serialize;

/// What was measured for one listener.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Measured {
    /// The accept-queue limit in force (sk_max_ack_backlog).
    pub backlog_limit: u32,
    /// Busiest one-second window of completed handshakes.
    pub peak_arrival_per_s: f64,
    /// Busiest one-second window of accept()s: what the acceptor can do.
    pub peak_accept_per_s: f64,
    /// Averages over the reporting interval; the arrival rate counts
    /// dropped connections too (the offered load).
    pub arrival_per_s: f64,
    pub accept_per_s: f64,
    /// Longest time a connection waited in the accept queue, seconds.
    pub longest_wait_s: f64,
    pub max_queue_seen: u32,
    /// Connections dropped with the queue full.
    pub drops: u64,
    /// How long clients or the proxy in front wait before giving up.
    pub client_timeout_s: f64,
    /// Seconds the averages cover.
    pub interval_s: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// The backlog fits what was seen: change nothing.
    None,
    Raise,
    Lower,
    /// accept() does not keep up: no backlog size helps.
    AddWorkers,
}

/// `backlog_advice` of the listener summary.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Advice {
    /// Smallest backlog that absorbs the bursts seen.
    pub min: u32,
    /// Largest useful backlog (accept rate x timeout); None when no accept
    /// rate was measured.
    pub max: Option<u32>,
    pub action: Action,
    pub reason: String,
}

pub fn advise(m: &Measured) -> Advice {
    let limit = m.backlog_limit;
    let burst = (m.peak_arrival_per_s * m.longest_wait_s).ceil();
    let need = (burst.min(u32::MAX as f64) as u32)
        .max(m.max_queue_seen)
        .max(1);
    let capacity = m.peak_accept_per_s.max(m.accept_per_s);
    let ceiling = (capacity > 0.0)
        .then(|| (capacity * m.client_timeout_s).floor().min(u32::MAX as f64) as u32)
        .map(|c| c.max(1));
    let timeout = m.client_timeout_s;
    let advice = |min: u32, action, reason: String| Advice {
        min,
        max: ceiling,
        action,
        reason,
    };

    // A burst that overflows also has more arrivals than accepts for a
    // while. What no queue absorbs is an excess that, carried over the
    // whole window, would not drain within the timeout.
    if m.drops > 0 && capacity > 0.0 && m.arrival_per_s > capacity {
        let excess = (m.arrival_per_s - capacity) * m.interval_s + f64::from(m.max_queue_seen);
        if ceiling.is_some_and(|c| excess > f64::from(c)) {
            return advice(
                need,
                Action::AddWorkers,
                format!(
                    "accept() managed at most {capacity:.0}/s but {:.0}/s arrived on average \
                     for {:.0} s: no backlog will help; add workers or make the handler faster",
                    m.arrival_per_s, m.interval_s
                ),
            );
        }
    }
    if let Some(ceiling) = ceiling {
        let drain_s = f64::from(limit) / capacity;
        let stalls_near_timeout = m.longest_wait_s * 2.0 >= timeout;
        if limit > ceiling && (stalls_near_timeout || m.max_queue_seen > ceiling) {
            return advice(
                need.min(ceiling),
                Action::Lower,
                format!(
                    "a full queue of {limit} takes {drain_s:.1} s to drain at {capacity:.0} \
                     accepts/s, longer than the {timeout:.0} s client timeout: clients time out \
                     (504) instead of failing fast; lower the backlog to at most {ceiling}"
                ),
            );
        }
        if need > ceiling {
            return advice(
                need,
                Action::AddWorkers,
                format!(
                    "bursts need a queue of {need} ({:.0}/s for {:.3} s), but at {capacity:.0} \
                     accepts/s only {ceiling} drain within the {timeout:.0} s client timeout: \
                     add workers or make the handler faster",
                    m.peak_arrival_per_s, m.longest_wait_s
                ),
            );
        }
    }
    let too_small = need > limit || (m.drops > 0 && m.max_queue_seen >= limit);
    if too_small {
        // The deepest queue seen is capped by the limit itself when it
        // overflowed: the connections turned away needed room too.
        let target = if m.drops > 0 {
            need.max(
                m.max_queue_seen
                    .saturating_add(u32::try_from(m.drops).unwrap_or(u32::MAX)),
            )
        } else {
            need
        };
        let target = ceiling.map_or(target, |c| target.min(c));
        let why = if m.peak_arrival_per_s > 0.0 {
            format!(
                "bursts of {:.0}/s while accept() stalled up to {:.3} s need a queue of about \
                 {need} (deepest seen {})",
                m.peak_arrival_per_s, m.longest_wait_s, m.max_queue_seen
            )
        } else {
            format!(
                "accept() stalled up to {:.3} s with {} queued",
                m.longest_wait_s, m.max_queue_seen
            )
        };
        let turned_away = match m.drops {
            0 => String::new(),
            1 => " and 1 connection found it full".to_owned(),
            n => format!(" and {n} connections found it full"),
        };
        return advice(
            target,
            Action::Raise,
            format!(
                "{why}{turned_away}, above the limit of {limit}: raise the backlog to at least \
                 {target}"
            ),
        );
    }
    advice(
        need,
        Action::None,
        format!(
            "backlog {limit} fits: deepest queue {}, longest wait {:.3} s{}",
            m.max_queue_seen,
            m.longest_wait_s,
            match ceiling {
                Some(c) => format!(", and up to {c} would drain within the {timeout:.0} s timeout"),
                None => String::new(),
            }
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured() -> Measured {
        Measured {
            backlog_limit: 511,
            peak_arrival_per_s: 200.0,
            peak_accept_per_s: 1000.0,
            arrival_per_s: 50.0,
            accept_per_s: 50.0,
            longest_wait_s: 0.002,
            max_queue_seen: 3,
            drops: 0,
            client_timeout_s: 10.0,
            interval_s: 60.0,
        }
    }

    /// The php-fpm numbers: 5,000 requests/s into a full 65,535-deep queue
    /// take 13 s to drain; behind a 10 s timeout that is too deep.
    #[test]
    fn php_fpm_65535_at_5000_per_s_is_too_deep() {
        let advice = advise(&Measured {
            backlog_limit: 65535,
            peak_arrival_per_s: 5000.0,
            peak_accept_per_s: 5000.0,
            arrival_per_s: 5000.0,
            accept_per_s: 5000.0,
            longest_wait_s: 13.1,
            max_queue_seen: 65535,
            drops: 0,
            client_timeout_s: 10.0,
            interval_s: 60.0,
        });
        assert_eq!(advice.action, Action::Lower, "{advice:?}");
        assert_eq!(advice.max, Some(50_000));
        assert!(
            advice.reason.contains("13.1 s to drain"),
            "{}",
            advice.reason
        );
        assert!(advice.reason.contains("at most 50000"), "{}", advice.reason);
        // 511 drains in 0.1 s at that rate: php-fpm's new default fits.
        let small = advise(&Measured {
            backlog_limit: 511,
            longest_wait_s: 0.1,
            max_queue_seen: 500,
            ..Measured {
                peak_arrival_per_s: 5000.0,
                peak_accept_per_s: 5000.0,
                arrival_per_s: 5000.0,
                accept_per_s: 5000.0,
                ..measured()
            }
        });
        assert_eq!(small.action, Action::None, "{small:?}");
    }

    #[test]
    fn a_server_that_keeps_up_needs_no_change() {
        let advice = advise(&measured());
        assert_eq!(advice.action, Action::None, "{advice:?}");
        assert_eq!(advice.min, 3);
        assert_eq!(advice.max, Some(10_000));
    }

    #[test]
    fn bursts_beyond_the_limit_raise_it() {
        let advice = advise(&Measured {
            backlog_limit: 128,
            peak_arrival_per_s: 1000.0,
            longest_wait_s: 0.5,
            max_queue_seen: 128,
            drops: 40,
            arrival_per_s: 100.0,
            accept_per_s: 100.0,
            ..measured()
        });
        assert_eq!(advice.action, Action::Raise, "{advice:?}");
        // The queue held 128 and turned 40 away: 168 would have held them,
        // but the bursts need 1000/s x 0.5 s.
        assert_eq!(advice.min, 500);
        assert!(
            advice.reason.contains("40 connections found it full"),
            "{}",
            advice.reason
        );
    }

    /// php-fpm behind nginx, one worker, 400 ms a request: a UNIX
    /// listener (no arrival rate), backlog 3, 19 EAGAINs.
    #[test]
    fn drops_without_an_arrival_rate_size_from_the_queue_and_the_drops() {
        let input = Measured {
            backlog_limit: 3,
            peak_arrival_per_s: 0.0,
            peak_accept_per_s: 3.0,
            arrival_per_s: 0.0,
            accept_per_s: 1.4,
            longest_wait_s: 1.6,
            max_queue_seen: 4,
            drops: 19,
            client_timeout_s: 10.0,
            interval_s: 3.4,
        };
        // 24 requests in 3.4 s average 7/s, above the 3/s php-fpm
        // managed, but the excess (4/s for 3.4 s, plus 4 queued) drains
        // within the 10 s timeout: a burst, which a deeper queue absorbs.
        let advice = advise(&Measured {
            arrival_per_s: 7.0,
            ..input
        });
        assert_eq!(advice.action, Action::Raise, "{advice:?}");
        assert_eq!((advice.min, advice.max), (23, Some(30)));
        assert!(!advice.reason.contains("0/s"), "{}", advice.reason);
    }

    #[test]
    fn an_acceptor_below_the_arrival_rate_gets_no_backlog() {
        let advice = advise(&Measured {
            arrival_per_s: 900.0,
            accept_per_s: 300.0,
            peak_accept_per_s: 320.0,
            drops: 5000,
            ..measured()
        });
        assert_eq!(advice.action, Action::AddWorkers, "{advice:?}");
        assert!(
            advice.reason.contains("no backlog will help"),
            "{}",
            advice.reason
        );
        // The same rates for one second, with the queue full: a burst
        // that a deeper queue absorbs.
        let burst = advise(&Measured {
            arrival_per_s: 900.0,
            accept_per_s: 300.0,
            peak_accept_per_s: 320.0,
            drops: 500,
            max_queue_seen: 511,
            interval_s: 1.0,
            ..measured()
        });
        assert_eq!(burst.action, Action::Raise, "{burst:?}");
        assert_eq!(burst.min, 1011);
    }

    #[test]
    fn bursts_that_cannot_drain_in_time_need_workers() {
        let advice = advise(&Measured {
            backlog_limit: 128,
            peak_arrival_per_s: 5000.0,
            peak_accept_per_s: 50.0,
            longest_wait_s: 4.0,
            max_queue_seen: 128,
            ..measured()
        });
        assert_eq!(advice.action, Action::AddWorkers, "{advice:?}");
        assert_eq!(advice.max, Some(500));
    }
}
