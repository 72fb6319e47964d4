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
//! - `apt/<suite>-arm64/`: the same for arm64 packages (kernels and
//!   busybox-static of the `--arch aarch64` guests), whatever suite.
//! - `busybox/<arch>/busybox`: the guests' busybox for a foreign
//!   architecture (the host's own busybox-static serves x86_64).
//! - `kernels/<package>/vmlinuz`: extracted kernels. A kernel that is here
//!   is never downloaded again. Resolution of the newest package still runs
//!   on every invocation (a second or two from the local lists); when it
//!   cannot (offline, no lists), the newest cached kernel of the series is
//!   used with a warning.
//! - `initramfs-<arch>.cpio`: rebuilt on every run (cheap), and per
//!   kernel `initramfs-<label>.cpio` with its modules appended.
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

/// The arm64 guest boots one series: under software emulation an arm64
/// guest costs as much as two x86 ones, and 6.12 is the series both
/// bookworm and the x86 matrix carry with every hook family.
const DEFAULT_KERNELS_AARCH64: &[&str] = &["6.12"];

/// The architecture of a guest: what the payload is built for, which
/// Debian kernel and busybox it gets, and which qemu emulates it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arch {
    #[default]
    #[value(name = "x86_64")]
    X86_64,
    #[value(name = "aarch64")]
    Aarch64,
}

impl Arch {
    /// The static musl target the payload is built for (what `cargo xtask
    /// dist` ships for this architecture).
    pub fn dist_target(self) -> &'static crate::dist::DistTarget {
        let triple = match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
        };
        crate::dist::TARGETS
            .iter()
            .find(|t| t.triple == triple)
            .expect("dist builds every vm-test architecture")
    }

    /// Debian's name of the architecture (package names, APT::Architecture).
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    pub fn qemu(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
        }
    }
}

/// Software emulation (TCG) boots in seconds but runs the tests slowly: the
/// 7.3 guest took 529-546 s on one day, over 600 s on another and over
/// 900 s on a third with other builds beside it (the whole suite passing
/// as far as it got, just slower), so the bound leaves room for a slow
/// host; a hung guest still ends.
const DEFAULT_TIMEOUT_SECS: u64 = 1500;

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

    /// Run the flood benchmarks (benches/flood.rs, benches/syn_flood.rs)
    /// and the UNIX EAGAIN storm (benches/storm.rs -- guest: the agent's
    /// defaults against --attach tracepoint) in the guests instead of the
    /// tests: figures on kernels where every drop kind is traced.
    #[arg(long, conflicts_with = "test_bin")]
    pub bench: bool,

    /// Seconds each guest may run before it is killed and counted as failed
    /// [default: 1500].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,

    /// Architecture of the guests: x86_64, or aarch64 (the static arm64
    /// agent and tests on Debian's arm64 cloud kernel, emulated by
    /// qemu-system-aarch64; default kernel 6.12).
    #[arg(long, value_enum, default_value_t = Arch::X86_64)]
    pub arch: Arch,
}

pub fn vm_test(opts: &VmTestOpts) -> Result<()> {
    let vm_dir = crate::workspace_root().join("target/vm");
    let timeout = Duration::from_secs(opts.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS));
    if timeout.is_zero() {
        bail!("--timeout must be at least 1 second");
    }

    // Parse every kernel name before spending minutes on builds.
    let arch = opts.arch;
    if arch != Arch::X86_64 && opts.bench {
        // The figures compare with host runs of the same glibc build.
        bail!("--bench runs x86_64 guests only");
    }
    let names: Vec<&str> = if opts.kernel.is_empty() {
        match arch {
            Arch::X86_64 => DEFAULT_KERNELS.to_vec(),
            Arch::Aarch64 => DEFAULT_KERNELS_AARCH64.to_vec(),
        }
    } else {
        opts.kernel.iter().map(String::as_str).collect()
    };
    let mut specs: Vec<KernelSpec> = Vec::new();
    for name in names {
        let spec = KernelSpec::parse(name, arch)?;
        if !specs.iter().any(|s| s.label == spec.label) {
            specs.push(spec);
        }
    }

    crate::outside::locate(arch.qemu()).map_err(anyhow::Error::msg)?;

    let payload = if opts.bench {
        payload::build_bench()?
    } else if opts.test_bin.is_empty() {
        payload::build_default(arch.dist_target())?
    } else {
        payload::from_test_bins(&opts.test_bin)?
    };

    let mut apt = apt::Apt::new(&vm_dir)?;
    let busybox = match arch {
        Arch::X86_64 => crate::outside::locate("busybox").map_err(anyhow::Error::msg)?,
        foreign => apt.busybox(foreign)?,
    };
    let initrd = vm_dir.join(format!("initramfs-{}.cpio", arch.debian()));
    let started = Instant::now();
    initramfs::build(&payload, &busybox, &initrd)?;
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
                    arch,
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
