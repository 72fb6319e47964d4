//! Run time and run count of the agent's own eBPF programs, as the kernel
//! keeps them while its accounting is on (off by default: it costs a clock
//! read per run): `kernel.bpf_stats_enabled=1`, or while some process
//! holds a bpf(BPF_ENABLE_STATS) fd, which that sysctl does not show (it
//! reads back only what was written to it).
//!
//! aya 0.14's `ProgramInfo` does not expose `run_time_ns`/`run_cnt`, so
//! they are read with bpf(BPF_OBJ_GET_INFO_BY_FD) on each program's fd,
//! into the uapi `bpf_prog_info` that aya-obj's generated bindings define.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya_obj::generated::{bpf_cmd, bpf_prog_info};

const BPF_STATS_ENABLED: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_time_ns: u64,
    pub run_count: u64,
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
