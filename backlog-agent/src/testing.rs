//! Test-only helpers for the unit tests: the one way a unit test skips,
//! and the builders more than one module's tests need.
//! Under CI=true (and in the qemu guests) a skip is a failure, as in the
//! integration tests (tests/common): a green CI run must mean the test ran.

/// Says why the test does not run and returns, or panics under CI.
pub(crate) fn skip(test: &str, why: &str) {
    let must_run = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var_os("BACKLOG_IN_GUEST").is_some();
    if must_run {
        panic!("{test}: {why}; a test may not skip under CI");
    }
    eprintln!("SKIPPED {test}: {why}");
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The kernel's UNIX totals key for `path` (its bytes as given, NUL
/// included if there is one) in `netns`.
pub(crate) fn unix_total_key(netns: u32, path: &[u8]) -> backlog_common::UnixTotalKey {
    let mut key = backlog_common::UnixTotalKey::ZERO;
    key.netns_inode = netns;
    key.path[..path.len()].copy_from_slice(path);
    key.path_len = path.len() as u32;
    key
}
