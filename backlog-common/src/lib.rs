//! Types shared by the eBPF programs and the agent.
//!
//! Everything here crosses the kernel/user boundary as raw bytes, so every
//! struct is `#[repr(C)]` with explicit padding (no implicit holes whose
//! content would be undefined) and a compile-time size check: a field added
//! on one side only fails the build instead of garbling records.
#![no_std]

use core::mem::size_of;

/// Address families as the kernel numbers them (`AF_INET`, `AF_INET6`,
/// `AF_UNIX`). Repeated here because `libc` is not available in the eBPF
/// crate.
pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// How a listener lost a connection. The numbers are the wire format of
/// [`DropEvent::kind`]; the strings are the stable names users grep for.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropKind {
    /// SYN dropped: SYN queue full and SYN cookies off.
    SynDroppedSynQueueFull = 1,
    /// SYN queue full, a SYN cookie answered instead (a warning, not a loss).
    SynCookieSent = 2,
    /// SYN dropped because the accept queue was full.
    SynDroppedAcceptQueueFull = 3,
    /// Final ACK of the handshake dropped because the accept queue was full.
    AckDroppedAcceptQueueFull = 4,
    /// SYN dropped: SYN queue past 3/4 of tcp_max_syn_backlog, cookies off.
    SynDroppedSynBacklogPressure = 5,
    /// Non-blocking connect() to a UNIX stream listener failed with EAGAIN.
    UnixConnectBacklogFull = 6,
    /// SYN dropped by tcp_conn_request() for another reason (no memory,
    /// no route, an LSM): the kernel counts it in ListenDrops too.
    SynDroppedOther = 7,
}

impl DropKind {
    pub const ALL: [DropKind; 7] = [
        DropKind::SynDroppedSynQueueFull,
        DropKind::SynCookieSent,
        DropKind::SynDroppedAcceptQueueFull,
        DropKind::AckDroppedAcceptQueueFull,
        DropKind::SynDroppedSynBacklogPressure,
        DropKind::UnixConnectBacklogFull,
        DropKind::SynDroppedOther,
    ];

    /// Decodes a wire value; unknown values are `None`, never transmuted.
    pub const fn from_u32(value: u32) -> Option<DropKind> {
        Some(match value {
            1 => DropKind::SynDroppedSynQueueFull,
            2 => DropKind::SynCookieSent,
            3 => DropKind::SynDroppedAcceptQueueFull,
            4 => DropKind::AckDroppedAcceptQueueFull,
            5 => DropKind::SynDroppedSynBacklogPressure,
            6 => DropKind::UnixConnectBacklogFull,
            7 => DropKind::SynDroppedOther,
            _ => return None,
        })
    }

    /// The stable name used in text and JSON output.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropKind::SynDroppedSynQueueFull => "syn_dropped_syn_queue_full",
            DropKind::SynCookieSent => "syn_cookie_sent",
            DropKind::SynDroppedAcceptQueueFull => "syn_dropped_accept_queue_full",
            DropKind::AckDroppedAcceptQueueFull => "ack_dropped_accept_queue_full",
            DropKind::SynDroppedSynBacklogPressure => "syn_dropped_syn_backlog_pressure",
            DropKind::UnixConnectBacklogFull => "unix_connect_backlog_full",
            DropKind::SynDroppedOther => "syn_dropped_other",
        }
    }
}

/// [`DropEvent::flags`]: at least one kernel read failed, so some fields are
/// zero rather than true values.
pub const EVENT_FLAG_PARTIAL: u32 = 1 << 0;
/// [`DropEvent::flags`]: the packet headers could not be read, so the peer
/// and local address/port are unknown.
pub const EVENT_FLAG_NO_PACKET: u32 = 1 << 1;

/// One dropped SYN or overflowed connection, as written to the ring buffer.
///
/// Addresses are in network byte order (IPv4 in the first 4 bytes); ports
/// are in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC, converted to wall time by the
    /// agent.
    pub timestamp_ns: u64,
    /// Inode number of the listener's socket (`socket:[N]` in /proc/PID/fd);
    /// 0 when the listener has no `struct socket` any more.
    pub socket_inode: u64,
    /// cgroup v2 id of the listener (`sk_cgrp_data`); 0 when unknown.
    pub cgroup_id: u64,
    /// The address the listener is bound to (0.0.0.0 / :: for a wildcard).
    pub listener_addr: [u8; 16],
    /// Destination address of the dropped packet (the local side).
    pub local_addr: [u8; 16],
    /// Source address of the dropped packet (the client).
    pub peer_addr: [u8; 16],
    /// A [`DropKind`] value.
    pub kind: u32,
    /// CPU that saw the drop.
    pub cpu: u32,
    /// Inode of the listener's network namespace (`ls -l /proc/PID/ns/net`).
    pub netns_inode: u32,
    /// Connections waiting in the accept queue (`sk_ack_backlog`).
    pub accept_queue_len: u32,
    /// The accept queue limit the kernel applied (`sk_max_ack_backlog`).
    pub accept_queue_max: u32,
    /// Requests in the SYN queue (`icsk_accept_queue.qlen`).
    pub syn_queue_len: u32,
    pub listener_port: u16,
    pub local_port: u16,
    pub peer_port: u16,
    /// `sk_family` of the listener: AF_INET or AF_INET6.
    pub listener_family: u16,
    /// IP version of the dropped packet as an address family, 0 if unknown.
    /// Differs from `listener_family` for IPv4 on a dual-stack listener.
    pub packet_family: u16,
    pub _pad0: u16,
    /// `EVENT_FLAG_*` bits.
    pub flags: u32,
}

