//! Loads the eBPF object and attaches, for each drop kind, the best hook
//! this kernel accepts. Every kind ends up either attached (and the hook
//! is named) or not observable (and the reason is given): the user is
//! told which, never left to guess.

use std::{collections::BTreeMap, path::Path, time::Instant};

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePoint, FEntry, FExit, KProbe, Program, TracePoint},
    Ebpf, EbpfError, EbpfLoader,
};
use backlog_common::{
    Config, DropCounts, DropKind, DropTotalKey, FilterConfig, PeerKey, UnixAccount, UnixTotalKey,
    COUNTER_ACCEPT_STATS_FULL, COUNTER_EVENTS_LOST, COUNTER_EVENTS_SUPPRESSED, COUNTER_READ_ERRORS,
    COUNTER_TOTALS_FULL,
};
use thiserror::Error;

use crate::{
    cli::AttachMode,
    kernel::btf::Btf,
    kernel::expire::{Expiry, RETIRED_CAP},
    kernel::offsets::{self, OffsetError},
    kernel::preflight::memory_phase,
    kernel::tracefs::EventFormat,
};

/// The eBPF object built by build.rs (empty when the build was skipped).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/backlog"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "this backlog-agent was built without its eBPF programs (AYA_BUILD_SKIP was set); \
         rebuild it with the eBPF toolchain: `cargo xtask setup && cargo build`"
    )]
    NoObject,
    #[error(transparent)]
    Offsets(#[from] OffsetError),
    // The chain is in the message, once: as a source too it would be
    // printed again by `{:#}` (aya's errors repeat their causes already).
    #[error("loading the eBPF object failed: {}", error_chain(.0))]
    Load(EbpfError),
    #[error("no drop kind can be observed on this kernel with --attach {mode}: {reasons}")]
    NothingObservable { mode: &'static str, reasons: String },
    #[error("eBPF map {name}: {reason}")]
    Map { name: &'static str, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookFamily {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl HookFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            HookFamily::Fentry => "fentry",
            HookFamily::Kprobe => "kprobe",
            HookFamily::Tracepoint => "tracepoint",
        }
    }

    fn allowed_by(self, mode: AttachMode) -> bool {
        matches!(
            (mode, self),
            (AttachMode::Auto, _)
                | (AttachMode::Fentry, HookFamily::Fentry)
                | (AttachMode::Kprobe, HookFamily::Kprobe)
                | (AttachMode::Tracepoint, HookFamily::Tracepoint)
        )
    }
}

/// Where one program of a hook attaches.
#[derive(Clone, Copy, Debug)]
enum Attach {
    Tracepoint {
        category: &'static str,
        name: &'static str,
    },
    /// tp_btf: a raw tracepoint with its arguments typed from BTF.
    BtfTracepoint(&'static str),
    Fentry(&'static str),
    Fexit(&'static str),
    Kprobe(&'static str),
    Kretprobe(&'static str),
}

/// A syscalls:* tracepoint, most of the tracepoint hooks.
const fn syscall_tracepoint(name: &'static str) -> Attach {
    Attach::Tracepoint {
        category: "syscalls",
        name,
    }
}

/// One way of observing a kind: programs that must all attach.
#[derive(Clone, Copy, Debug)]
struct Hook {
    family: HookFamily,
    /// What the user is told, e.g. "fexit tcp_v4_syn_recv_sock, tcp_v6_syn_recv_sock".
    label: &'static str,
    programs: &'static [(&'static str, Attach)],
    /// What must hold on this kernel for the programs to report truly.
    needs: Needs,
}

/// Facts a hook depends on, checked before its result is trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needs {
    Nothing,
    /// skb:kfree_skb with rx_sk and the TCP_LISTEN_OVERFLOW reason, its
    /// fields where the program reads them (TP_KFREE_SKB_*). Checked
    /// before attach (see start()).
    KfreeSkbLayout,
    /// KfreeSkbLayout's reason number, and trace_kfree_skb() with the
    /// four arguments (rx_sk last) the tp_btf program reads by position.
    KfreeSkbArgs,
    /// The syscalls:* record layouts.
    SyscallLayout,
    /// The syscalls:* record layouts, bpf_task_pt_regs and where the
    /// syscall arguments are in the saved registers. Checked before load:
    /// without the helpers the program cannot load.
    SyscallRegs,
    /// A tcp_v4_syn_recv_sock prototype the fexit programs know.
    SynRecvSockPrototype,
    /// unix_stream_connect with the four arguments the fexit program
    /// takes its return value after.
    UnixStreamConnectPrototype,
    /// This CPU's SNMP counters (BTF indexes and __per_cpu_offset).
    SnmpCounters,
    /// sock:inet_sock_set_state (its fields where the program reads them,
    /// TP_STATE_*) and the accept()/listen() record layouts.
    AcceptLayout,
    /// AcceptLayout, SyscallRegs' helpers and registers, and `ret` of
    /// sys_exit_accept{,4} where the exit-only programs read it
    /// (TP_SYS_EXIT_RET). Checked before load, like SyscallRegs.
    AcceptRegs,
    /// AcceptLayout, and for the tp_btf arrivals program
    /// inet_sock_set_state's three arguments and sock.sk_protocol.
    AcceptLayoutBtf,
    /// AcceptRegs and AcceptLayoutBtf's arrivals.
    AcceptRegsBtf,
}

impl Hook {
    fn describe(&self) -> String {
        self.label.to_owned()
    }
}

/// Preferred over the perf tracepoint below: its program has a recursion
/// guard of its own, where a perf tracepoint program is skipped whenever
/// the drop's softirq interrupted any kprobe or perf tracepoint program on
/// that CPU (see backlog-ebpf/src/kfree_skb.rs).
const KFREE_SKB_BTF: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint skb:kfree_skb (tp_btf, reason TCP_LISTEN_OVERFLOW)",
    needs: Needs::KfreeSkbArgs,
    programs: &[(
        "btf_kfree_skb_listen_overflow",
        Attach::BtfTracepoint("kfree_skb"),
    )],
};

const KFREE_SKB: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint skb:kfree_skb (reason TCP_LISTEN_OVERFLOW)",
    needs: Needs::KfreeSkbLayout,
    programs: &[(
        "kfree_skb_listen_overflow",
        Attach::Tracepoint {
            category: "skb",
            name: "kfree_skb",
        },
    )],
};

