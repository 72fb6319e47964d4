//! The syscall side: connect() on UNIX stream sockets failing with EAGAIN
//! (the nginx -> php-fpm "11: Resource temporarily unavailable"), and
//! listen(), to know the backlog a process asked for and who created a
//! listener even after it exited. Syscall tracepoints exist on every
//! kernel built with CONFIG_FTRACE_SYSCALLS, so this works where kprobes
//! and fentry do not.
//!
//! The accept-queue wait (accept.rs) needs connect() and listen() too: its
//! parts are called from the programs here rather than attached as second
//! programs, since every connect() on the machine pays for each program on
//! its tracepoints.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_user, generated,
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray},
    programs::TracePointContext,
    EbpfContext as _,
};
use backlog_common::{
    ListenEvent, UnixAccount, UnixConnectEvent, UnixTotalKey, AF_UNIX, TASK_COMM_LEN,
    TP_CONNECT_ADDR, TP_CONNECT_ADDRLEN, TP_CONNECT_FD, TP_SYS_EXIT_RET, UNIX_PATH_MAX,
};

use crate::{
    account,
    read::{btf_field, syscall_args01, Reader},
};

const EAGAIN: i64 = 11;
const EINPROGRESS: i64 = 115;
/// sockaddr_un: sun_family (2 bytes), then the path.
const SUN_PATH_OFFSET: usize = 2;

/// What sys_enter_connect keeps for the exit of an AF_UNIX connect() on
/// kernels without bpf_task_pt_regs (before 5.15): the path is only read
/// when the call failed with EAGAIN, the fd only when it succeeded
/// (accept.rs's UNIX arrival).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct UnixConnectArgs {
    addr: u64,
    addrlen: u64,
    fd: u64,
}

/// connect() arguments between syscall entry and exit, per thread.
#[map]
static UNIX_CONNECT_ARGS: HashMap<u64, UnixConnectArgs> = HashMap::with_max_entries(8192, 0);

/// EAGAINs per (client netns, path): what became of them and the rate
/// limit's bucket, in one entry (account.rs's admit_shared).
#[map]
static UNIX_TOTALS: HashMap<UnixTotalKey, UnixAccount> = HashMap::with_max_entries(8192, 0);

/// The key and the event are built here, off the 512-byte stack.
#[map]
static UNIX_KEY_SCRATCH: PerCpuArray<UnixTotalKey> = PerCpuArray::with_max_entries(1, 0);
#[map]
static UNIX_EVENT_SCRATCH: PerCpuArray<UnixConnectEvent> = PerCpuArray::with_max_entries(1, 0);

/// What sys_enter_listen keeps for the exit on kernels without
/// bpf_task_pt_regs (before 5.15).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct ListenArgs {
    fd: u32,
    backlog: i32,
}

#[map]
static LISTEN_ARGS: HashMap<u64, ListenArgs> = HashMap::with_max_entries(1024, 0);

/// Loaded before its layout is checked (see probes.rs): with absent
/// offsets the verifier must see no ctx access at all.
#[inline(always)]
fn layout_known(o: &backlog_common::KernelOffsets) -> bool {
    [
        o.tp_connect_addr,
        o.tp_connect_addrlen,
        o.tp_listen_fd,
        o.tp_listen_backlog,
        o.tp_sys_exit_ret,
    ]
    .iter()
    .all(|&offset| offset != backlog_common::OFFSET_ABSENT)
}

/// Copies out and removes what a syscall's entry saved for its exit.
#[inline(always)]
fn take<V: Copy>(map: &HashMap<u64, V>, key: u64) -> Option<V> {
    // SAFETY: the value is copied out before the entry is removed.
    let value = unsafe { map.get(key) }.copied()?;
    let _ = map.remove(key);
    Some(value)
}

/// A syscall tracepoint field at a constant offset: a plain load, which
/// the verifier allows for tracepoint programs at any constant offset
/// inside the record (and the agent attaches these programs only where
/// tracefs shows these offsets, see TP_CONNECT_ADDR).
#[inline(always)]
fn field<const AT: usize>(ctx: &TracePointContext) -> u64 {
    // SAFETY: an aligned 8-byte read inside the syscall record.
    unsafe { *(ctx.as_ptr() as *const u8).add(AT).cast::<u64>() }
}

