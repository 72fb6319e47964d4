//! The guest's root file system: a cpio (newc) archive the kernel unpacks
//! into a tmpfs and whose /init runs the tests.
//!
//! The archive is written here rather than with cpio(1) so that it can hold
//! /dev/console, owned by root, without creating device nodes on the host:
//! the kernel opens /dev/console for /init's stdin/stdout before anything
//! is mounted, and without it nothing /init prints reaches the serial port.
//! It is not compressed: under software emulation a 57 MiB archive reached
//! /init about 0.7 s sooner plain than gzipped (6.1 guest), and the host
//! saves the gzip time too.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use super::payload::{Payload, AGENT_GUEST_PATH};

/// Lines /init prints that the host side parses (see guest.rs).
pub const MARK_KERNEL: &str = "BACKLOG-VM-KERNEL";
pub const MARK_TEST: &str = "BACKLOG-VM-TEST";
pub const MARK_RESULT: &str = "BACKLOG-VM-RESULT rc=";

/// `busybox` is a static busybox for the guest's architecture.
pub fn build(payload: &Payload, busybox: &Path, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    }
    // Written next to the target and renamed, so an interrupted build never
    // leaves a truncated archive that a later boot would pick up.
    let tmp = out.with_extension("cpio.partial");
    let file = File::create(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    let write_err = || format!("failed to write {}", tmp.display());

    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc",
        "tests",
    ] {
        cpio.dir(dir).with_context(write_err)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1)
        .with_context(write_err)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)
        .with_context(write_err)?;
    // Enough identity for programs that look up root or resolve localhost
    // (musl reads these files directly; glibc 2.34+, for --test-bin and
    // --bench payloads, has the files NSS module built in). `nobody` is
    // the unprivileged user of the least-privilege test.
    cpio.file_bytes(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .with_context(write_err)?;
    cpio.file_bytes("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        .with_context(write_err)?;
    cpio.file_bytes(
        "etc/hosts",
        0o644,
        b"127.0.0.1 localhost\n::1 localhost ip6-localhost\n",
    )
    .with_context(write_err)?;

    // Every executable and the shared libraries it loads, at the paths the
    // dynamic loader will look for them.
    let mut executables: Vec<(PathBuf, String)> =
        vec![(busybox.to_path_buf(), "/bin/busybox".into())];
    executables.extend(
        payload
            .files
            .iter()
            .map(|f| (f.host.clone(), f.guest.clone())),
    );
    let mut libraries = BTreeSet::new();
    for (host, guest) in &executables {
        let needs = shared_libraries(host)?;
        if payload.static_only && !needs.is_empty() {
            bail!(
                "{} is dynamically linked ({}), but this guest must hold no libc: \
                 build it static (musl)",
                host.display(),
                needs.join(", "),
            );
        }
        libraries.extend(needs);
        cpio.file_from(guest, 0o755, host)
            .with_context(|| format!("failed to add {} to {}", host.display(), tmp.display()))?;
    }
    for lib in &libraries {
        cpio.file_from(lib, 0o755, Path::new(lib))
            .with_context(|| format!("failed to add {lib} to {}", tmp.display()))?;
    }

    for applet in busybox_applets()? {
        cpio.symlink(&applet, "/bin/busybox")
            .with_context(write_err)?;
    }
    cpio.file_bytes("init", 0o755, init_script(payload).as_bytes())
        .with_context(write_err)?;
    cpio.finish().with_context(write_err)?;

    fs::rename(&tmp, out).with_context(|| format!("failed to move {} into place", tmp.display()))
}

/// Writes `out` as the shared archive `base` followed by a second archive
/// with `modules` under /lib/modules: the kernel unpacks concatenated
/// archives in order, so each kernel gets its own modules without
/// rebuilding the shared part.
pub fn with_modules(base: &Path, modules: &[PathBuf], out: &Path) -> Result<()> {
    let tmp = out.with_extension("cpio.partial");
    fs::copy(base, &tmp).with_context(|| format!("failed to copy {}", base.display()))?;
    let file = fs::OpenOptions::new()
        .append(true)
        .open(&tmp)
        .with_context(|| format!("failed to open {}", tmp.display()))?;
    let mut cpio = Cpio::new(BufWriter::new(file));
    for module in modules {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("bad module path {}", module.display()))?;
        cpio.file_from(&format!("lib/modules/{name}"), 0o644, module)
            .with_context(|| format!("failed to add {} to {}", module.display(), tmp.display()))?;
    }
    cpio.finish()
        .with_context(|| format!("failed to write {}", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| format!("failed to move {} into place", tmp.display()))
}

/// The shell script the kernel runs as PID 1.
fn init_script(payload: &Payload) -> String {
    let mut script = String::from(
        r#"#!/bin/sh
# PID 1 of a `cargo xtask vm-test` guest. Everything printed here goes to the
# serial console, which the host parses for the BACKLOG-* lines.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mnt() {
    mount -t "$1" "$1" "$2" || echo "BACKLOG-VM-WARN cannot mount $1 on $2"
}
mnt proc /proc
mnt sysfs /sys
mnt devtmpfs /dev
mnt tmpfs /tmp
# Kernel-provided mount points: tracefs for kprobe/tracepoint ids and
# available_filter_functions, debugfs for tools that still look for
# tracing there, bpffs for pinning, cgroup2 for cgroup-attached programs.
mnt tracefs /sys/kernel/tracing
mnt debugfs /sys/kernel/debug
mnt bpf /sys/fs/bpf
mnt cgroup2 /sys/fs/cgroup
ip link set lo up
# Before 5.11, BPF maps are charged to RLIMIT_MEMLOCK, whose 64 KiB default
# fails map creation on 5.10.
ulimit -l unlimited
# sock_diag for TCP and UNIX listeners is modular in Debian's kernels: the
# per-kernel archive appended to this one carries the modules (modules.rs).
# A module that is missing or does not load fails the guest (below): the
# sock_diag tests would otherwise fail for a reason they cannot name.
modules_failed=""
for module in inet_diag tcp_diag unix_diag; do
    insmod "/lib/modules/$module.ko" || modules_failed="$modules_failed $module"
done
export CI=true BACKLOG_IN_GUEST=1 HOME=/root RUST_BACKTRACE=1
"#,
    );
    script.push_str(&format!("export BACKLOG_AGENT_BIN={AGENT_GUEST_PATH}\n"));
    script.push_str(&format!("echo \"{MARK_KERNEL} $(uname -r)\"\n"));
    script.push_str(&format!(
        r#"cd /tmp
rc=0
for module in $modules_failed; do
    echo "{MARK_TEST} name=insmod-$module rc=1"
    rc=1
done
run() {{
    name=$1
    shift
    echo "{MARK_TEST} name=$name start"
    "$@"
    status=$?
    # A leading newline keeps the marker on its own line after output that
    # did not end with one.
    echo
    echo "{MARK_TEST} name=$name rc=$status"
    [ "$status" -eq 0 ] || rc=1
}}
"#
    ));
    for run in &payload.runs {
        let words: Vec<String> = [run.name.as_str(), run.guest.as_str()]
            .into_iter()
            .chain(run.args.iter().map(String::as_str))
            .map(shell_quote)
            .collect();
        script.push_str(&format!("run {}\n", words.join(" ")));
    }
    script.push_str(&format!(
        "echo\necho \"{MARK_RESULT}$rc\"\nsync\npoweroff -f\n"
    ));
    script
}

fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Applet paths (`bin/sh`, `sbin/poweroff`, ...) to link to busybox.
/// They come from the host's busybox-static even for a foreign guest
/// (whose busybox cannot run here): both are the same Debian package built
/// from one configuration, so they carry the same applets.
fn busybox_applets() -> Result<Vec<String>> {
    let busybox = crate::outside::locate("busybox").map_err(anyhow::Error::msg)?;
    let out = super::apt::capture(
        Command::new(&busybox).arg("--list-full"),
        "busybox --list-full",
    )?;
    Ok(out
        .lines()
        .map(str::trim)
        // `linuxrc` sits at the root and would only shadow our /init's
        // role; busybox itself is already in place.
        .filter(|applet| applet.contains('/') && *applet != "bin/busybox")
        .map(str::to_owned)
        .collect())
}

/// The shared libraries `ldd` names for an executable, the dynamic loader
/// included; none for static executables and scripts.
fn shared_libraries(exe: &Path) -> Result<Vec<String>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("failed to start ldd (part of libc-bin)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", exe.display(), stderr.trim());
    }
    let mut libs = Vec::new();
    for line in stdout.lines().map(str::trim) {
        if line.contains("statically linked") {
            continue;
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or the
        // loader as "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no
        // file.
        let path = match line.split_once("=>") {
            Some((name, target)) => {
                let target = target.trim();
                if target.starts_with("not found") {
                    bail!(
                        "{} needs {}, which ldd cannot find on this machine",
                        exe.display(),
                        name.trim()
                    );
                }
                target.split_whitespace().next()
            }
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(path.to_owned());
        }
    }
    Ok(libs)
}