/// Preferred where fexit attaches: a program on unix_stream_connect()
/// itself, which only AF_UNIX stream connect()s reach, so that no
/// connect() pays for a syscall tracepoint program (see
/// backlog-ebpf/src/unix_stream_connect.rs). It also carries the
/// accept-queue wait's UNIX arrivals.
const UNIX_CONNECT_FEXIT: Hook = Hook {
    family: HookFamily::Fentry,
    label: "fexit unix_stream_connect (EAGAIN)",
    needs: Needs::UnixStreamConnectPrototype,
    programs: &[(
        "fexit_unix_stream_connect",
        Attach::Fexit("unix_stream_connect"),
    )],
};

/// Next: one program, on the exit only. Every connect() on the
/// machine reaches it, and all but UNIX EAGAINs and successes leave after
/// two comparisons; the arguments come from the task's saved registers
/// (5.15+), so no sys_enter_connect program runs at all.
const UNIX_CONNECT_REGS: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint syscalls:sys_exit_connect (EAGAIN on AF_UNIX, arguments from the saved registers)",
    needs: Needs::SyscallRegs,
    programs: &[(
        "sys_exit_connect_regs",
        syscall_tracepoint("sys_exit_connect"),
    )],
};

/// The fallback before 5.15: the entry keeps the arguments of AF_UNIX
/// connect()s for the exit.
const UNIX_CONNECT: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint syscalls:sys_enter_connect, sys_exit_connect (EAGAIN on AF_UNIX)",
    needs: Needs::SyscallLayout,
    programs: &[
        ("sys_exit_connect", syscall_tracepoint("sys_exit_connect")),
        ("sys_enter_connect", syscall_tracepoint("sys_enter_connect")),
    ],
};

/// Not a drop kind: records listen() calls for attribution and for the
/// backlog a process asked for. Preferred: the exit alone, listen()'s fd
/// and backlog from the task's saved registers (5.15+). Any program on a
/// sys_enter_* tracepoint puts every syscall on the machine through the
/// kernel's perf_syscall_enter, and the pair paid a map insert and delete
/// per call.
const LISTEN_CALLS_REGS: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint syscalls:sys_exit_listen (arguments from the saved registers)",
    needs: Needs::SyscallRegs,
    programs: &[(
        "sys_exit_listen_regs",
        syscall_tracepoint("sys_exit_listen"),
    )],
};

/// The fallback before 5.15: the entry keeps the arguments for the exit.
const LISTEN_CALLS: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint syscalls:sys_enter_listen, sys_exit_listen",
    needs: Needs::SyscallLayout,
    programs: &[
        ("sys_exit_listen", syscall_tracepoint("sys_exit_listen")),
        ("sys_enter_listen", syscall_tracepoint("sys_enter_listen")),
    ],
};

/// Not a drop kind: accept-queue wait, arrival and accept rates, and
/// near-full warnings (accept.rs). listen() and connect() have one
/// program each, shared with the listen() hook and the UNIX kind's
/// (every connect() on the machine pays for each program on its
/// tracepoints): the listener is remembered through LISTEN_CALLS_REGS or
/// LISTEN_CALLS, UNIX arrivals through the UNIX kind's programs, or
/// through UNIX_ARRIVALS_REGS / UNIX_ARRIVALS when `--attach` left that
/// kind out. Preferred: accept()'s listening fd from the saved registers
/// at exit (5.15+), so that no program runs at sys_enter_accept{,4}.
const ACCEPT_WAIT_REGS: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint sock:inet_sock_set_state, syscalls:sys_exit_{accept,accept4} (listening fd from the saved registers)",
    needs: Needs::AcceptRegs,
    programs: &[
        (
            "accept_sys_exit_accept4_regs",
            syscall_tracepoint("sys_exit_accept4"),
        ),
        (
            "accept_sys_exit_accept_regs",
            syscall_tracepoint("sys_exit_accept"),
        ),
        (
            "accept_inet_sock_set_state",
            Attach::Tracepoint {
                category: "sock",
                name: "inet_sock_set_state",
            },
        ),
    ],
};

/// ACCEPT_WAIT_REGS with the arrivals on a tp_btf program, preferred: a
/// perf tracepoint program is skipped whenever the arrival's softirq
/// interrupted any kprobe or perf tracepoint program on that CPU (see
/// backlog-ebpf/src/accept.rs). Needs sock.sk_protocol as a plain field.
const ACCEPT_WAIT_REGS_BTF: Hook = Hook {
    label: "tracepoint sock:inet_sock_set_state (tp_btf), syscalls:sys_exit_{accept,accept4} (listening fd from the saved registers)",
    needs: Needs::AcceptRegsBtf,
    programs: &[
        // First: where it cannot load, nothing else was loaded for
        // the next rung to load again.
        (
            "accept_btf_inet_sock_set_state",
            Attach::BtfTracepoint("inet_sock_set_state"),
        ),
        (
            "accept_sys_exit_accept4_regs",
            syscall_tracepoint("sys_exit_accept4"),
        ),
        (
            "accept_sys_exit_accept_regs",
            syscall_tracepoint("sys_exit_accept"),
        ),
    ],
    ..ACCEPT_WAIT_REGS
};

/// ACCEPT_WAIT with the arrivals on tp_btf, as ACCEPT_WAIT_REGS_BTF.
const ACCEPT_WAIT_BTF: Hook = Hook {
    label:
        "tracepoint sock:inet_sock_set_state (tp_btf), syscalls:sys_{enter,exit}_{accept,accept4}",
    needs: Needs::AcceptLayoutBtf,
    programs: &[
        // First: where it cannot load, nothing else was loaded for
        // the next rung to load again.
        (
            "accept_btf_inet_sock_set_state",
            Attach::BtfTracepoint("inet_sock_set_state"),
        ),
        (
            "accept_sys_exit_accept4",
            syscall_tracepoint("sys_exit_accept4"),
        ),
        (
            "accept_sys_exit_accept",
            syscall_tracepoint("sys_exit_accept"),
        ),
        (
            "accept_sys_enter_accept4",
            syscall_tracepoint("sys_enter_accept4"),
        ),
        (
            "accept_sys_enter_accept",
            syscall_tracepoint("sys_enter_accept"),
        ),
    ],
    ..ACCEPT_WAIT
};

