//! Final-ACK accept-queue overflow as reported by `skb:kfree_skb`.
//!
//! Since 6.15 `tcp_check_req()` frees the ACK of a handshake that cannot
//! be completed because the accept queue is full with reason
//! SKB_DROP_REASON_TCP_LISTEN_OVERFLOW, and since 6.11 the tracepoint
//! carries the listener as `rx_sk`. The reason number differs between
//! kernels, so the agent writes it into `OFFSETS` from BTF.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use backlog_common::{DropKind, OFFSET_ABSENT};

use crate::event;

#[tracepoint]
pub fn kfree_skb_listen_overflow(ctx: TracePointContext) -> u32 {
    // The tracepoint fires for every freed-with-reason packet on the
    // machine: read only the fields needed to leave (not the whole
    // offsets struct), and leave on the first comparison for all other
    // reasons.
    let reason_at = crate::offset!(tp_kfree_skb_reason);
    let rx_sk_at = crate::offset!(tp_kfree_skb_rx_sk);
    let skbaddr_at = crate::offset!(tp_kfree_skb_skbaddr);
    // Loaded before its layout is checked (see probes.rs): with absent
    // offsets the verifier must see no ctx access at all.
    if reason_at == OFFSET_ABSENT || rx_sk_at == OFFSET_ABSENT || skbaddr_at == OFFSET_ABSENT {
        return 0;
    }
    let Ok(reason) = (unsafe { ctx.read_at::<u32>(reason_at as usize) }) else {
        return 0;
    };
    if reason != crate::offset!(reason_tcp_listen_overflow) {
        return 0;
    }
    // let-else, not unwrap_or: see read.rs on undefined payloads.
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(rx_sk_at as usize) }) else {
        return 0;
    };
    let Ok(skb) = (unsafe { ctx.read_at::<u64>(skbaddr_at as usize) }) else {
        return 0;
    };
    event::emit(
        DropKind::AckDroppedAcceptQueueFull as u32,
        sk as *const u8,
        skb as *const u8,
        0,
    );
    0
}
