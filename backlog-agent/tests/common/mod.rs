//! Support for the privileged tests: the agent as a child process, private
//! network namespaces, the kernel's own counters, and tracefs instances
//! that count kernel events independently of the agent.
//!
//! Privileged tests skip with a message when they cannot run, except under
//! CI=true (and in the qemu guests), where a skip is a failure: a green run
//! must mean the kernel paths were really exercised.
#![allow(dead_code)] // each test binary uses a different subset

pub mod accounting;
pub mod bench;
pub mod http;
pub mod scenarios;
pub mod storm;
pub mod synflood;

/// The table of outside programs, shared with xtask (one file, one parser).
#[path = "../../../xtask/src/outside.rs"]
pub mod outside_table;
/// The expected-support matrix, shared with xtask.
#[path = "../../../xtask/src/support.rs"]
pub mod support;

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

/// Privileged tests count kernel events machine-wide: they must not
/// overlap even when the harness runs tests in parallel.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn must_not_skip() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var_os("BACKLOG_IN_GUEST").is_some()
}

/// The one place a test decides to skip: says so loudly and returns, or
/// panics under CI=true and in the guests, where a green run must mean the
/// test really ran.
pub fn skip(test: &str, why: &str) {
    let message = format!("{test}: {why}");
    if must_not_skip() {
        panic!("{message}; a test may not skip under CI");
    }
    eprintln!("SKIPPED {message}");
}

/// True when this test can drive the kernel (root, BTF); otherwise skips
/// (see [`skip`]).
pub fn privileged(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (/sys/kernel/btf/vmlinux)");
    }
    if missing.is_empty() {
        return true;
    }
    skip(test, &format!("needs {}", missing.join(" and ")));
    false
}

/// The path of an outside program, found through xtask/outside-programs.tsv:
/// tests start outside programs only through this, so the table stays the
/// one list of what the machine must have (an xtask unit test checks it).
/// A missing program fails the test: `cargo xtask setup` installs it.
pub fn outside(program: &str) -> PathBuf {
    outside_table::locate(program).unwrap_or_else(|err| panic!("{err}"))
}

/// Like [`outside`], for a program a benchmark can do without (bpftrace,
/// which the guests' initramfs does not carry): the caller prints why it
/// skips what needs it.
pub fn try_outside(program: &str) -> Result<PathBuf, String> {
    outside_table::locate(program)
}

/// What xtask/support-matrix.tsv expects of `family` (`fentry`, `kprobe`,
/// `tracepoint` or `auto`) on the running kernel, per drop kind. Panics
/// when the kernel's series is not in the table: a new kernel is added
/// explicitly.
pub fn expected_support(family: &str) -> std::collections::BTreeMap<String, support::Support> {
    let table = support::table();
    support::expected(&table, &kernel_release(), family)
        .unwrap_or_else(|err| panic!("{err}"))
        .clone()
}

/// True when the table says `family` traces every one of `kinds` here;
/// false when it says one of them is not observable.
pub fn expected_traced(family: &str, kinds: &[&str]) -> bool {
    let expected = expected_support(family);
    assert!(!kinds.is_empty(), "no kinds asked about");
    kinds.iter().all(|kind| {
        expected
            .get(*kind)
            .unwrap_or_else(|| panic!("{kind} is not a drop kind of the support table"))
            .is_traced()
    })
}

/// One cell of the support matrix as the agent reported it, for `cargo
/// xtask vm-test` (which compares it with the table itself, so a guest
/// whose test did not report a cell fails too).
pub fn support_line(family: &str, kind: &str, got: Option<&support::Support>) {
    use std::io::Write as _;
    let (cell, detail) = match got {
        Some(support::Support::Traced(f)) => (f.as_str(), String::new()),
        Some(support::Support::NotObservable(why)) => ("-", why.clone()),
        None => ("unreported", String::new()),
    };
    let line = format!(
        "BACKLOG-SUPPORT kernel={} family={family} kind={kind} agent={cell} detail={}\n",
        kernel_release(),
        detail.replace(['\n', '\r'], " ")
    );
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

pub fn agent_bin() -> PathBuf {
    std::env::var_os("BACKLOG_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_backlog-agent")))
}

/// A copy of the agent that any user can run, wherever the clone lives:
/// a clone in /root (mode 0700) is out of nobody's reach. The copy lives
/// in a directory of its own under /tmp (not $TMPDIR, which may be under
/// /root too) that everyone may enter; it goes when the TempDir drops.
pub fn agent_for_any_user() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .tempdir_in("/tmp")
        .expect("temporary directory in /tmp");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
        .expect("chmod 0755 the temporary directory");
    let agent = dir.path().join("backlog-agent");
    fs::copy(agent_bin(), &agent).expect("copy the agent");
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755))
        .expect("chmod 0755 the agent copy");
    (dir, agent)
}

pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// One cell of the guest matrix table (`cargo xtask vm-test` collects
/// these lines from every kernel).
///
/// Written to the stdout handle directly: libtest captures `println!` of
/// passing tests, and these lines must reach the guest console.
pub fn matrix(family: &str, test: &str, result: &str, detail: &str) {
    use std::io::Write as _;
    // detail= runs to the end of the line (vm/matrix.rs): only line
    // breaks need replacing.
    let detail = detail.replace(['\n', '\r'], " ");
    let line = format!(
        "BACKLOG-MATRIX kernel={} family={family} test={test} result={result} detail={detail}\n",
        kernel_release()
    );
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// A measured figure for the closing notes, uncaptured like `matrix`.
pub fn figure(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stderr().lock();
    let _ = writeln!(out, "BACKLOG-FIGURE kernel={} {text}", kernel_release());
}

/// A running backlog-agent.
pub struct Agent {
    child: Child,
    stderr_lines: mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
    /// stdout lines as they arrive, for tests that wait for an event.
    stdout_lines: Arc<Mutex<Vec<String>>>,
    stdout: Option<thread::JoinHandle<()>>,
}

/// What the agent printed, after it exited.
pub struct AgentRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl AgentRun {
    pub fn json_events(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON line {line:?}: {e}"))
            })
            .collect()
    }
}

pub enum Started {
    Ready(Agent),
    /// The agent exited before it was ready (e.g. a forced hook family the
    /// kernel cannot serve).
    Exited(AgentRun),
}

impl Agent {
    /// Starts the agent and waits for its `ready` line.
    pub fn start(args: &[&str]) -> Started {
        let mut command = Command::new(agent_bin());
        command.args(args);
        Agent::start_command(command)
    }

