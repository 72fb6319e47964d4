//! In-kernel filters: for each of --port, --netns, --pid, --cgroup and
//! --unix-path, a matching and a non-matching listener both overflow; the
//! agent must report, summarise and count only the matching one, and as
//! many drops as the kernel counted for it.

mod common;

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use common::{
    accounting::{explained, kernel_skipped},
    counter_delta, in_new_netns, netns_inode, privileged, scenarios, serial, tcp_ext, Agent,
    AgentRun,
};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

const MATCH_PORT: u16 = 8080;
const NOISE_PORT: u16 = 8081;
/// Set in the child that `overflow_child` spawns.
const CHILD_ENV: &str = "BACKLOG_FILTER_CHILD";

fn final_ack_overflow(port: u16) -> u64 {
    let before = tcp_ext();
    scenarios::final_ack_overflow(
        (std::net::Ipv4Addr::LOCALHOST, port).into(),
        8,
        Duration::from_millis(1200),
    );
    counter_delta(&before, &tcp_ext(), "ListenOverflows")
}

fn drops(run: &AgentRun) -> Vec<Value> {
    run.json_events()
        .into_iter()
        .filter(|e| {
            !["listener_summary", "netns_counters", "kernel_skips"]
                .contains(&e["kind"].as_str().unwrap_or(""))
        })
        .collect()
}

fn summaries(run: &AgentRun) -> Vec<Value> {
    run.json_events()
        .into_iter()
        .filter(|e| e["kind"] == "listener_summary")
        .collect()
}

/// Every TCP event and summary is about `port` in `netns`, and the final-ACK
/// events number `expected` (the kernel's ListenOverflows for it), or fewer
/// by no more than the runs the agent said the kernel skipped.
fn assert_only(run: &AgentRun, port: u16, netns: u64, expected: u64) {
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
    assert!(
        run.stderr.contains("filter (in the kernel): only"),
        "no start-up line about the filter:\n{}",
        run.stderr
    );
    let events = drops(run);
    for e in events.iter().chain(summaries(run).iter()) {
        assert_eq!(e["listener"]["port"], port, "unwanted line: {e}");
        assert_eq!(e["netns"].as_u64(), Some(netns), "unwanted line: {e}");
    }
    let acks = events
        .iter()
        .filter(|e| e["kind"] == "ack_dropped_accept_queue_full")
        .count() as u64;
    assert!(expected > 0, "the matching listener did not overflow");
    let skipped = kernel_skipped(&run.json_events(), &["ack_dropped_accept_queue_full"]);
    assert!(
        explained(acks, expected, skipped),
        "final-ACK events {acks} vs ListenOverflows {expected} ({skipped} skipped runs said)"
    );
    assert_eq!(summaries(run).len(), 1, "{}", run.stdout);
}

#[test]
fn port_filter() {
    if !privileged("port_filter") {
        return;
    }
    let _serial = serial();
    let agent = Agent::expect_ready(&["--output", "json", "--port", &MATCH_PORT.to_string()]);
    let (netns, matching, noise) = in_new_netns(|| {
        let noise = final_ack_overflow(NOISE_PORT);
        let matching = final_ack_overflow(MATCH_PORT);
        (netns_inode(), matching, noise)
    });
    let run = agent.stop();
    assert!(noise > 0, "the noise listener did not overflow");
    common::figure(&format!(
        "filter --port: matching={matching} noise={noise} events={}",
        drops(&run).len()
    ));
    assert_only(&run, MATCH_PORT, netns, matching);
}

/// A private namespace held by a thread until `done` is dropped; its
/// overflow runs when `go` is sent.
struct HeldNetns {
    inode: u64,
    go: mpsc::Sender<()>,
    result: mpsc::Receiver<u64>,
    thread: thread::JoinHandle<()>,
}

fn held_netns(port: u16) -> HeldNetns {
    let (inode_tx, inode_rx) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let (result_tx, result) = mpsc::channel();
    let thread = thread::spawn(move || {
        in_new_netns(move || {
            inode_tx.send(netns_inode()).unwrap();
            if go_rx.recv().is_ok() {
                result_tx.send(final_ack_overflow(port)).unwrap();
            }
        })
    });
    HeldNetns {
        inode: inode_rx.recv().unwrap(),
        go,
        result,
        thread,
    }
}

#[test]
fn netns_filter() {
    if !privileged("netns_filter") {
        return;
    }
    let _serial = serial();
    let wanted = held_netns(MATCH_PORT);
    let other = held_netns(MATCH_PORT);
    let agent = Agent::expect_ready(&["--output", "json", "--netns", &wanted.inode.to_string()]);
    let mut overflows = Vec::new();
    for ns in [&other, &wanted] {
        ns.go.send(()).unwrap();
        overflows.push(ns.result.recv().unwrap());
    }
    let run = agent.stop();
    let (noise, matching) = (overflows[0], overflows[1]);
    let wanted_inode = wanted.inode;
    for ns in [wanted, other] {
        drop(ns.go);
        ns.thread.join().unwrap();
    }
    assert!(noise > 0, "the other namespace's listener did not overflow");
    assert_only(&run, MATCH_PORT, wanted_inode, matching);
}

/// This test binary again, as a separate process that overflows a
/// listener on MATCH_PORT when told to (a line on its stdin), in the
/// network namespace of the calling thread, and then exits.
fn overflow_child() -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_overflows_on_request",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the overflow child")
}

/// Not a test on its own: the body of [`overflow_child`].
#[test]
#[ignore = "run by the filter tests as a child process"]
fn child_overflows_on_request() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let mut line = String::new();
    BufReader::new(std::io::stdin())
        .read_line(&mut line)
        .unwrap();
    final_ack_overflow(MATCH_PORT);
}