pub const DROP_EVENT_SIZE: usize = 112;
const _: () = assert!(size_of::<DropEvent>() == DROP_EVENT_SIZE);

impl DropEvent {
    pub const ZERO: DropEvent = DropEvent {
        timestamp_ns: 0,
        socket_inode: 0,
        cgroup_id: 0,
        listener_addr: [0; 16],
        local_addr: [0; 16],
        peer_addr: [0; 16],
        kind: 0,
        cpu: 0,
        netns_inode: 0,
        accept_queue_len: 0,
        accept_queue_max: 0,
        syn_queue_len: 0,
        listener_port: 0,
        local_port: 0,
        peer_port: 0,
        listener_family: 0,
        packet_family: 0,
        _pad0: 0,
        flags: 0,
    };
}

/// [`DropEvent::flags`]: the kernel answered the dropped final ACK with a
/// RST (net.ipv4.tcp_abort_on_overflow=1); without it the client believes
/// it is connected and times out later.
pub const EVENT_FLAG_RESET_SENT: u32 = 1 << 2;

/// Key of the per-listener drop totals kept in the kernel (`DROP_TOTALS`),
/// exact even when the ring buffer is full.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropTotalKey {
    pub socket_inode: u64,
    pub netns_inode: u32,
    pub kind: u32,
    pub listener_addr: [u8; 16],
    pub listener_port: u16,
    pub listener_family: u16,
    pub _pad0: u32,
}

const _: () = assert!(size_of::<DropTotalKey>() == 40);

pub const UNIX_PATH_MAX: usize = 108;
pub const TASK_COMM_LEN: usize = 16;

/// A non-blocking connect() to a UNIX stream socket failed with EAGAIN
/// (the listener's backlog is full): kind `unix_connect_backlog_full`.
/// The agent finds the listener by path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixConnectEvent {
    pub timestamp_ns: u64,
    /// Process (tgid) and thread of the client.
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    /// Bytes of `path` that are valid; an abstract name starts with NUL.
    /// The bytes after them are zero.
    pub path_len: u32,
    pub comm: [u8; TASK_COMM_LEN],
    pub path: [u8; UNIX_PATH_MAX],
    /// The client's network namespace (where the path was looked up; an
    /// abstract name is per namespace); 0 when unreadable.
    pub netns_inode: u32,
}

pub const UNIX_CONNECT_EVENT_SIZE: usize = 152;
const _: () = assert!(size_of::<UnixConnectEvent>() == UNIX_CONNECT_EVENT_SIZE);

/// A successful listen(): what the process asked for and what the kernel
/// applied (cut to net.core.somaxconn), recorded as it happens so that a
/// listener is attributed even if its process exits soon after.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenEvent {
    pub timestamp_ns: u64,
    /// 0 when the fd could not be resolved to a socket.
    pub socket_inode: u64,
    pub pid: u32,
    pub netns_inode: u32,
    /// The backlog argument of listen() (an int: may be negative).
    pub backlog_requested: i32,
    /// sk_max_ack_backlog after the call.
    pub backlog_applied: u32,
    pub family: u16,
    pub port: u16,
    pub fd: u32,
    pub comm: [u8; TASK_COMM_LEN],
}

pub const LISTEN_EVENT_SIZE: usize = 56;
const _: () = assert!(size_of::<ListenEvent>() == LISTEN_EVENT_SIZE);
// Records share one ring buffer and are told apart by their length.
const _: () = assert!(
    DROP_EVENT_SIZE != UNIX_CONNECT_EVENT_SIZE
        && DROP_EVENT_SIZE != LISTEN_EVENT_SIZE
        && UNIX_CONNECT_EVENT_SIZE != LISTEN_EVENT_SIZE
);

