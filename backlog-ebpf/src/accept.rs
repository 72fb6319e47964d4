//! Before the drop: how long connections wait in the accept queue, how
//! fast they arrive and are accepted, and whether the queue is getting
//! full. Tracepoints only, so this works where kprobes and fentry do not
//! (the 6.18 hosts), and map updates only: nothing per connection goes
//! through the ring buffer.
//!
//! The wait is measured from the child socket reaching ESTABLISHED
//! (`sock:inet_sock_set_state`, SYN_RECV -> ESTABLISHED: tcp_check_req()
//! has just queued the child on the listener, tcp_child_process() then
//! moves it to ESTABLISHED) to accept() returning it
//! (`syscalls:sys_exit_accept4` / `sys_exit_accept`, the returned fd
//! resolved to its socket as listen() tracking does). The child is keyed
//! by its `struct sock` address, which is what accept() hands out.
//!
//! Which listener: at ESTABLISHED the child does not point at its
//! listener, but its local port and network namespace name it; at
//! accept() the listening fd gives the listener itself. So rows are keyed
//! by (netns, port): listeners sharing a port (an SO_REUSEPORT group, or
//! one port on several addresses) share a row. The listener's `struct
//! sock` is remembered per (netns, port) from listen() and accept(), so
//! that each arrival can read the queue's fill for the near-full warning;
//! a listener created before the agent started and never accepting is not
//! known that way (no warning for it until it accepts once).
//!
//! UNIX stream listeners: there is no handshake tracepoint, but a client's
//! successful connect() (`syscalls:sys_exit_connect`, return 0) has
//! already queued the server's end of the connection on the listener, and
//! `unix_sk(client)->peer` is that socket, the one the server's accept()
//! will return: its arrival time is taken there. The listener itself is
//! not known at connect time (only at accept()), so UNIX rows have accept
//! rates and waits but no arrival count; their queue fill is read at
//! accept() only (kernels before 6.10 count a UNIX queue in
//! sk_receive_queue, not sk_ack_backlog: no fill there).

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, TracePointContext},
};
use backlog_common::{
    wait_bucket, AcceptKey, AcceptOffsets, AcceptStats, ACCEPT_KEY_TCP, ACCEPT_KEY_UNIX,
    ACCEPT_STATS_ENTRIES, AF_INET, AF_INET6, AF_UNIX, COUNTER_ACCEPT_STATS_FULL,
    NEAR_FULL_EVERY_NS, OFFSET_ABSENT, RATE_WINDOW_NS, TP_STATE_NEWSTATE, TP_STATE_OLDSTATE,
    TP_STATE_PROTOCOL, TP_STATE_SKADDR, TP_STATE_SPORT, TP_SYS_EXIT_RET,
};

use crate::read::{tp_field, Reader};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;
const TCP_LISTEN: u8 = 10;
const IPPROTO_TCP: u16 = 6;

/// Written by the agent before load (see backlog_common::AcceptOffsets).
#[no_mangle]
static ACCEPT_OFFSETS: AcceptOffsets = AcceptOffsets::ABSENT;

#[inline(always)]
fn offsets() -> AcceptOffsets {
    // SAFETY: a plain read of a global the agent rewrites before load;
    // volatile so that the initialiser is not folded into the code.
    unsafe { core::ptr::read_volatile(&ACCEPT_OFFSETS) }
}

/// Per-listener figures, read by the agent, which deletes the rows idle
/// for `--expire-after` (keeping their figures user-side).
#[map]
static ACCEPT_STATS: HashMap<AcceptKey, AcceptStats> =
    HashMap::with_max_entries(ACCEPT_STATS_ENTRIES, 0);

/// When each child socket reached ESTABLISHED, by `struct sock` address.
/// LRU: children closed before anyone accepted them are never removed
/// here and must not fill the map.
#[map]
static ESTABLISHED_AT: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// The listener's `struct sock` per (netns, port), from listen() and
/// accept(): what an arrival reads the queue fill from.
#[map]
static LISTENER_SOCK: LruHashMap<AcceptKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// The fd argument of accept()/accept4() between entry and exit, per
/// thread (a thread is in one syscall at a time), on kernels without
/// bpf_task_pt_regs (before 5.15); from 5.15 the exit reads it from the
/// saved registers instead. listen() and connect() keep theirs in
/// syscalls.rs, whose programs call into this module.
#[map]
static SYSCALL_FD: HashMap<u64, u32> = HashMap::with_max_entries(8192, 0);

