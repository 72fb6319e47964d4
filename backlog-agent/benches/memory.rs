//! `cargo xtask bench` (memory): the agent's RSS and CPU with many
//! listeners and many processes, against the same drops on the machine
//! as it is.
//!
//! 1. A fresh agent, LISTENERS_SMALL new listeners (half TCP on 127.0.0.1
//!    in a private netns, half UNIX), each given a few drops.
//! 2. A fresh agent, PROCESSES idle processes forked by the process that
//!    then creates LISTENERS new listeners the same way (so attribution
//!    reads the processes once, as possible holders).
//!
//! For each: the agent's peak RSS (VmHWM) and RSS (VmRSS) at ready (the
//! peak then is start-up's), once the drops are reported, and once every
//! listener and process is gone; how much of the RSS is the ring buffer's
//! mapping; its CPU; events + aggregated + lost against the EAGAINs the
//! clients saw, and the TCP accept-queue drops the netns counted. The
//! first case also prints the peak after each start-up step
//! (BACKLOG_MEMORY_PHASES). With BACKLOG_AGENT_BIN_BEFORE=PATH (e.g. a
//! build of main), that agent's start-up is measured too, next to this
//! one's: before and after a change, from one command. Figures, not
//! assertions. Bounded: the processes sleep at most 600 s and are killed
//! at the end; the listeners live in a tempdir and a private netns.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::HashSet,
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{
    accounting::accounted,
    bench::{idle_processes, process_cpu, task_cpu},
    storm, Agent, Started,
};

const LISTENERS: usize = 10_000;
const PROCESSES: usize = 10_000;
const LISTENERS_SMALL: usize = 100;
/// EAGAINs per UNIX listener, and connects per TCP listener (the accept
/// queue of backlog 1 holds two; the rest are dropped).
const DROPS_EACH: u64 = 3;
const TCP_CONNECTS_EACH: usize = 2 + DROPS_EACH as usize;
/// Time for the agent's last aggregate window and walk (RELAXED_WALK).
const SETTLE: Duration = Duration::from_millis(6500);

