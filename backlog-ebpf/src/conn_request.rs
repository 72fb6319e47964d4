//! SYN-stage outcomes of `tcp_conn_request()`, classified from what the
//! kernel counted for this SYN rather than guessed at entry.
//!
//! Every way tcp_conn_request() handles a SYN from a full queue bumps one
//! of this CPU's SNMP counters: TCPReqQFullDoCookies (a cookie answered),
//! TCPReqQFullDrop (SYN queue full, no cookies), ListenOverflows (accept
//! queue full) and ListenDrops (any drop, including the SYN-backlog
//! pressure rule). These per-CPU counters are only changed by the CPU that
//! runs the softirq, and the call does not nest on a CPU, so their change
//! between entry and exit is exactly what happened to this SYN: the
//! agent's counts equal /proc/net/netstat's by construction.
//! (tcp_syn_flood_action() would tell the same, but it is inlined in some
//! builds, e.g. Debian's 6.1.)

use aya_ebpf::{
    helpers::bpf_get_smp_processor_id,
    macros::{fentry, fexit, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use backlog_common::{DropKind, KernelOffsets};

use crate::{event, read::Reader};

const LISTEN_OVERFLOWS: usize = 0;
const LISTEN_DROPS: usize = 1;
const REQQ_FULL_DROP: usize = 2;
const REQQ_FULL_DO_COOKIES: usize = 3;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct SynInFlight {
    sk: u64,
    skb: u64,
    /// This CPU's MIB of the listener's netns, found at entry: the same
    /// CPU runs the exit, and the listener holds its netns meanwhile.
    mib: u64,
    active: u32,
    _pad: u32,
    counters: [u64; 4],
}

#[map]
static SYN_IN_FLIGHT: PerCpuArray<SynInFlight> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn slot() -> Option<&'static mut SynInFlight> {
    // SAFETY: a per-CPU slot only this CPU touches, from non-nesting
    // softirq code (see the module comment).
    SYN_IN_FLIGHT.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// This CPU's SNMP MIB (net->mib.net_statistics) in the listener's netns;
/// null when it cannot be read.
#[inline(always)]
fn this_cpu_mib(o: &KernelOffsets, sk: *const u8) -> *const u8 {
    let mut r = Reader::new();
    let net = r.ptr(sk, o.sk_net);
    let percpu = r.ptr(net, o.net_mib_net_statistics);
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let offsets = o.per_cpu_offset_addr as *const u8;
    let cpu_offset = r.at::<u64>(offsets, cpu.wrapping_mul(8));
    if !r.ok() {
        return core::ptr::null();
    }
    (percpu as u64).wrapping_add(cpu_offset) as *const u8
}

/// The four counters in `mib`, and whether they could all be read. Every
/// kernel so far keeps them in two adjacent pairs (ListenOverflows,
/// ListenDrops; TCPReqQFullDoCookies, TCPReqQFullDrop): two reads of 16
/// bytes then, four of 8 otherwise. Each SYN of a flood reads them twice.
#[inline(always)]
fn counters(o: &KernelOffsets, mib: *const u8) -> ([u64; 4], bool) {
    let mut r = Reader::new();
    let paired = o.mib_listen_drops == o.mib_listen_overflows.wrapping_add(1)
        && o.mib_reqq_full_drop == o.mib_reqq_full_do_cookies.wrapping_add(1);
    let values = if paired {
        let listen = r.at::<[u64; 2]>(mib, o.mib_listen_overflows.wrapping_mul(8));
        let reqq = r.at::<[u64; 2]>(mib, o.mib_reqq_full_do_cookies.wrapping_mul(8));
        [listen[0], listen[1], reqq[1], reqq[0]]
    } else {
        [
            r.at::<u64>(mib, o.mib_listen_overflows.wrapping_mul(8)),
            r.at::<u64>(mib, o.mib_listen_drops.wrapping_mul(8)),
            r.at::<u64>(mib, o.mib_reqq_full_drop.wrapping_mul(8)),
            r.at::<u64>(mib, o.mib_reqq_full_do_cookies.wrapping_mul(8)),
        ]
    };
    (values, r.ok() && !mib.is_null())
}

#[inline(always)]
fn enter(sk: u64, skb: u64) {
    let o = crate::offsets();
    let Some(s) = slot() else {
        return;
    };
    let mib = this_cpu_mib(&o, sk as *const u8);
    let (counters, ok) = counters(&o, mib);
    if ok {
        *s = SynInFlight {
            sk,
            skb,
            mib: mib as u64,
            active: 1,
            _pad: 0,
            counters,
        };
    } else {
        s.active = 0;
        crate::count(backlog_common::COUNTER_READ_ERRORS);
    }
}

#[inline(always)]
fn exit() {
    let Some(s) = slot() else {
        return;
    };
    if s.active == 0 {
        // Attached mid-call, or the entry could not read the counters.
        return;
    }
    s.active = 0;
    let state = *s;
    let o = crate::offsets();
    let sk = state.sk as *const u8;
    let skb = state.skb as *const u8;
    let (now, ok) = counters(&o, state.mib as *const u8);
    if !ok {
        crate::count(backlog_common::COUNTER_READ_ERRORS);
        return;
    }
    let delta = |i: usize| now[i].wrapping_sub(state.counters[i]);
    // A SYN is dropped at most once, so one else-if chain: it keeps the
    // verifier's paths (and the stack) to two emit() calls.
    let queue_full = delta(REQQ_FULL_DROP);
    let overflows = delta(LISTEN_OVERFLOWS);
    let dropped = if queue_full != 0 {
        Some(DropKind::SynDroppedSynQueueFull)
    } else if overflows != 0 {
        Some(DropKind::SynDroppedAcceptQueueFull)
    } else if delta(LISTEN_DROPS) != 0 {
        // Neither queue was full: the SYN-backlog pressure rule, or
        // another failure (memory, route, LSM), told apart by the rule.
        Some(if syn_backlog_pressure(&o, sk) {
            DropKind::SynDroppedSynBacklogPressure
        } else {
            DropKind::SynDroppedOther
        })
    } else {
        None
    };
    if delta(REQQ_FULL_DO_COOKIES) != 0 {
        event::emit(DropKind::SynCookieSent as u32, sk, skb, 0);
    }
    if let Some(kind) = dropped {
        event::emit(kind as u32, sk, skb, 0);
    }
}

/// tcp_conn_request()'s own test: cookies off and fewer than a quarter of
/// tcp_max_syn_backlog left in the SYN queue.
#[inline(always)]
fn syn_backlog_pressure(o: &KernelOffsets, sk: *const u8) -> bool {
    let mut r = Reader::new();
    let net = r.ptr(sk, o.sk_net);
    let syncookies = r.at::<u8>(net, o.net_syncookies);
    let max = r.at::<i32>(net, o.net_max_syn_backlog);
    let qlen = r.at::<i32>(sk, o.icsk_syn_queue_len);
    r.ok() && syncookies == 0 && max - qlen < (max >> 2)
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
