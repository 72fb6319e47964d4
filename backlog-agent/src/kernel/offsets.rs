//! Kernel struct offsets for the eBPF programs, from the running kernel's
//! BTF. Rust eBPF has no CO-RE, so these are resolved here at start-up
//! and written into the programs' read-only data before load.

use backlog_common::{AcceptOffsets, KernelOffsets, OFFSET_ABSENT};
use thiserror::Error;

use crate::{
    kernel::btf::{Btf, BtfError, Field},
    kernel::tracefs::EventFormat,
};

#[derive(Debug, Error)]
pub enum OffsetError {
    #[error("kernel {0}")]
    Btf(#[from] BtfError),
    #[error(
        "kernel BTF: {path} is {actual} bytes, expected {expected} (unsupported kernel layout)"
    )]
    UnexpectedSize {
        path: &'static str,
        actual: u32,
        expected: u32,
    },
}

/// Offsets plus the optional fields this kernel lacks, to be told to the
/// user (their event fields stay zero).
pub struct Resolved {
    pub offsets: KernelOffsets,
    pub absent: Vec<&'static str>,
}

fn sized(btf: &Btf, path: &'static str, expected: u32) -> Result<Field, OffsetError> {
    let field = btf.field(path)?;
    if field.size != expected {
        return Err(OffsetError::UnexpectedSize {
            path,
            actual: field.size,
            expected,
        });
    }
    Ok(field)
}

/// Collects the optional fields this kernel lacks while resolving.
struct Optional<'a> {
    btf: &'a Btf,
    absent: Vec<&'static str>,
}

impl Optional<'_> {
    /// The field's offset, or OFFSET_ABSENT (noted) when this kernel has
    /// no such field. A field of the wrong size is still an error: reading
    /// it would give garbage.
    fn offset(&mut self, path: &'static str, expected: u32) -> Result<u32, OffsetError> {
        match sized(self.btf, path, expected) {
            Ok(field) => Ok(field.offset),
            Err(OffsetError::Btf(
                BtfError::TypeNotFound { .. } | BtfError::MemberNotFound { .. },
            )) => {
                self.absent.push(path);
                Ok(OFFSET_ABSENT)
            }
            Err(err) => Err(err),
        }
    }
}

/// A per-netns sysctl that is a u8 on recent kernels and an int on older
/// ones.
fn netns_sysctl(optional: &mut Optional<'_>, path: &'static str) -> Result<u32, OffsetError> {
    match optional.btf.field(path) {
        Ok(field) if field.size == 1 || field.size == 4 => Ok(field.offset),
        Ok(field) => Err(OffsetError::UnexpectedSize {
            path,
            actual: field.size,
            expected: 1,
        }),
        Err(_) => {
            optional.absent.push(path);
            Ok(OFFSET_ABSENT)
        }
    }
}

