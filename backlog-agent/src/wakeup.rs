//! How the loop waits for the ring buffer: it polls every few
//! milliseconds while records keep coming, and sleeps until the kernel
//! wakes it once they stop.
//!
//! Either alone costs: a wakeup per record is an irq_work for the program
//! and a context switch for the agent, most of a record's cost under a
//! flood; a poll every 5 ms is 200 wakeups a second on an idle machine
//! (9% of a CPU in a software-emulated guest, where it also slowed the
//! flood it watched). So the programs never wake an agent that polls
//! (except once an eighth of the ring is pending), and an agent that
//! found the ring empty raises the `AGENT_ASLEEP` flag and stops polling:
//! the next record's program sees the flag after committing the record
//! and wakes it (backlog-ebpf main.rs, `wake_if_asleep`). Sleeping is
//! safe because the agent raises the flag, then reads the ring behind a
//! full fence, while the program commits (a fully ordered exchange), then
//! reads the flag: one of the two sees the other. The once-a-second
//! drain of the aggregate window stays as the last resort.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::atomic::{fence, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use aya::maps::MapData;

/// How often the ring buffer is read while records come.
pub const POLL: Duration = Duration::from_millis(5);

/// Woken again this soon after the last wakeup: records are frequent
/// enough that polling is cheaper than a wakeup each.
pub const FREQUENT: Duration = Duration::from_millis(5);

/// The agent's side of `AGENT_ASLEEP`: the map's value, mapped shared.
pub struct AsleepFlag {
    flag: NonNull<AtomicU32>,
    /// The mapping's length, and the map whose fd it keeps open (None in
    /// unit tests: a flag of their own).
    mapping: Option<(usize, MapData)>,
}

impl AsleepFlag {
    /// Maps the value of the one-entry BPF_F_MMAPABLE array.
    pub fn map(map: MapData) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let len = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&len| len >= size_of::<AtomicU32>())
            .unwrap_or(4096);
        // SAFETY: a fresh shared mapping of the map's value pages, read and
        // written only through atomics; the kernel keeps the map alive
        // while it is mapped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let flag = NonNull::new(ptr.cast::<AtomicU32>()).ok_or_else(|| io::Error::other("null"))?;
        Ok(Self {
            flag,
            mapping: Some((len, map)),
        })
    }

    #[cfg(test)]
    fn local() -> Self {
        Self {
            flag: NonNull::from(Box::leak(Box::new(AtomicU32::new(0)))),
            mapping: None,
        }
    }

    fn get(&self) -> &AtomicU32 {
        // SAFETY: mapped, page-aligned and alive as long as self.
        unsafe { self.flag.as_ref() }
    }

    /// Raised before the last look at the ring: the fence keeps that look
    /// from being done before the flag is visible to the programs.
    fn raise(&self) {
        self.get().store(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    fn lower(&self) {
        self.get().store(0, Ordering::Relaxed);
    }
}

impl Drop for AsleepFlag {
    fn drop(&mut self) {
        if let Some((len, _)) = &self.mapping {
            // SAFETY: the mapping made in `map`, not used after this.
            unsafe { libc::munmap(self.flag.as_ptr().cast(), *len) };
        }
    }
}

/// What made the loop read the ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// The kernel woke it (a record for a sleeping agent, or a filling ring).
    Woken,
    /// Its poll timer.
    Polled,
    /// The aggregate window's drain: it changes the pace only to release
    /// events left waiting for their holders.
    Window,
}

/// Records read, by what made the loop read them: a sleeping agent that
/// misses its wakeups reads them all at `Window`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub woken: u64,
    pub polled: u64,
    pub window: u64,
    /// Times the agent went to sleep.
    pub sleeps: u64,
}

/// Poll or sleep, decided after each read of the ring buffer.
pub struct Pace {
    /// None: no flag to sleep on (it could not be mapped); poll always.
    flag: Option<AsleepFlag>,
    next_poll: Option<Instant>,
    last_woken: Option<Instant>,
    pub stats: ReadStats,
}

impl Pace {
    /// Starts polling: the first records come as the probes attach.
    pub fn new(flag: Option<AsleepFlag>, now: Instant) -> Self {
        Self {
            flag,
            next_poll: Some(now + POLL),
            last_woken: None,
            stats: ReadStats::default(),
        }
    }

    /// When the loop reads the ring next without being woken; None while
    /// it sleeps.
    pub fn next_poll(&self) -> Option<Instant> {
        self.next_poll
    }

    /// After a read that found `records`: poll on, or sleep. `waiting`:
    /// the sink holds events waiting for their holders, which only a read
    /// releases (Sink::release_waiting), so the loop polls until they are
    /// out. `drain` reads the ring once more after the flag is raised and
    /// says how many records it found and whether events wait; either
    /// keeps the agent awake.
    pub fn after_read(
        &mut self,
        read: Read,
        records: usize,
        waiting: bool,
        now: Instant,
        drain: impl FnOnce() -> (usize, bool),
    ) {
        let n = records as u64;
        let poll = match read {
            Read::Woken => {
                self.stats.woken += n;
                let frequent = self
                    .last_woken
                    .is_some_and(|last| now.saturating_duration_since(last) < FREQUENT);
                self.last_woken = Some(now);
                frequent || waiting
            }
            Read::Polled => {
                self.stats.polled += n;
                records > 0 || waiting
            }
            Read::Window => {
                self.stats.window += n;
                // The pace stays, unless a sleeping loop now has events
                // waiting (a record read here came between its commit and
                // its wakeup).
                if !(waiting && self.next_poll.is_none()) {
                    return;
                }
                true
            }
        };
        if poll || !self.sleep(drain) {
            if let Some(flag) = &self.flag {
                flag.lower();
            }
            self.next_poll = Some(now + POLL);
        } else {
            self.next_poll = None;
        }
    }

