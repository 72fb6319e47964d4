//! eBPF programs of backlog: one module per kernel path that loses a
//! connection, sharing the event builder in `event` and the maps here.
#![no_std]
#![no_main]
// accept.rs: BPF has atomic add (XADD) but no compare-and-swap, so
// core's AtomicU64::fetch_add does not exist for this target; the
// intrinsic compiles to XADD when its result is unused.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod accept;
mod account;
mod conn_request;
mod event;
mod filter;
mod kfree_skb;
mod read;
mod syn_recv_sock;
mod syscalls;
mod unix_stream_connect;

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use backlog_common::{
    Config, KernelOffsets, COUNTER_COUNT, COUNTER_EVENTS_LOST, COUNTER_EVENTS_SENT,
};

/// Drop events for the agent. The size is a default; the agent sets the
/// real one (`--ring-buffer-kib`) before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// 1 while the agent sleeps until woken: it found the ring buffer empty
/// and stopped polling. The agent writes it through a shared mapping,
/// without a syscall; see `wake_if_asleep`.
#[map]
static AGENT_ASLEEP: Array<u32> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Per-CPU counters indexed by `COUNTER_*`: what could not be reported
/// as an event is counted here so that nothing is lost silently.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Written by the agent before load from the running kernel's BTF.
#[no_mangle]
static OFFSETS: KernelOffsets = KernelOffsets::ABSENT;

/// Rate limit and wakeup threshold, written by the agent before load.
#[no_mangle]
static CONFIG: Config = Config::DEFAULT;

/// One field of `CONFIG`, read through a volatile load for the same reason
/// as `offsets()`.
#[macro_export]
macro_rules! config {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::CONFIG.$field)) }
    };
}

/// One field of `OFFSETS`: hooks that fire on every call of a syscall read
/// only what they need instead of copying the whole struct.
#[macro_export]
macro_rules! offset {
    ($field:ident) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::OFFSETS.$field)) }
    };
}

/// Reads the offsets through a volatile load: the compiler must not fold
/// the compile-time initialiser into the code, since the agent rewrites it.
#[inline(always)]
fn offsets() -> KernelOffsets {
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
fn count(counter: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter) {
        // Per-CPU slot: no other CPU writes it, and BPF programs are not
        // preempted by themselves on one CPU for these program types.
        unsafe { *slot += 1 };
    }
}

/// Queues one record for the agent; false when the ring buffer is full.
///
/// A record never wakes the agent by itself while it is awake (it polls
/// every few milliseconds then, and is woken early once `wakeup_bytes`
/// are pending): a wakeup per record costs more than the record under a
/// flood. When it sleeps, the first record wakes it.
#[inline(always)]
fn output<T: 'static>(record: &T) -> bool {
    let threshold = config!(wakeup_bytes);
    let flags = if threshold == 0 {
        0
    } else if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    };
    let ok = EVENTS.output::<T>(record, flags).is_ok();
    if threshold != 0 {
        wake_if_asleep();
    }
    ok
}

/// Wakes the agent if it sleeps. Read after the record's commit, a fully
/// ordered exchange: the agent sets the flag, then (behind a full fence)
/// reads the ring, so either it saw this record, or this sees the flag.
/// Reading it before the output instead would leave a window (flag read,
/// agent goes to sleep, record committed unannounced). The wakeup rides
/// on a discarded record: only a commit can wake the reader, and the
/// agent's reader skips discarded ones.
#[inline(always)]
fn wake_if_asleep() {
    let Some(flag) = AGENT_ASLEEP.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the map's only value; the agent writes it concurrently,
    // hence the volatile accesses. Two CPUs racing here both wake it.
    unsafe {
        if core::ptr::read_volatile(flag) == 0 {
            return;
        }
        core::ptr::write_volatile(flag, 0);
    }
    if let Some(entry) = EVENTS.reserve_bytes(8, 0) {
        entry.discard(BPF_RB_FORCE_WAKEUP as u64);
    }
}

/// Queues a record that is not a drop (drops are accounted per listener,
/// see account.rs) and counts it as sent or lost.
#[inline(always)]
fn submit<T: 'static>(record: &T) {
    if output(record) {
        count(COUNTER_EVENTS_SENT);
    } else {
        count(COUNTER_EVENTS_LOST);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
