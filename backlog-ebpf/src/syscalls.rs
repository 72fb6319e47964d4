//! The syscall side: connect() on UNIX stream sockets failing with EAGAIN
//! (the nginx -> php-fpm "11: Resource temporarily unavailable"), and
//! listen(), to know the backlog a process asked for and who created a
//! listener even after it exited. Syscall tracepoints exist on every
//! kernel built with CONFIG_FTRACE_SYSCALLS, so this works where kprobes
//! and fentry do not.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_smp_processor_id, bpf_ktime_get_ns,
        bpf_probe_read_user, bpf_probe_read_user_buf,
    },
    macros::{map, tracepoint},
    maps::HashMap,
    programs::TracePointContext,
};
use backlog_common::{ListenEvent, UnixConnectEvent, AF_UNIX, TASK_COMM_LEN, UNIX_PATH_MAX};

use crate::read::Reader;

const EAGAIN: i64 = 11;
/// sockaddr_un: sun_family (2 bytes), then the path.
const SUN_PATH_OFFSET: usize = 2;

#[derive(Clone, Copy)]
#[repr(C)]
pub struct UnixConnectArgs {
    path_len: u32,
    _pad: u32,
    path: [u8; UNIX_PATH_MAX],
}

/// connect() arguments between syscall entry and exit, per thread.
#[map]
static UNIX_CONNECT_ARGS: HashMap<u64, UnixConnectArgs> = HashMap::with_max_entries(8192, 0);

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

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let o = crate::offsets();
    if !layout_known(&o) {
        return 0;
    }
    let (Ok(addr), Ok(addrlen)) = (
        unsafe { ctx.read_at::<u64>(o.tp_connect_addr as usize) },
        unsafe { ctx.read_at::<u64>(o.tp_connect_addrlen as usize) },
    ) else {
        return 0;
    };
    let addrlen = addrlen as u32 as usize;
    // Only UNIX sockets with a name; every other connect() leaves here.
    if addrlen <= SUN_PATH_OFFSET || addr == 0 {
        return 0;
    }
    let Ok(family) = (unsafe { bpf_probe_read_user(addr as *const u16) }) else {
        return 0;
    };
    if family != AF_UNIX {
        return 0;
    }
    let mut args = UnixConnectArgs {
        path_len: 0,
        _pad: 0,
        path: [0; UNIX_PATH_MAX],
    };
    // A constant-size read, then the length: the verifier accepts that on
    // every kernel, a variable-size one it may not. If the full size runs
    // off the caller's mapping the path stays unknown (length 0): the
    // event is still reported.
    let src = (addr as usize + SUN_PATH_OFFSET) as *const u8;
    if unsafe { bpf_probe_read_user_buf(src, &mut args.path) }.is_ok() {
        args.path_len = (addrlen - SUN_PATH_OFFSET).min(UNIX_PATH_MAX) as u32;
    }
    let key = bpf_get_current_pid_tgid();
    let _ = UNIX_CONNECT_ARGS.insert(key, args, 0);
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let key = bpf_get_current_pid_tgid();
    let Some(mut args) = take(&UNIX_CONNECT_ARGS, key) else {
        return 0;
    };
    let o = crate::offsets();
    if !layout_known(&o) {
        return 0;
    }
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(o.tp_sys_exit_ret as usize) }) else {
        return 0;
    };
    if ret != -EAGAIN {
        return 0;
    }
    if !crate::filter::wants_unix_path(&mut args.path, args.path_len) {
        return 0;
    }
    let event = UnixConnectEvent {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        pid: (key >> 32) as u32,
        tid: key as u32,
        cpu: unsafe { bpf_get_smp_processor_id() },
        path_len: args.path_len,
        comm: current_comm(),
        path: args.path,
        _pad0: 0,
    };
    crate::submit(&event);
    0
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
