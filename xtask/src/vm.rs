//! `cargo xtask vm-test`: boot Debian kernels in qemu and run the privileged
//! tests inside them.
//!
//! This machine's own kernel refuses fentry and has no kprobes, so the
//! kprobe and fentry attach paths can only be exercised in guests. Each guest
//! boots a Debian cloud kernel (BTF, kprobes, fentry, virtio and a serial
//! console are built in, so no modules are needed) with a small busybox
//! initramfs that runs the test binaries and reports through the serial
//! console.
//!
//! Everything lands under `target/vm/`:
//! - `apt/<suite>/`: private apt state for suites this machine does not
//!   carry (bullseye for 5.10); lists are refreshed when older than a day.
//! - `kernels/<package>/vmlinuz`: extracted kernels. A kernel that is here
//!   is never downloaded again. Resolution of the newest package still runs
//!   on every invocation (a second or two from the local lists); when it
//!   cannot (offline, no lists), the newest cached kernel of the series is
//!   used with a warning.
//! - `initramfs.cpio`: rebuilt on every run (cheap).
//! - `logs/<kernel>.log`: the serial console of each guest.

mod apt;
mod guest;
mod initramfs;
mod matrix;
mod payload;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use self::apt::{KernelSpec, ResolvedKernel};
use self::guest::{GuestOutcome, GuestRun};

/// Kernel series booted when no `--kernel` is given: the oldest kernel we
/// support (bullseye's 5.10, first with BTF in Debian), bookworm's 6.1 and
/// 6.12, and the newest Debian ships (7.3, trixie-backports), where all
/// three hook families exist.
const DEFAULT_KERNELS: &[&str] = &["5.10", "6.1", "6.12", "7.3"];

/// Software emulation (TCG) boots in seconds but runs the tests slowly.
const DEFAULT_TIMEOUT_SECS: u64 = 600;

#[derive(clap::Args, Default, Debug)]
pub struct VmTestOpts {
    /// Kernel to boot: a series (5.10, 6.1, 6.12, 7.3; the newest Debian
    /// cloud kernel of it is used) or a full package name such as
    /// linux-image-6.1.0-50-cloud-amd64. Repeatable. Default: 5.10, 6.1,
    /// 6.12 and 7.3.
    #[arg(long, value_name = "NAME")]
    pub kernel: Vec<String>,

    /// Run this executable in each guest (with no arguments) instead of the
    /// backlog-agent integration tests. Repeatable. For working on the
    /// harness itself.
    #[arg(long, value_name = "PATH")]
    pub test_bin: Vec<PathBuf>,

    /// Run the flood benchmark (benches/flood.rs) in the guests instead of
    /// the tests: figures on kernels where every drop kind is traced.
    #[arg(long, conflicts_with = "test_bin")]
    pub bench: bool,

    /// Seconds each guest may run before it is killed and counted as failed
    /// [default: 600].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
}

pub fn vm_test(opts: &VmTestOpts) -> Result<()> {
    let vm_dir = crate::workspace_root().join("target/vm");
    let timeout = Duration::from_secs(opts.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS));
    if timeout.is_zero() {
        bail!("--timeout must be at least 1 second");
    }

    // Parse every kernel name before spending minutes on builds.
    let names: Vec<&str> = if opts.kernel.is_empty() {
        DEFAULT_KERNELS.to_vec()
    } else {
        opts.kernel.iter().map(String::as_str).collect()
    };
    let mut specs: Vec<KernelSpec> = Vec::new();
    for name in names {
        let spec = KernelSpec::parse(name)?;
        if !specs.iter().any(|s| s.label == spec.label) {
            specs.push(spec);
        }
    }

    crate::outside::locate("qemu-system-x86_64").map_err(anyhow::Error::msg)?;

    let payload = if opts.bench {
        payload::build_bench()?
    } else if opts.test_bin.is_empty() {
        payload::build_default()?
    } else {
        payload::from_test_bins(&opts.test_bin)?
    };

    let initrd = vm_dir.join("initramfs.cpio");
    let started = Instant::now();
    initramfs::build(&payload, &initrd)?;
    println!(
        "vm-test: initramfs {} ({} MiB, {} test binaries) in {:.1}s",
        display_rel(&initrd),
        std::fs::metadata(&initrd).map_or(0, |m| m.len() >> 20),
        payload.runs.len(),
        started.elapsed().as_secs_f64()
    );

    // Resolve and fetch every kernel first: a typo or a missing package is
    // reported before any guest spends minutes booting. A kernel that cannot
    // be fetched is a failed guest, not the end of the run.
    let mut apt = apt::Apt::new(&vm_dir)?;
    let mut prepared: Vec<(KernelSpec, Result<ResolvedKernel>)> = Vec::new();
    for spec in specs {
        let kernel = apt.fetch(&spec);
        if let Err(err) = &kernel {
            eprintln!("vm-test: {}: {err:#}", spec.label);
        }
        prepared.push((spec, kernel));
    }

    let logs = vm_dir.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    let mut outcomes: Vec<GuestOutcome> = Vec::new();
    for (spec, kernel) in prepared {
        let outcome = match kernel {
            Ok(kernel) => {
                let log = logs.join(format!("{}.log", spec.label));
                let kernel_initrd = vm_dir.join(format!("initramfs-{}.cpio", spec.label));
                if let Err(err) = initramfs::with_modules(&initrd, &kernel.modules, &kernel_initrd)
                {
                    outcomes.push(GuestOutcome::not_booted(&spec.label, format!("{err:#}")));
                    continue;
                }
                println!(
                    "vm-test: booting {} ({}), console in {}",
                    spec.label,
                    kernel.package,
                    display_rel(&log)
                );
                guest::run(&GuestRun {
                    label: &spec.label,
                    package: &kernel.package,
                    vmlinuz: &kernel.vmlinuz,
                    initrd: &kernel_initrd,
                    log: &log,
                    timeout,
                    check_support: !opts.bench && opts.test_bin.is_empty(),
                })
            }
            Err(err) => GuestOutcome::not_booted(&spec.label, format!("{err:#}")),
        };
        outcomes.push(outcome);
    }

    println!();
    print!("{}", matrix::render_table(&outcomes));
    println!();
    print!("{}", matrix::render_support(&outcomes));
    println!();
    print!("{}", matrix::render_summary(&outcomes));

    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|o| o.failure().map(|why| format!("{} ({why})", o.label)))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} guests failed: {}",
            failed.len(),
            outcomes.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// Paths relative to the workspace root read better in progress lines.
fn display_rel(path: &Path) -> String {
    let root = crate::workspace_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}
