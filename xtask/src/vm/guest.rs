//! Booting one guest in qemu and reading its verdict off the serial
//! console.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use super::initramfs::{MARK_KERNEL, MARK_RESULT, MARK_TEST};
use super::matrix::{self, MatrixLine, SupportLine};

/// How long qemu may take to power off after the result marker before it
/// is killed (the verdict is already known by then).
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

pub struct GuestRun<'a> {
    pub label: &'a str,
    pub package: &'a str,
    pub arch: super::Arch,
    pub vmlinuz: &'a Path,
    pub initrd: &'a Path,
    pub log: &'a Path,
    pub timeout: Duration,
    /// Whether the payload reports the agent's start-up per family (the
    /// default tests do; `--test-bin` and `--bench` do not).
    pub check_support: bool,
}

pub struct GuestOutcome {
    pub label: String,
    pub package: Option<String>,
    /// `uname -r` as the guest printed it.
    pub uname: Option<String>,
    /// The aggregate exit code /init reported.
    pub rc: Option<i32>,
    /// Tests whose exit code was not 0, with that code.
    pub failed_tests: Vec<(String, String)>,
    pub matrix: Vec<MatrixLine>,
    /// The agent's start-up per family and kind, as the guest reported it.
    pub support: Vec<SupportLine>,
    /// Whether `support` is compared with xtask/support-matrix.tsv.
    pub check_support: bool,
    /// Where `support` differs from the table (filled after the run).
    pub support_differences: Vec<String>,
    /// Why the guest counts as failed even if `rc` says otherwise (panic,
    /// timeout, missing marker, qemu error, kernel not fetched).
    pub problem: Option<String>,
    pub boot_to_marker: Option<Duration>,
    pub wall: Option<Duration>,
    pub log: Option<String>,
    /// A first boot that ended in a kernel panic outside BPF code, after
    /// which the guest was booted once more (see `run`).
    pub panicked_before: Option<String>,
}

impl GuestOutcome {
    fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            package: None,
            uname: None,
            rc: None,
            failed_tests: Vec::new(),
            matrix: Vec::new(),
            support: Vec::new(),
            check_support: false,
            support_differences: Vec::new(),
            problem: None,
            boot_to_marker: None,
            wall: None,
            log: None,
            panicked_before: None,
        }
    }

    /// A guest whose kernel could not be fetched.
    pub fn not_booted(label: &str, problem: String) -> Self {
        Self {
            problem: Some(problem),
            ..Self::new(label)
        }
    }

    /// Why this guest failed, or None if it passed. A matrix line with
    /// result=fail fails the guest even when the test binary exited 0.
    pub fn failure(&self) -> Option<String> {
        if let Some(problem) = &self.problem {
            return Some(problem.clone());
        }
        if !self.failed_tests.is_empty() {
            let tests: Vec<String> = self
                .failed_tests
                .iter()
                .map(|(name, rc)| format!("{name} rc={rc}"))
                .collect();
            return Some(format!("failed: {}", tests.join(", ")));
        }
        match self.rc {
            Some(0) => {}
            Some(rc) => return Some(format!("rc={rc}")),
            None => return Some("no result marker".to_owned()),
        }
        let failed: Vec<&str> = self
            .matrix
            .iter()
            .filter(|m| m.result == "fail")
            .map(|m| m.test.as_str())
            .collect();
        if !failed.is_empty() {
            return Some(format!("matrix reports fail for {}", failed.join(", ")));
        }
        if !self.support_differences.is_empty() {
            return Some(format!(
                "{} differences from xtask/support-matrix.tsv",
                self.support_differences.len()
            ));
        }
        None
    }

    /// Columns of the per-kernel summary: label, verdict, package,
    /// boot-to-marker, wall time, log, and why it failed.
    pub fn summary_fields(&self) -> [String; 7] {
        let secs =
            |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()));
        let failure = self.failure();
        [
            self.label.clone(),
            if failure.is_none() { "PASS" } else { "FAIL" }.to_owned(),
            self.package.clone().unwrap_or_else(|| "-".to_owned()),
            format!("boot-to-marker {}", secs(self.boot_to_marker)),
            format!("wall {}", secs(self.wall)),
            self.log
                .as_deref()
                .map_or(String::new(), |log| format!("log {log}")),
            match (failure, &self.panicked_before) {
                (Some(failure), _) => failure,
                (None, Some(panic)) => format!("passed on a second boot; the first: {panic}"),
                (None, None) => String::new(),
            },
        ]
    }
}