/// The fallback before 5.15. Exits first, so that no entry is armed
/// without its exit.
const ACCEPT_WAIT: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint sock:inet_sock_set_state, syscalls:sys_{enter,exit}_{accept,accept4}",
    needs: Needs::AcceptLayout,
    programs: &[
        (
            "accept_sys_exit_accept4",
            syscall_tracepoint("sys_exit_accept4"),
        ),
        (
            "accept_sys_exit_accept",
            syscall_tracepoint("sys_exit_accept"),
        ),
        (
            "accept_inet_sock_set_state",
            Attach::Tracepoint {
                category: "sock",
                name: "inet_sock_set_state",
            },
        ),
        (
            "accept_sys_enter_accept4",
            syscall_tracepoint("sys_enter_accept4"),
        ),
        (
            "accept_sys_enter_accept",
            syscall_tracepoint("sys_enter_accept"),
        ),
    ],
};

/// UNIX_CONNECT's entry and an exit that counts no EAGAIN (or
/// UNIX_CONNECT_REGS's twin, preferred), attached for the accept-queue
/// wait's UNIX arrivals alone, when `--attach` left the UNIX kind
/// unobserved.
const UNIX_ARRIVALS: Hook = Hook {
    family: HookFamily::Tracepoint,
    label: "tracepoint syscalls:sys_enter_connect, sys_exit_connect (UNIX arrivals)",
    needs: Needs::SyscallLayout,
    programs: &[
        (
            "sys_exit_connect_arrivals",
            syscall_tracepoint("sys_exit_connect"),
        ),
        ("sys_enter_connect", syscall_tracepoint("sys_enter_connect")),
    ],
};

const UNIX_ARRIVALS_REGS: Hook = Hook {
    family: HookFamily::Tracepoint,
    label:
        "tracepoint syscalls:sys_exit_connect (UNIX arrivals, arguments from the saved registers)",
    needs: Needs::SyscallRegs,
    programs: &[(
        "sys_exit_connect_regs_arrivals",
        syscall_tracepoint("sys_exit_connect"),
    )],
};

/// fexit programs per prototype of `*_syn_recv_sock()`: the return value
/// follows 6 arguments before 6.12 and 7 since (see syn_recv_sock.rs).
const SYN_RECV_SOCK_FEXIT_6: Hook = Hook {
    family: HookFamily::Fentry,
    label: "fexit tcp_v4_syn_recv_sock, tcp_v6_syn_recv_sock",
    needs: Needs::SynRecvSockPrototype,
    programs: &[
        (
            "fexit_syn_recv_sock_v4_6args",
            Attach::Fexit("tcp_v4_syn_recv_sock"),
        ),
        (
            "fexit_syn_recv_sock_v6_6args",
            Attach::Fexit("tcp_v6_syn_recv_sock"),
        ),
    ],
};

const SYN_RECV_SOCK_FEXIT_7: Hook = Hook {
    programs: &[
        (
            "fexit_syn_recv_sock_v4_7args",
            Attach::Fexit("tcp_v4_syn_recv_sock"),
        ),
        (
            "fexit_syn_recv_sock_v6_7args",
            Attach::Fexit("tcp_v6_syn_recv_sock"),
        ),
    ],
    ..SYN_RECV_SOCK_FEXIT_6
};

const SYN_RECV_SOCK_KPROBE: Hook = Hook {
    family: HookFamily::Kprobe,
    label: "kprobe+kretprobe tcp_v4_syn_recv_sock, tcp_v6_syn_recv_sock",
    needs: Needs::Nothing,
    programs: &[
        (
            "kprobe_syn_recv_sock_v4",
            Attach::Kprobe("tcp_v4_syn_recv_sock"),
        ),
        (
            "kretprobe_syn_recv_sock_v4",
            Attach::Kretprobe("tcp_v4_syn_recv_sock"),
        ),
        (
            "kprobe_syn_recv_sock_v6",
            Attach::Kprobe("tcp_v6_syn_recv_sock"),
        ),
        (
            "kretprobe_syn_recv_sock_v6",
            Attach::Kretprobe("tcp_v6_syn_recv_sock"),
        ),
    ],
};

// The SYN-stage hooks: exit first, so that no entry is armed without it.
const CONN_REQUEST_FENTRY: Hook = Hook {
    family: HookFamily::Fentry,
    label: "fentry/fexit tcp_conn_request",
    needs: Needs::SnmpCounters,
    programs: &[
        ("fexit_conn_request", Attach::Fexit("tcp_conn_request")),
        ("fentry_conn_request", Attach::Fentry("tcp_conn_request")),
    ],
};

const CONN_REQUEST_KPROBE: Hook = Hook {
    family: HookFamily::Kprobe,
    label: "kprobe/kretprobe tcp_conn_request",
    needs: Needs::SnmpCounters,
    programs: &[
        (
            "kretprobe_conn_request",
            Attach::Kretprobe("tcp_conn_request"),
        ),
        ("kprobe_conn_request", Attach::Kprobe("tcp_conn_request")),
    ],
};

/// Candidate hooks per kind, best first (fentry, kprobe, tracepoint).
fn hooks_for(kind: DropKind, syn_recv_sock_params: Option<u32>) -> &'static [Hook] {
    match kind {
        DropKind::AckDroppedAcceptQueueFull if syn_recv_sock_params == Some(7) => &[
            SYN_RECV_SOCK_FEXIT_7,
            SYN_RECV_SOCK_KPROBE,
            KFREE_SKB_BTF,
            KFREE_SKB,
        ],
        DropKind::AckDroppedAcceptQueueFull => &[
            SYN_RECV_SOCK_FEXIT_6,
            SYN_RECV_SOCK_KPROBE,
            KFREE_SKB_BTF,
            KFREE_SKB,
        ],
        DropKind::SynDroppedSynQueueFull
        | DropKind::SynCookieSent
        | DropKind::SynDroppedAcceptQueueFull
        | DropKind::SynDroppedSynBacklogPressure
        | DropKind::SynDroppedOther => &[CONN_REQUEST_FENTRY, CONN_REQUEST_KPROBE],
        DropKind::UnixConnectBacklogFull => &[UNIX_CONNECT_FEXIT, UNIX_CONNECT_REGS, UNIX_CONNECT],
    }
}

/// What happened to one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Attached {
        family: HookFamily,
        hook: String,
        /// Better hooks that could not be used, with the reason.
        skipped: Vec<String>,
    },
    NotObservable {
        reason: String,
    },
}

