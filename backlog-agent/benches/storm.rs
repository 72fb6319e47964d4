//! `cargo xtask bench` (second part): the UNIX connect() EAGAIN storm and
//! the cost of the connect() hooks, side by side:
//! 1. the storm's EAGAIN rate without a tracer, with the agent (default
//!    settings, JSON to a pipe) and with bpftrace printing one line per
//!    EAGAIN, as ratios;
//! 2. kernel ns per call of each program (kernel.bpf_stats: run_time_ns /
//!    run_cnt), for the storm and for plain TCP connect()s, which every
//!    connect() on a machine pays;
//! 3. agent (and bpftrace) CPU per EAGAIN;
//! 4. events printed, aggregated and lost, and whether
//!    events + aggregated + lost = the EAGAINs the client saw.
//!
//! Figures from one run on one machine, not assertions. Bounded: each
//! phase runs STORM seconds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{
    bench::{bpf_costs, bpf_programs, print_costs, process_cpu},
    storm, Agent,
};

const STORM: Duration = Duration::from_secs(3);
const TCP_CONNECTS: u64 = 200_000;

/// One storm against a fresh full listener in `dir`.
fn one_storm(dir: &Path, name: &str) -> (storm::Storm, String) {
    let path = dir.join(name);
    let (listener, held) = storm::full_listener(&path, 4);
    let result = storm::storm(&path, u64::MAX, STORM);
    storm::release(held);
    drop(listener);
    (result, path.to_string_lossy().into_owned())
}

/// connect()s to a closed port on loopback: the connect() hooks' cost for
/// what is not AF_UNIX. Blocking ones are refused at once; non-blocking
/// ones return EINPROGRESS (the usual answer for event-driven clients).
fn tcp_connects(nonblocking: bool) -> Duration {
    common::in_new_netns(move || {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = Instant::now();
        for _ in 0..TCP_CONNECTS {
            if nonblocking {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .expect("socket");
                socket.set_nonblocking(true).expect("non-blocking");
                let _ = socket.connect(&to.into());
            } else {
                let _ = std::net::TcpStream::connect(to);
            }
        }
        started.elapsed()
    })
}

/// Sums what the agent accounted for `path`: events, aggregated, lost.
fn accounted(run: &common::AgentRun, path: &str) -> (u64, u64, u64, u64) {
    let (mut events, mut aggregated, mut lost, mut total) = (0, 0, 0, 0);
    for r in run.json_events() {
        if r["listener"]["path"] != path {
            continue;
        }
        if r["kind"] == "listener_summary" {
            let c = &r["accounting"]["unix_connect_backlog_full"];
            lost += c["lost"].as_u64().unwrap_or(0);
            total += c["total"].as_u64().unwrap_or(0);
        } else if r["aggregated"] == true {
            aggregated += r["count"].as_u64().unwrap_or(0);
        } else if r["kind"] == "unix_connect_backlog_full" {
            events += 1;
        }
    }
    (events, aggregated, lost, total)
}

/// 200 new UNIX listeners, each hit by a 20 ms storm, one after the other:
/// the case where every listener is new to the agent's attribution.
const NEW_LISTENERS: usize = 200;
const SHORT_STORM: Duration = Duration::from_millis(20);
const IDLE_PROCESSES: usize = 3000;

/// The many-listeners run under a fresh agent: its CPU, and what it
/// accounted against what the clients saw.
struct ManyListeners {
    eagain: u64,
    events: u64,
    aggregated: u64,
    lost: u64,
    agent_cpu: Duration,
}

