//! Exact accounting and the rate limit (flood mode), shared by every hook.
//!
//! Each drop is counted per listener and kind before anything else, then
//! either queued as a full event, or (over the rate limit) counted as
//! suppressed, or (ring buffer full) counted as lost. The agent turns the
//! suppressed counts into one aggregate record per listener, kind and
//! interval, so at any rate: events + aggregated + lost = total.
//!
//! The limit is a token bucket per listener and kind in the GCRA form: one
//! timestamp per bucket (the "theoretical arrival time"), advanced by the
//! interval between two events at the sustained rate. The bucket map is
//! shared by all CPUs and updated without atomics: two CPUs racing on one
//! bucket may both send, so the limit is approximate; the counts, per-CPU,
//! stay exact.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_ktime_get_ns, generated},
    maps::{HashMap, LruHashMap, PerCpuHashMap},
};
use backlog_common::{
    DropCounts, UnixAccount, COUNTER_EVENTS_LOST, COUNTER_EVENTS_SENT, COUNTER_EVENTS_SUPPRESSED,
    COUNTER_TOTALS_FULL,
};

use crate::count;

/// What `admit` decided for one drop, and where its counts are.
pub struct Admission {
    /// This CPU's counts of the listener and kind; null when the totals
    /// map is full (then only the global counters know).
    counts: *mut DropCounts,
    pub send: bool,
}

/// This CPU's counts for `key`, created on first use; null when the map
/// is full.
#[inline(always)]
fn counts_of<K>(totals: &PerCpuHashMap<K, DropCounts>, key: &K) -> *mut DropCounts {
    for _ in 0..2 {
        if let Some(counts) = totals.get_ptr_mut(key) {
            return counts;
        }
        // Another CPU may create the key between our lookup and insert:
        // then the insert fails with EEXIST and the second lookup finds it.
        if totals
            .insert(key, DropCounts::ZERO, BPF_NOEXIST as u64)
            .is_err()
        {
            continue;
        }
    }
    count(COUNTER_TOTALS_FULL);
    core::ptr::null_mut()
}

/// Takes a token from `key`'s bucket at time `now`.
#[inline(always)]
fn take_token<K>(buckets: &LruHashMap<K, u64>, key: &K, now: u64) -> bool {
    let interval = crate::config!(event_interval_ns);
    if interval == 0 {
        return true;
    }
    match buckets.get_ptr_mut(key) {
        Some(tat) => {
            // SAFETY: a value of a shared hash map; a racing CPU may write
            // it too, which only makes the limit approximate.
            let arrival = unsafe { *tat };
            if arrival > now.wrapping_add(crate::config!(burst_ns)) {
                return false;
            }
            let start = if arrival > now { arrival } else { now };
            unsafe { *tat = start.wrapping_add(interval) };
            true
        }
        None => {
            // A new (or evicted) bucket starts full.
            let _ = buckets.insert(key, now.wrapping_add(interval), BPF_ANY as u64);
            true
        }
    }
}

/// Counts one drop for `key` and decides whether it gets a full event.
/// A suppressed drop is fully accounted here; a sent one is finished by
/// [`queued`] once the ring buffer said yes or no.
#[inline(always)]
pub fn admit<K>(
    totals: &PerCpuHashMap<K, DropCounts>,
    buckets: &LruHashMap<K, u64>,
    key: &K,
    now: u64,
) -> Admission {
    let counts = counts_of(totals, key);
    if !counts.is_null() {
        // SAFETY: this CPU's value of a per-CPU map entry; programs do not
        // nest on one CPU for these program types.
        unsafe { (*counts).total += 1 };
    }
    let send = take_token(buckets, key, now);
    if !send {
        count(COUNTER_EVENTS_SUPPRESSED);
        if !counts.is_null() {
            unsafe { (*counts).suppressed += 1 };
        }
    }
    Admission { counts, send }
}

/// Records whether the event of an admitted drop reached the ring buffer.
#[inline(always)]
pub fn queued(admission: &Admission, ok: bool) {
    if ok {
        count(COUNTER_EVENTS_SENT);
    } else {
        count(COUNTER_EVENTS_LOST);
    }
    if admission.counts.is_null() {
        return;
    }
    // SAFETY: as in `admit`.
    unsafe {
        if ok {
            (*admission.counts).sent += 1;
        } else {
            (*admission.counts).lost += 1;
        }
    }
}

