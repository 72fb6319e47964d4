//! Final-ACK accept-queue overflow as reported by `skb:kfree_skb`.
//!
//! Since 6.15 `tcp_check_req()` frees the ACK of a handshake that cannot
//! be completed because the accept queue is full with reason
//! SKB_DROP_REASON_TCP_LISTEN_OVERFLOW, and since 6.11 the tracepoint
//! carries the listener as `rx_sk`. The reason number differs between
//! kernels, so the agent writes it into `OFFSETS` from BTF.
//!
//! Two programs for the same tracepoint, the agent attaching one:
//! - tp_btf, preferred. The drop happens in softirq, often run on the
//!   exit of an interrupt that came while some process was in a syscall.
//!   A perf tracepoint program runs under the one per-CPU guard
//!   (`bpf_prog_active`) that every kprobe and perf tracepoint program
//!   shares: if the interrupt came while any such program was running on
//!   that CPU (the agent's own syscalls:sys_exit_connect, under a UNIX
//!   storm), the kernel skips this program and only counts the skip in
//!   its `recursion_misses`. A tp_btf program has a guard of its own, so
//!   only itself nesting can make it miss.
//! - the perf tracepoint, where tp_btf cannot load.

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use backlog_common::{DropKind, TP_KFREE_SKB_REASON, TP_KFREE_SKB_RX_SK, TP_KFREE_SKB_SKBADDR};

use crate::{event, read::tp_field};

/// Positions of the arguments of `trace_kfree_skb(skb, location, reason,
/// rx_sk)` (6.11+; the agent checks there are four in BTF).
const ARG_SKB: usize = 0;
const ARG_REASON: usize = 2;
const ARG_RX_SK: usize = 3;

#[btf_tracepoint(function = "kfree_skb")]
pub fn btf_kfree_skb_listen_overflow(ctx: BtfTracePointContext) -> i32 {
    // Every packet freed with a reason on the machine comes here: one load
    // from the argument array and one comparison for all other reasons.
    let reason: u64 = ctx.arg(ARG_REASON);
    if reason as u32 != crate::offset!(reason_tcp_listen_overflow) {
        return 0;
    }
    let skb: u64 = ctx.arg(ARG_SKB);
    let sk: u64 = ctx.arg(ARG_RX_SK);
    // The verifier types rx_sk as possibly NULL and allows no arithmetic
    // on it before a check. A NULL listener is still a drop: its event
    // goes out with what can be read (the kernel's total keeps it).
    if sk == 0 {
        report(core::hint::black_box(0), skb);
    } else {
        report(sk, skb);
    }
    0
}

#[tracepoint]
pub fn kfree_skb_listen_overflow(ctx: TracePointContext) -> u32 {
    // The record offsets are compile-time constants, which the agent
    // checks against tracefs before it attaches this program; the reason
    // number comes from BTF (a frozen global, or u32::MAX, which no reason
    // has, when the kernel lacks it).
    // SAFETY (all three): aligned fields of the 6.11+ record.
    let reason = unsafe { tp_field::<u32, { TP_KFREE_SKB_REASON }>(&ctx) };
    if reason != crate::offset!(reason_tcp_listen_overflow) {
        return 0;
    }
    let sk = unsafe { tp_field::<u64, { TP_KFREE_SKB_RX_SK }>(&ctx) };
    let skb = unsafe { tp_field::<u64, { TP_KFREE_SKB_SKBADDR }>(&ctx) };
    report(sk, skb);
    0
}

#[inline(always)]
fn report(sk: u64, skb: u64) {
    event::emit(
        DropKind::AckDroppedAcceptQueueFull as u32,
        sk as *const u8,
        skb as *const u8,
        0,
    );
}
