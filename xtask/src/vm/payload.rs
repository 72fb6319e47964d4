//! What runs inside the guests: the agent plus its integration tests, or
//! the binaries given with `--test-bin`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::dist::DistTarget;

/// An executable copied into the initramfs.
pub struct PayloadFile {
    pub host: PathBuf,
    pub guest: String,
}

/// One command the guest's /init runs; its exit code counts.
pub struct TestRun {
    pub name: String,
    pub guest: String,
    pub args: Vec<String>,
}

pub struct Payload {
    pub files: Vec<PayloadFile>,
    pub runs: Vec<TestRun>,
    /// Every executable must be static: the initramfs then holds no libc
    /// at all, the way a shipped binary meets a bare box.
    pub static_only: bool,
}

// The guests run what `cargo xtask dist` ships for their architecture: a
// static musl build, in an initramfs without glibc, so a missing library or
// a glibc assumption fails there and not on a customer's box.

/// Where the integration tests expect the agent (they read
/// BACKLOG_AGENT_BIN, which /init sets to this).
pub const AGENT_GUEST_PATH: &str = "/bin/backlog-agent";

/// Integration tests that need the host's Debian userland (real nginx and
/// php-fpm, Prometheus; systemd-analyze for deploy/), which a bare
/// initramfs does not have, and `fold` (the summary's cap: 4,200 UNIX
/// listeners through the agent's own bookkeeping, the same on every
/// kernel, while the guests run its UNIX EAGAIN hook in `flood`): they
/// run on the host only, by design, not as a skip.
const HOST_ONLY_TESTS: [&str; 4] = ["real_servers", "prometheus", "deploy", "fold"];

/// Builds backlog-agent and its integration tests (the `tests/*.rs`
/// targets), static, for `target`. Unit tests of the lib and bin stay on
/// the host: they need no particular kernel.
pub fn build_default(target: &DistTarget) -> Result<Payload> {
    let linker = target.linker_override();
    // The agent optimised, the tests not: under software emulation an
    // unoptimised agent took 17 s from start to ready (its BTF reader and
    // aya's), and the guests start it some thirty times.
    let agent_artifacts = cargo_artifacts(
        &[
            "build",
            "--release",
            "--package",
            "backlog-agent",
            "--target",
            target.triple,
        ],
        linker.as_ref(),
    )?;
    let agent = agent_artifacts
        .iter()
        .find(|a| a.name == "backlog-agent" && a.kinds.iter().any(|k| k == "bin"))
        .context(
            "cargo build --release --package backlog-agent reported no backlog-agent executable",
        )?;

    let test_artifacts = cargo_artifacts(
        &[
            "test",
            "--package",
            "backlog-agent",
            "--no-run",
            "--target",
            target.triple,
        ],
        linker.as_ref(),
    )?;
    let mut files = vec![PayloadFile {
        host: agent.executable.clone(),
        guest: AGENT_GUEST_PATH.to_owned(),
    }];
    let mut runs = Vec::new();
    for test in test_artifacts
        .iter()
        .filter(|a| a.kinds.iter().any(|k| k == "test"))
        .filter(|a| !HOST_ONLY_TESTS.contains(&a.name.as_str()))
    {
        let guest = format!("/tests/{}", test.name);
        files.push(PayloadFile {
            host: test.executable.clone(),
            guest: guest.clone(),
        });
        runs.push(TestRun {
            name: test.name.clone(),
            guest,
            // The privileged tests change sysctls and count kernel events
            // system-wide, so they must not overlap.
            args: vec!["--test-threads=1".to_owned()],
        });
    }
    if runs.is_empty() {
        // An empty guest run would pass without testing anything.
        bail!("backlog-agent has no integration tests (tests/*.rs): nothing to run in the guests");
    }
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Payload {
        files,
        runs,
        static_only: true,
    })
}

/// The benchmarks the guests run, with the arguments after `--bench`: the
/// floods, which need a kernel where the SYN stage is traced
/// (`benches/flood.rs`, `benches/syn_flood.rs`), and the UNIX connect()
/// EAGAIN storm (`benches/storm.rs`) in its guest mode: the defaults
/// against `--attach tracepoint`, bpftrace (not in the initramfs) skipped
/// with a line, no many-processes case; 13 storms of 3 s and 8 agent
/// start-ups, under 90 s of guest time (it prints how long it took).
const GUEST_BENCHES: [(&str, &[&str]); 3] =
    [("flood", &[]), ("syn_flood", &[]), ("storm", &["guest"])];