pub struct Probes {
    /// Owns the programs and their links: dropping it detaches everything.
    pub ebpf: Ebpf,
    pub outcomes: Vec<(DropKind, Outcome)>,
    /// listen() tracking: the hook, or why it is unavailable.
    pub listen_calls: Result<String, String>,
    /// Accept-queue wait and rates: the hook, or why it is unavailable.
    pub accept_wait: Result<String, String>,
    /// What each attached program observes (drop kinds, or "listen()
    /// calls", "accept-queue wait", "UNIX arrivals"): what a run the
    /// kernel skipped (bpfstats::Skipped) may have missed.
    pub roles: BTreeMap<&'static str, Vec<&'static str>>,
}

/// Adds `what` to the roles of every program of `hook`.
fn add_roles(
    roles: &mut BTreeMap<&'static str, Vec<&'static str>>,
    hook: &Hook,
    what: &'static str,
) {
    for (program, _) in hook.programs {
        let list = roles.entry(program).or_default();
        if !list.contains(&what) {
            list.push(what);
        }
    }
}

/// Per-hook facts checked before load (tracepoint record layouts, enum
/// values): a hook whose precondition failed is not tried.
struct Preconditions {
    kfree_skb: Result<(), String>,
    kfree_skb_args: Result<(), String>,
    syscalls: Result<(), String>,
    syscall_regs: Result<(), String>,
    /// The fexit programs exist for 6- and 7-argument prototypes only.
    syn_recv_sock_fexit: Result<(), String>,
    unix_stream_connect_fexit: Result<(), String>,
    /// The SYN-stage classification reads this CPU's SNMP counters.
    snmp_counters: Result<(), String>,
    accept: Result<(), String>,
    /// `ret` of sys_exit_accept{,4} at TP_SYS_EXIT_RET (AcceptRegs).
    accept_exit_ret: Result<(), String>,
    /// What the tp_btf arrivals program reads (AcceptLayoutBtf).
    accept_btf: Result<(), String>,
}

impl Preconditions {
    fn of(&self, hook: &Hook) -> Result<(), String> {
        self.holds(hook.needs)
    }

    fn holds(&self, needs: Needs) -> Result<(), String> {
        match needs {
            Needs::Nothing => Ok(()),
            Needs::KfreeSkbLayout => self.kfree_skb.clone(),
            Needs::KfreeSkbArgs => self.kfree_skb_args.clone(),
            Needs::SyscallLayout => self.syscalls.clone(),
            Needs::SyscallRegs => self.syscalls.clone().and(self.syscall_regs.clone()),
            Needs::SynRecvSockPrototype => self.syn_recv_sock_fexit.clone(),
            Needs::UnixStreamConnectPrototype => self.unix_stream_connect_fexit.clone(),
            Needs::SnmpCounters => self.snmp_counters.clone(),
            Needs::AcceptLayout => self.accept.clone(),
            Needs::AcceptRegs => self
                .accept
                .clone()
                .and(self.syscall_regs.clone())
                .and(self.accept_exit_ret.clone()),
            Needs::AcceptLayoutBtf => self.holds(Needs::AcceptLayout).and(self.accept_btf.clone()),
            Needs::AcceptRegsBtf => self.holds(Needs::AcceptRegs).and(self.accept_btf.clone()),
        }
    }
}

/// The kernel side of `--max-events-per-sec` and of batched wakeups.
pub fn config(max_events_per_sec: u32, ring_buffer_kib: u32) -> Config {
    let event_interval_ns = match max_events_per_sec {
        0 => 0,
        n => (1_000_000_000 / u64::from(n)).max(1),
    };
    Config {
        event_interval_ns,
        // A second's worth of events may come at once after a quiet spell.
        burst_ns: 1_000_000_000u64.saturating_sub(event_interval_ns),
        // An eighth of the ring: the agent is woken well before it fills,
        // and polls for the rest.
        wakeup_bytes: u64::from(ring_buffer_kib) * 1024 / 8,
    }
}