fn many_listeners(dir: &Path, tag: &str) -> ManyListeners {
    let agent = Agent::expect_ready(&["--output", "json"]);
    let cpu0 = process_cpu(agent.pid());
    let mut eagain = 0;
    let mut paths = Vec::new();
    for i in 0..NEW_LISTENERS {
        let path = dir.join(format!("{tag}-{i}.sock"));
        let (listener, held) = storm::full_listener(&path, 4);
        eagain += storm::storm(&path, u64::MAX, SHORT_STORM).eagain;
        storm::release(held);
        drop(listener);
        paths.push(path.to_string_lossy().into_owned());
    }
    thread::sleep(Duration::from_millis(1200));
    let agent_cpu = process_cpu(agent.pid()).saturating_sub(cpu0);
    let run = agent.stop();
    let (mut events, mut aggregated, mut lost) = (0, 0, 0);
    for path in &paths {
        let (e, a, l, _) = accounted(&run, path);
        events += e;
        aggregated += a;
        lost += l;
    }
    ManyListeners {
        eagain,
        events,
        aggregated,
        lost,
        agent_cpu,
    }
}

fn report_many(what: &str, m: &ManyListeners) {
    println!(
        "  {what}: {} EAGAINs; events {}, aggregated {}, lost {} (identity {}); agent CPU {:.3} s",
        m.eagain,
        m.events,
        m.aggregated,
        m.lost,
        if m.events + m.aggregated + m.lost == m.eagain {
            "holds"
        } else {
            "BROKEN"
        },
        m.agent_cpu.as_secs_f64()
    );
}

/// (b) to (d): the storm, bpftrace beside it, the connect() hooks' cost.
fn side_by_side(dir: &Path) {
    let (without, _) = one_storm(dir, "none.sock");
    let tcp_without = tcp_connects(false);
    let tcp_nb_without = tcp_connects(true);

    let agent = Agent::expect_ready(&["--output", "json"]);
    let cpu0 = process_cpu(agent.pid());
    let p0 = bpf_programs();
    let (with, path) = one_storm(dir, "agent.sock");
    let p1 = bpf_programs();
    // The agent's last window and drain are part of its cost.
    thread::sleep(Duration::from_millis(1200));
    let agent_cpu = process_cpu(agent.pid()).saturating_sub(cpu0);
    let p2 = bpf_programs();
    let tcp_with = tcp_connects(false);
    let p3 = bpf_programs();
    let tcp_nb_with = tcp_connects(true);
    let p4 = bpf_programs();
    let run = agent.stop();
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);
    let (events, aggregated, lost, total) = accounted(&run, &path);

    // bpftrace, the same one-line question.
    let out = dir.join("bpftrace.out");
    let bpftrace = Command::new(common::outside("bpftrace"))
        .args([
            "-e",
            "tracepoint:syscalls:sys_exit_connect /args->ret == -11/ { printf(\"%d %s\\n\", pid, comm); }",
        ])
        .stdout(fs::File::create(&out).expect("bpftrace output file"))
        .stderr(Stdio::null())
        .spawn();
    let bpftrace_figures = match bpftrace {
        Ok(mut child) => {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("Attaching")
                && Instant::now() < deadline
            {
                thread::sleep(Duration::from_millis(50));
            }
            let cpu0 = process_cpu(child.id());
            let b0 = bpf_programs();
            let (storm, _) = one_storm(dir, "bpftrace.sock");
            let b1 = bpf_programs();
            thread::sleep(Duration::from_millis(1200));
            let cpu = process_cpu(child.id()).saturating_sub(cpu0);
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
            let lines = fs::read_to_string(&out).unwrap_or_default().lines().count() as u64;
            Some((storm, cpu, bpf_costs(&b0, &b1), lines))
        }
        Err(err) => {
            println!("bpftrace not run: {err} (`cargo xtask setup` installs it)");
            None
        }
    };

    println!(
        "(b) UNIX EAGAIN storm, {} s per phase, one client looping non-blocking connect() to a full listener:",
        STORM.as_secs()
    );
    println!("  without tracer: {:.0} EAGAIN/s", without.rate());
    println!(
        "  with backlog-agent: {:.0} EAGAIN/s ({:.3}x)",
        with.rate(),
        with.rate() / without.rate()
    );
    if let Some((storm, ..)) = &bpftrace_figures {
        println!(
            "  with bpftrace printf: {:.0} EAGAIN/s ({:.3}x)",
            storm.rate(),
            storm.rate() / without.rate()
        );
    }
    println!("  kernel cost during the storm with the agent:");
    print_costs("agent", &bpf_costs(&p0, &p1));
    if let Some((_, _, costs, _)) = &bpftrace_figures {
        print_costs("bpftrace", costs);
    }
    println!(
        "  agent CPU: {:.3} s for {} EAGAINs = {:.2} us per EAGAIN",
        agent_cpu.as_secs_f64(),
        with.eagain,
        agent_cpu.as_secs_f64() * 1e6 / with.eagain.max(1) as f64
    );
    if let Some((storm, cpu, _, lines)) = &bpftrace_figures {
        println!(
            "  bpftrace CPU: {:.3} s for {} EAGAINs = {:.2} us per EAGAIN ({lines} lines)",
            cpu.as_secs_f64(),
            storm.eagain,
            cpu.as_secs_f64() * 1e6 / storm.eagain.max(1) as f64
        );
        let agent_per = agent_cpu.as_secs_f64() / with.eagain.max(1) as f64;
        let bpftrace_per = cpu.as_secs_f64() / storm.eagain.max(1) as f64;
        if bpftrace_per > 0.0 {
            println!(
                "  agent CPU per EAGAIN / bpftrace's: {:.3}",
                agent_per / bpftrace_per
            );
        }
    }
    println!(
        "  events printed {events}, aggregated {aggregated}, lost {lost}; kernel total {total}; \
         client saw {} EAGAINs: identity {}",
        with.eagain,
        if events + aggregated + lost == with.eagain && total == with.eagain {
            "holds"
        } else {
            "BROKEN"
        }
    );
    println!(
        "TCP connect() (refused, loopback), {TCP_CONNECTS} calls: {:.0}/s without agent, {:.0}/s with ({:.3}x)",
        TCP_CONNECTS as f64 / tcp_without.as_secs_f64(),
        TCP_CONNECTS as f64 / tcp_with.as_secs_f64(),
        tcp_without.as_secs_f64() / tcp_with.as_secs_f64()
    );
    print_costs("agent", &bpf_costs(&p2, &p3));
    println!(
        "TCP connect() (non-blocking, EINPROGRESS), {TCP_CONNECTS} calls: {:.0}/s without agent, {:.0}/s with ({:.3}x)",
        TCP_CONNECTS as f64 / tcp_nb_without.as_secs_f64(),
        TCP_CONNECTS as f64 / tcp_nb_with.as_secs_f64(),
        tcp_nb_without.as_secs_f64() / tcp_nb_with.as_secs_f64()
    );
    print_costs("agent", &bpf_costs(&p3, &p4));
}