/// A zeroed value to create rows from (too big for the stack).
#[map]
static ZERO_STATS: PerCpuArray<AcceptStats> = PerCpuArray::with_max_entries(1, 0);

/// With absent offsets the verifier must see no ctx access at all.
#[inline(always)]
fn layout_known(o: &AcceptOffsets) -> bool {
    [
        o.tp_state_skaddr,
        o.tp_state_oldstate,
        o.tp_state_newstate,
        o.tp_state_sport,
        o.tp_state_protocol,
        o.tp_accept_fd,
        o.tp_listen_fd,
        o.tp_sys_exit_ret,
    ]
    .iter()
    .all(|&offset| offset != OFFSET_ABSENT)
}

#[inline(always)]
fn add(counter: &mut u64, value: u64) {
    // SAFETY: `counter` is a u64 in a map value, 8-byte aligned; other
    // CPUs update it too, hence the atomic add. Its result is unused, so
    // it compiles to BPF's XADD, which every supported kernel has.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, value) };
}

/// The row of `key`, created zeroed when missing.
#[inline(always)]
fn row(key: &AcceptKey) -> Option<&'static mut AcceptStats> {
    if let Some(stats) = ACCEPT_STATS.get_ptr_mut(key) {
        // SAFETY: a map value, valid while the program runs.
        return Some(unsafe { &mut *stats });
    }
    let zero = ZERO_STATS.get(0)?;
    // EEXIST when another CPU created it meanwhile: the lookup finds it.
    let _ = ACCEPT_STATS.insert(key, zero, BPF_NOEXIST as u64);
    // SAFETY: as above.
    let stats = ACCEPT_STATS
        .get_ptr_mut(key)
        .map(|stats| unsafe { &mut *stats });
    if stats.is_none() {
        // The map is full: said by the agent, never silent.
        crate::count(COUNTER_ACCEPT_STATS_FULL);
    }
    stats
}

/// Counts one occurrence in a `RATE_WINDOW_NS` window and keeps the
/// busiest window. Racy across CPUs: a window boundary seen by two CPUs
/// at once may lose a few counts, which a peak estimate tolerates.
#[inline(always)]
fn count_in_window(start: &mut u64, count: &mut u64, peak: &mut u64, now: u64) {
    if now.wrapping_sub(*start) >= RATE_WINDOW_NS {
        *start = now;
        *count = 0;
    }
    add(count, 1);
    if *count > *peak {
        *peak = *count;
    }
}

/// Reads the listener's queue fill, keeps the deepest, and records a
/// near-full crossing (at most one per listener per NEAR_FULL_EVERY_NS).
#[inline(always)]
fn queue_fill(stats: &mut AcceptStats, o: &AcceptOffsets, listener: *const u8, extra: u32) {
    let mut r = Reader::new();
    let len = r.at::<u32>(listener, o.sk_ack_backlog).wrapping_add(extra);
    let max = r.at::<u32>(listener, o.sk_max_ack_backlog);
    if !r.ok() {
        return;
    }
    if len > stats.max_queue_seen {
        stats.max_queue_seen = len;
    }
    stats.queue_limit = max;
    let percent = o.near_full_percent as u64;
    if percent == 0 || max == 0 || (len as u64) * 100 < (max as u64) * percent {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if stats.near_full_count != 0 && now.wrapping_sub(stats.near_full_last_ns) < NEAR_FULL_EVERY_NS
    {
        return;
    }
    stats.near_full_last_ns = now;
    stats.near_full_len = len;
    stats.near_full_max = max;
    add(&mut stats.near_full_count, 1);
}

/// Network namespace inode of a socket, 0 when unreadable.
#[inline(always)]
fn netns_of(o: &AcceptOffsets, sk: *const u8) -> u32 {
    let mut r = Reader::new();
    let net = r.ptr(sk, o.sk_net);
    r.at::<u32>(net, o.net_ns_inum)
}

/// `oldstate` and `newstate` of a passive open completing, as one 8-byte
/// load of the two adjacent ints reads them (little-endian: `oldstate`,
/// the lower address, is the low half).
const PASSIVE_OPEN_DONE: u64 = (TCP_ESTABLISHED as u32 as u64) << 32 | TCP_SYN_RECV as u32 as u64;
const _: () =
    assert!(TP_STATE_NEWSTATE == TP_STATE_OLDSTATE + 4 && TP_STATE_OLDSTATE.is_multiple_of(8));

#[tracepoint]
pub fn accept_inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // Every TCP (and SCTP, MPTCP) state change on the machine comes here,
    // several per connection: plain loads at compile-time offsets (checked
    // against tracefs by the agent before it attaches this program) and
    // two comparisons for all but a passive open completing; the offsets
    // struct is read only past them.
    // SAFETY (all): aligned fields of the record (see TP_STATE_*).
    let states = unsafe { tp_field::<u64, { TP_STATE_OLDSTATE }>(&ctx) };
    if states != PASSIVE_OPEN_DONE {
        return 0;
    }
    if unsafe { tp_field::<u16, { TP_STATE_PROTOCOL }>(&ctx) } != IPPROTO_TCP {
        return 0;
    }
    let o = offsets();
    if !layout_known(&o) {
        return 0;
    }
    let sk = unsafe { tp_field::<u64, { TP_STATE_SKADDR }>(&ctx) };
    let port = unsafe { tp_field::<u16, { TP_STATE_SPORT }>(&ctx) };
    tcp_arrival(&o, sk, port);
    0
}