/// Resolves the struct offsets every program needs. Fields without which
/// no event makes sense are errors; the others are recorded as absent.
pub fn resolve(btf: &Btf) -> Result<Resolved, OffsetError> {
    let mut o = KernelOffsets::ABSENT;
    o.sk_family = sized(btf, "sock.__sk_common.skc_family", 2)?.offset;
    o.sk_num = sized(btf, "sock.__sk_common.skc_num", 2)?.offset;
    o.sk_rcv_saddr = sized(btf, "sock.__sk_common.skc_rcv_saddr", 4)?.offset;
    o.sk_socket = sized(btf, "sock.sk_socket", 8)?.offset;
    o.sk_ack_backlog = sized(btf, "sock.sk_ack_backlog", 4)?.offset;
    o.sk_max_ack_backlog = sized(btf, "sock.sk_max_ack_backlog", 4)?.offset;
    o.skb_head = sized(btf, "sk_buff.head", 8)?.offset;
    o.skb_network_header = sized(btf, "sk_buff.network_header", 2)?.offset;
    o.skb_transport_header = sized(btf, "sk_buff.transport_header", 2)?.offset;
    // SOCK_INODE(): struct socket is embedded in struct socket_alloc next
    // to its vfs inode.
    let socket = btf.field("socket_alloc.socket")?.offset;
    let vfs_inode = btf.field("socket_alloc.vfs_inode")?.offset;
    o.socket_to_inode = vfs_inode.wrapping_sub(socket);
    o.inode_i_ino = sized(btf, "inode.i_ino", 8)?.offset;

    let mut optional = Optional {
        btf,
        absent: Vec::new(),
    };
    // Without CONFIG_IPV6 there is no v6 address in sock_common.
    o.sk_v6_rcv_saddr = optional.offset("sock.__sk_common.skc_v6_rcv_saddr", 16)?;
    // qlen is an atomic_t (4 bytes) on every kernel we know.
    o.icsk_syn_queue_len = optional.offset("inet_connection_sock.icsk_accept_queue.qlen", 4)?;
    // skc_net is a possible_net_t, which holds the pointer only with
    // CONFIG_NET_NS.
    let skc_net = optional.offset("sock.__sk_common.skc_net", 8)?;
    let net_ptr = optional.offset("possible_net_t.net", 8)?;
    if skc_net != OFFSET_ABSENT && net_ptr != OFFSET_ABSENT {
        o.sk_net = skc_net + net_ptr;
    }
    o.net_ns_inum = optional.offset("net.ns.inum", 4)?;
    // sk_cgrp_data: since 5.15 a plain `struct cgroup *cgroup`; before, a
    // u64 `val` that holds the pointer only when bit 0 is clear.
    let (inner, tagged) = match (
        btf.field("sock_cgroup_data.cgroup"),
        btf.field("sock_cgroup_data.val"),
    ) {
        (Ok(ptr), _) => (Some(ptr), 0),
        (Err(_), Ok(val)) => (Some(val), 1),
        _ => (None, 0),
    };
    match (btf.field("sock.sk_cgrp_data"), inner) {
        (Ok(data), Some(inner)) if inner.size == 8 => {
            o.sk_cgroup_ptr = data.offset + inner.offset;
            o.sk_cgroup_ptr_tagged = tagged;
        }
        _ => optional.absent.push("sock.sk_cgrp_data"),
    }
    // Per-netns sysctls read at drop time: u8 since 5.x reworks, an int
    // before; the programs read the low byte of the first two, which is
    // the same value on little-endian machines.
    o.net_syncookies = netns_sysctl(&mut optional, "net.ipv4.sysctl_tcp_syncookies")?;
    o.net_abort_on_overflow = netns_sysctl(&mut optional, "net.ipv4.sysctl_tcp_abort_on_overflow")?;
    o.net_max_syn_backlog = optional.offset("net.ipv4.sysctl_max_syn_backlog", 4)?;
    // fd -> struct socket for listen(): current->files->fdt->fd[fd].
    o.task_files = optional.offset("task_struct.files", 8)?;
    o.files_fdt = optional.offset("files_struct.fdt", 8)?;
    o.fdtable_max_fds = optional.offset("fdtable.max_fds", 4)?;
    o.fdtable_fd = optional.offset("fdtable.fd", 8)?;
    o.file_private_data = optional.offset("file.private_data", 8)?;
    o.socket_sk = optional.offset("socket.sk", 8)?;
    // current->nsproxy->net_ns: the netns a UNIX connect()'s client looked
    // its path up in (the client may be gone by the time the agent reads).
    o.task_nsproxy = optional.offset("task_struct.nsproxy", 8)?;
    o.nsproxy_net_ns = optional.offset("nsproxy.net_ns", 8)?;
    o.cgroup_kn = optional.offset("cgroup.kn", 8)?;
    o.kernfs_node_id = optional.offset("kernfs_node.id", 8)?;
    Ok(Resolved {
        offsets: o,
        absent: optional.absent,
    })
}