/// The fallback pair's entry (kernels without bpf_task_pt_regs): runs for
/// every connect() on the machine (TCP included), two loads and the
/// address family read, and it leaves unless that is AF_UNIX.
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let addr = field::<{ TP_CONNECT_ADDR }>(&ctx);
    let addrlen = field::<{ TP_CONNECT_ADDRLEN }>(&ctx) as u32 as u64;
    // Only UNIX sockets with a name; every other connect() leaves here.
    if addrlen <= SUN_PATH_OFFSET as u64 || addr == 0 {
        return 0;
    }
    let Ok(family) = (unsafe { bpf_probe_read_user(addr as *const u16) }) else {
        return 0;
    };
    if family != AF_UNIX {
        return 0;
    }
    let fd = field::<{ TP_CONNECT_FD }>(&ctx) as u32 as u64;
    let args = UnixConnectArgs { addr, addrlen, fd };
    let _ = UNIX_CONNECT_ARGS.insert(bpf_get_current_pid_tgid(), args, 0);
    0
}

/// The fallback pair's exit. The common non-blocking TCP answer,
/// EINPROGRESS, leaves on the first comparison (a UNIX connect() never
/// gives it, so no saved arguments are left behind by leaving); a TCP
/// connect() that returns 0 leaves after one lookup that finds nothing.
/// Success on AF_UNIX is the accept-queue wait's arrival (accept.rs),
/// EAGAIN the UNIX backlog drop; one program does both, so that
/// connect() pays for one program per tracepoint.
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    exit_connect(&ctx, Eagains::Counted)
}

/// The same exit attached for the accept-queue wait's UNIX arrivals
/// alone, where `--attach` leaves the UNIX kind unobserved: it counts no
/// EAGAIN for a kind the agent says it does not see.
#[tracepoint]
pub fn sys_exit_connect_arrivals(ctx: TracePointContext) -> u32 {
    exit_connect(&ctx, Eagains::Ignored)
}

/// Whether a connect() program counts UNIX EAGAINs or serves the
/// accept-queue wait's arrivals alone: one program each, so that what a
/// program does is decided by which one the agent attaches, after it
/// knows which rung took the UNIX kind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Eagains {
    Counted,
    Ignored,
}

