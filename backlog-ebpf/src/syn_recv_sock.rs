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
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, kprobe, kretprobe, map},
    maps::HashMap,
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
}

/// Keyed by pid_tgid: the handshake runs in softirq or in the context of
/// the task releasing the listener lock, one call at a time per task.
#[map]
static SYN_RECV_ARGS: HashMap<u64, SavedArgs> = HashMap::with_max_entries(4096, 0);

#[inline(always)]
fn save_args(ctx: &ProbeContext, skip_ipv4: bool) {
    let (Some(sk), Some(skb)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return;
    };
    if skip_ipv4 && event::packet_ip_version(skb as *const u8) == 4 {
        return;
    }
    let key = bpf_get_current_pid_tgid();
    let _ = SYN_RECV_ARGS.insert(key, SavedArgs { sk, skb }, 0);
}

#[inline(always)]
fn check_return(ctx: &RetProbeContext) {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value is copied out before the entry is removed.
    let Some(saved) = (unsafe { SYN_RECV_ARGS.get(key) }).copied() else {
        return;
    };
    let _ = SYN_RECV_ARGS.remove(key);
    let ret: u64 = ctx.ret();
    report_if_overflow(saved.sk as *const u8, saved.skb as *const u8, ret);
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