/// Fills in the syscalls:sys_{enter,exit}_{connect,listen} record layouts.
/// Every syscall tracepoint has the same shape (8-byte argument slots after
/// the common header), but it is read rather than assumed.
pub fn apply_syscalls(
    o: &mut KernelOffsets,
    enter_connect: &EventFormat,
    enter_listen: &EventFormat,
    exit_connect: &EventFormat,
    exit_listen: &EventFormat,
) -> Result<(), String> {
    let field = |format: &EventFormat, name: &str| {
        format
            .field(name)
            .filter(|f| f.size == 8)
            .map(|f| f.offset)
            .ok_or_else(|| format!("syscall tracepoint has no 8-byte `{name}` field"))
    };
    o.tp_connect_fd = field(enter_connect, "fd")?;
    o.tp_connect_addr = field(enter_connect, "uservaddr")?;
    o.tp_connect_addrlen = field(enter_connect, "addrlen")?;
    o.tp_listen_fd = field(enter_listen, "fd")?;
    o.tp_listen_backlog = field(enter_listen, "backlog")?;
    o.tp_sys_exit_ret = field(exit_connect, "ret")?;
    // The connect() hooks read these at compile-time offsets.
    let direct = [
        ("fd", o.tp_connect_fd, backlog_common::TP_CONNECT_FD),
        (
            "uservaddr",
            o.tp_connect_addr,
            backlog_common::TP_CONNECT_ADDR,
        ),
        (
            "addrlen",
            o.tp_connect_addrlen,
            backlog_common::TP_CONNECT_ADDRLEN,
        ),
        ("ret", o.tp_sys_exit_ret, backlog_common::TP_SYS_EXIT_RET),
        // Both listen() exits read `ret` where connect()'s is.
        (
            "ret",
            field(exit_listen, "ret")?,
            backlog_common::TP_SYS_EXIT_RET,
        ),
    ];
    for (name, found, expected) in direct {
        if found as usize != expected {
            return Err(format!(
                "syscall tracepoint field `{name}` is at offset {found}, not {expected} \
                 as on every kernel this build knows"
            ));
        }
    }
    Ok(())
}

/// The kernel symbols apply_snmp_counters and apply_syscall_regs look up:
/// kallsyms::read keeps only these lines.
pub const KALLSYMS_NEEDED: &[&str] = &[
    "__per_cpu_offset",
    "bpf_get_current_task_btf",
    "bpf_task_pt_regs",
];

/// Fills in what the tcp_conn_request hooks need: this CPU's SNMP counters
/// (net->mib.net_statistics[LINUX_MIB_*]) and `__per_cpu_offset[]`.
pub fn apply_snmp_counters(o: &mut KernelOffsets, btf: &Btf, kallsyms: &str) -> Result<(), String> {
    let stats = btf
        .field("net.mib.net_statistics")
        .map_err(|e| e.to_string())?;
    let index = |name: &str| -> Result<u32, String> {
        let value = btf.enumerator(name).map_err(|e| e.to_string())?;
        u32::try_from(value).map_err(|_| format!("{name} = {value} is out of range"))
    };
    o.mib_listen_overflows = index("LINUX_MIB_LISTENOVERFLOWS")?;
    o.mib_listen_drops = index("LINUX_MIB_LISTENDROPS")?;
    o.mib_reqq_full_drop = index("LINUX_MIB_TCPREQQFULLDROP")?;
    o.mib_reqq_full_do_cookies = index("LINUX_MIB_TCPREQQFULLDOCOOKIES")?;
    o.per_cpu_offset_addr = crate::kernel::kallsyms::address(kallsyms, "__per_cpu_offset")?;
    o.net_mib_net_statistics = stats.offset;
    Ok(())
}

/// Why the skb:kfree_skb hook cannot report final-ACK overflows here.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KfreeSkbUnavailable {
    #[error("skb:kfree_skb has no `{0}` field (added in 6.11)")]
    NoField(&'static str),
    #[error("kernel has no SKB_DROP_REASON_TCP_LISTEN_OVERFLOW (added in 6.15)")]
    NoReason,
    #[error(transparent)]
    Moved(#[from] RecordMoved),
}

/// A tracepoint record field that is not where a program reading it with
/// a plain load at a compile-time offset expects it.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "{tracepoint}'s `{field}` is at offset {found} on this kernel, not {expected} \
     where this build reads it"
)]
pub struct RecordMoved {
    pub tracepoint: &'static str,
    pub field: &'static str,
    pub found: u32,
    pub expected: usize,
}