/// What became of the drops of one listener and kind, per CPU (the agent
/// sums the CPUs). Every drop the hook sees is counted in `total` first,
/// then in exactly one of the others, so on every CPU
/// `total == sent + suppressed + lost`: a drop is either its own event, or
/// inside an aggregate's count, or counted lost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    pub total: u64,
    /// Queued as a full event.
    pub sent: u64,
    /// Over the rate limit (flood mode): counted only, reported by the
    /// agent as one aggregate per listener, kind and interval.
    pub suppressed: u64,
    /// The ring buffer was full.
    pub lost: u64,
}

const _: () = assert!(size_of::<DropCounts>() == 32);

impl DropCounts {
    pub const ZERO: DropCounts = DropCounts {
        total: 0,
        sent: 0,
        suppressed: 0,
        lost: 0,
    };
}

/// Key of the UNIX connect() EAGAIN totals (`UNIX_TOTALS`): the kernel
/// does not know the listener's socket at sys_exit_connect, only the path
/// the client asked for and the namespace it looked it up in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnixTotalKey {
    pub netns_inode: u32,
    /// Valid bytes of `path`; the rest are zero so that keys compare.
    pub path_len: u32,
    pub path: [u8; UNIX_PATH_MAX],
}

const _: () = assert!(size_of::<UnixTotalKey>() == 116);
// The exit-only connect() hook reads sun_family and sun_path in one copy
// into bytes 6.. of the key: the family lands in the upper half of
// `path_len` (then overwritten) and the path exactly on `path`.
const _: () = assert!(
    core::mem::offset_of!(UnixTotalKey, path_len) == 4
        && core::mem::offset_of!(UnixTotalKey, path) == 8
);

impl UnixTotalKey {
    pub const ZERO: UnixTotalKey = UnixTotalKey {
        netns_inode: 0,
        path_len: 0,
        path: [0; UNIX_PATH_MAX],
    };
}

/// Value of `UNIX_TOTALS`: the counts of one (client netns, path) and its
/// rate-limit bucket in one entry, so that an EAGAIN costs one lookup of
/// its 116-byte key instead of two. Shared by all CPUs (the counts are
/// updated with atomic adds, so they stay exact; the bucket without, as
/// account.rs explains).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnixAccount {
    pub counts: DropCounts,
    /// The token bucket's theoretical arrival time (account.rs).
    pub next_event_ns: u64,
    /// The timer tick (jiffies) in which the bucket last said "suppress":
    /// until the next tick, an EAGAIN is suppressed without reading the
    /// clock (account.rs's admit_shared).
    pub suppressed_tick: u64,
}

const _: () = assert!(size_of::<UnixAccount>() == 48);

impl UnixAccount {
    pub const ZERO: UnixAccount = UnixAccount {
        counts: DropCounts::ZERO,
        next_event_ns: 0,
        suppressed_tick: 0,
    };
}

/// Key of the busiest peers of suppressed drops (`SUPPRESSED_PEERS`),
/// approximate counts: enough to name the sources of a flood.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub socket_inode: u64,
    pub kind: u32,
    pub netns_inode: u32,
    /// AF_INET or AF_INET6 (the packet's).
    pub family: u16,
    pub _pad0: [u8; 6],
    pub addr: [u8; 16],
}

const _: () = assert!(size_of::<PeerKey>() == 40);

/// Settings the agent writes into the programs' read-only data before
/// load (`CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Token bucket per listener and kind (GCRA): nanoseconds between two
    /// full events at the sustained rate; 0 = unlimited.
    pub event_interval_ns: u64,
    /// How far ahead of now the bucket may run (the burst allowance).
    pub burst_ns: u64,
    /// While the agent polls, wake it early once this many bytes are
    /// pending in the ring buffer (a sleeping agent is woken by the first
    /// record, see `AGENT_ASLEEP`); 0 = the kernel's own policy, a wakeup
    /// per record that finds the reader caught up.
    pub wakeup_bytes: u64,
}

const _: () = assert!(size_of::<Config>() == 24);

impl Config {
    /// Before the agent writes it: no limit, a wakeup per record.
    pub const DEFAULT: Config = Config {
        event_interval_ns: 0,
        burst_ns: 0,
        wakeup_bytes: 0,
    };
}

