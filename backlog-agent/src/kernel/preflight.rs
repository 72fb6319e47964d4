//! What must hold before anything is loaded, each failure a one-line
//! error that says what is missing and how to fix it (capabilities are
//! checked in caps.rs).

use std::{fs, path::Path};

use thiserror::Error;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "kernel BTF not found at {VMLINUX_BTF}: this kernel was built without \
         CONFIG_DEBUG_INFO_BTF=y, which backlog needs to find struct offsets"
    )]
    NoBtf,
}

pub fn self_status() -> String {
    fs::read_to_string("/proc/self/status").unwrap_or_default()
}

/// Set (to anything) to have start-up print its memory after each step:
/// `BACKLOG_MEMORY_PHASES=1 backlog-agent`. The memory bench sets it to
/// show where the start-up peak (VmHWM) is reached.
pub const MEMORY_PHASES_ENV: &str = "BACKLOG_MEMORY_PHASES";

/// When MEMORY_PHASES_ENV is set, one note with the resident set now and
/// its peak so far. VmHWM only grows, so the step after which it jumps is
/// the step that made the peak.
pub fn memory_phase(step: &str) {
    if std::env::var_os(MEMORY_PHASES_ENV).is_none() {
        return;
    }
    let status = self_status();
    let kb = |field: &str| status_kb(&status, field).unwrap_or(0);
    crate::report::note(format_args!(
        "memory: after {step}: VmRSS {} kB (anon {}, file {}), VmHWM {} kB{}",
        kb("VmRSS"),
        kb("RssAnon"),
        kb("RssFile"),
        kb("VmHWM"),
        heap_figures()
    ));
}

/// What glibc's malloc holds: in use, free but kept, and in mappings of
/// their own; the gap between RssAnon and "in use" is what it keeps.
#[cfg(target_env = "gnu")]
fn heap_figures() -> String {
    // SAFETY: mallinfo2 has no preconditions (glibc 2.33+; Debian 12 has 2.36).
    let info = unsafe { libc::mallinfo2() };
    format!(
        "; malloc: in use {} kB, free kept {} kB, mapped {} kB",
        (info.uordblks + info.hblkhd) / 1024,
        info.fordblks / 1024,
        info.hblkhd / 1024
    )
}

#[cfg(not(target_env = "gnu"))]
fn heap_figures() -> String {
    String::new()
}

/// A "Field:   123 kB" line of /proc/PID/status, in kB.
fn status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub fn check_btf() -> Result<(), PreflightError> {
    if Path::new(VMLINUX_BTF).exists() {
        Ok(())
    } else {
        Err(PreflightError::NoBtf)
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it there so
/// the ring buffer fits. Later kernels account maps to the memory cgroup
/// and ignore the limit, so nothing is touched (or reported) on them.
/// Returns the error text when it was needed and could not be raised.
pub fn raise_memlock_limit(kernel_release: &str) -> Result<(), String> {
    if !release_before(kernel_release, (5, 11)) {
        return Ok(());
    }
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct is passed by reference.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// `uname -r` of the running kernel, e.g. "6.1.0-50-cloud-amd64".
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// True when `release` ("6.1.0-50-cloud-amd64") is older than
/// `(major, minor)`; an unparsable release counts as old (the safe side).
pub fn release_before(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(maj), Some(min)) => (maj, min) < (major, minor),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_fields_in_kb() {
        let status = "VmHWM:\t   37116 kB\nVmRSS:\t   14860 kB\nRssAnon:\t 1400 kB\n";
        assert_eq!(status_kb(status, "VmHWM"), Some(37116));
        assert_eq!(status_kb(status, "RssAnon"), Some(1400));
        assert_eq!(status_kb(status, "Vm"), None);
        assert_eq!(status_kb(status, "RssFile"), None);
    }

    #[test]
    fn compares_kernel_releases() {
        assert!(release_before("5.10.0-46-cloud-amd64", (5, 11)));
        assert!(!release_before("5.11.0", (5, 11)));
        assert!(!release_before("6.1.0-50-cloud-amd64", (5, 11)));
        assert!(!release_before("6.18.44-fc-v769", (6, 15)));
        assert!(release_before("6.12.100+deb12-cloud-amd64", (6, 15)));
        assert!(release_before("garbage", (5, 11)));
    }
}