/// The same tracepoint as a tp_btf program, preferred where it loads: a
/// perf tracepoint program shares one per-CPU guard with every kprobe and
/// perf tracepoint program, so an arrival whose softirq interrupted one
/// of them (our syscall programs, say) is skipped by the kernel; a tp_btf
/// program has a guard of its own (see kfree_skb.rs). Its arguments are
/// `(sk, oldstate, newstate)`; protocol and port come from the socket.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn accept_btf_inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let old: u64 = ctx.arg(1);
    let new: u64 = ctx.arg(2);
    if old as i32 != TCP_SYN_RECV || new as i32 != TCP_ESTABLISHED {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let o = offsets();
    // A NULL check first: the verifier allows no arithmetic on a pointer
    // argument it types as possibly NULL.
    if sk == 0 || !layout_known(&o) || o.sk_protocol == OFFSET_ABSENT {
        return 0;
    }
    let mut r = Reader::new();
    let protocol = r.at::<u16>(sk as *const u8, o.sk_protocol);
    let port = r.at::<u16>(sk as *const u8, o.sk_num);
    if !r.ok() || protocol != IPPROTO_TCP {
        return 0;
    }
    tcp_arrival(&o, sk, port);
    0
}

/// A TCP connection just queued on the listener of `port`: counts its
/// arrival, remembers when (for its wait at accept()) and reads the
/// queue's fill.
#[inline(always)]
fn tcp_arrival(o: &AcceptOffsets, sk: u64, port: u16) {
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = ESTABLISHED_AT.insert(sk, now, 0);
    let key = AcceptKey {
        socket_inode: 0,
        netns_inode: netns_of(o, sk as *const u8),
        port,
        kind: ACCEPT_KEY_TCP,
    };
    let Some(stats) = row(&key) else {
        return;
    };
    add(&mut stats.arrivals, 1);
    count_in_window(
        &mut stats.arrival_window_start_ns,
        &mut stats.arrival_window_count,
        &mut stats.arrival_window_peak,
        now,
    );
    // SAFETY: a copy of the map value.
    let Some(listener) = (unsafe { LISTENER_SOCK.get(key) }).copied() else {
        return;
    };
    let listener = listener as *const u8;
    // The remembered pointer may be stale (listener closed, memory
    // reused): trust it only while it is still a listener on this port.
    let mut r = Reader::new();
    let state = r.at::<u8>(listener, o.sk_state);
    let num = r.at::<u16>(listener, o.sk_num);
    if r.ok() && state == TCP_LISTEN && num == port {
        queue_fill(stats, o, listener, 0);
    }
}

#[inline(always)]
fn save_fd(ctx: &TracePointContext) {
    let o = offsets();
    if !layout_known(&o) {
        return;
    }
    // accept and accept4 have `fd` at the same place: checked by the
    // agent before load.
    if let Ok(fd) = unsafe { ctx.read_at::<u64>(o.tp_accept_fd as usize) } {
        let _ = SYSCALL_FD.insert(bpf_get_current_pid_tgid(), fd as u32, 0);
    }
}

