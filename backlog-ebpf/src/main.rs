//! eBPF programs of backlog: one module per kernel path that loses a
//! connection, sharing the event builder in `event` and the maps here.
#![no_std]
#![no_main]

mod conn_request;
mod event;
mod filter;
mod kfree_skb;
mod read;
mod syn_recv_sock;
mod syscalls;

use aya_ebpf::{
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use backlog_common::{KernelOffsets, COUNTER_COUNT, COUNTER_EVENTS_LOST, COUNTER_EVENTS_SENT};

/// Drop events for the agent. The size is a default; the agent sets the
/// real one (`--ring-buffer-kib`) before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU counters indexed by `COUNTER_*`: what could not be reported
/// as an event is counted here so that nothing is lost silently.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// Written by the agent before load from the running kernel's BTF.
#[no_mangle]
static OFFSETS: KernelOffsets = KernelOffsets::ABSENT;

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

/// Queues one record for the agent and counts it as sent, or as lost when
/// the ring buffer is full (the agent reports that count).
#[inline(always)]
fn submit<T: 'static>(record: &T) {
    if EVENTS.output::<T>(record, 0).is_ok() {
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
