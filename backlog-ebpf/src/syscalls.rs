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
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
    EbpfContext as _,
};
use backlog_common::{
    DropCounts, ListenEvent, UnixConnectEvent, UnixTotalKey, AF_UNIX, TASK_COMM_LEN,
    TP_CONNECT_ADDR, TP_CONNECT_ADDRLEN, TP_CONNECT_FD, TP_SYS_EXIT_RET, UNIX_PATH_MAX,
};

use crate::{account, read::Reader};

const EAGAIN: i64 = 11;
const EINPROGRESS: i64 = 115;
/// sockaddr_un: sun_family (2 bytes), then the path.
const SUN_PATH_OFFSET: usize = 2;

/// What sys_enter_connect keeps for the exit of an AF_UNIX connect(): the
/// path is only read when the call failed with EAGAIN, the fd only when
/// it succeeded (accept.rs's UNIX arrival).
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

/// EAGAINs per (client netns, path) and what became of them (account.rs).
#[map]
static UNIX_TOTALS: PerCpuHashMap<UnixTotalKey, DropCounts> =
    PerCpuHashMap::with_max_entries(4096, 0);

/// The rate limit's token bucket per (client netns, path).
#[map]
static UNIX_BUCKETS: LruHashMap<UnixTotalKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// The key and the event are built here, off the 512-byte stack.
#[map]
static UNIX_KEY_SCRATCH: PerCpuArray<UnixTotalKey> = PerCpuArray::with_max_entries(1, 0);
#[map]
static UNIX_EVENT_SCRATCH: PerCpuArray<UnixConnectEvent> = PerCpuArray::with_max_entries(1, 0);

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

/// Runs for every connect() on the machine (TCP included): two loads and
/// the address family read, and it leaves unless that is AF_UNIX.
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

/// Also runs for every connect(): the common non-blocking TCP answer,
/// EINPROGRESS, leaves on the first comparison (a UNIX connect() never
/// gives it, so no saved arguments are left behind by leaving); a TCP
/// connect() that returns 0 leaves after one lookup that finds nothing.
/// Success on AF_UNIX is the accept-queue wait's arrival (accept.rs),
/// EAGAIN the UNIX backlog drop; one program does both, so that
/// connect() pays for one program per tracepoint.
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let ret = field::<{ TP_SYS_EXIT_RET }>(&ctx) as i64;
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
    // Attached for the arrivals alone (see Config::unix_eagain).
    if crate::config!(unix_eagain) == 0 {
        return 0;
    }
    let Some(key) = UNIX_KEY_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot (see event.rs).
    let key = unsafe { &mut *key };
    *key = UnixTotalKey::ZERO;
    key.netns_inode = client_netns();
    // Exactly the bytes the caller passed, so that the rest of the key
    // stays zero and keys compare. The sockaddr is still the caller's:
    // connect() has returned but the thread has not run on.
    let mut len = args.addrlen.wrapping_sub(SUN_PATH_OFFSET as u64);
    if len > UNIX_PATH_MAX as u64 {
        len = UNIX_PATH_MAX as u64;
    }
    let src = (args.addr as usize + SUN_PATH_OFFSET) as *const c_void;
    // SAFETY: at most UNIX_PATH_MAX bytes into the key's path; the helper
    // reports a fault instead of faulting. If the read fails the path
    // stays unknown (length 0) and the EAGAIN is still counted.
    let rc =
        unsafe { generated::bpf_probe_read_user(key.path.as_mut_ptr().cast(), len as u32, src) };
    if rc == 0 {
        key.path_len = len as u32;
    } else {
        key.path = [0; UNIX_PATH_MAX];
    }
    // The --unix-path filter, before anything is counted or queued.
    if !crate::filter::wants_unix_path(&mut key.path, key.path_len) {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let admission = account::admit(&UNIX_TOTALS, &UNIX_BUCKETS, key, now);
    if !admission.send {
        return 0;
    }
    let Some(event) = UNIX_EVENT_SCRATCH.get_ptr_mut(0) else {
        account::queued(&admission, false);
        return 0;
    };
    // SAFETY: as above.
    let event = unsafe { &mut *event };
    event.timestamp_ns = now;
    event.pid = (pid_tgid >> 32) as u32;
    event.tid = pid_tgid as u32;
    event.cpu = unsafe { bpf_get_smp_processor_id() };
    event.path_len = key.path_len;
    event.comm = current_comm();
    event.path = key.path;
    event.netns_inode = key.netns_inode;
    let ok = crate::output(event);
    account::queued(&admission, ok);
    0
}

/// current->nsproxy->net_ns->ns.inum: where the client looked the path up.
#[inline(always)]
fn client_netns() -> u32 {
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
    // The accept-queue side (a no-op without its offsets).
    crate::accept::listened(args.fd);
    let mut event = ListenEvent {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        socket_inode: 0,
        pid: (key >> 32) as u32,
        netns_inode: 0,
        backlog_requested: args.backlog,
        backlog_applied: 0,
        family: 0,
        port: 0,
        fd: args.fd,
        comm: current_comm(),
    };
    // Fields that cannot be read stay 0; the agent treats 0 as unknown.
    let socket = socket_of_fd(args.fd);
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
    0
}

/// current->files->fdt->fd[fd]->private_data: the struct socket behind a
/// socket fd of the calling process; NULL when it cannot be read.
#[inline(always)]
fn socket_of_fd(fd: u32) -> *const u8 {
    let o = crate::offsets();
    let mut r = Reader::new();
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let files = r.ptr(task, o.task_files);
    let fdt = r.ptr(files, o.files_fdt);
    let max_fds = r.at::<u32>(fdt, o.fdtable_max_fds);
    let fds = r.ptr(fdt, o.fdtable_fd);
    let file = r.ptr(fds, fd.wrapping_mul(8));
    let socket = r.ptr(file, o.file_private_data);
    if r.ok() && fd < max_fds {
        socket
    } else {
        core::ptr::null()
    }
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