    /// Like [`Agent::start`], for a command prepared by the caller (e.g.
    /// one that drops to another user before exec).
    pub fn start_command(mut command: Command) -> Started {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin().display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, stderr_lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdout_pipe = child.stdout.take().expect("piped stdout");
        let stdout_lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&stdout_lines);
        let stdout = thread::spawn(move || {
            for line in BufReader::new(stdout_pipe).lines() {
                let Ok(line) = line else { break };
                sink.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(line);
            }
        });
        let mut agent = Agent {
            child,
            stderr_lines,
            stderr_seen: Vec::new(),
            stdout_lines,
            stdout: Some(stdout),
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match agent.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.starts_with("backlog-agent: ready");
                    agent.stderr_seen.push(line);
                    if ready {
                        return Started::Ready(agent);
                    }
                }
                // stderr closed: the agent exited.
                Err(mpsc::RecvTimeoutError::Disconnected) => return Started::Exited(agent.wait()),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = agent.child.kill();
                    let run = agent.wait();
                    panic!("agent not ready after 120 s; stderr:\n{}", run.stderr);
                }
            }
        }
    }

    pub fn expect_ready(args: &[&str]) -> Agent {
        match Agent::start(args) {
            Started::Ready(agent) => agent,
            Started::Exited(run) => panic!(
                "agent exited before ready ({}):\n{}",
                run.status, run.stderr
            ),
        }
    }

    /// Sends SIGINT and collects the output.
    pub fn stop(self) -> AgentRun {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        self.wait()
    }

    fn wait(mut self) -> AgentRun {
        let status = self.child.wait().expect("wait for the agent");
        let mut stderr = std::mem::take(&mut self.stderr_seen);
        stderr.extend(self.stderr_lines.try_iter());
        // stderr closes when the agent exits: drain what is still in flight.
        while let Ok(line) = self.stderr_lines.recv_timeout(Duration::from_secs(5)) {
            stderr.push(line);
        }
        if let Some(reader) = self.stdout.take() {
            let _ = reader.join();
        }
        let mut stdout = self
            .stdout_lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        AgentRun {
            status,
            stdout,
            stderr: stderr.join("\n"),
        }
    }

    /// Waits until the agent has printed `n` JSON events that `matches`
    /// accepts (polling, with a deadline), so a test stops the agent once
    /// what it waits for is there rather than after a guessed time. Panics
    /// with what was seen when the deadline passes.
    pub fn wait_for_events(
        &self,
        n: usize,
        timeout: Duration,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = {
                let lines = self
                    .stdout_lines
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                lines
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .filter(|e| matches(e))
                    .count()
            };
            if seen >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{seen} of {n} awaited events after {timeout:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (polling, with a deadline) for a stderr line containing
    /// `text` after `ready`; returns it. Panics with what was seen when the
    /// deadline passes.
    pub fn wait_for_stderr(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.stderr_seen.push(line.clone());
                    if found {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no stderr line with {text:?} after {timeout:?}:\n{}",
                    self.stderr_seen.join("\n")
                ),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the agent printed on stderr up to its `ready` line.
    pub fn startup(&self) -> String {
        self.stderr_seen.join("\n")
    }
}

/// A test that panics must not leave an agent attached: later tests would
/// count its events, and the process would outlive the test run.
impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `f` on a thread of its own in a new, private network namespace
/// with loopback up. Sockets, sysctls under /proc/sys/net and
/// /proc/thread-self/net all refer to that namespace inside `f`.
pub fn in_new_netns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    thread::spawn(move || {
        // SAFETY: unshare only affects this thread's namespaces.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        );
        loopback_up();
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn loopback_up() {
    // SAFETY: plain socket/ioctl calls on a zeroed ifreq whose name is set
    // to "lo"; the fd is closed at the end.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &ifr),
            0,
            "bring lo up: {}",
            std::io::Error::last_os_error()
        );
        libc::close(fd);
    }
}

/// Inode of the calling thread's network namespace.
pub fn netns_inode() -> u64 {
    fs::metadata("/proc/thread-self/ns/net")
        .expect("stat /proc/thread-self/ns/net")
        .ino()
}

/// TcpExt counters of the calling thread's network namespace.
pub fn tcp_ext() -> HashMap<String, u64> {
    let text = fs::read_to_string("/proc/thread-self/net/netstat").expect("read netstat");
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no TcpExt lines in netstat:\n{text}");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .map(|(n, v)| (n.to_owned(), v.parse().expect("numeric counter")))
        .collect()
}

pub fn counter_delta(
    before: &HashMap<String, u64>,
    after: &HashMap<String, u64>,
    name: &str,
) -> u64 {
    after.get(name).copied().unwrap_or(0) - before.get(name).copied().unwrap_or(0)
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn set_sysctl(name: &str, value: &str) {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    fs::write(&path, value).unwrap_or_else(|e| panic!("write {path}: {e}"));
}

pub fn tracefs() -> PathBuf {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if PathBuf::from(dir).join("events").is_dir() {
            return dir.into();
        }
    }
    let status = Command::new(outside("mount"))
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .expect("run mount");
    assert!(status.success(), "cannot mount tracefs");
    "/sys/kernel/tracing".into()
}

/// The number a tracepoint prints as `label` in its print fmt (e.g.
/// skb:kfree_skb's `{ 40, "TCP_LISTEN_OVERFLOW" }`): read from tracefs,
/// independently of the BTF lookup the agent does.
pub fn symbolic_value(event: &str, label: &str) -> Option<u64> {
    let format = fs::read_to_string(tracefs().join("events").join(event).join("format")).ok()?;
    let needle = format!("\"{label}\" }}");
    let end = format.find(&needle)?;
    let start = format[..end].rfind('{')?;
    format[start + 1..end]
        .trim()
        .trim_end_matches(',')
        .trim()
        .parse()
        .ok()
}

/// A private tracefs instance with one event enabled under a filter: an
/// independent count of kernel events.
pub struct TraceInstance {
    dir: PathBuf,
    event: String,
}

impl TraceInstance {
    pub fn new(event: &str, filter: &str) -> TraceInstance {
        let dir = tracefs()
            .join("instances")
            .join(format!("backlog-test-{}", std::process::id()));
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let instance = TraceInstance {
            dir,
            event: event.into(),
        };
        fs::write(instance.event_file("filter"), filter).expect("set trace filter");
        instance
    }

    fn event_file(&self, name: &str) -> PathBuf {
        self.dir.join("events").join(&self.event).join(name)
    }

    pub fn enable(&self) {
        fs::write(self.event_file("enable"), "1").expect("enable trace event");
    }

    pub fn disable(&self) {
        fs::write(self.event_file("enable"), "0").expect("disable trace event");
    }

    /// Events recorded; panics if the instance buffer overflowed, since the
    /// count would then be a lower bound only.
    pub fn count(&self) -> u64 {
        let trace = fs::read_to_string(self.dir.join("trace")).expect("read trace");
        for line in trace.lines().filter(|l| l.starts_with('#')) {
            if let Some(rest) = line.split("entries-in-buffer/entries-written:").nth(1) {
                let mut nums = rest.split_whitespace().next().unwrap_or("").split('/');
                let (a, b) = (nums.next(), nums.next());
                assert_eq!(a, b, "trace instance buffer overflowed: {line}");
            }
        }
        trace
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count() as u64
    }
}

impl Drop for TraceInstance {
    fn drop(&mut self) {
        let _ = fs::write(self.event_file("enable"), "0");
        let _ = fs::remove_dir(&self.dir);
    }
}
