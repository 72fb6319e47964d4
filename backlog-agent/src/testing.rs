//! Test-only helpers for the unit tests: the one way a unit test skips.
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