enum Event {
    Console(String),
    QemuStderr(String),
}

/// Boots the guest; a boot that ends in a kernel panic whose oops names no
/// BPF code is booted once more, its console kept beside the log as
/// `<log>.panic`. The kernels emulated here have panicked in their own
/// text patching (an `int3` left by smp_text_poke hit on the other vCPU
/// while tracefs disabled an event: 7.3 under TCG, once in 6 rehearsals),
/// which no test can cause or fix; a panic in or under a BPF program is
/// not retried, and the retry is said in the summary either way.
pub fn run(guest: &GuestRun) -> GuestOutcome {
    let first = run_once(guest);
    let Some(panic) = first.retryable_panic.clone() else {
        return first.outcome;
    };
    let kept = guest.log.with_extension("log.panic");
    let _ = std::fs::rename(guest.log, &kept);
    println!(
        "vm-test: {}: {panic} outside BPF code (console kept in {}); booting it once more",
        guest.label,
        super::display_rel(&kept)
    );
    let mut second = run_once(guest).outcome;
    second.panicked_before = Some(panic);
    second
}

struct Once {
    outcome: GuestOutcome,
    /// The panic, when the oops before it names no BPF code.
    retryable_panic: Option<String>,
}

fn run_once(guest: &GuestRun) -> Once {
    let mut outcome = GuestOutcome::new(guest.label);
    outcome.package = Some(guest.package.to_owned());
    outcome.log = Some(super::display_rel(guest.log));
    outcome.check_support = guest.check_support;
    let mut oops_names_bpf = false;
    let mut retryable_panic = None;
    match boot(guest, &mut outcome, &mut oops_names_bpf) {
        Err(Problem::Panic(problem)) => {
            if !oops_names_bpf {
                retryable_panic = Some(problem.clone());
            }
            outcome.problem = Some(problem);
        }
        Err(Problem::Other(problem)) => outcome.problem = Some(problem),
        Ok(()) => {}
    }
    if guest.check_support {
        if let Some(release) = &outcome.uname {
            outcome.support_differences = matrix::support_differences(release, &outcome.support);
        }
    }
    Once {
        outcome,
        retryable_panic,
    }
}

enum Problem {
    Panic(String),
    Other(String),
}

impl From<String> for Problem {
    fn from(problem: String) -> Self {
        Problem::Other(problem)
    }
}

/// Whether a console line of an oops names BPF code (a program, the
/// trampolines, the BPF core or tracing glue): such a panic is not retried.
fn names_bpf(line: &str) -> bool {
    line.contains("bpf")
}

