//! Finding, downloading and caching Debian cloud kernels.
//!
//! Package names carry the kernel ABI (`linux-image-6.1.0-50-cloud-amd64`)
//! and move with every Debian point release, so the newest name is resolved
//! from apt's lists on every run instead of being written down here.
//!
//! Suites this machine's apt sources carry (bookworm here) are read from the
//! machine's own lists. Other suites (bullseye for 5.10) get a private apt
//! state under `target/vm/apt/<suite>/` whose sources list reuses the mirror
//! URIs of the machine's Debian entries with the suite names swapped, so no
//! mirror host name is written in this repository and the machine's lists
//! are left alone.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context as _, Result};

use super::Arch;

/// A kernel series we know how to find: the package name is
/// `prefix` + ABI or patch number + `suffix` + `-` + Debian architecture
/// (amd64, arm64).
pub struct Series {
    pub name: &'static str,
    suite: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

const SERIES: &[Series] = &[
    Series {
        name: "5.10",
        suite: "bullseye",
        prefix: "linux-image-5.10.0-",
        suffix: "-cloud",
    },
    Series {
        name: "6.1",
        suite: "bookworm",
        prefix: "linux-image-6.1.0-",
        suffix: "-cloud",
    },
    // bookworm carries 6.12 (from bookworm-security) next to its 6.1; the
    // `+deb12` keeps trixie's and the backports' 6.12 builds out.
    Series {
        name: "6.12",
        suite: "bookworm",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-cloud",
    },
    // The newest series Debian ships (checked 2026-11-30: trixie-backports
    // carries 7.3, sid 7.2): the first where fentry, kprobe and the
    // skb:kfree_skb TCP_LISTEN_OVERFLOW tracepoint all exist. Backports
    // keeps only its newest kernel, so when 7.4 replaces it this row and
    // the support table's 7.3 rows move on together.
    Series {
        name: "7.3",
        suite: "trixie-backports",
        prefix: "linux-image-7.3.",
        suffix: "+deb13-cloud",
    },
];

/// Where a foreign guest's busybox-static comes from: this machine's
/// release, so that its applets are those the host's busybox-static lists
/// (the initramfs links them; the foreign busybox cannot run here).
const BUSYBOX_SUITE: &str = "bookworm";

/// Suites searched, in this order, for a kernel given by full package name
/// that the machine's own lists do not know.
const FALLBACK_SUITES: &[&str] = &["bullseye", "bookworm", "trixie"];

/// Debian release names; any suite of the machine's sources that starts with
/// one of these (`bookworm`, `bookworm-updates`, `bookworm-security`) comes
/// from a Debian archive rather than a third-party repository.
const DEBIAN_CODENAMES: &[&str] = &[
    "buster",
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "duke",
    "sid",
    "oldoldstable",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

/// Holds the keys of every Debian release (bullseye's included); the
/// per-release keyrings next to it would only verify their own release.
const ARCHIVE_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Private lists older than this are refreshed; within it a run resolves
/// from the lists it already has (and works offline).
const PRIVATE_LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

pub struct KernelSpec {
    /// What the user asked for (with `-arm64` for an arm64 guest); names
    /// the log file and the table row.
    pub label: String,
    what: What,
    arch: Arch,
}

enum What {
    Series(&'static Series),
    Package(String),
}

impl KernelSpec {
    pub fn parse(name: &str, arch: Arch) -> Result<Self> {
        let what = if let Some(series) = SERIES.iter().find(|s| s.name == name) {
            What::Series(series)
        } else if name.starts_with("linux-image-")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.+~".contains(&b))
        {
            let suffix = format!("-{}", arch.debian());
            if !name.ends_with(&suffix) {
                bail!("kernel `{name}` is not an {} package (name ending in {suffix}): choose it with --arch", arch.debian());
            }
            What::Package(name.to_owned())
        } else {
            let known: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
            bail!(
                "unknown kernel `{name}`: use {} or a full package name (linux-image-...)",
                known.join(", ")
            );
        };
        // x86_64 labels stay as they were (the table rows and log names
        // people know); other architectures are marked.
        let label = match (arch, &what) {
            (Arch::X86_64, _) | (_, What::Package(_)) => name.to_owned(),
            (_, What::Series(_)) => format!("{name}-{}", arch.debian()),
        };
        Ok(Self { label, what, arch })
    }
}

pub struct ResolvedKernel {
    pub package: String,
    pub vmlinuz: PathBuf,
    /// Uncompressed modules to load in the guest (see GUEST_MODULES).
    pub modules: Vec<PathBuf>,
}

/// Modules the guest needs that Debian's cloud kernels build as modules:
/// sock_diag for TCP and UNIX listeners (`ss` relies on them too; a real
/// system loads them on demand, a bare initramfs cannot). In load order.
pub const GUEST_MODULES: [&str; 3] = ["inet_diag", "tcp_diag", "unix_diag"];

/// Where apt reads its lists from for one suite.
#[derive(Clone)]
enum AptState {
    /// The machine's own sources and lists.
    Host,
    /// `target/vm/apt/<suite>/`, or `<suite>-<arch>/` for a foreign
    /// architecture (`arch` is then Some).
    Private {
        suite: String,
        dir: PathBuf,
        arch: Option<&'static str>,
    },
}

impl AptState {
    /// The `-o` options that point apt at this state.
    fn options(&self) -> Vec<String> {
        match self {
            AptState::Host => Vec::new(),
            AptState::Private { dir, arch, .. } => [
                format!(
                    "Dir::Etc::SourceList={}",
                    dir.join("sources.list").display()
                ),
                // Without this the machine's sources.list.d would be read too.
                "Dir::Etc::SourceParts=/dev/null".to_owned(),
                format!("Dir::State::Lists={}", dir.join("lists").display()),
                format!("Dir::Cache={}", dir.join("cache").display()),
                // Only the Packages indices are needed; the appstream
                // metadata would add 4 MB per suite for nothing.
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            ]
            .into_iter()
            // A foreign architecture replaces the native one (and the
            // machine's foreign ones) in these lists only: the machine's
            // dpkg configuration is left alone.
            .chain(arch.iter().flat_map(|arch| {
                [
                    format!("APT::Architecture={arch}"),
                    format!("APT::Architectures={arch}"),
                ]
            }))
            .flat_map(|opt| ["-o".to_owned(), opt])
            .collect(),
        }
    }

    fn describe(&self) -> String {
        match self {
            AptState::Host => "this machine's apt lists".to_owned(),
            AptState::Private {
                suite, arch: None, ..
            } => format!("private apt lists for {suite}"),
            AptState::Private {
                suite,
                arch: Some(arch),
                ..
            } => format!("private {arch} apt lists for {suite}"),
        }
    }
}

/// URIs of the Debian archives named in the machine's apt sources.
struct Mirrors {
    archive: String,
    security: Option<String>,
}

pub struct Apt {
    apt_dir: PathBuf,
    busybox_dir: PathBuf,
    kernels_dir: PathBuf,
    /// Suites the machine's sources carry (`bookworm`, `bookworm-security`).
    host_suites: HashSet<String>,
    mirrors: Result<Mirrors, String>,
    /// States refreshed during this run: never refreshed twice.
    refreshed: HashSet<String>,
}

impl Apt {
    pub fn new(vm_dir: &Path) -> Result<Self> {
        let entries = host_index_targets()?;
        let host_suites = entries
            .iter()
            .filter(|e| e.target_of == "deb")
            .map(|e| e.suite.clone())
            .collect();
        Ok(Self {
            apt_dir: vm_dir.join("apt"),
            busybox_dir: vm_dir.join("busybox"),
            kernels_dir: vm_dir.join("kernels"),
            host_suites,
            // Only needed for suites the machine lacks; report it then.
            mirrors: debian_mirrors(&entries),
            refreshed: HashSet::new(),
        })
    }

    /// Resolves the spec to a package and makes sure its vmlinuz is cached.
    pub fn fetch(&mut self, spec: &KernelSpec) -> Result<ResolvedKernel> {
        match &spec.what {
            What::Series(series) => match self.newest(series, spec.arch) {
                Ok((package, state)) => self.download(&package, &state),
                // Offline, or the lists are gone: a cached kernel of the
                // series still lets the tests run.
                Err(err) => match self.newest_cached(series, spec.arch) {
                    Some(kernel) => {
                        eprintln!(
                            "vm-test: warning: {}: {err:#}; using cached {}",
                            series.name, kernel.package
                        );
                        Ok(kernel)
                    }
                    None => Err(err),
                },
            },
            What::Package(package) => {
                if let Some(kernel) = self.cached(package) {
                    println!("vm-test: {package}: cached");
                    return Ok(kernel);
                }
                let state = self.locate(package, spec.arch)?;
                self.download(package, &state)
            }
        }
    }

    /// A static busybox for a foreign guest, from Debian's busybox-static
    /// of [`BUSYBOX_SUITE`] for that architecture; downloaded once, then
    /// cached under `target/vm/busybox/<arch>/`.
    pub fn busybox(&mut self, arch: Arch) -> Result<PathBuf> {
        let dir = self.busybox_dir.join(arch.debian());
        let dest = dir.join("busybox");
        if dest.is_file() {
            return Ok(dest);
        }
        let state = self.state_for(BUSYBOX_SUITE, arch)?;
        let work = dir.join(".partial");
        if work.exists() {
            fs::remove_dir_all(&work)
                .with_context(|| format!("failed to remove {}", work.display()))?;
        }
        fs::create_dir_all(&work)
            .with_context(|| format!("failed to create {}", work.display()))?;
        let fetched = (|| -> Result<()> {
            capture(
                Command::new("apt-get")
                    .args(state.options())
                    .args(["-o", "APT::Sandbox::User=root"])
                    .args(["-q", "download", "busybox-static"])
                    .current_dir(&work),
                &format!("apt-get download busybox-static ({})", state.describe()),
            )?;
            let deb = find_file(&work, |name| name.ends_with(".deb"))
                .context("apt-get download busybox-static left no .deb")?;
            let root = work.join("root");
            capture(
                Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
                &format!("dpkg -x {}", deb.display()),
            )?;
            let busybox = root.join("bin/busybox");
            if !busybox.is_file() {
                bail!("{} has no bin/busybox", deb.display());
            }
            fs::rename(&busybox, &dest)
                .with_context(|| format!("failed to move {} into the cache", busybox.display()))
        })();
        if let Err(err) = fs::remove_dir_all(&work) {
            eprintln!(
                "vm-test: warning: failed to remove {}: {err}",
                work.display()
            );
        }
        fetched?;
        println!(
            "vm-test: busybox-static ({}) downloaded to {}",
            arch.debian(),
            super::display_rel(&dest)
        );
        Ok(dest)
    }

    /// The newest package of the series and the apt state that knows it.
    fn newest(&mut self, series: &Series, arch: Arch) -> Result<(String, AptState)> {
        let state = self.state_for(series.suite, arch)?;
        let mut names = self.package_names(&state, series, arch)?;
        if names.is_empty() && self.refreshed.insert(state_key(&state)) {
            // Empty or outdated lists (a fresh container has none). A source
            // that fails to refresh (a third-party one on the machine, say)
            // matters only if the kernel is still not found.
            if let Err(err) = self.update(&state) {
                eprintln!("vm-test: warning: {err:#}");
            }
            names = self.package_names(&state, series, arch)?;
        }
        names.sort_by(|a, b| natural_cmp(a, b));
        let newest = names.pop().ok_or_else(|| {
            anyhow!(
                "no package {}<N>{}-{} in {} ({})",
                series.prefix,
                series.suffix,
                arch.debian(),
                series.suite,
                state.describe()
            )
        })?;
        println!(
            "vm-test: {}: newest is {newest} ({})",
            series.name,
            state.describe()
        );
        Ok((newest, state))
    }

    fn package_names(&self, state: &AptState, series: &Series, arch: Arch) -> Result<Vec<String>> {
        let out = capture(
            Command::new("apt-cache")
                .args(state.options())
                .args(["pkgnames", series.prefix]),
            "apt-cache pkgnames",
        )?;
        // pkgnames matches a prefix only; `-dbg`, `-unsigned` and other
        // flavours share it.
        Ok(out
            .lines()
            .filter(|name| series_matches(series, arch, name))
            .map(str::to_owned)
            .collect())
    }

    /// Finds which apt state knows a package given by its full name.
    fn locate(&mut self, package: &str, arch: Arch) -> Result<AptState> {
        if arch == Arch::X86_64 && self.knows(&AptState::Host, package) {
            return Ok(AptState::Host);
        }
        // Try the suite the name points at first, to avoid refreshing
        // lists of suites that cannot have it.
        let hint = if package.contains("+deb13") {
            "trixie"
        } else if package.contains("+deb12") || package.starts_with("linux-image-6.1.0-") {
            "bookworm"
        } else {
            "bullseye"
        };
        let mut suites = vec![hint];
        suites.extend(FALLBACK_SUITES.iter().filter(|s| **s != hint));
        let mut tried = Vec::new();
        for suite in suites {
            if arch == Arch::X86_64 && self.host_suites.contains(suite) {
                continue;
            }
            let state = self.state_for(suite, arch)?;
            if self.knows(&state, package) {
                return Ok(state);
            }
            tried.push(suite);
        }
        bail!(
            "package {package} not found in this machine's apt lists nor in {}",
            tried.join(", ")
        )
    }

    fn knows(&self, state: &AptState, package: &str) -> bool {
        capture(
            Command::new("apt-cache").args(state.options()).args([
                "show",
                "--no-all-versions",
                package,
            ]),
            "apt-cache show",
        )
        .is_ok_and(|out| !out.trim().is_empty())
    }

    /// The apt state for a suite: the machine's if it carries the suite, a
    /// private one (set up and refreshed when stale) otherwise.
    fn state_for(&mut self, suite: &str, arch: Arch) -> Result<AptState> {
        // The machine is amd64: its lists hold amd64 packages only.
        let foreign = (arch != Arch::X86_64).then(|| arch.debian());
        if foreign.is_none() && self.host_suites.contains(suite) {
            return Ok(AptState::Host);
        }
        let mirrors = self.mirrors.as_ref().map_err(|err| anyhow!("{err}"))?;
        let dir = match foreign {
            None => self.apt_dir.join(suite),
            Some(arch) => self.apt_dir.join(format!("{suite}-{arch}")),
        };
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("failed to create {}", dir.join(sub).display()))?;
        }
        if !Path::new(ARCHIVE_KEYRING).exists() {
            bail!("{ARCHIVE_KEYRING} is missing: install debian-archive-keyring to verify {suite}");
        }
        let mut sources = format!(
            "# Written by `cargo xtask vm-test` from this machine's apt sources.\n\
             deb [signed-by={ARCHIVE_KEYRING}] {} {suite} main\n",
            mirrors.archive
        );
        // A release (bullseye) has a security suite; backports has none.
        let release = !suite.contains('-');
        match &mirrors.security {
            Some(security) if release => sources.push_str(&format!(
                "deb [signed-by={ARCHIVE_KEYRING}] {security} {suite}-security main\n"
            )),
            Some(_) => {}
            None => eprintln!(
                "vm-test: warning: no Debian security archive in this machine's apt sources; \
                 {suite}'s newest kernels (published there) will be missed"
            ),
        }
        let list_path = dir.join("sources.list");
        let changed = fs::read_to_string(&list_path).ok().as_deref() != Some(sources.as_str());
        if changed {
            fs::write(&list_path, &sources)
                .with_context(|| format!("failed to write {}", list_path.display()))?;
        }

        let state = AptState::Private {
            suite: suite.to_owned(),
            dir: dir.clone(),
            arch: foreign,
        };
        let stamp = dir.join("updated");
        let age = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        let fresh = !changed && age.is_some_and(|age| age < PRIVATE_LISTS_MAX_AGE);
        if !fresh && self.refreshed.insert(state_key(&state)) {
            match self.update(&state) {
                Ok(()) => {
                    fs::write(&stamp, b"")
                        .with_context(|| format!("failed to write {}", stamp.display()))?;
                }
                // Stale lists beat no lists when the mirror is unreachable.
                Err(err) if age.is_some() && !changed => {
                    eprintln!(
                        "vm-test: warning: {err:#}; using the {suite} lists from an earlier run"
                    );
                }
                Err(err) => return Err(err),
            }
        }
        Ok(state)
    }

    fn update(&self, state: &AptState) -> Result<()> {
        let started = Instant::now();
        capture(
            Command::new("apt-get")
                .args(state.options())
                // Without it apt-get exits 0 when every fetch failed (it keeps
                // the old lists), and a failed refresh would look fresh.
                .args(["-q", "update", "--error-on=any"]),
            &format!("apt-get update ({})", state.describe()),
        )?;
        println!(
            "vm-test: apt-get update ({}) in {:.1}s",
            state.describe(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn cached(&self, package: &str) -> Option<ResolvedKernel> {
        let dir = self.kernels_dir.join(package);
        let vmlinuz = dir.join("vmlinuz");
        // A cache entry from before modules were kept is incomplete.
        let modules: Vec<PathBuf> = GUEST_MODULES
            .iter()
            .map(|m| dir.join("modules").join(format!("{m}.ko")))
            .collect();
        (vmlinuz.is_file() && modules.iter().all(|m| m.is_file())).then(|| ResolvedKernel {
            package: package.to_owned(),
            vmlinuz,
            modules,
        })
    }

    fn newest_cached(&self, series: &Series, arch: Arch) -> Option<ResolvedKernel> {
        let mut names: Vec<String> = fs::read_dir(&self.kernels_dir)
            .ok()?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| series_matches(series, arch, name))
            .collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names.iter().rev().find_map(|name| self.cached(name))
    }

    /// Downloads the package unless its vmlinuz is cached, and keeps only
    /// the vmlinuz and its config (the modules are not needed: the cloud
    /// kernels build in everything a test guest uses).
    fn download(&self, package: &str, state: &AptState) -> Result<ResolvedKernel> {
        if let Some(kernel) = self.cached(package) {
            println!("vm-test: {package}: cached");
            return Ok(kernel);
        }
        let started = Instant::now();
        let work = self.kernels_dir.join(format!(".partial-{package}"));
        if work.exists() {
            fs::remove_dir_all(&work)
                .with_context(|| format!("failed to remove {}", work.display()))?;
        }
        fs::create_dir_all(&work)
            .with_context(|| format!("failed to create {}", work.display()))?;
        let fetched = self.download_into(package, state, &work);
        // The .deb and the extracted tree (modules included) are not needed
        // once vmlinuz is in place, nor after a failure.
        if let Err(err) = fs::remove_dir_all(&work) {
            eprintln!(
                "vm-test: warning: failed to remove {}: {err}",
                work.display()
            );
        }
        let (_, deb_size) = fetched?;
        println!(
            "vm-test: {package}: downloaded ({} MiB) and extracted in {:.1}s",
            deb_size >> 20,
            started.elapsed().as_secs_f64()
        );
        self.cached(package)
            .with_context(|| format!("{package}: the cache entry is incomplete after download"))
    }

    /// Downloads and unpacks the package in `work` and moves its vmlinuz
    /// (and config) into the cache; returns the cached vmlinuz and the size
    /// of the .deb.
    fn download_into(
        &self,
        package: &str,
        state: &AptState,
        work: &Path,
    ) -> Result<(PathBuf, u64)> {
        // From 6.16 Debian's linux-image-* is an empty package depending
        // on linux-binary-* (vmlinuz), linux-modules-* and linux-base-*
        // (config): fetch those too.
        let mut packages = vec![package.to_owned()];
        packages.extend(split_parts(&capture(
            Command::new("apt-cache").args(state.options()).args([
                "show",
                "--no-all-versions",
                package,
            ]),
            &format!("apt-cache show {package}"),
        )?));
        capture(
            Command::new("apt-get")
                .args(state.options())
                // apt's unprivileged `_apt` download user cannot write into
                // the workspace; without this apt warns and falls back anyway.
                .args(["-o", "APT::Sandbox::User=root"])
                .args(["-q", "download"])
                .args(&packages)
                .current_dir(work),
            &format!(
                "apt-get download {} ({})",
                packages.join(" "),
                state.describe()
            ),
        )?;
        let root = work.join("root");
        let mut deb_size = 0;
        for entry in fs::read_dir(work)
            .with_context(|| format!("failed to read {}", work.display()))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".deb"))
        {
            let deb = entry.path();
            deb_size += fs::metadata(&deb).map_or(0, |m| m.len());
            capture(
                Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
                &format!("dpkg -x {}", deb.display()),
            )?;
        }
        if deb_size == 0 {
            bail!("apt-get download {package} left no .deb");
        }
        // boot/vmlinuz-<version> up to 6.12; usr/lib/modules/<version>/
        // vmlinuz (and config) in the split packages.
        let boot = find_file(&root.join("boot"), |name| name.starts_with("vmlinuz-"))
            .map(|_| root.join("boot"))
            .or_else(|| {
                fs::read_dir(root.join("usr/lib/modules"))
                    .ok()?
                    .flatten()
                    .map(|e| e.path())
                    .find(|dir| dir.join("vmlinuz").is_file())
            })
            .with_context(|| {
                format!("{package} has no boot/vmlinuz-* nor usr/lib/modules/*/vmlinuz")
            })?;
        let vmlinuz = find_file(&boot, |name| {
            name == "vmlinuz" || name.starts_with("vmlinuz-")
        })
        .with_context(|| format!("{package} has no vmlinuz"))?;

        let dest = self.kernels_dir.join(package);
        fs::create_dir_all(&dest)
            .with_context(|| format!("failed to create {}", dest.display()))?;
        // The config answers "is CONFIG_X set in this guest?" without
        // booting it.
        if let Some(config) = find_file(&boot, |name| {
            name == "config" || name.starts_with("config-")
        }) {
            fs::copy(&config, dest.join("config"))
                .with_context(|| format!("failed to copy {}", config.display()))?;
        }
        // The diag modules, uncompressed (busybox insmod cannot read .xz).
        let modules_dest = dest.join("modules");
        fs::create_dir_all(&modules_dest)
            .with_context(|| format!("failed to create {}", modules_dest.display()))?;
        for module in GUEST_MODULES {
            let found = find_module(&root.join("lib/modules"), module)
                .or_else(|| find_module(&root.join("usr/lib/modules"), module))
                .with_context(|| format!("{package} has no {module}.ko"))?;
            let target = modules_dest.join(format!("{module}.ko"));
            if found.extension().is_some_and(|e| e == "xz") {
                let out = Command::new("xz")
                    .arg("-dc")
                    .arg(&found)
                    .output()
                    .with_context(|| format!("failed to run xz on {}", found.display()))?;
                if !out.status.success() {
                    bail!("xz -dc {} failed: {}", found.display(), out.status);
                }
                fs::write(&target, out.stdout)
                    .with_context(|| format!("failed to write {}", target.display()))?;
            } else {
                fs::copy(&found, &target)
                    .with_context(|| format!("failed to copy {}", found.display()))?;
            }
        }
        // vmlinuz goes last: its presence marks a complete cache entry.
        let dest_vmlinuz = dest.join("vmlinuz");
        fs::rename(&vmlinuz, &dest_vmlinuz)
            .with_context(|| format!("failed to move {} into the cache", vmlinuz.display()))?;
        Ok((dest_vmlinuz, deb_size))
    }
}

/// The linux-binary-*, linux-modules-* and linux-base-* packages an
/// `apt-cache show` record of a split linux-image-* depends on.
fn split_parts(record: &str) -> Vec<String> {
    let Some(depends) = record.lines().find_map(|l| l.strip_prefix("Depends: ")) else {
        return Vec::new();
    };
    depends
        .split([',', '|'])
        .filter_map(|dep| dep.split_whitespace().next())
        .filter(|name| {
            ["linux-binary-", "linux-modules-", "linux-base-"]
                .iter()
                .any(|p| name.starts_with(p))
        })
        .map(str::to_owned)
        .collect()
}

/// `<name>.ko` or `<name>.ko.xz` anywhere below `dir`.
fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_module(&path, name) {
                return Some(found);
            }
        } else if let Some(file) = path.file_name().and_then(|f| f.to_str()) {
            if file == format!("{name}.ko") || file == format!("{name}.ko.xz") {
                return Some(path);
            }
        }
    }
    None
}