/// Indexes of the per-CPU `COUNTERS` array: things the programs could not
/// report as events. The agent sums them over CPUs and reports them.
pub const COUNTER_EVENTS_LOST: u32 = 0;
/// A kernel read failed while filling an event (the event is still sent,
/// flagged `EVENT_FLAG_PARTIAL`).
pub const COUNTER_READ_ERRORS: u32 = 1;
/// Events successfully queued.
pub const COUNTER_EVENTS_SENT: u32 = 2;
/// A per-listener total could not be stored (`DROP_TOTALS` full).
pub const COUNTER_TOTALS_FULL: u32 = 3;
/// Drops over the rate limit, counted only (all listeners together).
pub const COUNTER_EVENTS_SUPPRESSED: u32 = 4;
/// An accept-queue figure could not be stored (`ACCEPT_STATS` full: a new
/// listener gets no wait or rate figures until rows expire).
pub const COUNTER_ACCEPT_STATS_FULL: u32 = 5;
pub const COUNTER_COUNT: u32 = 6;

/// Where syscalls:sys_enter_connect keeps `fd`, `uservaddr` and `addrlen`, and
/// every syscalls:sys_exit_* keeps `ret`: the layout of syscall tracepoints
/// on every kernel (an 8-byte header, the syscall number, then 8-byte
/// slots). The connect() hooks run on every connect() on the machine, so
/// they read these with plain loads at constant offsets instead of a
/// helper call; the agent checks that tracefs agrees before it attaches
/// them.
pub const TP_CONNECT_FD: usize = 16;
pub const TP_CONNECT_ADDR: usize = 24;
pub const TP_CONNECT_ADDRLEN: usize = 32;
pub const TP_SYS_EXIT_RET: usize = 16;

/// Where sock:inet_sock_set_state keeps `skaddr`, `oldstate`, `newstate`,
/// `sport` and `protocol` (the same from 4.16, when `protocol` was added,
/// to 6.18). The accept-queue wait's hook runs on every TCP state change
/// on the machine and leaves after plain loads at these offsets unless a
/// passive open completes; the agent checks tracefs against them before
/// it attaches the hook.
pub const TP_STATE_SKADDR: usize = 8;
pub const TP_STATE_OLDSTATE: usize = 16;
pub const TP_STATE_NEWSTATE: usize = 20;
pub const TP_STATE_SPORT: usize = 24;
pub const TP_STATE_PROTOCOL: usize = 30;

/// Where skb:kfree_skb keeps `skbaddr`, `rx_sk` and `reason` since 6.11
/// (when `rx_sk` came in, before it the hook cannot name the listener).
/// The hook runs for every packet freed with a reason and leaves after one
/// plain load of `reason` unless it is TCP_LISTEN_OVERFLOW; the agent
/// checks tracefs against these offsets before it attaches the hook.
pub const TP_KFREE_SKB_SKBADDR: usize = 8;
pub const TP_KFREE_SKB_RX_SK: usize = 24;
pub const TP_KFREE_SKB_REASON: usize = 36;

/// Marks an offset as "this kernel has no such field": the program skips
/// the read and leaves the event field zero.
pub const OFFSET_ABSENT: u32 = u32::MAX;

/// Kernel struct and tracepoint-record offsets, resolved by the agent from
/// the running kernel's BTF and tracefs, and written into the program's
/// read-only data before load. Rust eBPF gets no CO-RE relocations, so no
/// kernel offset may be compiled into the program.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    // skb:kfree_skb tracepoint record.
    pub tp_kfree_skb_skbaddr: u32,
    pub tp_kfree_skb_rx_sk: u32,
    pub tp_kfree_skb_reason: u32,
    /// Value of SKB_DROP_REASON_TCP_LISTEN_OVERFLOW on this kernel.
    pub reason_tcp_listen_overflow: u32,

    // struct sock (via sock_common).
    pub sk_family: u32,
    pub sk_num: u32,
    pub sk_rcv_saddr: u32,
    pub sk_v6_rcv_saddr: u32,
    /// skc_net: a `struct net *` (possible_net_t holds just that pointer).
    pub sk_net: u32,
    pub sk_socket: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    /// Where the `struct cgroup *` of sk_cgrp_data is.
    pub sk_cgroup_ptr: u32,
    /// 1 on kernels < 5.15 where sk_cgrp_data is a tagged union: the pointer
    /// is only valid when bit 0 (is_data) is clear.
    pub sk_cgroup_ptr_tagged: u32,
    /// inet_connection_sock.icsk_accept_queue.qlen
    pub icsk_syn_queue_len: u32,

    pub net_ns_inum: u32,
    /// SOCK_INODE(): offset of `vfs_inode` minus offset of `socket` in
    /// struct socket_alloc, added to a `struct socket *`.
    pub socket_to_inode: u32,
    pub inode_i_ino: u32,
    pub cgroup_kn: u32,
    pub kernfs_node_id: u32,

    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    /// net.ipv4.sysctl_tcp_syncookies (read as its low byte).
    pub net_syncookies: u32,
    /// net.ipv4.sysctl_max_syn_backlog (an int).
    pub net_max_syn_backlog: u32,
    /// net.ipv4.sysctl_tcp_abort_on_overflow (read as its low byte).
    pub net_abort_on_overflow: u32,

    // syscalls:sys_{enter,exit}_{connect,listen} records.
    pub tp_connect_fd: u32,
    pub tp_connect_addr: u32,
    pub tp_connect_addrlen: u32,
    pub tp_listen_fd: u32,
    pub tp_listen_backlog: u32,
    pub tp_sys_exit_ret: u32,

    // fd -> struct socket, for listen().
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,

    // This CPU's SNMP counters (net->mib.net_statistics, a per-CPU array
    // of LINUX_MIB_* counters) for the SYN-stage classification.
    pub net_mib_net_statistics: u32,
    pub mib_listen_overflows: u32,
    pub mib_listen_drops: u32,
    pub mib_reqq_full_drop: u32,
    pub mib_reqq_full_do_cookies: u32,
    /// current->nsproxy->net_ns, for the netns of a UNIX connect()'s client.
    pub task_nsproxy: u32,
    pub nsproxy_net_ns: u32,
    /// Where the first three syscall arguments are in the `struct pt_regs`
    /// a task saved at syscall entry (x86_64: di, si, dx; arm64: orig_x0,
    /// regs[1], regs[2]): the exit-only connect() hook reads connect()'s
    /// fd, address and length there (bpf_task_pt_regs, 5.15+) instead of
    /// keeping them from a sys_enter_connect program.
    pub pt_regs_arg0: u32,
    pub pt_regs_arg1: u32,
    pub pt_regs_arg2: u32,
    /// Address of the kernel's `__per_cpu_offset[]` (from /proc/kallsyms);
    /// 0 when unknown.
    pub per_cpu_offset_addr: u64,
}