pub fn start(
    mode: AttachMode,
    ring_buffer_kib: u32,
    config: &Config,
    near_full_percent: u32,
    filter: &FilterConfig,
    vmlinux: Btf,
    tracefs: &Path,
) -> Result<(Probes, Vec<&'static str>), ProbeError> {
    if OBJECT.is_empty() {
        return Err(ProbeError::NoObject);
    }
    // Taken by value: every question for it is asked before the object is
    // loaded, and it is dropped there, before aya parses the same file
    // (its loader, then fentry/fexit): two parsed copies at once made the
    // start-up peak.
    let btf = &vmlinux;
    let resolved = offsets::resolve(btf)?;
    memory_phase("resolving offsets");
    let mut kernel_offsets = resolved.offsets;
    let kfree_skb = EventFormat::read(tracefs, "skb", "kfree_skb")
        .map_err(|err| err.to_string())
        .and_then(|format| {
            offsets::apply_kfree_skb(&mut kernel_offsets, btf, &format)
                .map_err(|err| err.to_string())
        });
    let kfree_skb_args = kfree_skb
        .clone()
        .and_then(|()| tracepoint_args(btf, "kfree_skb", 4));
    let syscalls = (|| {
        let read = |name| EventFormat::read(tracefs, "syscalls", name).map_err(|e| e.to_string());
        offsets::apply_syscalls(
            &mut kernel_offsets,
            &read("sys_enter_connect")?,
            &read("sys_enter_listen")?,
            &read("sys_exit_connect")?,
            &read("sys_exit_listen")?,
        )
    })();
    let syn_recv_sock_params = btf.function_param_count("tcp_v4_syn_recv_sock").ok();
    let syn_recv_sock_fexit = match syn_recv_sock_params {
        Some(6 | 7) => Ok(()),
        Some(n) => Err(format!(
            "tcp_v4_syn_recv_sock takes {n} arguments here; this build knows 6 and 7"
        )),
        None => Err("tcp_v4_syn_recv_sock is not in the kernel's BTF".into()),
    };
    let unix_stream_connect_fexit = match btf.function_param_count("unix_stream_connect") {
        Ok(4) => Ok(()),
        Ok(n) => Err(format!(
            "unix_stream_connect takes {n} arguments here; this build knows 4"
        )),
        Err(_) => Err("unix_stream_connect is not in the kernel's BTF".into()),
    };
    // Only the lines of the symbols asked about (the whole file is 5 MB).
    let kallsyms = crate::kernel::kallsyms::read(offsets::KALLSYMS_NEEDED);
    let snmp_counters = kallsyms
        .as_deref()
        .map_err(Clone::clone)
        .and_then(|kallsyms| offsets::apply_snmp_counters(&mut kernel_offsets, btf, kallsyms));
    let syscall_regs = kallsyms
        .as_deref()
        .map_err(Clone::clone)
        .and_then(|kallsyms| offsets::apply_syscall_regs(&mut kernel_offsets, btf, kallsyms));
    memory_phase("reading /proc/kallsyms");
    let accept_offsets =
        crate::enrich::accept_wait::resolve(&kernel_offsets, btf, tracefs, near_full_percent);
    let accept_btf = match accept_offsets.as_ref().map(|o| o.sk_protocol) {
        Ok(backlog_common::OFFSET_ABSENT) => {
            Err("sock.sk_protocol is not a 2-byte field here (a bitfield before 5.6)".into())
        }
        // Without the offsets the accept precondition already says why.
        Ok(_) | Err(_) => tracepoint_args(btf, "inet_sock_set_state", 3),
    };
    let preconditions = Preconditions {
        kfree_skb,
        kfree_skb_args,
        syscalls,
        syscall_regs,
        syn_recv_sock_fexit,
        unix_stream_connect_fexit,
        snmp_counters,
        accept: accept_offsets
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|o| offsets::check_inet_sock_set_state(o).map_err(|e| e.to_string())),
        accept_exit_ret: accept_offsets
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|o| offsets::check_sys_exit_accept(o).map_err(|e| e.to_string())),
        accept_btf,
    };
    let accept_offsets = accept_offsets.unwrap_or(backlog_common::AcceptOffsets::ABSENT);
    drop(vmlinux);
    memory_phase("dropping the kernel's BTF");

    // The CLI caps the size (2 GiB, the largest power of two a u32 holds);
    // checked all the same, so no caller can wrap it to 0.
    let ring_buffer_bytes = ring_buffer_kib
        .checked_mul(1024)
        .ok_or_else(|| ProbeError::Map {
            name: "EVENTS",
            reason: format!("{ring_buffer_kib} KiB does not fit the kernel's u32 map size"),
        })?;
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &kernel_offsets, true)
        .override_global("CONFIG", config, true)
        .override_global("ACCEPT_OFFSETS", &accept_offsets, true)
        .override_global("FILTER", filter, true)
        .map_max_entries("EVENTS", ring_buffer_bytes)
        .load(OBJECT)
        .map_err(ProbeError::Load)?;
    memory_phase("loading the eBPF object");

    let mut kernel_btf = KernelBtf::default();
    // One hook may serve several kinds (tcp_conn_request serves five):
    // attach it once and reuse the result.
    let mut tried: Vec<(&'static str, Result<(), String>)> = Vec::new();
    let mut outcomes = Vec::new();
    let mut roles = BTreeMap::new();
    for kind in DropKind::ALL {
        let hooks = hooks_for(kind, syn_recv_sock_params);
        let mut failures = Vec::new();
        let mut attached = None;
        for hook in hooks.iter().filter(|h| h.family.allowed_by(mode)) {
            let result = match tried.iter().find(|(label, _)| *label == hook.label) {
                Some((_, result)) => result.clone(),
                None if matches!(
                    hook.needs,
                    Needs::SyscallRegs | Needs::KfreeSkbLayout | Needs::KfreeSkbArgs
                ) =>
                {
                    // Without the helpers the program does not load, and
                    // where the kfree_skb record is shorter (before 6.11)
                    // the kernel refuses its constant-offset loads at
                    // attach (EACCES): the missing helper or field is the
                    // reason worth telling.
                    let result = preconditions
                        .of(hook)
                        .and_then(|()| attach(&mut ebpf, hook, &mut kernel_btf));
                    tried.push((hook.label, result.clone()));
                    result
                }
                None => {
                    // Attach first: when the kernel refuses the whole
                    // family, that is the reason worth telling, not a
                    // missing detail. A hook whose precondition then fails
                    // is given up (it would report wrong values).
                    let result = attach(&mut ebpf, hook, &mut kernel_btf).and_then(|()| {
                        preconditions.of(hook).inspect_err(|_| {
                            for (program, _) in hook.programs {
                                unload(&mut ebpf, program);
                            }
                        })
                    });
                    tried.push((hook.label, result.clone()));
                    result
                }
            };
            match result {
                Ok(()) => {
                    attached = Some(hook);
                    break;
                }
                Err(reason) => {
                    let line = match kernel_wide_refusal(&reason) {
                        // Same reason for every hook of the family: say it once.
                        Some(refusal) => refusal.to_owned(),
                        None => format!("{}: {reason}", hook.describe()),
                    };
                    if !failures.contains(&line) {
                        failures.push(line);
                    }
                }
            }
        }
        if let Some(hook) = attached {
            add_roles(&mut roles, hook, kind.as_str());
        }
        let outcome = match attached {
            Some(hook) => Outcome::Attached {
                family: hook.family,
                hook: hook.describe(),
                skipped: failures,
            },
            None if hooks.is_empty() => Outcome::NotObservable {
                reason: "this version of backlog has no hook for it yet".into(),
            },
            None if failures.is_empty() => Outcome::NotObservable {
                reason: format!("no {} hook exists for {}", mode_name(mode), kind.as_str()),
            },
            // A forced family that cannot serve this kind still runs for
            // the kinds it can serve; this one is reported with the reason.
            None => Outcome::NotObservable {
                reason: failures.join("; "),
            },
        };
        outcomes.push((kind, outcome));
    }
    if !outcomes
        .iter()
        .any(|(_, o)| matches!(o, Outcome::Attached { .. }))
    {
        // One line: the distinct reasons, most kinds share one.
        let mut why: Vec<&str> = Vec::new();
        for (_, outcome) in &outcomes {
            if let Outcome::NotObservable { reason } = outcome {
                if !why.contains(&reason.as_str()) {
                    why.push(reason);
                }
            }
        }
        return Err(ProbeError::NothingObservable {
            mode: mode_name(mode),
            reasons: why.join("; "),
        });
    }
    memory_phase("attaching the drop hooks");
    let listen_calls = first_of(
        &[LISTEN_CALLS_REGS, LISTEN_CALLS],
        &preconditions,
        &mut ebpf,
        &mut kernel_btf,
    );
    // Tracepoints only: whatever --attach forces applies to drop kinds.
    let unix_connect = outcomes.iter().find_map(|(kind, outcome)| match outcome {
        Outcome::Attached { hook, .. } if *kind == DropKind::UnixConnectBacklogFull => {
            Some(hook.clone())
        }
        _ => None,
    });
    if let Ok(hook) = &listen_calls {
        add_roles(&mut roles, hook, "listen() calls");
    }
    let accept_wait = first_of(
        &[
            ACCEPT_WAIT_REGS_BTF,
            ACCEPT_WAIT_REGS,
            ACCEPT_WAIT_BTF,
            ACCEPT_WAIT,
        ],
        &preconditions,
        &mut ebpf,
        &mut kernel_btf,
    )
    .map(|accept| {
        add_roles(&mut roles, &accept, "accept-queue wait");
        // The parts carried by shared programs, named only when they run.
        let mut hook = accept.describe();
        match &listen_calls {
            Ok(listen) if listen.label == LISTEN_CALLS_REGS.label => {
                hook.push_str(", sys_exit_listen")
            }
            Ok(_) => hook.push_str(", sys_{enter,exit}_listen"),
            Err(_) => {}
        }
        // Carried by the UNIX kind's programs when it is attached; else
        // the tracepoint ladder, exit-only first, with programs that count
        // no EAGAIN.
        let arrivals = match unix_connect {
            Some(label) => Ok(label),
            None => first_of(
                &[UNIX_ARRIVALS_REGS, UNIX_ARRIVALS],
                &preconditions,
                &mut ebpf,
                &mut kernel_btf,
            )
            .map(|arrivals| arrivals.label.to_owned()),
        };
        // Whichever programs carry them, by their label.
        if let Ok(label) = &arrivals {
            for hook in [
                UNIX_CONNECT_FEXIT,
                UNIX_CONNECT_REGS,
                UNIX_CONNECT,
                UNIX_ARRIVALS_REGS,
                UNIX_ARRIVALS,
            ] {
                if hook.label == label {
                    add_roles(&mut roles, &hook, "UNIX arrivals");
                }
            }
        }
        match arrivals.as_deref() {
            Ok(label) if label == UNIX_CONNECT_FEXIT.label => {
                hook.push_str(", fexit unix_stream_connect (UNIX arrivals)")
            }
            Ok(label) if label == UNIX_CONNECT_REGS.label || label == UNIX_ARRIVALS_REGS.label => {
                hook.push_str(", sys_exit_connect (UNIX arrivals)")
            }
            Ok(_) => hook.push_str(", sys_{enter,exit}_connect (UNIX arrivals)"),
            Err(reason) => hook.push_str(&format!(" (no UNIX arrivals: {reason})")),
        }
        hook
    });
    let listen_calls = listen_calls.map(|hook| hook.describe());
    memory_phase("attaching the other hooks");
    Ok((
        Probes {
            ebpf,
            outcomes,
            listen_calls,
            accept_wait,
            roles,
        },
        resolved.absent,
    ))
}

