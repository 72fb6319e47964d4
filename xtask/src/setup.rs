//! Installs what building and testing need and is missing, and says what
//! and why. Everything is checked first, so a second run does nothing.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::run;

/// bpf-linker links the eBPF object; 0.13 is the release built against
/// LLVM 22, the LLVM of both rustc toolchains here (shared/toolchain.md).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages and why each is needed.
const PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "LLVM 22 to build bpf-linker"),
    (
        "libpolly-22-dev",
        "linked by LLVM 22 when building bpf-linker",
    ),
    ("libzstd-dev", "linked by LLVM 22 when building bpf-linker"),
    (
        "qemu-system-x86",
        "boots Debian kernels for the guest test matrix",
    ),
    (
        "busybox-static",
        "the shell and tools inside the guests' initramfs",
    ),
    (
        "iproute2",
        "`ip`: the benchmark's SYN flood assigns 198.18.0.1 inside its namespace",
    ),
    (
        "bpftrace",
        "the benchmark's comparison: the same question as a bpftrace one-liner",
    ),
];

pub fn ensure_all() -> Result<()> {
    ensure_packages()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn say(message: &str) {
    eprintln!("setup: {message}");
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn ensure_packages() -> Result<()> {
    let missing: Vec<_> = PACKAGES.iter().filter(|(p, _)| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for (package, why) in &missing {
        say(&format!("installing {package}: {why}"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let names: Vec<_> = missing.iter().map(|(p, _)| *p).collect();
        bail!(
            "missing Debian packages and not root: run `sudo apt-get install {}`",
            names.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing.iter().map(|(p, _)| *p))
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("rustup not found: install rustup with a stable and a nightly toolchain")?;
    if !out.status.success() {
        bail!(
            "no nightly toolchain (`rustup toolchain list`): the eBPF programs need nightly \
             for -Z build-std; install it with `rustup toolchain install nightly`"
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    say("installing rust-src for nightly: -Z build-std=core builds core for bpfel-unknown-none");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_bpf_linker() -> Result<()> {
    let current = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned());
    if current
        .as_deref()
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    say(&format!(
        "installing bpf-linker {BPF_LINKER_VERSION} (links the eBPF object; about a minute)"
    ));
    run(crate::cargo()
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX))
}