const _: () = assert!(size_of::<KernelOffsets>() == 48 * 4 + 8);

impl KernelOffsets {
    /// All fields absent: a program that runs with these reports nothing
    /// wrong, only zeros.
    pub const ABSENT: KernelOffsets = KernelOffsets {
        tp_kfree_skb_skbaddr: OFFSET_ABSENT,
        tp_kfree_skb_rx_sk: OFFSET_ABSENT,
        tp_kfree_skb_reason: OFFSET_ABSENT,
        reason_tcp_listen_overflow: OFFSET_ABSENT,
        sk_family: OFFSET_ABSENT,
        sk_num: OFFSET_ABSENT,
        sk_rcv_saddr: OFFSET_ABSENT,
        sk_v6_rcv_saddr: OFFSET_ABSENT,
        sk_net: OFFSET_ABSENT,
        sk_socket: OFFSET_ABSENT,
        sk_ack_backlog: OFFSET_ABSENT,
        sk_max_ack_backlog: OFFSET_ABSENT,
        sk_cgroup_ptr: OFFSET_ABSENT,
        sk_cgroup_ptr_tagged: 0,
        icsk_syn_queue_len: OFFSET_ABSENT,
        net_ns_inum: OFFSET_ABSENT,
        socket_to_inode: OFFSET_ABSENT,
        inode_i_ino: OFFSET_ABSENT,
        cgroup_kn: OFFSET_ABSENT,
        kernfs_node_id: OFFSET_ABSENT,
        skb_head: OFFSET_ABSENT,
        skb_network_header: OFFSET_ABSENT,
        skb_transport_header: OFFSET_ABSENT,
        net_syncookies: OFFSET_ABSENT,
        net_max_syn_backlog: OFFSET_ABSENT,
        net_abort_on_overflow: OFFSET_ABSENT,
        tp_connect_fd: OFFSET_ABSENT,
        tp_connect_addr: OFFSET_ABSENT,
        tp_connect_addrlen: OFFSET_ABSENT,
        tp_listen_fd: OFFSET_ABSENT,
        tp_listen_backlog: OFFSET_ABSENT,
        tp_sys_exit_ret: OFFSET_ABSENT,
        task_files: OFFSET_ABSENT,
        files_fdt: OFFSET_ABSENT,
        fdtable_max_fds: OFFSET_ABSENT,
        fdtable_fd: OFFSET_ABSENT,
        file_private_data: OFFSET_ABSENT,
        socket_sk: OFFSET_ABSENT,
        net_mib_net_statistics: OFFSET_ABSENT,
        mib_listen_overflows: OFFSET_ABSENT,
        mib_listen_drops: OFFSET_ABSENT,
        mib_reqq_full_drop: OFFSET_ABSENT,
        mib_reqq_full_do_cookies: OFFSET_ABSENT,
        task_nsproxy: OFFSET_ABSENT,
        nsproxy_net_ns: OFFSET_ABSENT,
        pt_regs_arg0: OFFSET_ABSENT,
        pt_regs_arg1: OFFSET_ABSENT,
        pt_regs_arg2: OFFSET_ABSENT,
        per_cpu_offset_addr: 0,
    };
}