/// Checks record offsets read from tracefs against the compile-time
/// offsets a program loads them from.
fn same_place(
    tracepoint: &'static str,
    fields: &[(&'static str, u32, usize)],
) -> Result<(), RecordMoved> {
    match fields
        .iter()
        .find(|(_, found, expected)| *found as usize != *expected)
    {
        Some(&(field, found, expected)) => Err(RecordMoved {
            tracepoint,
            field,
            found,
            expected,
        }),
        None => Ok(()),
    }
}

/// The exit-only accept() programs read `ret` at a compile-time offset
/// (backlog_common::TP_SYS_EXIT_RET): `o` holds where tracefs shows it
/// for sys_exit_accept and sys_exit_accept4 (checked equal by resolve).
pub fn check_sys_exit_accept(o: &AcceptOffsets) -> Result<(), RecordMoved> {
    same_place(
        "syscalls:sys_exit_accept4",
        &[("ret", o.tp_sys_exit_ret, backlog_common::TP_SYS_EXIT_RET)],
    )
}

/// The accept-queue wait's sock:inet_sock_set_state program reads its
/// record at compile-time offsets (backlog_common::TP_STATE_*): `o` holds
/// what tracefs says.
pub fn check_inet_sock_set_state(o: &AcceptOffsets) -> Result<(), RecordMoved> {
    use backlog_common::{
        TP_STATE_NEWSTATE, TP_STATE_OLDSTATE, TP_STATE_PROTOCOL, TP_STATE_SKADDR, TP_STATE_SPORT,
    };
    same_place(
        "sock:inet_sock_set_state",
        &[
            ("skaddr", o.tp_state_skaddr, TP_STATE_SKADDR),
            ("oldstate", o.tp_state_oldstate, TP_STATE_OLDSTATE),
            ("newstate", o.tp_state_newstate, TP_STATE_NEWSTATE),
            ("sport", o.tp_state_sport, TP_STATE_SPORT),
            ("protocol", o.tp_state_protocol, TP_STATE_PROTOCOL),
        ],
    )
}

/// Fills in the skb:kfree_skb record layout and the drop-reason number.
pub fn apply_kfree_skb(
    o: &mut KernelOffsets,
    btf: &Btf,
    format: &EventFormat,
) -> Result<(), KfreeSkbUnavailable> {
    let field = |name: &'static str, size: u32| {
        format
            .field(name)
            .filter(|f| f.size == size)
            .map(|f| f.offset)
            .ok_or(KfreeSkbUnavailable::NoField(name))
    };
    let skbaddr = field("skbaddr", 8)?;
    let rx_sk = field("rx_sk", 8)?;
    let reason = field("reason", 4)?;
    let value = btf
        .enum_value("skb_drop_reason", "SKB_DROP_REASON_TCP_LISTEN_OVERFLOW")
        .map_err(|_| KfreeSkbUnavailable::NoReason)?;
    o.tp_kfree_skb_skbaddr = skbaddr;
    o.tp_kfree_skb_rx_sk = rx_sk;
    o.tp_kfree_skb_reason = reason;
    o.reason_tcp_listen_overflow =
        u32::try_from(value).map_err(|_| KfreeSkbUnavailable::NoReason)?;
    // The program reads the record at compile-time offsets.
    same_place(
        "skb:kfree_skb",
        &[
            ("skbaddr", skbaddr, backlog_common::TP_KFREE_SKB_SKBADDR),
            ("rx_sk", rx_sk, backlog_common::TP_KFREE_SKB_RX_SK),
            ("reason", reason, backlog_common::TP_KFREE_SKB_REASON),
        ],
    )?;
    Ok(())
}

/// Fills in where connect()'s first three arguments are in the `struct
/// pt_regs` a task saves at syscall entry, for the exit-only connect()
/// hook. The registers are this architecture's syscall ABI (the agent and
/// its eBPF object are built for the same one); their places come from
/// BTF. On arm64, x0 is overwritten by the return value: the first
/// argument stays in orig_x0.
pub fn apply_syscall_regs(o: &mut KernelOffsets, btf: &Btf, kallsyms: &str) -> Result<(), String> {
    // The functions behind the helpers (not in BTF: BPF_CALL functions
    // carry none), present from the kernel that has the helpers on.
    for helper in ["bpf_get_current_task_btf", "bpf_task_pt_regs"] {
        if !crate::kernel::kallsyms::has(kallsyms, helper) {
            return Err(format!("the kernel has no {helper}() helper (5.15+)"));
        }
    }
    let slot = |path: &str, size: u32, index: u32| -> Result<u32, String> {
        let field = btf.field(path).map_err(|e| e.to_string())?;
        if field.size < size || field.offset % 8 != 0 {
            return Err(format!(
                "kernel BTF: {path} is {} bytes at {}, not a register slot",
                field.size, field.offset
            ));
        }
        Ok(field.offset + 8 * index)
    };
    let args = if cfg!(target_arch = "x86_64") {
        [
            slot("pt_regs.di", 8, 0)?,
            slot("pt_regs.si", 8, 0)?,
            slot("pt_regs.dx", 8, 0)?,
        ]
    } else if cfg!(target_arch = "aarch64") {
        [
            slot("pt_regs.orig_x0", 8, 0)?,
            slot("pt_regs.regs", 8 * 31, 1)?,
            slot("pt_regs.regs", 8 * 31, 2)?,
        ]
    } else {
        return Err("this build knows the syscall registers of x86_64 and arm64 only".into());
    };
    [o.pt_regs_arg0, o.pt_regs_arg1, o.pt_regs_arg2] = args;
    // The program walks current->nsproxy->net_ns->ns.inum with plain
    // loads the verifier checks: every offset must be a real one.
    for (offset, path) in [
        (o.task_nsproxy, "task_struct.nsproxy"),
        (o.nsproxy_net_ns, "nsproxy.net_ns"),
        (o.net_ns_inum, "net.ns.inum"),
    ] {
        if offset == OFFSET_ABSENT {
            return Err(format!("kernel BTF has no {path}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use backlog_common::{
        TP_STATE_NEWSTATE, TP_STATE_OLDSTATE, TP_STATE_PROTOCOL, TP_STATE_SKADDR, TP_STATE_SPORT,
    };

    fn state_offsets(skaddr: usize, sport: usize) -> AcceptOffsets {
        AcceptOffsets {
            tp_state_skaddr: skaddr as u32,
            tp_state_oldstate: TP_STATE_OLDSTATE as u32,
            tp_state_newstate: TP_STATE_NEWSTATE as u32,
            tp_state_sport: sport as u32,
            tp_state_protocol: TP_STATE_PROTOCOL as u32,
            ..AcceptOffsets::ABSENT
        }
    }

    #[test]
    fn inet_sock_set_state_where_the_program_reads_it() {
        let o = state_offsets(TP_STATE_SKADDR, TP_STATE_SPORT);
        assert_eq!(check_inet_sock_set_state(&o), Ok(()));
    }

    #[test]
    fn sys_exit_accept_ret_where_the_program_reads_it() {
        let at = |ret: usize| AcceptOffsets {
            tp_sys_exit_ret: ret as u32,
            ..AcceptOffsets::ABSENT
        };
        let here = backlog_common::TP_SYS_EXIT_RET;
        assert_eq!(check_sys_exit_accept(&at(here)), Ok(()));
        let err = check_sys_exit_accept(&at(here + 8)).unwrap_err();
        assert_eq!((err.field, err.found), ("ret", here as u32 + 8));
    }

    #[test]
    fn inet_sock_set_state_moved_names_the_field() {
        let o = state_offsets(TP_STATE_SKADDR, TP_STATE_SPORT + 2);
        let err = check_inet_sock_set_state(&o).unwrap_err();
        assert_eq!(err.field, "sport");
        assert_eq!(
            err.to_string(),
            format!(
                "sock:inet_sock_set_state's `sport` is at offset {} on this kernel, \
                 not {TP_STATE_SPORT} where this build reads it",
                TP_STATE_SPORT + 2
            )
        );
    }
}
