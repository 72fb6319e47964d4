//! Kernel timestamps to wall-clock time.
//!
//! The programs stamp events with `bpf_ktime_get_ns()` (CLOCK_MONOTONIC);
//! the agent samples both clocks once at start-up and shifts by the
//! difference. RFC 3339 formatting is done here rather than pulling in a
//! date crate for one conversion.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Converts CLOCK_MONOTONIC nanoseconds to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct MonotonicToWall {
    /// realtime - monotonic, in nanoseconds, sampled once.
    offset_ns: i128,
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; both clocks always exist
    // on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of event timestamps.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

impl MonotonicToWall {
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        MonotonicToWall {
            offset_ns: real - mono,
        }
    }

    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        let ns = monotonic_ns as i128 + self.offset_ns;
        if ns <= 0 {
            return UNIX_EPOCH;
        }
        UNIX_EPOCH + Duration::from_nanos(ns.min(u64::MAX as i128) as u64)
    }
}

/// Formats as RFC 3339 in UTC with microseconds: `2026-11-22T03:04:05.123456Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// [`rfc3339`] for a stream of close timestamps: the date and time down
/// to the second are formatted once per second, the microseconds per call,
/// into a buffer that is reused.
#[derive(Default)]
pub struct Rfc3339Cache {
    second: Option<u64>,
    text: String,
}

impl Rfc3339Cache {
    pub fn format(&mut self, time: SystemTime) -> &str {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        if self.second != Some(secs) {
            self.text = rfc3339(time);
            self.second = Some(secs);
        }
        // "…SS." is followed by exactly six digits and "Z".
        let micros = since.subsec_micros();
        let start = self.text.len() - 7;
        self.text.truncate(start);
        let mut digits = [b'0'; 6];
        let mut rest = micros;
        for digit in digits.iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        self.text.extend(digits.iter().map(|&d| d as char));
        self.text.push('Z');
        &self.text
    }
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (the era-based algorithm: 400-year eras of 146097 days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod cache_tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_cache_formats_as_rfc3339_does() {
        let mut cache = Rfc3339Cache::default();
        let base = UNIX_EPOCH + Duration::from_secs(1_795_316_400);
        for micros in [0u64, 1, 999_999, 123_456, 1_000_000, 86_400_000_001] {
            let t = base + Duration::from_micros(micros);
            assert_eq!(cache.format(t), rfc3339(t));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // 2000-02-29 (leap day) 12:34:56.789012
        let t = UNIX_EPOCH + Duration::from_micros(951_827_696_789_012);
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.789012Z");
        // 2026-11-22T03:00:00Z
        let t = UNIX_EPOCH + Duration::from_secs(1_795_316_400);
        assert_eq!(rfc3339(t), "2026-11-22T03:00:00.000000Z");
    }

    #[test]
    fn monotonic_now_maps_close_to_system_time() {
        let conv = MonotonicToWall::now();
        let mono = clock_ns(libc::CLOCK_MONOTONIC) as u64;
        let wall = conv.wall(mono);
        let diff = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|e| e.duration());
        assert!(diff < Duration::from_secs(1), "{diff:?}");
    }
}