/// A minimal writer for the "newc" cpio format the kernel unpacks
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
struct Cpio<W: io::Write> {
    out: W,
    next_ino: u32,
    /// Paths written so far: parents are created on demand and a library
    /// shared by several executables is stored once.
    written: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl<W: io::Write> Cpio<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            written: BTreeSet::new(),
        }
    }

    /// Creates missing parent directories and tells whether `path` itself
    /// is new.
    fn claim(&mut self, path: &str) -> io::Result<Option<String>> {
        let path = path.trim_start_matches('/').to_owned();
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        if let Some((_, dirs)) = components.split_last() {
            for dir in dirs {
                if !parent.is_empty() {
                    parent.push('/');
                }
                parent.push_str(dir);
                if self.written.insert(parent.clone()) {
                    self.header(&parent, S_IFDIR | 0o755, 0, (0, 0))?;
                }
            }
        }
        Ok(self.written.insert(path.clone()).then_some(path))
    }

    fn dir(&mut self, path: &str) -> io::Result<()> {
        if let Some(path) = self.claim(path)? {
            self.header(&path, S_IFDIR | 0o755, 0, (0, 0))?;
        }
        Ok(())
    }

    fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        if let Some(path) = self.claim(path)? {
            self.header(&path, S_IFCHR | perm, 0, (major, minor))?;
        }
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        if let Some(path) = self.claim(path)? {
            self.header(&path, S_IFLNK | 0o777, target.len(), (0, 0))?;
            self.out.write_all(target.as_bytes())?;
            self.pad(target.len())?;
        }
        Ok(())
    }

    fn file_bytes(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        if let Some(path) = self.claim(path)? {
            self.header(&path, S_IFREG | perm, data.len(), (0, 0))?;
            self.out.write_all(data)?;
            self.pad(data.len())?;
        }
        Ok(())
    }

    /// Streams a host file (test binaries can be tens of MiB).
    fn file_from(&mut self, path: &str, perm: u32, host: &Path) -> io::Result<()> {
        let Some(path) = self.claim(path)? else {
            return Ok(());
        };
        let mut src = File::open(host)?;
        let len = src.metadata()?.len();
        let size = usize::try_from(len)
            .ok()
            .filter(|_| len <= u64::from(u32::MAX))
            .ok_or_else(|| io::Error::other("file larger than 4 GiB"))?;
        self.header(&path, S_IFREG | perm, size, (0, 0))?;
        let copied = io::copy(&mut src, &mut self.out)?;
        if copied != len {
            return Err(io::Error::other("file changed while it was copied"));
        }
        self.pad(size)
    }

    fn finish(mut self) -> io::Result<()> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.out.flush()
    }

    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let name_size = name.len() + 1;
        // Fields: ino mode uid gid nlink mtime filesize devmajor devminor
        // rdevmajor rdevminor namesize check. Owner root, mtime 0 so that
        // the archive only changes when its content does.
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name_size as u32,
            0,
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + name_size)
    }

    /// Header+name and data are each padded to a multiple of four bytes.
    fn pad(&mut self, len: usize) -> io::Result<()> {
        let padding = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..padding])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_parents_come_first() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.file_bytes("a/b/c", 0o644, b"hello").expect("write");
        cpio.file_bytes("/a/b/c", 0o644, b"again").expect("write");
        let out = {
            let mut c = cpio;
            c.header("TRAILER!!!", 0, 0, (0, 0)).expect("write");
            c.out
        };
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        let a = text.find("a\0").expect("a");
        let ab = text.find("a/b\0").expect("a/b");
        let abc = text.find("a/b/c\0").expect("a/b/c");
        assert!(a < ab && ab < abc);
        assert_eq!(text.matches("a/b/c\0").count(), 1);
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
