//! Developer tasks: `cargo xtask setup|run|test|vm-test|bench|dist`.
//!
//! README.md promises a newcomer two commands (`cargo xtask run`, `cargo
//! xtask test`); both start with `setup`, which installs only what is
//! missing, so they are safe to repeat.

// Both are shared with the integration tests (`#[path]`), which use the
// parts xtask does not.
mod dist;
#[allow(dead_code)]
mod outside;
mod setup;
#[allow(dead_code)]
mod support;
mod vm;

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test backlog")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what run, test, bench and vm-test need and is missing, as
    /// xtask/outside-programs.tsv lists it (Debian packages, nightly's
    /// rust-src, bpf-linker). Idempotent.
    Setup {
        /// List what is missing and install nothing; exit 1 when something
        /// is missing.
        #[arg(long)]
        check: bool,
    },
    /// Set up, build the agent and run it with the given arguments.
    Run {
        /// Arguments passed to backlog-agent (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the whole test suite: fmt, clippy, unit and
    /// privileged host tests, and the guest kernel matrix (x86_64, then
    /// the aarch64 guest).
    Test {
        /// Skip the qemu guest matrix (host tests only).
        #[arg(long)]
        no_vm: bool,
    },
    /// Boot Debian kernels in qemu and run the privileged tests inside.
    VmTest(vm::VmTestOpts),
    /// Set up, then run the benchmarks: floods of listen-queue drops (the
    /// final-ACK flood, the spoofed-source SYN flood), a UNIX EAGAIN storm
    /// with and without the agent (and bpftrace), the agent's hot path, and
    /// its memory with 10,000 listeners and processes; figures, not part of
    /// the tests.
    Bench,
    /// Set up, then build the static release binaries (x86_64 and aarch64,
    /// musl, eBPF object embedded) into target/dist/ with SHA256SUMS.
    Dist,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { check: true } => setup::check(),
        Task::Setup { check: false } => setup::ensure(None),
        Task::Run { args } => run_agent(&args),
        Task::Test { no_vm } => test_all(no_vm),
        Task::VmTest(opts) => setup::ensure(Some("vm-test")).and_then(|()| vm::vm_test(&opts)),
        Task::Bench => setup::ensure(Some("bench")).and_then(|()| {
            // The TCP floods, the UNIX storm side by side with bpftrace
            // (and the many-listeners case), then the agent's hot path.
            for bench in ["flood", "syn_flood", "storm", "hot_path", "memory"] {
                run(cargo().args(["bench", "--package", "backlog-agent", "--bench", bench]))?;
            }
            Ok(())
        }),
        Task::Dist => setup::ensure(Some("dist")).and_then(|()| dist::dist()),
    };
    if let Err(err) = result {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

/// Runs a command and fails with its command line when it does not succeed.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run_agent(args: &[String]) -> Result<()> {
    setup::ensure(Some("run"))?;
    run(cargo().args(["build", "--release", "--package", "backlog-agent"]))?;
    let agent = workspace_root().join("target/release/backlog-agent");
    // exec-like: hand over the agent's exit status so Ctrl-C behaves as if
    // the agent had been started directly.
    let status = Command::new(&agent)
        .args(args)
        .status()
        .with_context(|| format!("failed to start {}", agent.display()))?;
    std::process::exit(status.code().unwrap_or(1));
}

fn test_all(no_vm: bool) -> Result<()> {
    setup::ensure(Some("test"))?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The eBPF crate only builds for the BPF target (its panic handler
    // clashes with std on the host), so it is linted there, with nightly.
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "backlog-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(Command::new("cargo")
        .current_dir(workspace_root().join("backlog-ebpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([
            "+nightly",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    // Privileged tests change sysctls and count kernel events system-wide,
    // so they must not overlap: one test thread.
    // The eBPF crate has no host build (see the clippy step above).
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "backlog-ebpf",
        "--",
        "--test-threads=1",
    ]))?;
    if !no_vm {
        let x86 = vm::vm_test(&vm::VmTestOpts::default());
        // The aarch64 build on Debian's arm64 6.12 (about 5.5 minutes under
        // software emulation here), run even when an x86 guest failed so
        // that one CI run shows both.
        let arm = vm::vm_test(&vm::VmTestOpts {
            arch: vm::Arch::Aarch64,
            ..vm::VmTestOpts::default()
        });
        match (x86, arm) {
            (Ok(()), Ok(())) => {}
            (Err(err), Ok(())) | (Ok(()), Err(err)) => return Err(err),
            (Err(x86), Err(arm)) => {
                bail!("x86_64 guests: {x86:#}; aarch64 guest: {arm:#}")
            }
        }
    }
    Ok(())
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}