/// The child's overflow, measured from this thread's namespace (the
/// child's).
fn run_child(mut child: Child) -> u64 {
    let before = tcp_ext();
    writeln!(child.stdin.take().unwrap(), "go").unwrap();
    assert!(child.wait().unwrap().success(), "the overflow child failed");
    counter_delta(&before, &tcp_ext(), "ListenOverflows")
}

/// --pid of a process that has not called listen() yet: its listener is
/// added when the agent sees the listen(). The noise listener belongs to
/// this process.
#[test]
fn pid_filter() {
    if !privileged("pid_filter") {
        return;
    }
    let _serial = serial();
    let (pid_tx, pid_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let scenario = thread::spawn(move || {
        in_new_netns(move || {
            let child = overflow_child();
            pid_tx.send((child.id(), netns_inode())).unwrap();
            ready_rx.recv().unwrap();
            let noise = final_ack_overflow(NOISE_PORT);
            (run_child(child), noise)
        })
    });
    let (pid, netns) = pid_rx.recv().unwrap();
    let agent = Agent::expect_ready(&["--output", "json", "--pid", &pid.to_string()]);
    ready_tx.send(()).unwrap();
    let (matching, noise) = scenario.join().unwrap();
    let run = agent.stop();
    assert!(noise > 0, "the noise listener did not overflow");
    assert!(
        run.stderr
            .contains(&format!("held by pid {pid} (0 sockets now")),
        "{}",
        run.stderr
    );
    assert_only(&run, MATCH_PORT, netns, matching);
}

/// A cgroup of our own under the cgroup2 mount, removed at the end.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new() -> TestCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = backlog_agent::enrich::context::cgroup2_mount_point(&mountinfo)
            .expect("a cgroup2 mount (the agent needs one for --cgroup)");
        let dir = root.join(format!("backlog-filter-test-{}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup(dir)
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("move {pid} into {}: {e}", self.0.display()));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// --cgroup: the child, moved into a cgroup of its own before it creates
/// its listener, matches; this process's listener does not.
#[test]
fn cgroup_filter() {
    if !privileged("cgroup_filter") {
        return;
    }
    let _serial = serial();
    let cgroup = TestCgroup::new();
    let cgroup_path = cgroup.0.clone();
    let (pid_tx, pid_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let scenario = thread::spawn(move || {
        in_new_netns(move || {
            let child = overflow_child();
            pid_tx.send((child.id(), netns_inode())).unwrap();
            ready_rx.recv().unwrap();
            let noise = final_ack_overflow(NOISE_PORT);
            (run_child(child), noise)
        })
    });
    let (pid, netns) = pid_rx.recv().unwrap();
    cgroup.enter(pid);
    let agent = Agent::expect_ready(&[
        "--output",
        "json",
        "--cgroup",
        cgroup_path.to_str().unwrap(),
    ]);
    ready_tx.send(()).unwrap();
    let (matching, noise) = scenario.join().unwrap();
    let run = agent.stop();
    assert!(noise > 0, "the noise listener did not overflow");
    assert_only(&run, MATCH_PORT, netns, matching);
    let id = std::fs::metadata(&cgroup_path).unwrap().ino();
    // Drop events carry the listener's cgroup (near-full warnings, which
    // the filter lets through too, do not).
    let acks: Vec<Value> = drops(&run)
        .into_iter()
        .filter(|e| e["kind"] == "ack_dropped_accept_queue_full")
        .collect();
    assert!(!acks.is_empty(), "no drop events:\n{}", run.stdout);
    for e in acks {
        assert_eq!(e["cgroup_id"].as_u64(), Some(id), "{e}");
    }
}

/// Non-blocking connects to a UNIX listener with backlog 1 until EAGAIN;
/// returns the listener, the connected clients and the EAGAIN count.
fn unix_eagains(path: &Path) -> (std::os::unix::net::UnixListener, Vec<Socket>, u64) {
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    // SAFETY: listen() on a valid socket fd changes only its backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 1) }, 0);
    let mut clients = Vec::new();
    let mut eagains = 0;
    for _ in 0..6 {
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        socket.set_nonblocking(true).unwrap();
        match socket.connect(&socket2::SockAddr::unix(path).unwrap()) {
            Ok(()) => clients.push(socket),
            Err(e) if e.kind() == ErrorKind::WouldBlock => eagains += 1,
            Err(e) => panic!("unix connect: {e}"),
        }
    }
    (listener, clients, eagains)
}

#[test]
fn unix_path_filter() {
    if !privileged("unix_path_filter") {
        return;
    }
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let wanted = dir.path().join("wanted.sock");
    let other = dir.path().join("other.sock");
    let agent = Agent::expect_ready(&["--output", "json", "--unix-path", wanted.to_str().unwrap()]);
    let (l1, c1, noise) = unix_eagains(&other);
    let (l2, c2, matching) = unix_eagains(&wanted);
    let run = agent.stop();
    drop((l1, c1, l2, c2));
    assert!(run.status.success(), "{}", run.stderr);
    assert!(noise > 0 && matching > 0, "no EAGAIN");
    let events = drops(&run);
    for e in events.iter().chain(summaries(&run).iter()) {
        assert_eq!(
            e["listener"]["path"],
            wanted.to_str().unwrap(),
            "unwanted: {e}"
        );
    }
    assert_eq!(events.len() as u64, matching, "{}", run.stdout);
    assert_eq!(summaries(&run).len(), 1, "{}", run.stdout);
    assert!(run.stderr.contains("(no TCP listeners)"), "{}", run.stderr);
}
