//! Final-ACK accept-queue overflow as reported by `skb:kfree_skb`.
//!
//! Since 6.15 `tcp_check_req()` frees the ACK of a handshake that cannot
//! be completed because the accept queue is full with reason
//! SKB_DROP_REASON_TCP_LISTEN_OVERFLOW, and since 6.11 the tracepoint
//! carries the listener as `rx_sk`. The reason number differs between
//! kernels, so the agent writes it into `OFFSETS` from BTF.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use backlog_common::{DropKind, TP_KFREE_SKB_REASON, TP_KFREE_SKB_RX_SK, TP_KFREE_SKB_SKBADDR};

use crate::{event, read::tp_field};

#[tracepoint]
pub fn kfree_skb_listen_overflow(ctx: TracePointContext) -> u32 {
    // The tracepoint fires for every packet freed with a reason on the
    // machine: one plain load of `reason` and one comparison for all
    // other reasons. The record offsets are compile-time constants, which
    // the agent checks against tracefs before it attaches this program;
    // the reason number comes from BTF (a frozen global, or u32::MAX,
    // which no reason has, when the kernel lacks it).
    // SAFETY (all three): aligned fields of the 6.11+ record.
    let reason = unsafe { tp_field::<u32, { TP_KFREE_SKB_REASON }>(&ctx) };
    if reason != crate::offset!(reason_tcp_listen_overflow) {
        return 0;
    }
    let sk = unsafe { tp_field::<u64, { TP_KFREE_SKB_RX_SK }>(&ctx) };
    let skb = unsafe { tp_field::<u64, { TP_KFREE_SKB_SKBADDR }>(&ctx) };
    event::emit(
        DropKind::AckDroppedAcceptQueueFull as u32,
        sk as *const u8,
        skb as *const u8,
        0,
    );
    0
}