/// The first of `ladder` whose preconditions hold and whose programs all
/// attach, best first (hooks that are not drop kinds: nothing is reported
/// for a rung given up but the rung used); the last rung's reason when
/// none does.
fn first_of(
    ladder: &[Hook],
    preconditions: &Preconditions,
    ebpf: &mut Ebpf,
    kernel_btf: &mut KernelBtf,
) -> Result<Hook, String> {
    let mut reason = String::from("no hook");
    for hook in ladder {
        match preconditions
            .of(hook)
            .and_then(|()| attach(ebpf, hook, kernel_btf))
        {
            Ok(()) => return Ok(*hook),
            Err(why) => reason = why,
        }
    }
    Err(reason)
}

fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Auto => "auto",
        AttachMode::Fentry => "fentry",
        AttachMode::Kprobe => "kprobe",
        AttachMode::Tracepoint => "tracepoint",
    }
}

/// Whether a tp_btf program on the tracepoint `name` gets the `want`
/// arguments it reads by position.
fn tracepoint_args(btf: &Btf, name: &str, want: u32) -> Result<(), String> {
    match btf.tracepoint_arg_count(name) {
        Ok(n) if n == want => Ok(()),
        Ok(n) => Err(format!(
            "trace_{name}() takes {n} arguments here; this build knows {want}"
        )),
        Err(err) => Err(err.to_string()),
    }
}

/// Loads and attaches every program of `hook`; on any failure, unloads
/// those already attached so that a half-attached hook never reports.
/// Loading alone proves nothing (kprobe programs load on kernels without
/// kprobes), so success means attached.
fn attach(ebpf: &mut Ebpf, hook: &Hook, kernel_btf: &mut KernelBtf) -> Result<(), String> {
    for (done, (name, target)) in hook.programs.iter().enumerate() {
        if let Err(err) = attach_program(ebpf, name, *target, kernel_btf) {
            for (loaded, _) in &hook.programs[..=done] {
                unload(ebpf, loaded);
            }
            return Err(format!(
                "{}: {}",
                target_name(*target),
                explain(*target, &err)
            ));
        }
    }
    Ok(())
}

/// Detaches and unloads one program (best effort: it is being given up).
fn unload(ebpf: &mut Ebpf, name: &str) {
    let _ = match ebpf.program_mut(name) {
        Some(Program::TracePoint(p)) => p.unload(),
        Some(Program::BtfTracePoint(p)) => p.unload(),
        Some(Program::FEntry(p)) => p.unload(),
        Some(Program::FExit(p)) => p.unload(),
        Some(Program::KProbe(p)) => p.unload(),
        _ => Ok(()),
    };
}

fn target_name(target: Attach) -> String {
    match target {
        Attach::Tracepoint { category, name } => format!("{category}:{name}"),
        Attach::BtfTracepoint(name) => format!("tp_btf {name}"),
        Attach::Fentry(f) | Attach::Fexit(f) | Attach::Kprobe(f) | Attach::Kretprobe(f) => {
            f.to_owned()
        }
    }
}

/// aya's own BTF (fexit needs it to find the target's type id), parsed
/// only when an fexit hook is tried.
#[derive(Default)]
struct KernelBtf(Option<Result<aya::Btf, String>>);