/// Runs qemu to completion (or kills it), filling `outcome` from the
/// console; returns the problem that makes the guest fail, if any.
fn boot(
    guest: &GuestRun,
    outcome: &mut GuestOutcome,
    oops_names_bpf: &mut bool,
) -> Result<(), Problem> {
    let mut log = File::create(guest.log)
        .map_err(|err| format!("cannot create {}: {err}", guest.log.display()))?;
    let started = Instant::now();
    let qemu = guest.arch.qemu();
    let mut command = Command::new(qemu);
    let console = match guest.arch {
        super::Arch::X86_64 => "ttyS0",
        super::Arch::Aarch64 => {
            // The generic virtual board: a PL011 UART (ttyAMA0) and virtio,
            // which Debian's arm64 cloud kernel drives with built-in drivers.
            command.args(["-M", "virt"]);
            "ttyAMA0"
        }
    };
    let mut child = command
        // Nested KVM crashes or hangs on this project's machines: software
        // emulation, spread over both host cores.
        .args(["-accel", "tcg,thread=multi", "-cpu", cpu(guest.arch)])
        .args(["-m", "2048", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(guest.vmlinuz)
        .arg("-initrd")
        .arg(guest.initrd)
        // panic=-1 reboots at once on a panic, and -no-reboot turns that
        // reboot into qemu exiting: a panicking guest ends instead of
        // hanging until the timeout.
        .args(["-append", &format!("console={console} quiet panic=-1")])
        // With -nographic the console is multiplexed with qemu's monitor on
        // stdio; a null stdin keeps the host terminal out of it.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| format!("cannot start {qemu}: {err}"))?;

    let (tx, rx) = mpsc::channel();
    spawn_reader(child.stdout.take(), tx.clone(), Event::Console);
    spawn_reader(child.stderr.take(), tx, Event::QemuStderr);

    let mut deadline = started + guest.timeout;
    let mut timed_out = false;
    let mut killed = false;
    let mut panic_line: Option<String> = None;
    // From an oops to the panic: the lines that say where it happened.
    let mut in_oops = false;
    let mut qemu_errors: Vec<String> = Vec::new();
    loop {
        let now = Instant::now();
        let event = match rx.recv_timeout(deadline.saturating_duration_since(now)) {
            Ok(event) => event,
            // Both pipes closed: qemu has exited.
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) if !killed => {
                timed_out = outcome.rc.is_none();
                kill(&mut child);
                killed = true;
                // The readers end once the pipes close; drain what is left.
                deadline = Instant::now() + Duration::from_secs(10);
                continue;
            }
            // A grandchild holding the pipes open must not hang us.
            Err(RecvTimeoutError::Timeout) => break,
        };
        let line = match event {
            Event::Console(line) => line,
            Event::QemuStderr(line) => {
                qemu_errors.push(line.clone());
                format!("qemu: {line}")
            }
        };
        // Logging is best effort: a full disk must not hide the verdict.
        let _ = writeln!(log, "{line}");
        println!("[{}] {line}", guest.label);

        if line.contains("Kernel panic - not syncing") && panic_line.is_none() {
            panic_line = Some(line.trim().to_owned());
        }
        if line.contains("Oops:") || line.contains("BUG:") {
            in_oops = true;
        }
        if in_oops && panic_line.is_none() && names_bpf(&line) {
            *oops_names_bpf = true;
        }
        if let Some(rest) = after(&line, MARK_KERNEL) {
            outcome.uname = Some(rest.trim().to_owned());
        } else if let Some(rest) = after(&line, MARK_TEST) {
            if let Some(rc) = field(rest, "rc") {
                if rc != "0" {
                    let name = field(rest, "name").unwrap_or("?");
                    outcome.failed_tests.push((name.to_owned(), rc.to_owned()));
                }
            }
        } else if let Some(rest) = after(&line, MARK_RESULT) {
            let rc = rest.split_whitespace().next().unwrap_or_default();
            // An unparsable code counts as a failure, not as a pass.
            outcome.rc = Some(rc.parse().unwrap_or(-1));
            outcome.boot_to_marker = Some(started.elapsed());
            deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
        } else if let Some(matrix) = MatrixLine::parse(&line) {
            outcome.matrix.push(matrix);
        } else if let Some(support) = SupportLine::parse(&line) {
            outcome.support.push(support);
        }
    }
    let status = child.wait();
    outcome.wall = Some(started.elapsed());

    if let Some(panic) = panic_line {
        return Err(Problem::Panic(format!("kernel panic: {panic}")));
    }
    if timed_out {
        return Err(format!("timed out after {}s", guest.timeout.as_secs()).into());
    }
    if outcome.rc.is_none() {
        let qemu = match status {
            Ok(status) if !status.success() => {
                let last = qemu_errors
                    .last()
                    .map_or(String::new(), |e| format!(": {e}"));
                format!(", qemu exited with {status}{last}")
            }
            Ok(_) => String::new(),
            Err(err) => format!(", waiting for qemu failed: {err}"),
        };
        return Err(format!(
            "no {} marker on the console{qemu}",
            MARK_RESULT.trim_end_matches(" rc=")
        )
        .into());
    }
    Ok(())
}

/// The emulated CPU: every feature qemu can emulate, so that the kernel
/// takes the same paths as on recent hardware.
fn cpu(arch: super::Arch) -> &'static str {
    match arch {
        super::Arch::X86_64 => "max",
        // Emulating the architected pointer-authentication algorithm
        // (QARMA) costs TCG dearly on every function return; the
        // implementation-defined one keeps the feature for the kernel at a
        // fraction of the cost.
        super::Arch::Aarch64 => "max,pauth-impdef=on",
    }
}