/// The saved fd and the syscall's return value, when it succeeded.
#[inline(always)]
fn take_fd(ctx: &TracePointContext, o: &AcceptOffsets) -> Option<(u32, i64)> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let fd = unsafe { SYSCALL_FD.get(key) }.copied()?;
    let _ = SYSCALL_FD.remove(key);
    if !layout_known(o) {
        return None;
    }
    let ret = unsafe { ctx.read_at::<i64>(o.tp_sys_exit_ret as usize) }.ok()?;
    (ret >= 0).then_some((fd, ret))
}

#[tracepoint]
pub fn accept_sys_enter_accept4(ctx: TracePointContext) -> u32 {
    save_fd(&ctx);
    0
}

#[tracepoint]
pub fn accept_sys_enter_accept(ctx: TracePointContext) -> u32 {
    save_fd(&ctx);
    0
}

/// Whether `unix_arrival` can do anything: the exit-only connect() hook
/// asks before it reads connect()'s arguments.
#[inline(always)]
pub fn arrivals_known() -> bool {
    let o = offsets();
    layout_known(&o) && o.unix_peer != OFFSET_ABSENT
}

/// A successful UNIX connect() on `fd` (called by syscalls.rs's
/// sys_exit_connect, which saved `fd` at entry for AF_UNIX addresses
/// only).
#[inline(always)]
pub fn unix_arrival(fd: u32) {
    let o = offsets();
    if !layout_known(&o) || o.unix_peer == OFFSET_ABSENT {
        return;
    }
    let socket = crate::read::socket_of_fd(&o.fd_walk(), fd);
    unix_arrival_of(&o, socket);
}

/// A successful UNIX connect() of the client's `struct socket`: the
/// server's end of the connection is queued on the listener now, and
/// `unix_sk(client)->peer` is the socket its accept() returns. Called
/// with the socket by unix_stream_connect.rs's fexit, which has it as an
/// argument, and through the fd walk above by the syscall hooks.
#[inline(always)]
pub fn unix_arrival_of_socket(socket: *const u8) {
    let o = offsets();
    if !layout_known(&o) || o.unix_peer == OFFSET_ABSENT {
        return;
    }
    unix_arrival_of(&o, socket);
}

#[inline(always)]
fn unix_arrival_of(o: &AcceptOffsets, socket: *const u8) {
    if socket.is_null() {
        return;
    }
    let mut r = Reader::new();
    let sk = r.ptr(socket, o.socket_sk);
    let family = r.at::<u16>(sk, o.sk_family);
    let peer = r.at::<u64>(sk, o.unix_peer);
    if r.ok() && family == AF_UNIX && peer != 0 {
        let now = unsafe { bpf_ktime_get_ns() };
        let _ = ESTABLISHED_AT.insert(peer, now, 0);
    }
}

#[tracepoint]
pub fn accept_sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx);
    0
}

#[tracepoint]
pub fn accept_sys_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx);
    0
}

// The exit-only pair, where the kernel has bpf_task_pt_regs (5.15+): no
// sys_enter_accept{,4} program, so no map insert and delete per accept();
// a failed accept() (EAGAIN on a non-blocking listener, the common case
// of an event loop) leaves after one load and one comparison.

#[tracepoint]
pub fn accept_sys_exit_accept4_regs(ctx: TracePointContext) -> u32 {
    accepted_regs(&ctx);
    0
}

#[tracepoint]
pub fn accept_sys_exit_accept_regs(ctx: TracePointContext) -> u32 {
    accepted_regs(&ctx);
    0
}

#[inline(always)]
fn accepted_regs(ctx: &TracePointContext) {
    // SAFETY: an aligned field of the record, where the agent checked
    // that sys_exit_accept{,4} have `ret` (see TP_SYS_EXIT_RET).
    let new_fd = unsafe { tp_field::<i64, { TP_SYS_EXIT_RET }>(ctx) };
    if new_fd < 0 {
        return;
    }
    let (listen_fd, _) = crate::read::syscall_args01();
    accepted_on(&offsets(), listen_fd as u32, new_fd);
}