impl KernelBtf {
    fn get(&mut self) -> Result<&aya::Btf, String> {
        self.0
            .get_or_insert_with(|| aya::Btf::from_sys_fs().map_err(|e| e.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }
}

fn attach_program(
    ebpf: &mut Ebpf,
    name: &str,
    target: Attach,
    kernel_btf: &mut KernelBtf,
) -> Result<(), String> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the eBPF object"))?;
    match target {
        Attach::Tracepoint { category, name } => {
            let tp: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            tp.load().map_err(|e| format!("load: {e}"))?;
            tp.attach(category, name)
                .map_err(|e| format!("attach: {e}"))?;
        }
        Attach::BtfTracepoint(name) => {
            let btf = kernel_btf.get()?;
            let tp: &mut BtfTracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            tp.load(name, btf)
                .map_err(|e| format!("load: {}", error_chain(&e)))?;
            tp.attach()
                .map_err(|e| format!("attach: {}", error_chain(&e)))?;
        }
        Attach::Fentry(function) => {
            let btf = kernel_btf.get()?;
            let fentry: &mut FEntry = program.try_into().map_err(|e| format!("{e}"))?;
            fentry
                .load(function, btf)
                .map_err(|e| format!("load: {}", error_chain(&e)))?;
            fentry
                .attach()
                .map_err(|e| format!("attach: {}", error_chain(&e)))?;
        }
        Attach::Fexit(function) => {
            let btf = kernel_btf.get()?;
            let fexit: &mut FExit = program.try_into().map_err(|e| format!("{e}"))?;
            fexit
                .load(function, btf)
                .map_err(|e| format!("load: {}", error_chain(&e)))?;
            fexit
                .attach()
                .map_err(|e| format!("attach: {}", error_chain(&e)))?;
        }
        Attach::Kprobe(function) | Attach::Kretprobe(function) => {
            // Kprobe programs load where the kernel has no kprobes and only
            // the attach fails; the load is the verifier's time, half a
            // second for kretprobe_conn_request on 6.18, paid at every
            // start for nothing. The PMU's directory is what the attach
            // needs (perf_event_open of type kprobe; every kernel from 4.17
            // with CONFIG_KPROBES has it).
            if !Path::new(KPROBE_PMU).exists() {
                return Err(format!("attach: {KPROBE_PMU} is missing"));
            }
            let kprobe: &mut KProbe = program.try_into().map_err(|e| format!("{e}"))?;
            kprobe.load().map_err(|e| format!("load: {e}"))?;
            kprobe
                .attach(function, 0)
                .map_err(|e| format!("attach: {}", error_chain(&e)))?;
        }
    }
    Ok(())
}

const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";
const REFUSES_FENTRY: &str = "the kernel refuses fentry/fexit programs (EPERM at load)";
const NO_KPROBES: &str = "the kernel has no kprobes (CONFIG_KPROBES off)";

/// A refusal that holds for every hook of a family, not one function.
fn kernel_wide_refusal(reason: &str) -> Option<&'static str> {
    [REFUSES_FENTRY, NO_KPROBES]
        .into_iter()
        .find(|refusal| reason.ends_with(refusal))
}

/// Says in plain words why the kernel refused, keeping the raw error for
/// the cases we do not recognise.
fn explain(target: Attach, raw: &str) -> String {
    match target {
        Attach::Fentry(_) | Attach::Fexit(_) if raw.contains("Operation not permitted") => {
            REFUSES_FENTRY.into()
        }
        Attach::Fentry(_) | Attach::Fexit(_)
            if raw.contains("No such file") || raw.contains("not found") =>
        {
            "the function is not in the kernel's BTF (inlined or absent)".into()
        }
        // x86 BPF trampolines took at most 6 arguments before 6.5; Debian
        // backported a seventh to tcp_v4_syn_recv_sock into 6.1.
        // 524 is the kernel's internal ENOTSUPP, which libc cannot name.
        Attach::Fentry(_) | Attach::Fexit(_)
            if raw.starts_with("attach:") && raw.contains("os error 524") =>
        {
            "the kernel's BPF trampoline cannot attach to this function (ENOTSUPP: \
             functions with more than 6 arguments need 6.5+)"
                .into()
        }
        Attach::Kprobe(_) | Attach::Kretprobe(_) if raw.contains(KPROBE_PMU) => NO_KPROBES.into(),
        _ => raw.to_owned(),
    }
}