/// A field of /proc/PID/status in kB.
fn status_kb(pid: u32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The RSS of `pid`'s mappings of BPF maps (the ring buffer's data pages
/// are mapped twice, so that a record can wrap), in kB: kernel memory
/// that counts in RSS (as RssFile), not memory the agent allocated.
fn bpf_map_rss_kb(pid: u32) -> u64 {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_map = false;
    let mut kb = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: "start-end perms offset dev inode [path]".
            in_map = line.ends_with("anon_inode:bpf-map");
        } else if in_map {
            if let Some(v) = line.strip_prefix("Rss:") {
                kb += v
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
    }
    kb
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

/// Starts `bin` (default: this build) with BACKLOG_MEMORY_PHASES set.
fn start_agent(bin: Option<&Path>, args: &[&str]) -> Agent {
    let bin = bin.map(Path::to_path_buf).unwrap_or_else(common::agent_bin);
    let mut command = Command::new(&bin);
    command
        .args(["--output", "json"])
        .args(args)
        .env("BACKLOG_MEMORY_PHASES", "1");
    match Agent::start_command(command) {
        Started::Ready(agent) => agent,
        Started::Exited(run) => panic!(
            "{} exited before ready ({}):\n{}",
            bin.display(),
            run.status,
            run.stderr
        ),
    }
}

/// "step peak, ..." from the agent's BACKLOG_MEMORY_PHASES lines (an
/// agent that predates them prints none).
fn phases(stderr: &str) -> String {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("backlog-agent: memory: after ")?;
            let (step, figures) = rest.split_once(": ")?;
            let hwm: u64 = figures
                .split("VmHWM ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(format!("{step} {:.1}", hwm as f64 / 1024.0))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The start-up alone: RSS and peak at ready, and the peak after each
/// step, for this build and, when given, another.
fn startup(label: &str, bin: Option<&Path>) {
    let agent = start_agent(bin, &[]);
    let pid = agent.pid();
    let (hwm, rss, ring) = (
        status_kb(pid, "VmHWM"),
        status_kb(pid, "VmRSS"),
        bpf_map_rss_kb(pid),
    );
    let run = agent.stop();
    println!(
        "  start-up, {label}: peak {}, RSS at ready {} (of which BPF map mappings {})",
        mb(hwm),
        mb(rss),
        mb(ring)
    );
    let steps = phases(&run.stderr);
    if !steps.is_empty() {
        println!("    peak (MB) after each step: {steps}");
    }
}

/// CPU per thread of `pid`, busiest first: where the time goes.
fn threads_cpu(pid: u32) -> String {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return String::new();
    };
    let mut threads: Vec<(String, Duration)> = tasks
        .flatten()
        .filter_map(|t| {
            let tid: u32 = t.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(t.path().join("comm")).ok()?;
            Some((comm.trim().to_owned(), task_cpu(pid, tid)))
        })
        .filter(|(_, cpu)| !cpu.is_zero())
        .collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.1));
    threads
        .iter()
        .map(|(comm, cpu)| format!("{comm} {:.2} s", cpu.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Raises the soft fd limit to the hard one (raising the hard limit needs
/// CAP_SYS_RESOURCE, which a container may not have); the limit.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

/// `n` TCP listeners (backlog 1) on 127.0.0.1 in a new netns, each sent
/// TCP_CONNECTS_EACH non-blocking connects: the accept queue holds two,
/// the others' final ACKs are dropped. The listeners, and the growth of
/// ListenOverflows there.
fn tcp_listeners(n: usize) -> (Vec<TcpListener>, u64) {
    common::in_new_netns(move || {
        let before = common::tcp_ext();
        let mut listeners = Vec::with_capacity(n);
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
            // SAFETY: listen on a valid socket fd.
            unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 1) };
            let to: SocketAddr = listener.local_addr().expect("local addr");
            // The handshake on loopback completes inside connect(); the
            // clients can go at once.
            for _ in 0..TCP_CONNECTS_EACH {
                let client =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .expect("socket");
                client.set_nonblocking(true).expect("non-blocking");
                let _ = client.connect(&to.into());
            }
            listeners.push(listener);
        }
        let after = common::tcp_ext();
        (
            listeners,
            common::counter_delta(&before, &after, "ListenOverflows"),
        )
    })
}

/// A UNIX listener and the client fds that keep its queue full.
type FullUnix = (UnixListener, Vec<i32>);

/// `n` full UNIX listeners in `dir`, each hit by DROPS_EACH EAGAINs.
fn unix_listeners(dir: &Path, tag: &str, n: usize) -> (Vec<FullUnix>, u64, HashSet<String>) {
    let mut eagain = 0;
    let mut listeners = Vec::with_capacity(n);
    let mut paths = HashSet::new();
    for i in 0..n {
        let path = dir.join(format!("{tag}-{i}.sock"));
        let full = storm::full_listener(&path, 0);
        eagain += storm::storm(&path, DROPS_EACH, Duration::from_secs(1)).eagain;
        listeners.push(full);
        paths.insert(path.to_string_lossy().into_owned());
    }
    (listeners, eagain, paths)
}

/// `expire`: with `--expire-after 1`, so that once the listeners are gone
/// their rows expire and the summary folds them (beyond its 4,096).
fn case(dir: &Path, tag: &str, listeners: usize, processes: usize, expire: bool) {
    let mut agent = start_agent(
        None,
        if expire {
            &["--expire-after", "1"]
        } else {
            &[]
        },
    );
    let pid = agent.pid();
    let (ready_hwm, ready_rss) = (status_kb(pid, "VmHWM"), status_kb(pid, "VmRSS"));
    let cpu0 = process_cpu(pid);
    let started = Instant::now();
    // Forked before the listeners exist: children forked after would
    // inherit the full queues' client fds (not close-on-exec), and the
    // agent reads every fd of a new child of a holder once.
    let mut idle = idle_processes(processes);
    let (tcp, overflows) = tcp_listeners(listeners / 2);
    let (unix, eagain, paths) = unix_listeners(dir, tag, listeners - listeners / 2);
    let built = started.elapsed();
    thread::sleep(SETTLE);
    let (hwm, rss, ring) = (
        status_kb(pid, "VmHWM"),
        status_kb(pid, "VmRSS"),
        bpf_map_rss_kb(pid),
    );
    let cpu = process_cpu(pid).saturating_sub(cpu0);
    for child in &mut idle {
        let _ = child.kill();
        let _ = child.wait();
    }
    drop(tcp);
    for (listener, held) in unix {
        storm::release(held);
        drop(listener);
    }
    let folded = if expire {
        agent.wait_for_stderr("idle listeners into the summary", Duration::from_secs(120))
    } else {
        String::new()
    };
    thread::sleep(SETTLE);
    let (hwm_after, rss_after) = (status_kb(pid, "VmHWM"), status_kb(pid, "VmRSS"));
    let cpu_after = process_cpu(pid).saturating_sub(cpu0);
    let threads = threads_cpu(pid);
    let run = agent.stop();
    let a = accounted(&run.json_events(), &["unix_connect_backlog_full"], |r| {
        r["listener"]["path"]
            .as_str()
            .is_some_and(|path| paths.contains(path))
    });
    let (events, aggregated, lost) = (a.events, a.aggregated, a.lost);
    let walks = run
        .stderr
        .lines()
        .find(|l| l.contains("attribution:"))
        .unwrap_or("")
        .to_owned();
    println!(
        "  {listeners} listeners ({} TCP, {} UNIX), {} more processes (set up in {:.1} s):",
        listeners / 2,
        listeners - listeners / 2,
        idle.len(),
        built.as_secs_f64()
    );
    println!(
        "    agent at ready: peak {}, RSS {}; with them: peak {}, RSS {} \
         (BPF map mappings {}); once they are gone: peak {}, RSS {}",
        mb(ready_hwm),
        mb(ready_rss),
        mb(hwm),
        mb(rss),
        mb(ring),
        mb(hwm_after),
        mb(rss_after)
    );
    println!(
        "    agent CPU {:.3} s with them, {:.3} s to the end",
        cpu.as_secs_f64(),
        cpu_after.as_secs_f64()
    );
    println!("    by thread: {threads}");
    // The agent's own view at stop (glibc's in use / kept figures), and
    // after its final summary (the peak then includes the summary's).
    for (step, label) in [
        ("the run", "at stop"),
        ("the final summary", "after the summary"),
    ] {
        let prefix = format!("backlog-agent: memory: after {step}: ");
        if let Some(figures) = run.stderr.lines().find_map(|l| l.strip_prefix(&prefix)) {
            println!("    agent {label}: {figures}");
        }
    }
    if expire {
        println!("    {folded}");
    }
    println!("    {walks}");
    println!(
        "    UNIX: {eagain} EAGAINs; events {events}, aggregated {aggregated}, lost {lost} (identity {}); \
         TCP: ListenOverflows in the netns {overflows}",
        if events + aggregated + lost == eagain {
            "holds"
        } else {
            "BROKEN"
        }
    );
}

fn main() {
    if !common::privileged("bench memory") {
        return;
    }
    // A TCP listener takes one fd, a full UNIX listener two.
    let fds = raise_fd_limit();
    let needed = (LISTENERS / 2 * 3 + 1000) as u64; // for the default N
    if fds < needed {
        println!("fd limit {fds} < {needed}: not run");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    println!("backlog memory bench on {}", common::kernel_release());
    if let Some(before) = std::env::var_os("BACKLOG_AGENT_BIN_BEFORE") {
        startup(
            "before (BACKLOG_AGENT_BIN_BEFORE)",
            Some(&PathBuf::from(before)),
        );
    }
    startup("this build", None);
    case(dir.path(), "small", LISTENERS_SMALL, 0, false);
    // `cargo bench --bench memory -- N`: N listeners and processes;
    // `-- expire`: then N listeners again with `--expire-after 1`.
    let n = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(LISTENERS.max(PROCESSES));
    case(dir.path(), "big", n, n, false);
    if std::env::args().any(|a| a == "expire") {
        case(dir.path(), "expire", n, 0, true);
    }
}