fn spawn_reader<R: std::io::Read + Send + 'static>(
    pipe: Option<R>,
    tx: mpsc::Sender<Event>,
    wrap: fn(String) -> Event,
) {
    let Some(pipe) = pipe else { return };
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = strip_controls(&String::from_utf8_lossy(&buf));
                    if tx.send(wrap(line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Drops terminal control sequences and characters: SeaBIOS and the kernel
/// reset and clear the screen (ESC c, ESC [2J), which would wipe the user's
/// terminal or CI log, and the serial console ends lines with \r\n.
fn strip_controls(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI sequences run to a final byte in @..~; other escapes
                // are two characters long.
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

fn kill(child: &mut Child) {
    // Already exited is fine; anything else leaves nothing better to do.
    let _ = child.kill();
}

/// The text after `marker`, wherever it starts in the line (kernel messages
/// can land in front of it on the console).
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|at| &line[at + marker.len()..])
}

/// The value of `key=` among space-separated words.
fn field<'a>(words: &'a str, key: &str) -> Option<&'a str> {
    words
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_control_sequences_are_dropped() {
        assert_eq!(
            strip_controls("\x1bc\x1b[?7l\x1b[2J\x1b[0mSeaBIOS (1.16)\r\n"),
            "SeaBIOS (1.16)"
        );
        assert_eq!(strip_controls("a\tb\r"), "a\tb");
    }

    #[test]
    fn only_a_panic_outside_bpf_code_is_booted_again() {
        // From the 7.3 guest's console (text patching under TCG).
        assert!(!names_bpf(
            "[  114.853454] RIP: 0010:ttwu_do_activate+0x93/0x1b0"
        ));
        assert!(!names_bpf(
            "[  114.857813]  tracepoint_probe_unregister+0x199/0x390"
        ));
        assert!(names_bpf(
            "[    9.1] RIP: 0010:bpf_prog_6deef7357e7b4530_accept+0x2c/0x80"
        ));
        assert!(names_bpf("[    9.2]  bpf_trace_run3+0x8c/0x110"));
        let mut outcome = GuestOutcome::new("7.3");
        outcome.rc = Some(0);
        outcome.panicked_before = Some("kernel panic: x".into());
        assert_eq!(outcome.failure(), None);
        assert_eq!(
            outcome.summary_fields()[6],
            "passed on a second boot; the first: kernel panic: x"
        );
    }

    #[test]
    fn a_failing_matrix_line_fails_the_guest() {
        let mut outcome = GuestOutcome::new("6.1");
        outcome.rc = Some(0);
        assert_eq!(outcome.failure(), None);
        outcome.matrix.extend(MatrixLine::parse(
            "BACKLOG-MATRIX kernel=k family=kprobe test=t result=fail",
        ));
        assert!(outcome.failure().is_some());
    }
}