/// What [`admit_shared`] decided: the entry's counts live in a map shared
/// by all CPUs, so they are updated with atomic adds.
pub struct SharedAdmission {
    account: *mut UnixAccount,
    pub send: bool,
    /// bpf_ktime_get_ns() when the clock was read: always when `send`.
    pub now: u64,
}

/// Adds to a counter other CPUs update too. The result is unused, so
/// this compiles to BPF's XADD, which every supported kernel has.
#[inline(always)]
fn add(counter: *mut u64) {
    // SAFETY: `counter` points at an 8-byte aligned u64 of a map value.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
}

/// [`admit`] for the UNIX EAGAINs, with counts and bucket in one shared
/// entry: one hash lookup of the 116-byte key per EAGAIN instead of one
/// in a per-CPU totals map plus one in a bucket map (those lookups were
/// most of what a suppressed EAGAIN cost). With the map full the EAGAIN
/// is counted in COUNTER_TOTALS_FULL and gets a full event (no bucket to
/// limit it; the agent sized the map for far more paths than it expects).
///
/// In a storm nearly every EAGAIN is suppressed, and reading the clock
/// was an eighth of what one cost (bpf_stats: 363 -> 323 ns without it).
/// So once the bucket has said "suppress", the entry remembers the timer
/// tick (jiffies, one load) and the rest of that tick is suppressed
/// without the clock. A token that comes due within a tick is taken at
/// the next one: an event at most one tick (1-10 ms) late, never a count
/// lost.
#[inline(always)]
pub fn admit_shared<K>(accounts: &HashMap<K, UnixAccount>, key: &K) -> SharedAdmission {
    let mut account = core::ptr::null_mut();
    for _ in 0..2 {
        if let Some(found) = accounts.get_ptr_mut(key) {
            account = found;
            break;
        }
        // EEXIST when another CPU created it meanwhile: looked up again.
        let _ = accounts.insert(key, UnixAccount::ZERO, BPF_NOEXIST as u64);
    }
    if account.is_null() {
        count(COUNTER_TOTALS_FULL);
        return SharedAdmission {
            account,
            send: true,
            now: unsafe { bpf_ktime_get_ns() },
        };
    }
    // SAFETY (below): a value of a shared map, valid while the program
    // runs; the counts change only through atomic adds.
    add(unsafe { core::ptr::addr_of_mut!((*account).counts.total) });
    let (send, now) = match crate::config!(event_interval_ns) {
        0 => (true, unsafe { bpf_ktime_get_ns() }),
        interval => {
            // SAFETY: a helper without arguments.
            let tick = unsafe { generated::bpf_jiffies64() };
            let suppressed_tick = unsafe { core::ptr::addr_of_mut!((*account).suppressed_tick) };
            if unsafe { *suppressed_tick } == tick {
                (false, 0)
            } else {
                let now = unsafe { bpf_ktime_get_ns() };
                // The bucket as in `take_token` (a new entry starts
                // full: its arrival time 0 is long past).
                let tat = unsafe { core::ptr::addr_of_mut!((*account).next_event_ns) };
                let arrival = unsafe { *tat };
                if arrival > now.wrapping_add(crate::config!(burst_ns)) {
                    unsafe { *suppressed_tick = tick };
                    (false, now)
                } else {
                    let start = if arrival > now { arrival } else { now };
                    unsafe { *tat = start.wrapping_add(interval) };
                    (true, now)
                }
            }
        }
    };
    if !send {
        count(COUNTER_EVENTS_SUPPRESSED);
        add(unsafe { core::ptr::addr_of_mut!((*account).counts.suppressed) });
    }
    SharedAdmission { account, send, now }
}

/// [`queued`] for [`admit_shared`].
#[inline(always)]
pub fn queued_shared(admission: &SharedAdmission, ok: bool) {
    count(if ok {
        COUNTER_EVENTS_SENT
    } else {
        COUNTER_EVENTS_LOST
    });
    let account = admission.account;
    if account.is_null() {
        return;
    }
    // SAFETY: as in `admit_shared`.
    add(unsafe {
        if ok {
            core::ptr::addr_of_mut!((*account).counts.sent)
        } else {
            core::ptr::addr_of_mut!((*account).counts.lost)
        }
    });
}