    /// Raises the flag and takes the last look; false when there is no
    /// flag, or the look found records or left events waiting (the caller
    /// then lowers the flag and polls).
    fn sleep(&mut self, drain: impl FnOnce() -> (usize, bool)) -> bool {
        let Some(flag) = &self.flag else {
            return false;
        };
        flag.raise();
        let (found, waiting) = drain();
        self.stats.polled += found as u64;
        if found > 0 || waiting {
            return false;
        }
        self.stats.sleeps += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn without_a_flag_it_polls_forever() {
        let t = Instant::now();
        let mut pace = Pace::new(None, t);
        pace.after_read(Read::Polled, 0, false, t + ms(5), || unreachable!());
        assert_eq!(pace.next_poll(), Some(t + ms(10)));
        pace.after_read(Read::Woken, 1, false, t + ms(100), || unreachable!());
        assert_eq!(pace.next_poll(), Some(t + ms(105)));
    }

    #[test]
    fn a_poll_that_finds_records_polls_on() {
        let t = Instant::now();
        let mut pace = Pace::new(None, t);
        pace.after_read(Read::Polled, 3, false, t, || unreachable!());
        assert_eq!(pace.next_poll(), Some(t + POLL));
        assert_eq!(pace.stats.polled, 3);
    }

    fn raised(pace: &Pace) -> bool {
        pace.flag.as_ref().unwrap().get().load(Ordering::SeqCst) == 1
    }

    #[test]
    fn a_lone_wakeup_sleeps_with_the_flag_raised() {
        let t = Instant::now();
        let mut pace = Pace::new(Some(AsleepFlag::local()), t);
        let mut looked = false;
        pace.after_read(Read::Woken, 1, false, t + ms(50), || {
            looked = true;
            (0, false)
        });
        assert!(looked, "the last look after raising the flag");
        assert!(raised(&pace));
        assert_eq!(pace.next_poll(), None);
        assert_eq!((pace.stats.woken, pace.stats.sleeps), (1, 1));
    }

    #[test]
    fn wakeups_in_quick_succession_turn_to_polling() {
        let t = Instant::now();
        let mut pace = Pace::new(Some(AsleepFlag::local()), t);
        pace.after_read(Read::Woken, 1, false, t + ms(50), || (0, false));
        pace.after_read(Read::Woken, 1, false, t + ms(52), || unreachable!());
        assert!(!raised(&pace), "lowered on waking");
        assert_eq!(pace.next_poll(), Some(t + ms(52) + POLL));
        // Polling on while it finds records, asleep at the first empty poll.
        pace.after_read(Read::Polled, 4, false, t + ms(57), || unreachable!());
        assert_eq!(pace.next_poll(), Some(t + ms(57) + POLL));
        pace.after_read(Read::Polled, 0, false, t + ms(62), || (0, false));
        assert_eq!(pace.next_poll(), None);
        assert!(raised(&pace));
    }

    #[test]
    fn records_in_the_last_look_keep_it_awake() {
        let t = Instant::now();
        let mut pace = Pace::new(Some(AsleepFlag::local()), t);
        pace.after_read(Read::Polled, 0, false, t + ms(5), || (2, false));
        assert!(!raised(&pace));
        assert_eq!(pace.next_poll(), Some(t + ms(10)));
        assert_eq!((pace.stats.polled, pace.stats.sleeps), (2, 0));
    }

    #[test]
    fn events_waiting_for_holders_keep_it_polling() {
        let t = Instant::now();
        let mut pace = Pace::new(Some(AsleepFlag::local()), t);
        // Woken, the record's event waits for its holders: poll, not sleep.
        pace.after_read(Read::Woken, 1, true, t + ms(50), || unreachable!());
        assert!(!raised(&pace));
        assert_eq!(pace.next_poll(), Some(t + ms(50) + POLL));
        pace.after_read(Read::Polled, 0, true, t + ms(55), || unreachable!());
        assert_eq!(pace.next_poll(), Some(t + ms(55) + POLL));
        // Released: asleep at the next empty poll.
        pace.after_read(Read::Polled, 0, false, t + ms(60), || (0, false));
        assert_eq!(pace.next_poll(), None);
        // The last look itself may leave events waiting.
        let mut pace = Pace::new(Some(AsleepFlag::local()), t);
        pace.after_read(Read::Polled, 0, false, t + ms(5), || (0, true));
        assert!(!raised(&pace));
        assert_eq!(pace.next_poll(), Some(t + ms(10)));
        // Asleep, a window read that leaves events waiting starts polling.
        let mut pace = Pace::new(Some(AsleepFlag::local()), t);
        pace.after_read(Read::Polled, 0, false, t + ms(5), || (0, false));
        assert_eq!(pace.next_poll(), None);
        pace.after_read(Read::Window, 1, true, t + ms(1000), || unreachable!());
        assert!(!raised(&pace));
        assert_eq!(pace.next_poll(), Some(t + ms(1000) + POLL));
    }

    #[test]
    fn the_window_drain_counts_but_keeps_the_pace() {
        let t = Instant::now();
        let mut pace = Pace::new(None, t);
        pace.after_read(Read::Window, 2, false, t + ms(1000), || unreachable!());
        assert_eq!(pace.next_poll(), Some(t + POLL));
        assert_eq!(pace.stats.window, 2);
    }
}