/// An error with its sources, on one line: aya's top-level messages alone
/// ("the BPF_PROG_LOAD syscall failed") hide the errno that explains.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        // Many errors print their cause in their own message too: say
        // each thing once.
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl Probes {
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self.ebpf.take_map("EVENTS").ok_or(ProbeError::Map {
            name: "EVENTS",
            reason: "missing from the eBPF object".into(),
        })?;
        RingBuf::try_from(map).map_err(|e| ProbeError::Map {
            name: "EVENTS",
            reason: e.to_string(),
        })
    }

    /// The map behind the agent's sleep flag (wakeup.rs).
    pub fn take_asleep_flag(&mut self) -> Result<MapData, ProbeError> {
        match self.take_map("AGENT_ASLEEP")? {
            aya::maps::Map::Array(data) => Ok(data),
            _ => Err(ProbeError::Map {
                name: "AGENT_ASLEEP",
                reason: "not an array map".into(),
            }),
        }
    }

    /// The per-listener accept-queue figures (accept.rs).
    pub fn take_accept_stats(
        &mut self,
    ) -> Result<
        aya::maps::HashMap<MapData, backlog_common::AcceptKey, backlog_common::AcceptStats>,
        ProbeError,
    > {
        let map = self.ebpf.take_map("ACCEPT_STATS").ok_or(ProbeError::Map {
            name: "ACCEPT_STATS",
            reason: "missing from the eBPF object".into(),
        })?;
        aya::maps::HashMap::try_from(map).map_err(|e| ProbeError::Map {
            name: "ACCEPT_STATS",
            reason: e.to_string(),
        })
    }

    pub fn take_counters(&mut self) -> Result<KernelCounters, ProbeError> {
        Ok(KernelCounters {
            array: PerCpuArray::try_from(self.take_map("COUNTERS")?)
                .map_err(map_error("COUNTERS"))?,
            totals: PerCpuHashMap::try_from(self.take_map("DROP_TOTALS")?)
                .map_err(map_error("DROP_TOTALS"))?,
            unix_totals: BpfHashMap::try_from(self.take_map("UNIX_TOTALS")?)
                .map_err(map_error("UNIX_TOTALS"))?,
            peers: BpfHashMap::try_from(self.take_map("SUPPRESSED_PEERS")?)
                .map_err(map_error("SUPPRESSED_PEERS"))?,
            peers_batch: true,
            inet_expiry: Expiry::new(None, RETIRED_CAP),
            unix_expiry: Expiry::new(None, RETIRED_CAP),
        })
    }

    fn take_map(&mut self, name: &'static str) -> Result<aya::maps::Map, ProbeError> {
        self.ebpf.take_map(name).ok_or(ProbeError::Map {
            name,
            reason: "missing from the eBPF object".into(),
        })
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> ProbeError {
    move |e| ProbeError::Map {
        name,
        reason: e.to_string(),
    }
}

/// The programs' per-CPU counters and per-listener accounting.
pub struct KernelCounters {
    array: PerCpuArray<MapData, u64>,
    totals: PerCpuHashMap<MapData, DropTotalKey, DropCounts>,
    unix_totals: BpfHashMap<MapData, UnixTotalKey, UnixAccount>,
    peers: BpfHashMap<MapData, PeerKey, u64>,
    /// Whether `peers` is emptied with the batch command (batch.rs).
    peers_batch: bool,
    /// Idle rows moved out of `totals` / `unix_totals` (expire.rs).
    pub inet_expiry: Expiry<DropTotalKey>,
    pub unix_expiry: Expiry<UnixTotalKey>,
}

fn sum_cpus(values: &[DropCounts]) -> DropCounts {
    values.iter().fold(DropCounts::ZERO, |a, v| DropCounts {
        total: a.total + v.total,
        sent: a.sent + v.sent,
        suppressed: a.suppressed + v.suppressed,
        lost: a.lost + v.lost,
    })
}

impl KernelCounters {
    fn sum(&self, index: u32) -> Result<u64, String> {
        let values = self.array.get(&index, 0).map_err(|e| e.to_string())?;
        Ok(values.iter().sum())
    }

    pub fn events_lost(&self) -> Result<u64, String> {
        self.sum(COUNTER_EVENTS_LOST)
    }

    /// Drops over the rate limit (all listeners).
    pub fn events_suppressed(&self) -> Result<u64, String> {
        self.sum(COUNTER_EVENTS_SUPPRESSED)
    }

    pub fn read_errors(&self) -> Result<u64, String> {
        self.sum(COUNTER_READ_ERRORS)
    }

    /// Per-listener totals that could not be stored (map full).
    pub fn totals_full(&self) -> Result<u64, String> {
        self.sum(COUNTER_TOTALS_FULL)
    }

    /// Accept-queue updates that found `ACCEPT_STATS` full.
    pub fn accept_stats_full(&self) -> Result<u64, String> {
        self.sum(COUNTER_ACCEPT_STATS_FULL)
    }

    /// What became of the drops per listener and kind, summed over CPUs,
    /// since start: the live rows plus the expired ones.
    pub fn totals(&self) -> Result<Vec<(DropTotalKey, DropCounts)>, String> {
        Ok(self.inet_expiry.merged(self.live_totals()?))
    }

    /// The same for UNIX connect() EAGAINs, per (client netns, path).
    pub fn unix_totals(&self) -> Result<Vec<(UnixTotalKey, DropCounts)>, String> {
        Ok(self.unix_expiry.merged(self.live_unix_totals()?))
    }

    /// Only the rows now in the kernel map.
    pub fn live_totals(&self) -> Result<Vec<(DropTotalKey, DropCounts)>, String> {
        self.totals
            .iter()
            .map(|entry| {
                let (key, values) = entry.map_err(|e| e.to_string())?;
                Ok((key, sum_cpus(&values)))
            })
            .collect()
    }

    pub fn live_unix_totals(&self) -> Result<Vec<(UnixTotalKey, DropCounts)>, String> {
        self.unix_totals
            .iter()
            .map(|entry| {
                let (key, account) = entry.map_err(|e| e.to_string())?;
                Ok((key, account.counts))
            })
            .collect()
    }

    /// Deletes the rows idle for `--expire-after` (as of the live rows
    /// just read, `inet` and `unix`), keeping their counts user-side;
    /// returns the deleted keys.
    ///
    /// Each is read once more and deleted only if still unchanged. A drop
    /// that lands between that read and the delete, on a row idle for
    /// minutes, is lost from the accounting (its event, if any, still
    /// arrives): a window of the two syscalls, nanoseconds to microseconds.
    pub fn expire(
        &mut self,
        inet: &[(DropTotalKey, DropCounts)],
        unix: &[(UnixTotalKey, DropCounts)],
        now: Instant,
    ) -> (Vec<DropTotalKey>, Vec<UnixTotalKey>) {
        let mut gone_inet = Vec::new();
        for key in self.inet_expiry.observe(inet, now) {
            let Ok(values) = self.totals.get(&key, 0) else {
                continue;
            };
            let last = sum_cpus(&values);
            if Some(last) == self.inet_expiry.last(&key) && self.totals.remove(&key).is_ok() {
                self.inet_expiry.retire(key, last);
                gone_inet.push(key);
            }
        }
        let mut gone_unix = Vec::new();
        for key in self.unix_expiry.observe(unix, now) {
            // One shared entry (counts and token bucket, account.rs):
            // deleting it also refills the bucket, as for a new path.
            let Ok(account) = self.unix_totals.get(&key, 0) else {
                continue;
            };
            let last = account.counts;
            if Some(last) == self.unix_expiry.last(&key) && self.unix_totals.remove(&key).is_ok() {
                self.unix_expiry.retire(key, last);
                gone_unix.push(key);
            }
        }
        (gone_inet, gone_unix)
    }

    /// The sources of suppressed drops since the last call, emptying the
    /// map so that each interval names its own busiest peers.
    pub fn take_peers(&mut self) -> Vec<(PeerKey, u64)> {
        if self.peers_batch {
            match super::batch::take_all(aya::maps::IterableMap::map(&self.peers)) {
                Ok(peers) => return peers,
                // Too old a kernel for the batch command (before 5.6):
                // one entry at a time from now on.
                Err(_) => self.peers_batch = false,
            }
        }
        let peers: Vec<(PeerKey, u64)> = self.peers.iter().filter_map(Result::ok).collect();
        for (key, _) in &peers {
            let _ = self.peers.remove(key);
        }
        peers
    }
}