/// The guest benchmarks and a release agent, for `vm-test --bench`:
/// figures from kernels where every kind is traced.
pub fn build_bench() -> Result<Payload> {
    let agent_artifacts =
        cargo_artifacts(&["build", "--release", "--package", "backlog-agent"], None)?;
    let agent = agent_artifacts
        .iter()
        .find(|a| a.name == "backlog-agent" && a.kinds.iter().any(|k| k == "bin"))
        .context("cargo build --release reported no backlog-agent executable")?;
    let mut args = vec!["bench", "--package", "backlog-agent", "--no-run"];
    for (bench, _) in GUEST_BENCHES {
        args.extend(["--bench", bench]);
    }
    let bench_artifacts = cargo_artifacts(&args, None)?;
    let mut files = vec![PayloadFile {
        host: agent.executable.clone(),
        guest: AGENT_GUEST_PATH.to_owned(),
    }];
    let mut runs = Vec::new();
    for (name, bench_args) in GUEST_BENCHES {
        let bench = bench_artifacts
            .iter()
            .find(|a| a.name == name && a.kinds.iter().any(|k| k == "bench"))
            .with_context(|| format!("cargo bench --no-run reported no {name} benchmark"))?;
        let guest = format!("/tests/{name}");
        files.push(PayloadFile {
            host: bench.executable.clone(),
            guest: guest.clone(),
        });
        runs.push(TestRun {
            name: name.to_owned(),
            guest,
            args: std::iter::once("--bench")
                .chain(bench_args.iter().copied())
                .map(str::to_owned)
                .collect(),
        });
    }
    // bpftrace beside the agent (benches/syn_flood.rs and storm.rs run it
    // where it is), at the path xtask/outside-programs.tsv names, with its
    // shared libraries (LLVM and clang: some 200 MB of initramfs).
    match crate::outside::locate("bpftrace") {
        Ok(bpftrace) => files.push(PayloadFile {
            guest: bpftrace.to_string_lossy().into_owned(),
            host: bpftrace,
        }),
        Err(why) => println!("vm-test: the guests' benchmarks run without bpftrace: {why}"),
    }
    Ok(Payload {
        files,
        runs,
        // The figures compare with host runs of the same glibc build.
        static_only: false,
    })
}

/// `--test-bin` payloads run with no arguments: they need not be libtest
/// harnesses.
pub fn from_test_bins(paths: &[PathBuf]) -> Result<Payload> {
    let mut files = Vec::new();
    let mut runs: Vec<TestRun> = Vec::new();
    for path in paths {
        let host = path
            .canonicalize()
            .with_context(|| format!("test binary {} not found", path.display()))?;
        if !host.is_file() {
            bail!("test binary {} is not a file", path.display());
        }
        let name = guest_name(&host);
        if runs.iter().any(|r| r.name == name) {
            bail!("two test binaries are named {name}: rename one");
        }
        let guest = format!("/tests/{name}");
        files.push(PayloadFile {
            host,
            guest: guest.clone(),
        });
        runs.push(TestRun {
            name,
            guest,
            args: Vec::new(),
        });
    }
    Ok(Payload {
        files,
        runs,
        static_only: false,
    })
}

/// File names become guest paths and shell words in /init: keep them to a
/// safe alphabet.
fn guest_name(path: &Path) -> String {
    let name: String = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        format!("t{name}")
    } else {
        name
    }
}

struct Artifact {
    name: String,
    kinds: Vec<String>,
    executable: PathBuf,
}

/// Runs cargo with JSON messages on stdout and collects the executables it
/// produced. Diagnostics are rendered for humans on stderr, which is
/// inherited so build errors show as usual. `linker` is the target's
/// linker override (rust-lld for aarch64, as in `cargo xtask dist`).
fn cargo_artifacts(args: &[&str], linker: Option<&(String, &str)>) -> Result<Vec<Artifact>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let shown = format!("cargo {}", args.join(" "));
    println!("vm-test: {shown}");
    let mut command = Command::new(&cargo);
    if let Some((var, linker)) = linker {
        command.env(var, linker);
    }
    let mut child = command
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(crate::workspace_root())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {shown}"))?;
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut stdout)
            .with_context(|| format!("failed to read the output of {shown}"))?;
    }
    let status = child
        .wait()
        .with_context(|| format!("failed to wait for {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status}); its errors are above");
    }

    let mut artifacts = Vec::new();
    for line in stdout.lines() {
        // Build scripts may print non-JSON lines; they are not artifacts.
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = msg["executable"].as_str() else {
            continue;
        };
        let name = msg["target"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let kinds = msg["target"]["kind"]
            .as_array()
            .map(|kinds| {
                kinds
                    .iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        artifacts.push(Artifact {
            name,
            kinds,
            executable: PathBuf::from(executable),
        });
    }
    Ok(artifacts)
}

#[cfg(test)]
mod tests {
    use super::GUEST_BENCHES;

    /// Every guest benchmark is a `[[bench]]` of backlog-agent without the
    /// libtest harness (the arguments after `--bench` are its own), and the
    /// storm runs in its guest mode: the host-only parts (bpftrace, the
    /// many-processes case) would not finish or not start in a guest.
    #[test]
    fn guest_benches_are_harnessless_benches_of_the_agent() {
        let manifest =
            std::fs::read_to_string(crate::workspace_root().join("backlog-agent/Cargo.toml"))
                .expect("read backlog-agent/Cargo.toml");
        let sections: Vec<&str> = manifest.split("[[bench]]").skip(1).collect();
        for (name, _) in GUEST_BENCHES {
            let section = sections
                .iter()
                .find(|s| s.contains(&format!("name = \"{name}\"")))
                .unwrap_or_else(|| panic!("{name} is not a [[bench]] of backlog-agent"));
            let section = section.split("\n[").next().unwrap_or(section);
            assert!(
                section.contains("harness = false"),
                "{name}: the guest passes it arguments of its own; it needs harness = false"
            );
        }
        let storm = GUEST_BENCHES
            .iter()
            .find(|(name, _)| *name == "storm")
            .expect("the guests run the storm");
        assert_eq!(storm.1, ["guest"]);
    }
}