// ---------------------------------------------------------------------
// Accept-queue wait, arrival and accept rates, near-full warnings.
// Kept in a kernel map (`ACCEPT_STATS`), never sent per connection: the
// agent reads the map at each summary and polls it for near-full warnings.
// ---------------------------------------------------------------------

/// [`AcceptKey::kind`]: a TCP listener, known by netns and local port.
pub const ACCEPT_KEY_TCP: u16 = 1;
/// [`AcceptKey::kind`]: a UNIX stream listener, known by its socket inode.
pub const ACCEPT_KEY_UNIX: u16 = 2;

/// Rows of `ACCEPT_STATS`: one per TCP (netns, port) or UNIX listener.
pub const ACCEPT_STATS_ENTRIES: u32 = 1024;

/// Which listener a row of `ACCEPT_STATS` is about.
///
/// A TCP child socket reaching ESTABLISHED does not point back at its
/// listener, but it carries the local port and the netns; those name the
/// listener (all sockets of an SO_REUSEPORT group, or listeners on several
/// addresses of one port, share a row). UNIX listeners have no port: their
/// socket inode, learnt at accept(), names them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AcceptKey {
    /// UNIX: the listener's socket inode; TCP: 0.
    pub socket_inode: u64,
    pub netns_inode: u32,
    /// TCP local port (host order); 0 for UNIX.
    pub port: u16,
    /// `ACCEPT_KEY_TCP` or `ACCEPT_KEY_UNIX`.
    pub kind: u16,
}

const _: () = assert!(size_of::<AcceptKey>() == 16);

/// Waits below this many microseconds have a bucket each; above, every
/// power of two is cut into `WAIT_SUB_BUCKETS` equal parts, so a bucket
/// is at most 1/16 of its values wide (a percentile read at the bucket's
/// middle is within about 3%: a plain log2 histogram, off by up to 2x,
/// could not check a wait to 10%).
pub const WAIT_SUB_BUCKETS: u64 = 16;
const WAIT_SUB_BITS: u32 = 4;
/// Waits are clamped to 2^36 us (19 h).
const WAIT_MAX_LOG2: u32 = 35;
pub const WAIT_BUCKETS: usize = (WAIT_SUB_BUCKETS as usize) * (WAIT_MAX_LOG2 as usize - 2);

/// Bucket of a wait of `us` microseconds. Branch-light and loop-free so
/// that the eBPF verifier accepts it on every kernel.
#[inline(always)]
pub const fn wait_bucket(us: u64) -> usize {
    let max = (1u64 << (WAIT_MAX_LOG2 + 1)) - 1;
    let v = if us > max { max } else { us };
    if v < WAIT_SUB_BUCKETS {
        return v as usize;
    }
    // floor(log2(v)) by halving steps: no clz instruction in BPF.
    let mut log2 = 0u32;
    let mut x = v;
    if x >= 1 << 32 {
        x >>= 32;
        log2 += 32;
    }
    if x >= 1 << 16 {
        x >>= 16;
        log2 += 16;
    }
    if x >= 1 << 8 {
        x >>= 8;
        log2 += 8;
    }
    if x >= 1 << 4 {
        x >>= 4;
        log2 += 4;
    }
    if x >= 1 << 2 {
        x >>= 2;
        log2 += 2;
    }
    if x >= 1 << 1 {
        log2 += 1;
    }
    let sub = (v >> (log2 - WAIT_SUB_BITS)) & (WAIT_SUB_BUCKETS - 1);
    let bucket = WAIT_SUB_BUCKETS + (log2 - WAIT_SUB_BITS) as u64 * WAIT_SUB_BUCKETS + sub;
    if bucket as usize >= WAIT_BUCKETS {
        WAIT_BUCKETS - 1
    } else {
        bucket as usize
    }
}

/// The waits bucket `bucket` holds: `[low, low + width)` microseconds.
pub const fn wait_bucket_range(bucket: usize) -> (u64, u64) {
    let b = bucket as u64;
    if b < WAIT_SUB_BUCKETS {
        return (b, 1);
    }
    let octave = (b - WAIT_SUB_BUCKETS) / WAIT_SUB_BUCKETS;
    let sub = (b - WAIT_SUB_BUCKETS) % WAIT_SUB_BUCKETS;
    ((WAIT_SUB_BUCKETS + sub) << octave, 1 << octave)
}

