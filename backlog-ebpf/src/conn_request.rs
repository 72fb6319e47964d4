//! SYN-stage outcomes of `tcp_conn_request()`, classified from what the
//! kernel did for this SYN rather than guessed at entry:
//!
//! - `tcp_syn_flood_action()` runs only when the SYN queue is full (or
//!   tcp_syncookies=2); it returns true when a cookie is wanted and bumps
//!   TCPReqQFullDoCookies, false when the SYN is dropped and bumps
//!   TCPReqQFullDrop. Its return value is the kind, exactly.
//! - `af_ops->send_synack()` (`tcp_v4_send_synack`/`tcp_v6_send_synack`,
//!   called through a pointer, so never inlined) runs iff the SYN was
//!   answered. An unanswered SYN was dropped: because the accept queue was
//!   full (ListenOverflows), because the SYN queue passed 3/4 of
//!   tcp_max_syn_backlog with cookies off, or for another reason.
//!
//! The calls happen in softirq on one CPU without nesting (a SYN-ACK sent
//! on loopback is received in a later softirq run), so the state of the
//! SYN in flight lives in a per-CPU slot between entry and exit.

use aya_ebpf::{
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use backlog_common::DropKind;

use crate::{event, read};

#[derive(Clone, Copy)]
#[repr(C)]
pub struct SynInFlight {
    sk: u64,
    skb: u64,
    active: u32,
    flood_action_called: u32,
    want_cookie: u32,
    answered: u32,
    accept_full_at_entry: u32,
    _pad: u32,
}

#[map]
static SYN_IN_FLIGHT: PerCpuArray<SynInFlight> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn slot() -> Option<&'static mut SynInFlight> {
    // SAFETY: a per-CPU slot only this CPU touches, from non-nesting
    // softirq code (see the module comment).
    SYN_IN_FLIGHT.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn enter(sk: u64, skb: u64) {
    if let Some(s) = slot() {
        *s = SynInFlight {
            sk,
            skb,
            active: 1,
            flood_action_called: 0,
            want_cookie: 0,
            answered: 0,
            accept_full_at_entry: u32::from(event::accept_queue_full(sk as *const u8)),
            _pad: 0,
        };
    }
}

#[inline(always)]
fn flood_action_returned(ret: u64) {
    if let Some(s) = slot() {
        if s.active != 0 {
            s.flood_action_called = 1;
            // A C bool: only the low byte is defined.
            s.want_cookie = u32::from(ret & 0xff != 0);
        }
    }
}

#[inline(always)]
fn synack_sent() {
    if let Some(s) = slot() {
        if s.active != 0 {
            s.answered = 1;
        }
    }
}

#[inline(always)]
fn exit() {
    let Some(s) = slot() else {
        return;
    };
    if s.active == 0 {
        // Attached mid-call: the entry was not seen, so say nothing.
        return;
    }
    s.active = 0;
    let state = *s;
    let sk = state.sk as *const u8;
    let skb = state.skb as *const u8;
    if state.flood_action_called != 0 && state.want_cookie != 0 {
        event::emit(DropKind::SynCookieSent as u32, sk, skb, 0);
    }
    if state.answered != 0 {
        return;
    }
    let kind = if state.flood_action_called != 0 && state.want_cookie == 0 {
        DropKind::SynDroppedSynQueueFull
    } else if state.accept_full_at_entry != 0 || event::accept_queue_full(sk) {
        DropKind::SynDroppedAcceptQueueFull
    } else if state.want_cookie == 0 && syn_backlog_pressure(sk) {
        DropKind::SynDroppedSynBacklogPressure
    } else {
        DropKind::SynDroppedOther
    };
    event::emit(kind as u32, sk, skb, 0);
}

/// tcp_conn_request()'s own test: cookies off and fewer than a quarter of
/// tcp_max_syn_backlog left in the SYN queue.
#[inline(always)]
fn syn_backlog_pressure(sk: *const u8) -> bool {
    let o = crate::offsets();
    let Some(net) = read::ptr(sk, o.sk_net) else {
        return false;
    };
    let (Some(syncookies), Some(max), Some(qlen)) = (
        read::at::<u8>(net, o.net_syncookies),
        read::at::<i32>(net, o.net_max_syn_backlog),
        read::at::<i32>(sk, o.icsk_syn_queue_len),
    ) else {
        return false;
    };
    syncookies == 0 && max - qlen < (max >> 2)
}

// tcp_conn_request(rsk_ops, af_ops, sk, skb)
#[fentry(function = "tcp_conn_request")]
pub fn fentry_conn_request(ctx: FEntryContext) -> i32 {
    enter(ctx.arg(2), ctx.arg(3));
    0
}

#[fexit(function = "tcp_conn_request")]
pub fn fexit_conn_request(_ctx: FExitContext) -> i32 {
    exit();
    0
}

// tcp_syn_flood_action(sk, proto) -> bool: the return value follows the
// two arguments in the fexit context.
#[fexit(function = "tcp_syn_flood_action")]
pub fn fexit_syn_flood_action(ctx: FExitContext) -> i32 {
    flood_action_returned(ctx.arg(2));
    0
}

#[fentry(function = "tcp_v4_send_synack")]
pub fn fentry_send_synack_v4(_ctx: FEntryContext) -> i32 {
    synack_sent();
    0
}

#[fentry(function = "tcp_v6_send_synack")]
pub fn fentry_send_synack_v6(_ctx: FEntryContext) -> i32 {
    synack_sent();
    0
}

#[kprobe]
pub fn kprobe_conn_request(ctx: ProbeContext) -> u32 {
    if let (Some(sk), Some(skb)) = (ctx.arg::<u64>(2), ctx.arg::<u64>(3)) {
        enter(sk, skb);
    }
    0
}

#[kretprobe]
pub fn kretprobe_conn_request(_ctx: RetProbeContext) -> u32 {
    exit();
    0
}

#[kretprobe]
pub fn kretprobe_syn_flood_action(ctx: RetProbeContext) -> u32 {
    flood_action_returned(ctx.ret());
    0
}

#[kprobe]
pub fn kprobe_send_synack(_ctx: ProbeContext) -> u32 {
    synack_sent();
    0
}