/// The listener behind `fd` and its row key, with its identity filled in.
#[inline(always)]
fn listener_of_fd(o: &AcceptOffsets, fd: u32) -> Option<(*const u8, AcceptKey, Identity)> {
    let socket = crate::read::socket_of_fd(&o.fd_walk(), fd);
    if socket.is_null() {
        return None;
    }
    let mut r = Reader::new();
    let sk = r.ptr(socket, o.socket_sk);
    let family = r.at::<u16>(sk, o.sk_family);
    let port = r.at::<u16>(sk, o.sk_num);
    let inode = r.at::<u64>(
        socket.wrapping_add(o.socket_to_inode as usize),
        o.inode_i_ino,
    );
    let netns = netns_of(o, sk);
    if !r.ok() {
        return None;
    }
    let mut identity = Identity {
        inode,
        family,
        addr: [0; 16],
    };
    let key = match family {
        AF_INET | AF_INET6 => {
            if family == AF_INET6 {
                identity.addr = r.at::<[u8; 16]>(sk, o.sk_v6_rcv_saddr);
            } else {
                let v4 = r.at::<[u8; 4]>(sk, o.sk_rcv_saddr);
                identity.addr[..4].copy_from_slice(&v4);
            }
            AcceptKey {
                socket_inode: 0,
                netns_inode: netns,
                port,
                kind: ACCEPT_KEY_TCP,
            }
        }
        AF_UNIX => AcceptKey {
            socket_inode: inode,
            netns_inode: netns,
            port: 0,
            kind: ACCEPT_KEY_UNIX,
        },
        _ => return None,
    };
    Some((sk, key, identity))
}

struct Identity {
    inode: u64,
    family: u16,
    addr: [u8; 16],
}

#[inline(always)]
fn remember(stats: &mut AcceptStats, identity: &Identity) {
    stats.listener_inode = identity.inode;
    stats.listener_family = identity.family;
    stats.listener_addr = identity.addr;
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) {
    let o = offsets();
    let Some((listen_fd, new_fd)) = take_fd(ctx, &o) else {
        return;
    };
    accepted_on(&o, listen_fd, new_fd);
}

/// accept() on `listen_fd` returned `new_fd`: the listener's row, and the
/// wait of the connection it handed out.
#[inline(always)]
fn accepted_on(o: &AcceptOffsets, listen_fd: u32, new_fd: i64) {
    let Some((listener, key, identity)) = listener_of_fd(o, listen_fd) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // An LRU update on every accept() costs more than the lookup that
    // usually finds the same listener already there.
    // SAFETY: a copy of the map value.
    let known = unsafe { LISTENER_SOCK.get(key) }.copied();
    if key.kind == ACCEPT_KEY_TCP && known != Some(listener as u64) {
        let _ = LISTENER_SOCK.insert(key, listener as u64, 0);
    }
    let Some(stats) = row(&key) else {
        return;
    };
    remember(stats, &identity);
    add(&mut stats.accepts, 1);
    count_in_window(
        &mut stats.accept_window_start_ns,
        &mut stats.accept_window_count,
        &mut stats.accept_window_peak,
        now,
    );
    // The queue held this connection too until a moment ago.
    queue_fill(stats, o, listener, 1);

    let child_socket = crate::read::socket_of_fd(&o.fd_walk(), new_fd as u32);
    if child_socket.is_null() {
        return;
    }
    let mut r = Reader::new();
    let child = r.ptr(child_socket, o.socket_sk) as u64;
    if !r.ok() {
        return;
    }
    // SAFETY: a copy of the map value.
    let Some(established) = (unsafe { ESTABLISHED_AT.get(child) }).copied() else {
        return;
    };
    let _ = ESTABLISHED_AT.remove(child);
    if established > now {
        return;
    }
    let wait_us = (now - established) / 1000;
    let bucket = wait_bucket(wait_us);
    if let Some(slot) = stats.wait_buckets.get_mut(bucket) {
        add(slot, 1);
    }
    add(&mut stats.waits, 1);
    add(&mut stats.wait_sum_us, wait_us);
    if wait_us > stats.wait_max_us {
        stats.wait_max_us = wait_us;
    }
}

/// A listener created while the agent runs is known from its listen()
/// (called by syscalls.rs's sys_exit_listen once listen() on `fd`
/// succeeded), so that the near-full check works before its first
/// accept().
#[inline(always)]
pub fn listened(fd: u32) {
    let o = offsets();
    if !layout_known(&o) {
        return;
    }
    let Some((listener, key, identity)) = listener_of_fd(&o, fd) else {
        return;
    };
    if key.kind != ACCEPT_KEY_TCP {
        return;
    }
    let _ = LISTENER_SOCK.insert(key, listener as u64, 0);
    if let Some(stats) = row(&key) {
        remember(stats, &identity);
        let mut r = Reader::new();
        let max = r.at::<u32>(listener, o.sk_max_ack_backlog);
        if r.ok() {
            stats.queue_limit = max;
        }
    }
}