#[inline(always)]
fn exit_connect(ctx: &TracePointContext, eagains: Eagains) -> u32 {
    let ret = field::<{ TP_SYS_EXIT_RET }>(ctx) as i64;
    if ret == -EINPROGRESS {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if ret != 0 && ret != -EAGAIN {
        // Whatever this thread's entry saved (if anything) is done with.
        let _ = UNIX_CONNECT_ARGS.remove(pid_tgid);
        return 0;
    }
    let Some(args) = take(&UNIX_CONNECT_ARGS, pid_tgid) else {
        return 0;
    };
    if ret == 0 {
        crate::accept::unix_arrival(args.fd as u32);
        return 0;
    }
    if eagains == Eagains::Counted {
        unix_eagain(
            args.addr,
            args.addrlen,
            SockaddrIn::CallerMemory,
            client_netns,
        );
    }
    0
}

/// The only connect() program where the kernel has bpf_task_pt_regs
/// (5.15+) and no fexit on unix_stream_connect (unix_stream_connect.rs)
/// attaches: nothing runs at sys_enter_connect, and the exit takes the
/// arguments from the registers the task saved at syscall entry, only on
/// the returns that matter. So a connect() that is not a UNIX EAGAIN or
/// success pays two comparisons (EINPROGRESS, ECONNREFUSED, ...); one
/// that returns 0 (a blocking TCP connect(), every UDP connect()) also
/// pays the register read and the address family read; EAGAIN is
/// checked for AF_UNIX before it is counted (a TCP connect() gives EAGAIN
/// when ephemeral ports run out).
#[tracepoint]
pub fn sys_exit_connect_regs(ctx: TracePointContext) -> u32 {
    exit_connect_regs(&ctx, Eagains::Counted)
}

/// sys_exit_connect_regs for the accept-queue wait's UNIX arrivals alone
/// (see sys_exit_connect_arrivals).
#[tracepoint]
pub fn sys_exit_connect_regs_arrivals(ctx: TracePointContext) -> u32 {
    exit_connect_regs(&ctx, Eagains::Ignored)
}

#[inline(always)]
fn exit_connect_regs(ctx: &TracePointContext, eagains: Eagains) -> u32 {
    let ret = field::<{ TP_SYS_EXIT_RET }>(ctx) as i64;
    if ret == -EAGAIN {
        if eagains == Eagains::Counted {
            // SAFETY: a helper without memory preconditions.
            let task = unsafe { generated::bpf_get_current_task_btf() };
            let regs = unsafe { generated::bpf_task_pt_regs(task) } as *const u8;
            let (pt_regs_arg1_at, pt_regs_arg2_at) =
                (crate::offset!(pt_regs_arg1), crate::offset!(pt_regs_arg2));
            // SAFETY (both): register slots of pt_regs (see btf_field).
            let addr = unsafe { btf_field::<u64>(regs, pt_regs_arg1_at) };
            let addrlen = unsafe { btf_field::<u64>(regs, pt_regs_arg2_at) };
            unix_eagain(
                addr,
                addrlen as u32 as u64,
                SockaddrIn::CallerMemory,
                || client_netns_btf(task as *const u8),
            );
        }
        return 0;
    }
    if ret != 0 || !crate::accept::arrivals_known() {
        return 0;
    }
    let (fd, addr) = syscall_args01();
    let fd = fd as u32;
    if addr != 0 && unsafe { bpf_probe_read_user(addr as *const u16) } == Ok(AF_UNIX) {
        crate::accept::unix_arrival(fd);
    }
    0
}

/// Where connect()'s sockaddr is when a program reads it: still in the
/// caller's memory at the syscall's exit (the thread has not run on), or
/// the kernel's copy (move_addr_to_kernel, on __sys_connect's stack) that
/// unix_stream_connect() was handed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SockaddrIn {
    CallerMemory,
    Kernel,
}

impl SockaddrIn {
    /// `len` bytes at `src` into `dst`: the helper's return code (0 on
    /// success; it reports a fault instead of faulting).
    #[inline(always)]
    fn read(self, dst: *mut u8, len: u32, src: u64) -> i64 {
        // SAFETY: the callers pass `dst` with room for `len` bytes.
        unsafe {
            match self {
                SockaddrIn::CallerMemory => {
                    generated::bpf_probe_read_user(dst.cast(), len, src as *const c_void)
                }
                SockaddrIn::Kernel => {
                    generated::bpf_probe_read_kernel(dst.cast(), len, src as *const c_void)
                }
            }
        }
    }

    #[inline(always)]
    fn family(self, src: u64) -> u16 {
        let mut family = 0u16;
        if self.read((&mut family as *mut u16).cast(), 2, src) == 0 {
            family
        } else {
            0
        }
    }
}

