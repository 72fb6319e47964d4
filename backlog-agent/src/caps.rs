//! Capabilities: the smallest set the agent needs, checked before anything
//! is loaded (a missing one is named in a one-line error or warning), and
//! given up once the programs are attached, keeping only what the run
//! itself needs.
//!
//! The set was measured, not guessed: the agent was run as `nobody` with
//! candidate sets (`setpriv --reuid=nobody --inh-caps=... --ambient-caps=...`,
//! and tests/least_privilege.rs does the same on every kernel of the guest
//! matrix) and compared with a root run. What each one is for:
//!
//! - CAP_BPF: create maps and load programs.
//! - CAP_PERFMON: load tracing programs and attach them (perf_event_open
//!   of tracepoints and kprobes, BPF trampolines).
//! - CAP_DAC_READ_SEARCH: tracefs is root-only (mode 0700): tracepoint ids
//!   and record formats are read at start-up; at run time it lists
//!   /proc/PID/fd of other users' processes (mode 0500) to attribute a
//!   listener.
//! - CAP_SYS_PTRACE: at run time, readlink /proc/PID/fd/N and open
//!   /proc/PID/ns/net of other users' processes (ptrace access mode
//!   checks), for attribution and to enter a listener's network namespace.
//! - CAP_SYS_ADMIN: at run time, setns() into a listener's network
//!   namespace, the only way to read that namespace's sysctls
//!   (net.core.somaxconn, ...) and to ask its sock_diag (UNIX listener
//!   paths, per-listener drop counts where SYN-stage drops are counted
//!   rather than traced). setns needs it even for the agent's own
//!   namespace. On Debian's 5.10 and 6.12 kernels the syscall tracepoints
//!   (UNIX connect, listen()) also failed to attach without it (measured
//!   in the guests; perf_event_open refused), unlike on 6.18.
//! - CAP_SYSLOG: /proc/kallsyms shows the address of `__per_cpu_offset`
//!   (which the SYN-stage programs need to read this CPU's SNMP counters)
//!   only to it, unless kernel.perf_event_paranoid <= 1. Needed only on
//!   kernels where the SYN-stage hooks (kprobe, fentry) attach.
//!
//! Kernels before 5.11 charge maps to RLIMIT_MEMLOCK: the agent raises it
//! when it can (CAP_SYS_RESOURCE); a unit gives `LimitMEMLOCK=infinity`
//! instead, so CAP_SYS_RESOURCE is not in the set.

use std::{fs, io};

use thiserror::Error;

/// One capability the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
    /// Kept after attaching: the run itself needs it.
    pub at_run_time: bool,
    /// What is lost without it, for warnings.
    pub without: &'static str,
}

pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_SETPCAP: u32 = 8;
pub const CAP_SYS_PTRACE: u32 = 19;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYSLOG: u32 = 34;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// The minimal set, in the order units list it. deploy/ (the systemd unit
/// and the DaemonSet) must grant exactly these; a test checks it.
pub const MINIMAL: &[Capability] = &[
    Capability {
        name: "CAP_BPF",
        bit: CAP_BPF,
        at_run_time: false,
        without: "no program can be loaded",
    },
    Capability {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        at_run_time: false,
        without: "no tracing program can be attached",
    },
    Capability {
        name: "CAP_DAC_READ_SEARCH",
        bit: CAP_DAC_READ_SEARCH,
        at_run_time: true,
        without: "tracefs (root-only) and other users' /proc/PID/fd cannot be read",
    },
    Capability {
        name: "CAP_SYS_PTRACE",
        bit: CAP_SYS_PTRACE,
        at_run_time: true,
        without: "processes of other users will not be attributed and their network \
                  namespaces cannot be entered",
    },
    Capability {
        name: "CAP_SYS_ADMIN",
        bit: CAP_SYS_ADMIN,
        at_run_time: true,
        without: "network namespaces cannot be entered (setns): their sysctls, UNIX \
                  listener paths and counted drops stay unknown; some kernels refuse \
                  syscall tracepoints without it",
    },
    Capability {
        name: "CAP_SYSLOG",
        bit: CAP_SYSLOG,
        at_run_time: false,
        without: "/proc/kallsyms hides __per_cpu_offset: SYN-stage drops cannot be \
                  classified where kprobe or fentry programs attach",
    },
];

/// The minimal set's names, for units and messages.
pub fn minimal_names() -> Vec<&'static str> {
    MINIMAL.iter().map(|c| c.name).collect()
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CapsError {
    #[error(
        "missing capability {missing}: {why}; run it as root (`sudo backlog-agent`) or grant {all}"
    )]
    Missing {
        missing: String,
        why: &'static str,
        all: String,
    },
    #[error("cannot give up capabilities ({0})")]
    Drop(String),
}

/// A capability set as the kernel's bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn has(self, bit: u32) -> bool {
        self.0 & (1 << bit) != 0
    }

    /// Names of the minimal set's members in this set.
    pub fn names(self) -> Vec<&'static str> {
        MINIMAL
            .iter()
            .filter(|c| self.has(c.bit))
            .map(|c| c.name)
            .collect()
    }
}