fn state_key(state: &AptState) -> String {
    match state {
        AptState::Host => String::new(),
        AptState::Private { dir, .. } => dir.display().to_string(),
    }
}

fn series_matches(series: &Series, arch: Arch, name: &str) -> bool {
    name.strip_prefix(series.prefix)
        .and_then(|rest| rest.strip_suffix(arch.debian()))
        .and_then(|rest| rest.strip_suffix('-'))
        .and_then(|rest| rest.strip_suffix(series.suffix))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// One `deb` or `deb-src` entry of the machine's sources, as apt parsed it.
struct IndexTarget {
    target_of: String,
    uri: String,
    suite: String,
}

/// The machine's apt sources through apt's own parser, which reads both
/// one-line `sources.list` files and deb822 `.sources` files.
fn host_index_targets() -> Result<Vec<IndexTarget>> {
    let out = capture(
        Command::new("apt-get").args([
            "indextargets",
            "--no-release-info",
            "--format",
            "$(TARGET_OF) $(REPO_URI) $(RELEASE)",
        ]),
        "apt-get indextargets (reading this machine's apt sources)",
    )?;
    let mut targets: Vec<IndexTarget> = Vec::new();
    for line in out.lines() {
        let mut fields = line.split_whitespace();
        let (Some(target_of), Some(uri), Some(suite)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let target = IndexTarget {
            target_of: target_of.to_owned(),
            uri: uri.to_owned(),
            suite: suite.to_owned(),
        };
        // One line per index file (Packages, Translations, ...).
        if !targets.iter().any(|t| {
            t.uri == target.uri && t.suite == target.suite && t.target_of == target.target_of
        }) {
            targets.push(target);
        }
    }
    Ok(targets)
}

/// Picks the main archive and security archive URIs from the machine's
/// Debian entries. Errors are kept as text: they only matter when a suite
/// has to be fetched from a private state.
fn debian_mirrors(targets: &[IndexTarget]) -> Result<Mirrors, String> {
    let debian = |t: &&IndexTarget| {
        let base = t.suite.split(['-', '/']).next().unwrap_or_default();
        t.target_of == "deb" && DEBIAN_CODENAMES.contains(&base)
    };
    // Security suites are `<codename>-security` (`<codename>/updates`
    // before bullseye); everything else Debian-named is on the main archive.
    let is_security =
        |t: &&IndexTarget| t.suite.ends_with("-security") || t.suite.ends_with("/updates");
    let security = targets
        .iter()
        .filter(debian)
        .find(is_security)
        .map(|t| t.uri.clone());
    let mut archive_entries: Vec<&IndexTarget> = targets
        .iter()
        .filter(debian)
        .filter(|t| !is_security(t))
        .collect();
    // Prefer a plain release suite over -updates or -backports entries; a
    // mirror that carries only those is still the main archive.
    archive_entries.sort_by_key(|t| t.suite.contains('-'));
    let archive = archive_entries
        .first()
        .map(|t| t.uri.clone())
        .ok_or_else(|| {
            "this machine's apt sources name no Debian archive (a deb entry for a suite such as \
         bookworm), so other suites cannot be fetched"
                .to_owned()
        })?;
    Ok(Mirrors { archive, security })
}

/// Compares names with embedded numbers by value: `-9-` < `-10-`.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let a_len = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let b_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (a_num, a_rest) = a.split_at(a_len);
                let (b_num, b_rest) = b.split_at(b_len);
                let strip = |n: &[u8]| -> usize { n.iter().take_while(|c| **c == b'0').count() };
                let (a_sig, b_sig) = (&a_num[strip(a_num)..], &b_num[strip(b_num)..]);
                let ord = a_sig.len().cmp(&b_sig.len()).then_with(|| a_sig.cmp(b_sig));
                if ord.is_ne() {
                    return ord;
                }
                (a, b) = (a_rest, b_rest);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                (a, b) = (&a[1..], &b[1..]);
            }
        }
    }
}

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_str().is_some_and(&pred))
        .map(|e| e.path())
}