/// Zeroes the key with 4-byte stores. `*key = UnixTotalKey::ZERO` compiles
/// to a call of the BPF target's memset, a byte loop: 116 iterations
/// that were a quarter of what an EAGAIN cost.
#[inline(always)]
fn zero_key(key: &mut UnixTotalKey) {
    let words = (key as *mut UnixTotalKey).cast::<u32>();
    for i in 0..core::mem::size_of::<UnixTotalKey>() / 4 {
        // SAFETY: inside the key, which is 4-byte aligned; volatile so
        // that LLVM does not fold the stores back into a memset call.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// task->nsproxy->net_ns->ns.inum through BTF pointers (see btf_field),
/// `task` being bpf_get_current_task_btf()'s; 0 when a pointer is NULL
/// (the load faults safely to 0).
#[inline(always)]
fn client_netns_btf(task: *const u8) -> u32 {
    let (nsproxy_at, net_ns_at, inum_at) = (
        crate::offset!(task_nsproxy),
        crate::offset!(nsproxy_net_ns),
        crate::offset!(net_ns_inum),
    );
    // SAFETY: fields of task_struct, nsproxy and net (offsets from BTF,
    // required present by the agent for this program).
    unsafe {
        let nsproxy = btf_field::<u64>(task, nsproxy_at) as *const u8;
        let net = btf_field::<u64>(nsproxy, net_ns_at) as *const u8;
        btf_field::<u32>(net, inum_at)
    }
}

/// One EAGAIN of connect(addr, addrlen): counted for its (client netns,
/// path) if `addr` is an AF_UNIX address, and reported unless suppressed.
#[inline(always)]
pub fn unix_eagain(
    addr: u64,
    addrlen: u64,
    sockaddr_in: SockaddrIn,
    client_netns: impl FnOnce() -> u32,
) {
    if addrlen <= SUN_PATH_OFFSET as u64 || addr == 0 {
        return;
    }
    let Some(key) = UNIX_KEY_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot (see event.rs).
    let key = unsafe { &mut *key };
    // The slot keeps the previous EAGAIN's key, zero past its path_len
    // (the map starts zeroed, and every path below keeps that true). The
    // copy below overwrites at least that much when this path is not
    // shorter, so only then can the zeroing be left out: in a storm, the
    // same path over and over.
    let previous_len = key.path_len as u64;
    // Exactly the bytes the caller passed, so that the rest of the key
    // stays zero and keys compare, whichever hook read them (see
    // SockaddrIn for where they are). One copy
    // takes sun_family and sun_path: the family lands in bytes 6..8 of
    // the key (the upper half of path_len, written below), the path on
    // `path` (offsets asserted in backlog-common).
    let mut len = addrlen.wrapping_sub(SUN_PATH_OFFSET as u64);
    if len > UNIX_PATH_MAX as u64 {
        len = UNIX_PATH_MAX as u64;
    }
    if len < previous_len {
        zero_key(key);
    }
    let dst = (key as *mut UnixTotalKey as *mut u8).wrapping_add(8 - SUN_PATH_OFFSET);
    // At most 2 + UNIX_PATH_MAX bytes into bytes 6..116 of the key.
    let rc = sockaddr_in.read(dst, (len + SUN_PATH_OFFSET as u64) as u32, addr);
    if rc == 0 {
        // Little-endian (bpfel): bytes 6..8 are the upper half.
        if key.path_len >> 16 != AF_UNIX as u32 {
            return;
        }
        key.path_len = len as u32;
    } else {
        // connect() read these bytes a moment ago, so this is not
        // expected; if it happens the EAGAIN is still counted, path
        // unknown (length 0), when the family alone can be read.
        zero_key(key);
        if sockaddr_in.family(addr) != AF_UNIX {
            return;
        }
    }
    key.netns_inode = client_netns();
    // The --unix-path filter, before anything is counted or queued.
    if !crate::filter::wants_unix_path(&mut key.path, key.path_len) {
        return;
    }
    let admission = account::admit_shared(&UNIX_TOTALS, key);
    if !admission.send {
        return;
    }
    let Some(event) = UNIX_EVENT_SCRATCH.get_ptr_mut(0) else {
        account::queued_shared(&admission, false);
        return;
    };
    // SAFETY: as above.
    let event = unsafe { &mut *event };
    let pid_tgid = bpf_get_current_pid_tgid();
    event.timestamp_ns = admission.now;
    event.pid = (pid_tgid >> 32) as u32;
    event.tid = pid_tgid as u32;
    event.cpu = unsafe { bpf_get_smp_processor_id() };
    event.path_len = key.path_len;
    event.comm = current_comm();
    event.path = key.path;
    event.netns_inode = key.netns_inode;
    let ok = crate::output(event);
    account::queued_shared(&admission, ok);
}

/// current->nsproxy->net_ns->ns.inum: where the client looked the path up.
#[inline(always)]
pub fn client_netns() -> u32 {
    let mut r = Reader::new();
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let nsproxy = r.ptr(task, crate::offset!(task_nsproxy));
    let net = r.ptr(nsproxy, crate::offset!(nsproxy_net_ns));
    let inum = r.at::<u32>(net, crate::offset!(net_ns_inum));
    if r.ok() {
        inum
    } else {
        0
    }
}

/// The fallback pair's entry (kernels without bpf_task_pt_regs): keeps
/// listen()'s arguments for the exit.
#[tracepoint]
pub fn sys_enter_listen(ctx: TracePointContext) -> u32 {
    let o = crate::offsets();
    if !layout_known(&o) {
        return 0;
    }
    let (Ok(fd), Ok(backlog)) = (
        unsafe { ctx.read_at::<u64>(o.tp_listen_fd as usize) },
        unsafe { ctx.read_at::<u64>(o.tp_listen_backlog as usize) },
    ) else {
        return 0;
    };
    let key = bpf_get_current_pid_tgid();
    let args = ListenArgs {
        fd: fd as u32,
        backlog: backlog as i32,
    };
    let _ = LISTEN_ARGS.insert(key, args, 0);
    0
}

#[tracepoint]
pub fn sys_exit_listen(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(args) = take(&LISTEN_ARGS, key) else {
        return 0;
    };
    let o = crate::offsets();
    if !layout_known(&o) {
        return 0;
    }
    if unsafe { ctx.read_at::<i64>(o.tp_sys_exit_ret as usize) } != Ok(0) {
        return 0;
    }
    listened(args.fd, args.backlog, key);
    0
}

/// The only listen() program where the kernel has bpf_task_pt_regs
/// (5.15+): no sys_enter_listen program, and so no map insert and delete
/// per call; a failed listen() leaves on its return value, and a
/// successful one takes its fd and backlog from the registers the task
/// saved at syscall entry.
#[tracepoint]
pub fn sys_exit_listen_regs(ctx: TracePointContext) -> u32 {
    if field::<{ TP_SYS_EXIT_RET }>(&ctx) != 0 {
        return 0;
    }
    let (fd, backlog) = syscall_args01();
    // int arguments: the upper halves of the registers are not theirs.
    listened(fd as u32, backlog as i32, bpf_get_current_pid_tgid());
    0
}

/// A successful listen(fd, backlog) by `pid_tgid`: the accept-queue side
/// learns the listener, and the agent gets a ListenEvent.
#[inline(always)]
fn listened(fd: u32, backlog: i32, pid_tgid: u64) {
    let o = crate::offsets();
    // The accept-queue side (a no-op without its offsets).
    crate::accept::listened(fd);
    let mut event = ListenEvent {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        socket_inode: 0,
        pid: (pid_tgid >> 32) as u32,
        netns_inode: 0,
        backlog_requested: backlog,
        backlog_applied: 0,
        family: 0,
        port: 0,
        fd,
        comm: current_comm(),
    };
    // Fields that cannot be read stay 0; the agent treats 0 as unknown.
    let socket = crate::read::socket_of_fd(&o.fd_walk(), fd);
    if !socket.is_null() {
        let mut r = Reader::new();
        let inode = socket.wrapping_add(o.socket_to_inode as usize);
        event.socket_inode = r.at::<u64>(inode, o.inode_i_ino);
        let sk = r.ptr(socket, o.socket_sk);
        event.backlog_applied = r.at::<u32>(sk, o.sk_max_ack_backlog);
        event.family = r.at::<u16>(sk, o.sk_family);
        event.port = r.at::<u16>(sk, o.sk_num);
        let net = r.ptr(sk, o.sk_net);
        event.netns_inode = r.at::<u32>(net, o.net_ns_inum);
    }
    crate::filter::note_listen(event.pid, event.socket_inode);
    crate::submit(&event);
}

/// The calling task's comm, zeroed when unreadable (a zeroed buffer, not
/// an `unwrap_or`, for the verifier: see read.rs).
#[inline(always)]
fn current_comm() -> [u8; TASK_COMM_LEN] {
    let mut comm = [0u8; TASK_COMM_LEN];
    // SAFETY: the helper writes at most TASK_COMM_LEN bytes into `comm`.
    unsafe {
        aya_ebpf::helpers::generated::bpf_get_current_comm(
            comm.as_mut_ptr().cast(),
            TASK_COMM_LEN as u32,
        )
    };
    comm
}