/// The effective set from /proc/self/status text (`CapEff:`); empty when
/// it cannot be read.
pub fn effective(status: &str) -> CapSet {
    CapSet(
        status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(0),
    )
}

/// Fails, naming the first missing capability, when programs cannot be
/// loaded and attached. CAP_SYS_ADMIN alone also serves (it implies
/// CAP_BPF and CAP_PERFMON for the bpf() and perf_event_open() checks).
pub fn check_start_up(caps: CapSet) -> Result<(), CapsError> {
    if caps.has(CAP_SYS_ADMIN) {
        return Ok(());
    }
    match MINIMAL
        .iter()
        .filter(|c| c.bit == CAP_BPF || c.bit == CAP_PERFMON)
        .find(|c| !caps.has(c.bit))
    {
        None => Ok(()),
        Some(cap) => Err(CapsError::Missing {
            missing: cap.name.to_owned(),
            why: cap.without,
            all: minimal_names().join(" "),
        }),
    }
}

/// One warning per member of the minimal set that is missing but not
/// fatal, saying what is lost.
pub fn warnings(caps: CapSet) -> Vec<String> {
    MINIMAL
        .iter()
        .filter(|c| c.bit != CAP_BPF && c.bit != CAP_PERFMON && !caps.has(c.bit))
        .map(|c| format!("no {}: {}", c.name, c.without))
        .collect()
}

/// What is kept after attaching: the run-time members the process has.
pub fn run_time_set(caps: CapSet) -> CapSet {
    CapSet(
        MINIMAL
            .iter()
            .filter(|c| c.at_run_time && caps.has(c.bit))
            .fold(0, |mask, c| mask | (1 << c.bit)),
    )
}

/// Gives up every capability but `keep`, for good: the bounding set
/// (where CAP_SETPCAP allows it), the permitted, effective, inheritable
/// and ambient sets, and no_new_privs so that nothing can regain them.
///
/// Capabilities are per thread: this must run while the process has one
/// thread (the agent's runtime is single-threaded; the threads it starts
/// later for setns inherit the reduced set).
pub fn drop_all_but(keep: CapSet, caps: CapSet) -> Result<(), CapsError> {
    let err = |what: &str| CapsError::Drop(format!("{what}: {}", io::Error::last_os_error()));
    if caps.has(CAP_SETPCAP) {
        let last = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(40);
        for bit in (0..=last).filter(|&bit| !keep.has(bit)) {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, bit as libc::c_ulong, 0, 0, 0) } != 0 {
                return Err(err("PR_CAPBSET_DROP"));
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(err("PR_CAP_AMBIENT_CLEAR_ALL"));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(err("PR_SET_NO_NEW_PRIVS"));
    }
    capset(keep)
}

/// capset(2), version 3 (64-bit sets): permitted = effective = `keep`,
/// inheritable empty. libc has no wrapper, hence the raw syscall.
fn capset(keep: CapSet) -> Result<(), CapsError> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let low = keep.0 as u32;
    let high = (keep.0 >> 32) as u32;
    let data = [
        Data {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        Data {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: header and data are valid for the kernel to read (version 3
    // takes two Data elements) and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if rc != 0 {
        return Err(CapsError::Drop(format!(
            "capset: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(bits: &[u32]) -> CapSet {
        CapSet(bits.iter().fold(0, |m, b| m | (1 << b)))
    }

    #[test]
    fn reads_the_effective_set() {
        assert_eq!(
            effective("Name:\tx\nCapEff:\t000001ffffffffff\n").0,
            0x1ff_ffff_ffff
        );
        assert_eq!(effective("").0, 0);
        assert_eq!(effective("CapEff:\tzz\n").0, 0);
    }

    #[test]
    fn start_up_names_the_missing_capability() {
        assert_eq!(check_start_up(set(&[CAP_BPF, CAP_PERFMON])), Ok(()));
        assert_eq!(check_start_up(set(&[CAP_SYS_ADMIN])), Ok(()));
        for (caps, missing) in [
            (set(&[CAP_BPF]), "CAP_PERFMON"),
            (set(&[CAP_PERFMON, CAP_SYS_PTRACE]), "CAP_BPF"),
            (set(&[]), "CAP_BPF"),
        ] {
            let err = check_start_up(caps).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("missing capability {missing}:")),
                "{err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn warns_about_each_missing_run_time_capability() {
        let all = set(&MINIMAL.iter().map(|c| c.bit).collect::<Vec<_>>());
        assert!(warnings(all).is_empty());
        let w = warnings(set(&[CAP_BPF, CAP_PERFMON]));
        for name in [
            "CAP_DAC_READ_SEARCH",
            "CAP_SYS_PTRACE",
            "CAP_SYS_ADMIN",
            "CAP_SYSLOG",
        ] {
            assert!(
                w.iter().any(|l| l.starts_with(&format!("no {name}:"))),
                "{w:?}"
            );
        }
    }

    #[test]
    fn keeps_only_run_time_capabilities_it_has() {
        let root = CapSet(0x1ff_ffff_ffff);
        assert_eq!(
            run_time_set(root),
            set(&[CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN])
        );
        assert_eq!(
            run_time_set(set(&[CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE])),
            set(&[CAP_SYS_PTRACE])
        );
    }
}