/// Runs a command with captured output; on failure the error names `what`
/// and quotes apt's or dpkg's last error line, so it stays on one line.
pub fn capture(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: failed to start {:?}", cmd.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // apt prefixes errors with "E:" and the first is the specific one
        // ("Failed to fetch <uri> <why>"); otherwise the last line.
        let reason = stderr
            .lines()
            .chain(stdout.lines())
            .find(|l| l.starts_with("E:"))
            .or_else(|| stderr.lines().rfind(|l| !l.trim().is_empty()))
            .unwrap_or("no error output");
        bail!("{what} failed ({}): {}", out.status, reason.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_abi_sorts_last() {
        let mut names = [
            "linux-image-5.10.0-9-cloud-amd64",
            "linux-image-5.10.0-46-cloud-amd64",
            "linux-image-5.10.0-10-cloud-amd64",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names.last(), Some(&"linux-image-5.10.0-46-cloud-amd64"));
        assert!(natural_cmp("linux-image-6.12.99+deb12", "linux-image-6.12.117+deb12").is_lt());
    }

    #[test]
    fn series_patterns_exclude_other_flavours() {
        let s612 = &SERIES[2];
        assert!(series_matches(
            s612,
            Arch::X86_64,
            "linux-image-6.12.117+deb12-cloud-amd64"
        ));
        assert!(!series_matches(
            s612,
            Arch::X86_64,
            "linux-image-6.12.117+deb12-cloud-amd64-dbg"
        ));
        assert!(!series_matches(
            s612,
            Arch::X86_64,
            "linux-image-6.12.117+deb12-rt-amd64"
        ));
        assert!(!series_matches(
            s612,
            Arch::X86_64,
            "linux-image-6.12.38+deb13-cloud-amd64"
        ));
        let s510 = &SERIES[0];
        assert!(series_matches(
            s510,
            Arch::X86_64,
            "linux-image-5.10.0-46-cloud-amd64"
        ));
        assert!(!series_matches(
            s510,
            Arch::X86_64,
            "linux-image-5.10.0-46-cloud-amd64-unsigned"
        ));
    }

    #[test]
    fn arm64_series_match_arm64_packages_only() {
        let s612 = SERIES.iter().find(|s| s.name == "6.12").expect("6.12");
        let arm = "linux-image-6.12.117+deb12-cloud-arm64";
        assert!(series_matches(s612, Arch::Aarch64, arm));
        assert!(!series_matches(s612, Arch::X86_64, arm));
        assert!(!series_matches(
            s612,
            Arch::Aarch64,
            "linux-image-6.12.117+deb12-cloud-amd64"
        ));
        assert!(!series_matches(
            s612,
            Arch::Aarch64,
            "linux-image-6.12.117+deb12-arm64"
        ));

        let spec = KernelSpec::parse("6.12", Arch::Aarch64).expect("6.12 parses");
        assert_eq!(spec.label, "6.12-arm64");
        assert_eq!(
            KernelSpec::parse("6.12", Arch::X86_64).expect("6.12").label,
            "6.12"
        );
        assert!(KernelSpec::parse(arm, Arch::Aarch64).is_ok());
        // An amd64 kernel would not boot in qemu-system-aarch64.
        assert!(KernelSpec::parse("linux-image-6.1.0-50-cloud-amd64", Arch::Aarch64).is_err());
    }

    #[test]
    fn split_kernel_packages_are_fetched_whole() {
        let record = "Package: linux-image-7.3.4+deb13-cloud-amd64\n\
Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), linux-binary-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), linux-modules-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1)\n";
        assert_eq!(
            split_parts(record),
            [
                "linux-base-7.3.4+deb13-cloud-amd64",
                "linux-binary-7.3.4+deb13-cloud-amd64",
                "linux-modules-7.3.4+deb13-cloud-amd64"
            ]
        );
        assert!(split_parts("Depends: kmod, linux-base (>= 4.3~)\n").is_empty());
        let s73 = SERIES.iter().find(|s| s.name == "7.3").expect("7.3 series");
        assert!(series_matches(
            s73,
            Arch::X86_64,
            "linux-image-7.3.4+deb13-cloud-amd64"
        ));
        assert!(!series_matches(
            s73,
            Arch::X86_64,
            "linux-image-7.3.4+deb13-cloud-amd64-dbg"
        ));
    }

    #[test]
    fn mirrors_come_from_debian_entries_only() {
        let t = |target_of: &str, uri: &str, suite: &str| IndexTarget {
            target_of: target_of.into(),
            uri: uri.into(),
            suite: suite.into(),
        };
        let targets = vec![
            t("deb", "https://example.org/node/", "nodistro"),
            t("deb", "http://mirror.example/debian/", "bookworm-updates"),
            t("deb", "http://mirror.example/debian/", "bookworm"),
            t(
                "deb",
                "http://mirror.example/debian-security/",
                "bookworm-security",
            ),
        ];
        let mirrors = debian_mirrors(&targets).expect("mirrors");
        assert_eq!(mirrors.archive, "http://mirror.example/debian/");
        assert_eq!(
            mirrors.security.as_deref(),
            Some("http://mirror.example/debian-security/")
        );
        assert!(debian_mirrors(&targets[..1]).is_err());
    }
}
