//! Final-ACK accept-queue overflow seen at `tcp_v4_syn_recv_sock()` /
//! `tcp_v6_syn_recv_sock()`, for kernels whose kfree_skb has no
//! listen-overflow reason (before 6.15).
//!
//! Both return NULL through `exit_overflow` when `sk_acceptq_is_full()` is
//! the first thing they check; they also return NULL on rarer failures
//! (no memory, no route). So a drop is reported only when the function
//! really returned NULL AND the accept queue was full: the outcome the
//! kernel produced, read at exit, not guessed at entry.
//!
//! For an IPv4 packet on a dual-stack listener, tcp_v6_syn_recv_sock()
//! just calls tcp_v4_syn_recv_sock(); the v6 hooks ignore IPv4 packets so
//! that one drop is one event.

use aya_ebpf::{
    macros::{fexit, kprobe, kretprobe, map},
    maps::PerCpuArray,
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use backlog_common::DropKind;

use crate::event;

// The return value of an fexit program follows the arguments in its
// context; it is read as a context slot rather than with
// bpf_get_func_ret(), which needs 5.17. `*_syn_recv_sock()` took six
// arguments (sk, skb, req, dst, req_unhash, own_req) until 6.12 added
// opt_child_init. The slot must be a constant for the verifier, so there is
// one program per prototype and the agent loads the one matching the
// running kernel's BTF.

#[inline(always)]
fn report_if_overflow(sk: *const u8, skb: *const u8, ret: u64) {
    if ret == 0 && event::accept_queue_full(sk) {
        event::emit(DropKind::AckDroppedAcceptQueueFull as u32, sk, skb, 0);
    }
}

#[inline(always)]
fn fexit_v4(ctx: &FExitContext, ret_slot: usize) {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let ret: u64 = ctx.arg(ret_slot);
    report_if_overflow(sk as *const u8, skb as *const u8, ret);
}

#[inline(always)]
fn fexit_v6(ctx: &FExitContext, ret_slot: usize) {
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    if event::packet_ip_version(skb as *const u8) == 4 {
        return;
    }
    let ret: u64 = ctx.arg(ret_slot);
    report_if_overflow(sk as *const u8, skb as *const u8, ret);
}

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn fexit_syn_recv_sock_v4_6args(ctx: FExitContext) -> i32 {
    fexit_v4(&ctx, 6);
    0
}

#[fexit(function = "tcp_v4_syn_recv_sock")]
pub fn fexit_syn_recv_sock_v4_7args(ctx: FExitContext) -> i32 {
    fexit_v4(&ctx, 7);
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn fexit_syn_recv_sock_v6_6args(ctx: FExitContext) -> i32 {
    fexit_v6(&ctx, 6);
    0
}

#[fexit(function = "tcp_v6_syn_recv_sock")]
pub fn fexit_syn_recv_sock_v6_7args(ctx: FExitContext) -> i32 {
    fexit_v6(&ctx, 7);
    0
}

/// Arguments saved at kprobe entry for the kretprobe, which on x86 cannot
/// see them any more.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct SavedArgs {
    sk: u64,
    skb: u64,
    active: u64,
}

/// One slot per CPU, not per task: the handshake runs in softirq, which
/// does not nest on a CPU, and softirqs that interrupt the idle task all
/// have pid_tgid 0, so a per-task key would mix CPUs up.
#[map]
static SYN_RECV_ARGS: PerCpuArray<SavedArgs> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn save_args(ctx: &ProbeContext, skip_ipv4: bool) {
    let (Some(sk), Some(skb)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return;
    };
    // The v4-mapped call chain: the v6 function hands IPv4 packets to the
    // v4 one, whose probes report them.
    if skip_ipv4 && event::packet_ip_version(skb as *const u8) == 4 {
        return;
    }
    if let Some(slot) = SYN_RECV_ARGS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot (see SYN_RECV_ARGS).
        unsafe { *slot = SavedArgs { sk, skb, active: 1 } };
    }
}

#[inline(always)]
fn check_return(ctx: &RetProbeContext) {
    let Some(slot) = SYN_RECV_ARGS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot (see SYN_RECV_ARGS).
    let slot = unsafe { &mut *slot };
    if slot.active == 0 {
        return;
    }
    slot.active = 0;
    let ret: u64 = ctx.ret();
    report_if_overflow(slot.sk as *const u8, slot.skb as *const u8, ret);
}

#[kprobe]
pub fn kprobe_syn_recv_sock_v4(ctx: ProbeContext) -> u32 {
    save_args(&ctx, false);
    0
}

#[kretprobe]
pub fn kretprobe_syn_recv_sock_v4(ctx: RetProbeContext) -> u32 {
    check_return(&ctx);
    0
}

#[kprobe]
pub fn kprobe_syn_recv_sock_v6(ctx: ProbeContext) -> u32 {
    save_args(&ctx, true);
    0
}

#[kretprobe]
pub fn kretprobe_syn_recv_sock_v6(ctx: RetProbeContext) -> u32 {
    check_return(&ctx);
    0
}