/// Per-listener accept-queue figures, updated in the kernel with atomic
/// adds (counters) and racy maxima (a lost update costs one sample).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptStats {
    /// Handshakes completed (a child socket went SYN_RECV -> ESTABLISHED).
    pub arrivals: u64,
    /// accept()s that returned a connection of this listener.
    pub accepts: u64,
    /// Accepted connections whose arrival was seen (the histogram's total).
    pub waits: u64,
    pub wait_sum_us: u64,
    pub wait_max_us: u64,
    /// The listener's socket inode and address, from its last accept() or
    /// listen() (0 / zero while neither was seen).
    pub listener_inode: u64,
    pub listener_addr: [u8; 16],
    /// AF_INET, AF_INET6 or AF_UNIX; 0 while unknown.
    pub listener_family: u16,
    pub _pad0: u16,
    /// Deepest accept queue seen (at an arrival or just before an accept).
    pub max_queue_seen: u32,
    /// `sk_max_ack_backlog` when last read.
    pub queue_limit: u32,
    pub _pad1: u32,
    /// Arrivals per `RATE_WINDOW_NS` window: the current one and the peak.
    pub arrival_window_start_ns: u64,
    pub arrival_window_count: u64,
    pub arrival_window_peak: u64,
    /// accept()s per window, likewise.
    pub accept_window_start_ns: u64,
    pub accept_window_count: u64,
    pub accept_window_peak: u64,
    /// Times the queue passed the near-full threshold (at most one per
    /// `NEAR_FULL_EVERY_NS`), and the fill at the last one.
    pub near_full_count: u64,
    pub near_full_last_ns: u64,
    pub near_full_len: u32,
    pub near_full_max: u32,
    /// Accepted connections by wait, see [`wait_bucket`].
    pub wait_buckets: [u64; WAIT_BUCKETS],
}

const _: () = assert!(size_of::<AcceptStats>() == 152 + 8 * WAIT_BUCKETS);

/// Window of the peak arrival and accept rates.
pub const RATE_WINDOW_NS: u64 = 1_000_000_000;
/// At most one near-full warning per listener per this interval.
pub const NEAR_FULL_EVERY_NS: u64 = 1_000_000_000;

/// Offsets the accept-queue programs need, written by the agent before
/// load like [`KernelOffsets`] (a separate global so that the drop
/// programs' layout is untouched).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptOffsets {
    // sock:inet_sock_set_state record.
    pub tp_state_skaddr: u32,
    pub tp_state_oldstate: u32,
    pub tp_state_newstate: u32,
    pub tp_state_sport: u32,
    pub tp_state_protocol: u32,
    // syscalls:sys_enter_accept4 / sys_enter_accept / sys_enter_listen
    // `fd`, and sys_exit_* `ret`.
    pub tp_accept_fd: u32,
    pub tp_listen_fd: u32,
    pub tp_sys_exit_ret: u32,
    // struct sock.
    pub sk_state: u32,
    pub sk_family: u32,
    pub sk_num: u32,
    pub sk_rcv_saddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_net: u32,
    pub sk_socket: u32,
    pub sk_ack_backlog: u32,
    pub sk_max_ack_backlog: u32,
    pub net_ns_inum: u32,
    pub socket_to_inode: u32,
    pub inode_i_ino: u32,
    // fd -> struct socket.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    /// `--near-full PERCENT`: warn when the accept queue reaches this share
    /// of its limit; 0 disables the warning.
    pub near_full_percent: u32,
    // UNIX arrivals: unix_sock.peer (the socket the server will accept).
    // The connect() record is read by syscalls.rs at constant offsets.
    pub unix_peer: u32,
    /// sock.sk_protocol (a u16 since 5.6): the tp_btf arrivals program
    /// reads it from the socket, the perf tracepoint one from the record.
    pub sk_protocol: u32,
}

/// The offsets of the walk current->files->fdt->fd[fd]->private_data
/// (the struct socket behind a socket fd), which both KernelOffsets and
/// AcceptOffsets carry: one walk in the eBPF crate serves both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdWalk {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
}

/// `fd_walk()` for each offsets struct that carries the walk's fields.
macro_rules! fd_walk_of {
    ($($offsets:ty),*) => {$(
        impl $offsets {
            pub const fn fd_walk(&self) -> FdWalk {
                FdWalk {
                    task_files: self.task_files,
                    files_fdt: self.files_fdt,
                    fdtable_max_fds: self.fdtable_max_fds,
                    fdtable_fd: self.fdtable_fd,
                    file_private_data: self.file_private_data,
                }
            }
        }
    )*};
}

fd_walk_of!(KernelOffsets, AcceptOffsets);

const _: () = assert!(size_of::<AcceptOffsets>() == 29 * 4);

