//! Run time and run count of the agent's own eBPF programs, as the kernel
//! keeps them while its accounting is on (off by default: it costs a clock
//! read per run): `kernel.bpf_stats_enabled=1`, or while some process
//! holds a bpf(BPF_ENABLE_STATS) fd, which that sysctl does not show (it
//! reads back only what was written to it).
//!
//! aya 0.14's `ProgramInfo` does not expose `run_time_ns`/`run_cnt`, so
//! they are read with bpf(BPF_OBJ_GET_INFO_BY_FD) on each program's fd,
//! into the uapi `bpf_prog_info` that aya-obj's generated bindings define.
//!
//! The same record carries `recursion_misses`, counted whatever that
//! sysctl says: runs the kernel skipped because the program would have
//! nested in a BPF program already running on that CPU (for kprobe and
//! perf tracepoint programs, any such program: they share one per-CPU
//! guard). A skipped run saw nothing, so the agent reports them
//! (`Skipped`) next to what each program observes.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::programs::ProgramFd;
use aya_obj::generated::{bpf_cmd, bpf_prog_info};

const BPF_STATS_ENABLED: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
}

/// Runs of one program the kernel skipped since it was loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub program: String,
    pub runs: u64,
}

/// The fds of the loaded programs, kept past detaching: a program stays
/// in the kernel, with its counts, while an fd to it is open, so its last
/// skips can be read after its links are gone (`skipped_held`).
pub struct Held(Vec<(String, ProgramFd)>);

/// Copies of the fds of every loaded program of `ebpf`.
pub fn hold(ebpf: &aya::Ebpf) -> Held {
    Held(
        ebpf.programs()
            .filter_map(|(name, program)| {
                let fd = program.fd().ok()?.try_clone().ok()?;
                Some((name.to_owned(), fd))
            })
            .collect(),
    )
}

/// The programs of `ebpf` whose runs the kernel skipped, by name; an fd
/// that cannot be asked is said as an error.
pub fn skipped(ebpf: &aya::Ebpf) -> Result<Vec<Skipped>, String> {
    skipped_of(
        ebpf.programs()
            .filter_map(|(name, program)| program.fd().ok().map(|fd| (name, fd.as_fd()))),
    )
}

/// `skipped` of held fds.
pub fn skipped_held(held: &Held) -> Result<Vec<Skipped>, String> {
    skipped_of(held.0.iter().map(|(name, fd)| (name.as_str(), fd.as_fd())))
}

fn skipped_of<'a>(
    programs: impl Iterator<Item = (&'a str, BorrowedFd<'a>)>,
) -> Result<Vec<Skipped>, String> {
    let mut out = Vec::new();
    for (name, fd) in programs {
        let info = prog_info(fd).map_err(|err| format!("program {name}: {err}"))?;
        if info.recursion_misses > 0 {
            out.push(Skipped {
                program: name.to_owned(),
                runs: info.recursion_misses,
            });
        }
    }
    out.sort_by(|a, b| a.program.cmp(&b.program));
    Ok(out)
}

/// Whether kernel.bpf_stats_enabled is 1.
pub fn sysctl_enabled() -> bool {
    std::fs::read_to_string(BPF_STATS_ENABLED).is_ok_and(|v| v.trim() == "1")
}

/// The stats of the loaded programs of `ebpf`, or none while the kernel
/// has accounted no run at all (its accounting has been off).
pub fn accounted(ebpf: &aya::Ebpf) -> Vec<ProgramStats> {
    let programs = programs(ebpf);
    if programs.iter().any(|p| p.run_count > 0) || sysctl_enabled() {
        programs
    } else {
        Vec::new()
    }
}

/// The stats of every loaded program of `ebpf` (programs never loaded, or
/// unloaded after a failed attach, have no fd and are left out).
fn programs(ebpf: &aya::Ebpf) -> Vec<ProgramStats> {
    let mut out: Vec<ProgramStats> = ebpf
        .programs()
        .filter_map(|(name, program)| {
            let fd = program.fd().ok()?;
            let info = prog_info(fd.as_fd()).ok()?;
            Some(ProgramStats {
                name: name.to_owned(),
                run_time_ns: info.run_time_ns,
                run_count: info.run_cnt,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The `info` member of `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn prog_info(fd: BorrowedFd<'_>) -> std::io::Result<bpf_prog_info> {
    // SAFETY: bpf_prog_info is plain integers and arrays; all-zero is valid.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let attr = InfoByFdAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<bpf_prog_info>() as u32,
        info: (&mut info as *mut bpf_prog_info) as u64,
    };
    // SAFETY: the attr points at a live, writable bpf_prog_info of the
    // length it gives; the kernel writes at most that many bytes (fewer on
    // an older kernel with a shorter struct, leaving zeros).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &attr as *const InfoByFdAttr,
            std::mem::size_of::<InfoByFdAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}