fn main() {
    if !common::privileged("bench storm") {
        return;
    }
    // Run-time statistics for every BPF program while this fd is open.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime);
    if let Err(err) = &stats {
        println!("kernel.bpf_stats unavailable ({err}): no ns per call");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    println!("backlog storm bench on {}", common::kernel_release());

    // `cargo bench --bench storm -- many` runs only (e), the
    // many-processes case.
    if !std::env::args().any(|a| a == "many") {
        side_by_side(dir.path());
    }
    drop(stats);

    println!(
        "(e) {NEW_LISTENERS} new UNIX listeners, each hit by a {} ms storm:",
        SHORT_STORM.as_millis()
    );
    let quiet = many_listeners(dir.path(), "quiet");
    report_many("on this machine as it is", &quiet);
    let mut idle: Vec<std::process::Child> = (0..IDLE_PROCESSES)
        .filter_map(|_| {
            Command::new(common::outside("sleep"))
                .arg("600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        })
        .collect();
    let busy = many_listeners(dir.path(), "busy");
    report_many(&format!("with {} more idle processes", idle.len()), &busy);
    println!(
        "  agent CPU with them / without: {:.2}",
        busy.agent_cpu.as_secs_f64() / quiet.agent_cpu.as_secs_f64().max(1e-3)
    );
    for child in &mut idle {
        let _ = child.kill();
        let _ = child.wait();
    }
}