impl AcceptOffsets {
    pub const ABSENT: AcceptOffsets = AcceptOffsets {
        tp_state_skaddr: OFFSET_ABSENT,
        tp_state_oldstate: OFFSET_ABSENT,
        tp_state_newstate: OFFSET_ABSENT,
        tp_state_sport: OFFSET_ABSENT,
        tp_state_protocol: OFFSET_ABSENT,
        tp_accept_fd: OFFSET_ABSENT,
        tp_listen_fd: OFFSET_ABSENT,
        tp_sys_exit_ret: OFFSET_ABSENT,
        sk_state: OFFSET_ABSENT,
        sk_family: OFFSET_ABSENT,
        sk_num: OFFSET_ABSENT,
        sk_rcv_saddr: OFFSET_ABSENT,
        sk_v6_rcv_saddr: OFFSET_ABSENT,
        sk_net: OFFSET_ABSENT,
        sk_socket: OFFSET_ABSENT,
        sk_ack_backlog: OFFSET_ABSENT,
        sk_max_ack_backlog: OFFSET_ABSENT,
        net_ns_inum: OFFSET_ABSENT,
        socket_to_inode: OFFSET_ABSENT,
        inode_i_ino: OFFSET_ABSENT,
        task_files: OFFSET_ABSENT,
        files_fdt: OFFSET_ABSENT,
        fdtable_max_fds: OFFSET_ABSENT,
        fdtable_fd: OFFSET_ABSENT,
        file_private_data: OFFSET_ABSENT,
        socket_sk: OFFSET_ABSENT,
        near_full_percent: 0,
        unix_peer: OFFSET_ABSENT,
        sk_protocol: OFFSET_ABSENT,
    };
}
/// Which in-kernel filters are on (`FILTER_*` bits), written by the
/// agent before load like [`KernelOffsets`]; the values to match are in
/// hash maps (FILTER_PORTS, FILTER_NAMESPACES, FILTER_SOCKETS, FILTER_CGROUPS,
/// FILTER_UNIX_PATHS). No bit set: everything is reported.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    pub flags: u32,
    pub _pad0: u32,
}

impl FilterConfig {
    pub const NONE: FilterConfig = FilterConfig { flags: 0, _pad0: 0 };
}

/// TCP listeners on these ports (`--port`).
pub const FILTER_PORT: u32 = 1 << 0;
/// Listeners in these network namespaces (`--netns`).
pub const FILTER_NETNS: u32 = 1 << 1;
/// Listeners with these socket inodes (`--pid`: the PIDs' sockets).
pub const FILTER_SOCKET: u32 = 1 << 2;
/// Listeners created in these cgroups (`--cgroup`: v2 ids under a path).
pub const FILTER_CGROUP: u32 = 1 << 3;
/// UNIX connect()s to these paths (`--unix-path`).
pub const FILTER_UNIX_PATH: u32 = 1 << 4;
/// The filters that apply to TCP listeners.
pub const FILTER_TCP: u32 = FILTER_PORT | FILTER_NETNS | FILTER_SOCKET | FILTER_CGROUP;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C), made only of integers and integer arrays,
    // with explicit padding, so every bit pattern is valid and there are no
    // uninitialised bytes.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::DropTotalKey {}
    unsafe impl aya::Pod for super::UnixConnectEvent {}
    unsafe impl aya::Pod for super::ListenEvent {}
    unsafe impl aya::Pod for super::DropCounts {}
    unsafe impl aya::Pod for super::UnixTotalKey {}
    unsafe impl aya::Pod for super::UnixAccount {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::AcceptKey {}
    unsafe impl aya::Pod for super::AcceptStats {}
    unsafe impl aya::Pod for super::AcceptOffsets {}
    unsafe impl aya::Pod for super::FilterConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_is_none() {
        for kind in DropKind::ALL {
            assert_eq!(DropKind::from_u32(kind as u32), Some(kind));
        }
        assert_eq!(DropKind::from_u32(0), None);
        assert_eq!(DropKind::from_u32(8), None);
    }

    #[test]
    fn wait_buckets_cover_every_value_in_order() {
        let mut last = 0;
        for us in (0..100_000u64).chain([1 << 30, (1 << 36) - 1, 1 << 36, u64::MAX]) {
            let bucket = wait_bucket(us);
            assert!(bucket < WAIT_BUCKETS, "{us}");
            assert!(bucket >= last || us >= 1 << 30, "{us}");
            last = bucket;
            let (low, width) = wait_bucket_range(bucket);
            if us < 1 << 36 {
                assert!(
                    low <= us && us < low + width,
                    "{us} not in [{low}, +{width})"
                );
                assert!(width * 16 <= low.max(16), "{us}: bucket too wide");
            }
        }
    }
}
