//! Installs what building, running and testing need and is missing, as
//! the table `xtask/outside-programs.tsv` lists it, and says what and why.
//! Everything is checked first, so a second run does nothing.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::outside::{self, Row, Source};
use crate::run;

/// bpf-linker is built against Debian's LLVM 22 (shared/toolchain.md).
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// What the command being run needs: `Some("test")` for `cargo xtask
/// test`, None for everything in the table (`cargo xtask setup`).
fn needed(command: Option<&str>) -> Result<Vec<Row>> {
    let rows = outside::parse(outside::TABLE).map_err(anyhow::Error::msg)?;
    Ok(rows
        .into_iter()
        .filter(|row| command.is_none_or(|c| row.needed_by(c)))
        .collect())
}

/// Installs what `command` needs (everything when None).
pub fn ensure(command: Option<&str>) -> Result<()> {
    let missing = missing(command)?;
    let debs: Vec<&Row> = missing.iter().filter(|r| r.source == Source::Deb).collect();
    if !debs.is_empty() {
        for row in &debs {
            say(&format!("installing {}: {}", row.name, row.why));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let names: Vec<&str> = debs.iter().map(|r| r.name.as_str()).collect();
            bail!(
                "missing Debian packages and not root: run `sudo apt-get install {}`",
                names.join(" ")
            );
        }
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(debs.iter().map(|r| r.name.as_str()))
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    // rust-src before bpf-linker: the table's order.
    for row in missing.iter().filter(|r| r.source != Source::Deb) {
        say(&format!("installing {}: {}", row.name, row.why));
        install_rust(row)?;
    }
    Ok(())
}

/// `cargo xtask setup --check`: lists what is missing (for every command)
/// and installs nothing; fails when something is missing.
pub fn check() -> Result<()> {
    let all = needed(None)?;
    let missing = missing(None)?;
    for row in &missing {
        println!(
            "missing: {} {} (needed by {}): {}",
            match row.source {
                Source::Deb => "Debian package",
                Source::Rustup => "rustup component",
                Source::RustupTarget => "rustup target",
                Source::Cargo => "cargo install",
            },
            row.name,
            row.needed_by.join(", "),
            row.why
        );
    }
    if !missing.is_empty() {
        bail!(
            "{} of {} things in {} are missing: `cargo xtask setup` installs them",
            missing.len(),
            all.len(),
            outside::TABLE_PATH
        );
    }
    println!(
        "setup: all {} things in {} are installed",
        all.len(),
        outside::TABLE_PATH
    );
    Ok(())
}

fn missing(command: Option<&str>) -> Result<Vec<Row>> {
    let mut missing = Vec::new();
    for row in needed(command)? {
        if !installed(&row)? {
            missing.push(row);
        }
    }
    Ok(missing)
}

fn say(message: &str) {
    eprintln!("setup: {message}");
}

fn installed(row: &Row) -> Result<bool> {
    Ok(match row.source {
        // The package's programs must be there too: a package whose files
        // were removed by hand is not usable.
        Source::Deb => {
            deb_installed(&row.name)
                && row
                    .programs
                    .iter()
                    .all(|p| std::path::Path::new(p).is_file())
        }
        Source::Rustup => {
            let (component, toolchain) = split_at(&row.name)?;
            rustup_installed("component", component, toolchain)?
        }
        Source::RustupTarget => {
            let (target, toolchain) = split_at(&row.name)?;
            rustup_installed("target", target, toolchain)?
        }
        Source::Cargo => {
            let (krate, version) = split_at(&row.name)?;
            Command::new(krate)
                .arg("--version")
                .output()
                .ok()
                .filter(|out| out.status.success())
                .is_some_and(|out| String::from_utf8_lossy(&out.stdout).contains(version))
        }
    })
}

fn split_at(name: &str) -> Result<(&str, &str)> {
    name.split_once('@')
        .with_context(|| format!("{}: `{name}` is not NAME@VERSION", outside::TABLE_PATH))
}

fn deb_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

/// Whether `rustup <what> list --installed` names `name` (`what` is
/// component or target).
fn rustup_installed(what: &str, name: &str, toolchain: &str) -> Result<bool> {
    let out = Command::new("rustup")
        .args([what, "list", "--toolchain", toolchain, "--installed"])
        .output()
        .context("rustup not found: install rustup with a stable and a nightly toolchain")?;
    if !out.status.success() {
        bail!(
            "no {toolchain} toolchain (`rustup toolchain list`): the eBPF programs need \
             nightly for -Z build-std; install it with `rustup toolchain install {toolchain}`"
        );
    }
    // Components are listed with their host suffix (rust-src is not, but
    // rustc-x86_64-unknown-linux-gnu is); targets by their name.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == name || l.starts_with(&format!("{name}-"))))
}

fn install_rust(row: &Row) -> Result<()> {
    let (name, version) = split_at(&row.name)?;
    match row.source {
        Source::Deb => unreachable!("Debian packages are installed with apt-get"),
        Source::Rustup => {
            run(Command::new("rustup").args(["component", "add", name, "--toolchain", version]))
        }
        Source::RustupTarget => {
            run(Command::new("rustup").args(["target", "add", name, "--toolchain", version]))
        }
        // bpf-linker is the only crate installed; it must link Debian's
        // LLVM 22 rather than download one.
        Source::Cargo if name == "bpf-linker" => run(crate::cargo()
            .args(["install", name, "--version", version, "--locked"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)),
        Source::Cargo => {
            run(crate::cargo().args(["install", name, "--version", version, "--locked"]))
        }
    }
}

/// README's list of what setup installs, made from the table.
#[cfg(test)]
pub fn readme_section() -> String {
    let rows = outside::parse(outside::TABLE).unwrap_or_else(|err| panic!("{err}"));
    let mut out = String::new();
    for row in rows {
        let what = match row.source {
            Source::Deb => format!("Debian package `{}`", row.name),
            Source::Rustup => {
                let (component, toolchain) = row.name.split_once('@').unwrap_or((&row.name, "?"));
                format!("rustup component `{component}` ({toolchain})")
            }
            Source::RustupTarget => {
                let (target, toolchain) = row.name.split_once('@').unwrap_or((&row.name, "?"));
                format!("rustup target `{target}` ({toolchain})")
            }
            Source::Cargo => {
                let (krate, version) = row.name.split_once('@').unwrap_or((&row.name, "?"));
                format!("`{krate}` {version} (cargo install)")
            }
        };
        out.push_str(&format!(
            "- {what}, for {}: {}\n",
            row.needed_by.join(", "),
            row.why
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::support;

    const README_BEGIN: &str = "<!-- outside-programs:";
    const README_END: &str = "<!-- end outside-programs -->";

    /// Programs started without being in the table: the toolchain README
    /// asks for (rustup with its cargo).
    const TOOLCHAIN: [&str; 2] = ["cargo", "rustup"];

    #[test]
    fn outside_table_parses_and_is_complete() {
        let rows = outside::parse(outside::TABLE).expect("the table parses");
        assert!(!rows.is_empty());
        for command in outside::COMMANDS {
            assert!(
                rows.iter().any(|r| r.needed_by(command)),
                "nothing is needed by {command}?"
            );
        }
        let mut names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a package is listed twice");
        for row in &rows {
            assert!(!row.why.trim().is_empty(), "{}: say why", row.name);
            if row.source == Source::Deb {
                for program in &row.programs {
                    assert!(
                        program.starts_with('/'),
                        "{}: {program} is not absolute",
                        row.name
                    );
                }
            }
        }
        let target = outside::parse("rustup-target\tx86_64-unknown-linux-musl@stable\t-\trun\twhy")
            .expect("a rustup target row parses");
        assert_eq!(target[0].source, Source::RustupTarget);
        assert!(outside::parse("deb\tx\t-\tdeploy\twhy").is_err());
        assert!(outside::parse("deb\tx\t-\ttest").is_err());
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// The string literal arguments of `call` in `text` (`call("x")`).
    fn literal_args<'a>(text: &'a str, call: &str) -> Vec<&'a str> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find(call) {
            rest = &rest[at + call.len()..];
            if let Some(end) = rest.find('"') {
                out.push(&rest[..end]);
            }
        }
        out
    }

    /// Tests and benchmarks start outside programs only through
    /// common::outside (so a program's package is always known), and every
    /// program a test, a benchmark or xtask starts is in the table.
    #[test]
    fn every_program_started_is_in_the_table() {
        let rows = outside::parse(outside::TABLE).expect("the table parses");
        let root = crate::workspace_root();
        // Built from pieces so this file does not match itself.
        let command_new = ["Command", "::new(\""].concat();
        let helpers = [["outside", "(\""].concat(), ["locate", "(\""].concat()];
        let mut problems = Vec::new();
        let mut started = 0;
        for (dir, through_helper) in [
            ("backlog-agent/tests", true),
            ("backlog-agent/benches", true),
            ("xtask/src", false),
        ] {
            let mut files = Vec::new();
            rust_files(&root.join(dir), &mut files);
            assert!(!files.is_empty(), "no sources under {dir}");
            for file in files {
                let text = std::fs::read_to_string(&file).expect("read source");
                let name = file
                    .strip_prefix(&root)
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                for program in literal_args(&text, &command_new) {
                    started += 1;
                    if through_helper {
                        problems.push(format!(
                            "{name}: starts \"{program}\" directly; use common::outside(\"{program}\")"
                        ));
                    } else if !TOOLCHAIN.contains(&program)
                        && outside::provider(&rows, program).is_none()
                    {
                        problems.push(format!(
                            "{name}: starts {program}, not in {}",
                            outside::TABLE_PATH
                        ));
                    }
                }
                for helper in &helpers {
                    for program in literal_args(&text, helper) {
                        started += 1;
                        if outside::provider(&rows, program).is_none() {
                            problems.push(format!(
                                "{name}: uses {program}, not in {}",
                                outside::TABLE_PATH
                            ));
                        }
                    }
                }
                // A hard-coded path bypasses the table just the same.
                if through_helper {
                    for prefix in ["\"/usr/sbin/", "\"/usr/bin/", "\"/sbin/", "\"/bin/"] {
                        if text.contains(prefix) {
                            problems.push(format!(
                                "{name}: names a program by path ({prefix}...); use common::outside"
                            ));
                        }
                    }
                }
            }
        }
        assert!(started > 0, "the scan found no program started at all");
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn the_scan_sees_a_program_that_is_not_listed() {
        let rows = outside::parse(outside::TABLE).expect("the table parses");
        let source = ["let x = Command", "::new(\"frobnicate\").arg(1);"].concat();
        let found = literal_args(&source, &["Command", "::new(\""].concat());
        assert_eq!(found, ["frobnicate"]);
        assert!(outside::provider(&rows, "frobnicate").is_none());
        assert!(outside::provider(&rows, "nginx").is_some());
    }

    /// README's list is the table's, word for word.
    #[test]
    fn readme_lists_the_table() {
        let path = crate::workspace_root().join("README.md");
        let readme = std::fs::read_to_string(&path).expect("read README.md");
        let begin = readme
            .find(README_BEGIN)
            .expect("README has the outside-programs markers");
        let body_start = begin + readme[begin..].find('\n').expect("marker line ends") + 1;
        let end = readme.find(README_END).expect("README has the end marker");
        let current = &readme[body_start..end];
        let wanted = readme_section();
        if current != wanted && std::env::var_os("BACKLOG_UPDATE_README").is_some() {
            let updated = format!("{}{wanted}{}", &readme[..body_start], &readme[end..]);
            std::fs::write(&path, updated).expect("write README.md");
            return;
        }
        assert_eq!(
            current,
            wanted,
            "README.md's package list differs from {}; \
             BACKLOG_UPDATE_README=1 cargo test -p xtask readme rewrites it",
            outside::TABLE_PATH
        );
        // And only there: a package named elsewhere in README but not in
        // the table would be a promise setup does not keep.
        let rows = outside::parse(outside::TABLE).expect("the table parses");
        for word in [
            "nginx",
            "php8.2-fpm",
            "qemu-system-x86",
            "busybox-static",
            "bpftrace",
        ] {
            if readme.contains(&format!("`{word}`")) {
                assert!(rows.iter().any(|r| r.name == word), "README names {word}");
            }
        }
    }

    #[test]
    fn support_table_parses() {
        let table = support::parse(support::TABLE).expect("the support table parses");
        assert!(table.len() >= 5, "{:?}", table.keys().collect::<Vec<_>>());
        assert!(support::parse("6.1\tfentry\tsyn_cookie_sent\tkprobe\tx").is_err());
        assert!(support::parse("6.1\tfentry\tsyn_cookie_sent\t-\t").is_err());
        // One cell alone leaves every other family and kind missing.
        assert!(support::parse("6.1\tfentry\tsyn_cookie_sent\tfentry\tx").is_err());
        assert_eq!(support::series_of("6.1.0-57-cloud-amd64"), "6.1");
        assert_eq!(support::series_of("6.12.117+deb12-cloud-amd64"), "6.12");
        assert_eq!(support::series_of("7.3.4+deb13-cloud-amd64"), "7.3");
        assert_eq!(support::series_of("6.18.44-fc-v669"), "6.18");
    }

    /// The agent's start-up lines as it prints them (this machine, auto).
    #[test]
    fn startup_lines_are_read_per_kind() {
        let stderr = "backlog-agent: syn_dropped_syn_queue_full, syn_cookie_sent: not observable: EPERM\n\
backlog-agent: ack_dropped_accept_queue_full: tracepoint skb:kfree_skb (reason TCP_LISTEN_OVERFLOW)\n\
backlog-agent:   skipped: the kernel has no kprobes (CONFIG_KPROBES off)\n\
backlog-agent: syn_dropped_accept_queue_full: fentry/fexit tcp_conn_request\n\
backlog-agent: syn_dropped_other: kprobe/kretprobe tcp_conn_request\n\
backlog-agent: listen() calls: tracepoint syscalls:sys_exit_listen (arguments from the saved registers)\n\
backlog-agent: ready: watching 2 of 7 drop kinds; Ctrl-C to stop";
        let seen = support::observed(stderr);
        assert_eq!(
            seen["syn_cookie_sent"],
            support::Support::NotObservable("EPERM".into())
        );
        assert_eq!(
            seen["ack_dropped_accept_queue_full"],
            support::Support::Traced("tracepoint".into())
        );
        assert_eq!(
            seen["syn_dropped_accept_queue_full"],
            support::Support::Traced("fentry".into())
        );
        assert_eq!(
            seen["syn_dropped_other"],
            support::Support::Traced("kprobe".into())
        );
        assert!(!seen.contains_key("unix_connect_backlog_full"));
        let none = support::observed(
            "backlog-agent: error: no drop kind can be observed on this kernel with --attach kprobe: no kprobes",
        );
        assert_eq!(none.len(), support::KINDS.len());
        assert!(none.values().all(|s| !s.is_traced()));
    }
}
