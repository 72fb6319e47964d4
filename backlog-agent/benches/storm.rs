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
//!
//! `-- guest` (what `cargo xtask vm-test --bench` passes) runs the storm
//! without a tracer, with the agent at its defaults and with the agent
//! forced to `--attach tracepoint`, alternated over a few rounds (see
//! [`rungs`]), skips bpftrace with one line where it is not installed
//! (the guests' initramfs) and leaves out the many-processes case (e).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{
    accounting::{accounted, Accounted},
    bench::{
        bpf_costs, bpf_programs, idle_processes, print_costs, print_costs_indented, process_cpu,
        traced_phase, Bpftrace,
    },
    storm, Agent,
};

const UNIX_KIND: &str = "unix_connect_backlog_full";
const STORM: Duration = Duration::from_secs(3);
const TCP_CONNECTS: u64 = 200_000;
/// Below the ephemeral port range, so every connect() gets a port.
const SUCCESS_CONNECTS: u64 = 20_000;

/// One storm against a fresh full listener in `dir`.
fn one_storm(dir: &Path, name: &str) -> (storm::Storm, String) {
    let path = dir.join(name);
    let (listener, held) = storm::full_listener(&path, 4);
    let result = storm::storm(&path, u64::MAX, STORM);
    storm::release(held);
    drop(listener);
    (result, path.to_string_lossy().into_owned())
}

/// `count` connect()s to a closed port on loopback: the connect() hooks'
/// cost for what is not AF_UNIX. Blocking ones are refused at once;
/// non-blocking ones return EINPROGRESS (the usual answer for
/// event-driven clients).
fn tcp_connects(nonblocking: bool, count: u64) -> Duration {
    common::in_new_netns(move || {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        let started = Instant::now();
        for _ in 0..count {
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

/// connect()s that return 0: blocking TCP ones to a listener that
/// accepts (SUCCESS_CONNECTS of them: each takes a local port), or UDP
/// ones (TCP_CONNECTS; connect() on UDP returns 0 at once, as for DNS
/// clients). These are the non-UNIX calls the exit-only connect() hook
/// cannot leave on the return value alone: it reads the address family.
fn successful_connects(udp: bool) -> (Duration, u64) {
    common::in_new_netns(move || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let to: SocketAddr = ([127, 0, 0, 1], port).into();
        if udp {
            let started = Instant::now();
            for _ in 0..TCP_CONNECTS {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
                let _ = socket.connect(to);
            }
            return (started.elapsed(), TCP_CONNECTS);
        }
        // Accepted by this thread after each connect(), so the queue
        // never overflows (a SYN retransmission would take a second).
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let started = Instant::now();
        for _ in 0..SUCCESS_CONNECTS {
            let _ = std::net::TcpStream::connect(to);
            while let Ok((stream, _)) = listener.accept() {
                // Closed with a RST: a TIME_WAIT on the server's side
                // would make a later client on the same port wait for a
                // SYN retransmission.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
        }
        let elapsed = started.elapsed();
        (elapsed, SUCCESS_CONNECTS)
    })
}

/// What any program on sys_exit_connect costs, whatever it does.
struct Floor {
    /// Non-blocking TCP connect()s measured, and bpf_stats ns per call of
    /// a program doing one load and one comparison (bpftrace's filter on
    /// `ret`): what bpf_stats itself adds to every program on this host.
    calls: u64,
    ns: f64,
    /// The storm with only that program attached: what enabling the
    /// syscall tracepoint costs a connect() loop before any work is done
    /// (every syscall of every task then takes the tracing slow path).
    storm: storm::Storm,
}

/// A bpftrace one-liner, attached: its process and its program's id.
struct Attached {
    child: std::process::Child,
    id: u32,
}

impl Attached {
    /// Starts `program` and waits until a new BPF program whose name
    /// starts with `name` shows up (bpftrace truncates names to 15 bytes).
    fn start(bpftrace: &Path, program: &str, name: &str) -> Result<Attached, String> {
        let before = bpf_programs();
        let mut child = Command::new(bpftrace)
            .args(["-e", program])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(id) = bpf_programs()
                .iter()
                .find(|(id, (found, ..))| !before.contains_key(id) && found.starts_with(name))
                .map(|(id, _)| *id)
            {
                return Ok(Attached { child, id });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("bpftrace attached no {name} program within 60 s"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// bpf_stats calls and ns per call of the program while `work` runs.
    fn measure<T>(&self, work: impl FnOnce() -> T) -> (T, u64, f64) {
        let before = bpf_programs();
        let out = work();
        let after = bpf_programs();
        let (ns0, cnt0) = before.get(&self.id).map_or((0, 0), |(_, n, c)| (*n, *c));
        let (ns1, cnt1) = after.get(&self.id).map_or((0, 0), |(_, n, c)| (*n, *c));
        let calls = cnt1.saturating_sub(cnt0);
        (
            out,
            calls,
            ns1.saturating_sub(ns0) as f64 / calls.max(1) as f64,
        )
    }

    fn stop(mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
    }
}

/// Attaches the do-nothing program and measures [`Floor`].
fn stats_floor(dir: &Path, bpftrace: &Path) -> Result<Floor, String> {
    let probe = Attached::start(
        bpftrace,
        "tracepoint:syscalls:sys_exit_connect /args->ret == 12345/ { }",
        "sys_exit_conn",
    )?;
    let (_, calls, ns) = probe.measure(|| tcp_connects(true, TCP_CONNECTS));
    let (storm, _) = one_storm(dir, "floor.sock");
    probe.stop();
    Ok(Floor { calls, ns, storm })
}

/// The cheapest program that learns anything about the address a
/// connect() asked for: bpftrace reading the 2-byte sun_family from the
/// caller's memory at sys_enter_connect, nothing else. Every hook at the
/// syscall pays such a read for the path (the kernel's own copy is gone
/// by sys_exit_connect), so this bounds what the agent's tracepoint rung
/// can cost per EAGAIN and what storm rate it can keep.
struct ReadFloor {
    calls: u64,
    ns: f64,
    storm: storm::Storm,
}

fn user_read_floor(dir: &Path, bpftrace: &Path) -> Result<ReadFloor, String> {
    let probe = Attached::start(
        bpftrace,
        "tracepoint:syscalls:sys_enter_connect \
         / *(uint16 *)uptr(args->uservaddr) == 12345 / { }",
        "sys_enter_conn",
    )?;
    let ((storm, _), calls, ns) = probe.measure(|| one_storm(dir, "read-floor.sock"));
    probe.stop();
    Ok(ReadFloor { calls, ns, storm })
}

/// bpftrace during a storm: what it cost, and the lines it printed.
struct BpftracePrintf {
    storm: storm::Storm,
    cpu: Duration,
    costs: Vec<(String, u64, f64)>,
    lines: u64,
}

/// The storm with bpftrace printing one line per EAGAIN (the same
/// one-line question the agent answers); None when it cannot start.
fn bpftrace_printf(dir: &Path, bpftrace: &Path) -> Option<BpftracePrintf> {
    let tracer = match Bpftrace::attach(
        bpftrace,
        "tracepoint:syscalls:sys_exit_connect /args->ret == -11/ { printf(\"%d %s\\n\", pid, comm); }",
        dir.join("bpftrace.out"),
        Duration::from_secs(60),
    ) {
        Ok(tracer) => tracer,
        Err(why) => {
            println!("bpftrace not run: {why}");
            return None;
        }
    };
    let ((storm, _), cpu, costs) = traced_phase(tracer.pid(), || one_storm(dir, "bpftrace.sock"));
    let lines = tracer.stop();
    Some(BpftracePrintf {
        storm,
        cpu,
        costs,
        lines,
    })
}

/// What the agent accounted for the UNIX listeners at `paths`.
fn accounted_paths(run: &common::AgentRun, paths: &[&str]) -> Accounted {
    accounted(&run.json_events(), &[UNIX_KIND], |r| {
        paths.iter().any(|p| r["listener"]["path"] == *p)
    })
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
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let Accounted {
        events,
        aggregated,
        lost,
        ..
    } = accounted_paths(&run, &paths);
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

/// Storm rate ratios, with / without the agent, from PAIRS more pairs of
/// phases (without, then with a freshly started agent): one pair's ratio
/// moves by several percent with what else the machine does, so the
/// median of several is printed beside the main run's.
const PAIRS: usize = 4;

fn storm_pairs(dir: &Path) -> Vec<f64> {
    (0..PAIRS)
        .map(|i| {
            let (without, _) = one_storm(dir, &format!("pair-none-{i}.sock"));
            let agent = Agent::expect_ready(&["--output", "json"]);
            let (with, _) = one_storm(dir, &format!("pair-agent-{i}.sock"));
            let run = agent.stop();
            assert!(run.status.success(), "agent failed:\n{}", run.stderr);
            with.rate() / without.rate()
        })
        .collect()
}

/// (b) to (d): the storm, bpftrace beside it, the connect() hooks' cost.
fn side_by_side(dir: &Path) {
    let (without, _) = one_storm(dir, "none.sock");
    let tcp_without = tcp_connects(false, TCP_CONNECTS);
    let tcp_nb_without = tcp_connects(true, TCP_CONNECTS);

    let agent = Agent::expect_ready(&["--output", "json"]);
    let cpu0 = process_cpu(agent.pid());
    let p0 = bpf_programs();
    let (with, path) = one_storm(dir, "agent.sock");
    let p1 = bpf_programs();
    // The agent's last window and drain are part of its cost.
    thread::sleep(Duration::from_millis(1200));
    let agent_cpu = process_cpu(agent.pid()).saturating_sub(cpu0);
    let p2 = bpf_programs();
    let tcp_with = tcp_connects(false, TCP_CONNECTS);
    let p3 = bpf_programs();
    let tcp_nb_with = tcp_connects(true, TCP_CONNECTS);
    let p4 = bpf_programs();
    let accepted_with = successful_connects(false);
    let p5 = bpf_programs();
    let udp_with = successful_connects(true);
    let p6 = bpf_programs();
    let run = agent.stop();
    let accepted_without = successful_connects(false);
    let udp_without = successful_connects(true);
    let bpftrace = common::outside("bpftrace");
    let floor = stats_floor(dir, &bpftrace);
    let read_floor = user_read_floor(dir, &bpftrace);
    // A second storm without a tracer, after the others: the ratios use
    // the mean of the two, so that drift over the run (thermal, other
    // load) does not count as the agent's.
    let (without_after, _) = one_storm(dir, "none-after.sock");
    let without_rate = (without.rate() + without_after.rate()) / 2.0;
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);
    let Accounted {
        events,
        aggregated,
        lost,
        total,
        ..
    } = accounted_paths(&run, &[&path]);

    // bpftrace, the same one-line question.
    let bpftrace_figures = bpftrace_printf(dir, &bpftrace);

    println!(
        "(b) UNIX EAGAIN storm, {} s per phase, one client looping non-blocking connect() to a full listener:",
        STORM.as_secs()
    );
    println!(
        "  without tracer: {:.0} EAGAIN/s (first and last phase: {:.0}, {:.0})",
        without_rate,
        without.rate(),
        without_after.rate()
    );
    println!(
        "  with backlog-agent: {:.0} EAGAIN/s ({:.3}x)",
        with.rate(),
        with.rate() / without_rate
    );
    if let Some(BpftracePrintf { storm, .. }) = &bpftrace_figures {
        println!(
            "  with bpftrace printf: {:.0} EAGAIN/s ({:.3}x)",
            storm.rate(),
            storm.rate() / without_rate
        );
    }
    let mut pairs = storm_pairs(dir);
    pairs.sort_by(f64::total_cmp);
    println!(
        "  with backlog-agent, {PAIRS} more pairs of phases (without, then with): {}; median {:.3}x",
        pairs
            .iter()
            .map(|r| format!("{r:.3}x"))
            .collect::<Vec<_>>()
            .join(" "),
        (pairs[(PAIRS - 1) / 2] + pairs[PAIRS / 2]) / 2.0
    );
    if let Ok(floor) = &floor {
        println!(
            "  with only a do-nothing program on sys_exit_connect (bpftrace filter): \
             {:.0} EAGAIN/s ({:.3}x): the ceiling of any tracer hooked there",
            floor.storm.rate(),
            floor.storm.rate() / without_rate
        );
    }
    match &read_floor {
        Ok(ReadFloor { calls, ns, storm }) => println!(
            "  with only a program reading sun_family from the caller's memory (bpftrace, \
             sys_enter_connect): {:.0} EAGAIN/s ({:.3}x), {ns:.0} ns per call over {calls} \
             calls: the ceiling of any tracer that reads the path",
            storm.rate(),
            storm.rate() / without_rate
        ),
        Err(err) => println!("  user-memory read floor not measured: {err}"),
    }
    println!("  kernel cost during the storm with the agent:");
    print_costs("agent", &bpf_costs(&p0, &p1));
    if let Some(BpftracePrintf { costs, .. }) = &bpftrace_figures {
        print_costs("bpftrace", costs);
    }
    println!(
        "  agent CPU: {:.3} s for {} EAGAINs = {:.2} us per EAGAIN",
        agent_cpu.as_secs_f64(),
        with.eagain,
        agent_cpu.as_secs_f64() * 1e6 / with.eagain.max(1) as f64
    );
    if let Some(BpftracePrintf {
        storm, cpu, lines, ..
    }) = &bpftrace_figures
    {
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
    for (what, without, with, costs) in [
        (
            "TCP connect() (blocking, accepted)",
            accepted_without,
            accepted_with,
            bpf_costs(&p4, &p5),
        ),
        ("UDP connect()", udp_without, udp_with, bpf_costs(&p5, &p6)),
    ] {
        println!(
            "{what}, {} calls: {:.0}/s without agent, {:.0}/s with ({:.3}x)",
            with.1,
            without.1 as f64 / without.0.as_secs_f64(),
            with.1 as f64 / with.0.as_secs_f64(),
            without.0.as_secs_f64() / with.0.as_secs_f64()
        );
        print_costs("agent", &costs);
    }
    match &floor {
        Ok(Floor { calls, ns, .. }) => println!(
            "bpf_stats floor: a program doing one load and one comparison on sys_exit_connect \
             (bpftrace filter), {calls} non-blocking TCP connect()s: {ns:.0} ns per call; \
             subtract it from the figures above for the programs' own cost"
        ),
        Err(err) => println!("bpf_stats floor not measured: {err}"),
    }
}

/// The agent settings the guest run compares: the defaults (which pick
/// the best hook the kernel allows for UNIX connect(), fexit on
/// unix_stream_connect where fentry attaches, once the agent has that
/// program) and the syscall-tracepoint rung forced.
const RUNGS: [(&str, &[&str]); 2] = [
    ("default (--output json)", &["--output", "json"]),
    (
        "--attach tracepoint",
        &["--output", "json", "--attach", "tracepoint"],
    ),
];

/// Rounds of (without, one rung, without, the other rung), the rungs'
/// order alternating, then one more phase without: 13 storms of STORM
/// seconds and 8 agent start-ups (2-4 s each in a 6.12 guest) with the
/// TCP connect()s; the guest mode prints how long it took.
const ROUNDS: usize = 3;

/// TCP connect()s per kind in the guest: software emulation runs them
/// about 15 times slower than the host (3,000-3,500 per second in a 6.12
/// guest), and six runs of them must fit the guest's time (with 5,000
/// the whole guest mode took 88 s).
const GUEST_TCP_CONNECTS: u64 = 2_000;

/// Per program: name, calls, ns per call (what bpf_costs returns).
type Costs = Vec<(String, u64, f64)>;

/// One storm under a freshly started agent.
struct AgentPhase {
    storm: storm::Storm,
    /// The agent's start-up line for the UNIX kind: which hook it chose.
    hook: String,
    /// From start to the agent's `ready` line.
    startup: Duration,
    costs: Costs,
    /// From ready to the end of the storm plus the agent's last window.
    cpu: Duration,
    accounted: Accounted,
}

fn agent_phase(dir: &Path, args: &[&str], name: &str) -> AgentPhase {
    let started = Instant::now();
    let agent = Agent::expect_ready(args);
    let startup = started.elapsed();
    let prefix = format!("{UNIX_KIND}:");
    let hook = agent
        .startup()
        .lines()
        .map(|l| l.trim_start_matches("backlog-agent: "))
        .find(|l| l.starts_with(&prefix))
        .unwrap_or(&prefix)
        .to_owned();
    let cpu0 = process_cpu(agent.pid());
    let p0 = bpf_programs();
    let (storm, path) = one_storm(dir, name);
    let p1 = bpf_programs();
    // The agent's last window and drain are part of its cost.
    thread::sleep(Duration::from_millis(1200));
    let cpu = process_cpu(agent.pid()).saturating_sub(cpu0);
    let run = agent.stop();
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);
    AgentPhase {
        storm,
        hook,
        startup,
        costs: bpf_costs(&p0, &p1),
        cpu,
        accounted: accounted_paths(&run, &[&path]),
    }
}

/// Refused and non-blocking TCP connect()s (GUEST_TCP_CONNECTS of each)
/// under a freshly started agent: their time and the programs' cost. Run
/// after the storms: each batch is a network namespace that the kernel
/// tears down in the background, which would slow the next storm.
fn tcp_phase(args: &[&str]) -> [(Duration, Costs); 2] {
    let agent = Agent::expect_ready(args);
    let q0 = bpf_programs();
    let refused = tcp_connects(false, GUEST_TCP_CONNECTS);
    let q1 = bpf_programs();
    let nonblocking = tcp_connects(true, GUEST_TCP_CONNECTS);
    let q2 = bpf_programs();
    let run = agent.stop();
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);
    [
        (refused, bpf_costs(&q0, &q1)),
        (nonblocking, bpf_costs(&q1, &q2)),
    ]
}

/// The median, as storm_pairs prints it (the mean of the middle two for
/// an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (v[(n - 1) / 2] + v[n / 2]) / 2.0
}

fn ratios(values: &[f64]) -> String {
    values
        .iter()
        .map(|r| format!("{r:.3}x"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Per program over several phases: calls summed, ns per call over all.
fn merged_costs<'a>(phases: impl IntoIterator<Item = &'a [(String, u64, f64)]>) -> Costs {
    let mut by_name: std::collections::BTreeMap<&str, (u64, f64)> = Default::default();
    for costs in phases {
        for (name, calls, ns) in costs {
            let entry = by_name.entry(name).or_default();
            entry.0 += calls;
            entry.1 += *calls as f64 * ns;
        }
    }
    by_name
        .into_iter()
        .map(|(name, (calls, ns))| (name.to_owned(), calls, ns / calls.max(1) as f64))
        .collect()
}

/// `-- guest` (what `cargo xtask vm-test --bench` passes): the storm
/// without a tracer, with the agent at its defaults and with the agent
/// forced to the syscall tracepoints, alternated over ROUNDS rounds
/// (TCG guests are noisy: each agent phase is compared with the mean of
/// the phases without a tracer just before and after it, and the median
/// is printed); bpftrace where it is installed (the guests' initramfs
/// has none: one line says so); no many-processes case (e).
fn rungs(dir: &Path) {
    let started = Instant::now();
    let (first, _) = one_storm(dir, "guest-none.sock");
    let mut without = vec![first];
    let mut phases: [Vec<(AgentPhase, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for (step, rung) in order.into_iter().enumerate() {
            let phase = agent_phase(
                dir,
                RUNGS[rung].1,
                &format!("guest-rung{rung}-{round}.sock"),
            );
            let (after, _) = one_storm(dir, &format!("guest-none-{round}-{step}.sock"));
            let before = without.last().expect("a phase without tracer came first");
            let ratio = phase.storm.rate() / ((before.rate() + after.rate()) / 2.0);
            without.push(after);
            phases[rung].push((phase, ratio));
        }
    }
    let bpftrace = match common::try_outside("bpftrace") {
        Ok(path) => {
            let printf = bpftrace_printf(dir, &path);
            let floor = stats_floor(dir, &path);
            let (after, _) = one_storm(dir, "guest-none-bpftrace.sock");
            Ok((printf, floor, after))
        }
        Err(err) => Err(err),
    };
    // Without an agent before and after the agents, as for the storm.
    let tcp_batches = || {
        [
            tcp_connects(false, GUEST_TCP_CONNECTS),
            tcp_connects(true, GUEST_TCP_CONNECTS),
        ]
    };
    let tcp_before = tcp_batches();
    let tcp_with: Vec<[(Duration, Costs); 2]> =
        RUNGS.iter().map(|(_, args)| tcp_phase(args)).collect();
    let tcp_after = tcp_batches();

    let rates: Vec<f64> = without.iter().map(storm::Storm::rate).collect();
    println!(
        "(b) UNIX EAGAIN storm, {} s per phase, one client looping non-blocking connect() to a full listener; \
         {ROUNDS} rounds of (without, agent, without, agent with the other settings), \
         the settings' order alternating, a fresh agent per phase, then one more without:",
        STORM.as_secs()
    );
    println!(
        "  without tracer: median {:.0} EAGAIN/s over {} phases ({})",
        median(&rates),
        rates.len(),
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (rung, (what, _)) in RUNGS.iter().enumerate() {
        let runs = &phases[rung];
        let hooks: Vec<&str> = {
            let mut h: Vec<&str> = runs.iter().map(|(p, _)| p.hook.as_str()).collect();
            h.dedup();
            h
        };
        println!("  with backlog-agent, {what}: {}", hooks.join(" / "));
        let r: Vec<f64> = runs.iter().map(|(_, r)| *r).collect();
        println!(
            "    rate / mean of the phases without just before and after: {}; median {:.3}x",
            ratios(&r),
            median(&r)
        );
        println!("    kernel cost during its storms ({} phases):", runs.len());
        print_costs_indented(
            6,
            "agent",
            &merged_costs(runs.iter().map(|(p, _)| p.costs.as_slice())),
        );
        let eagain: u64 = runs.iter().map(|(p, _)| p.storm.eagain).sum();
        let cpu: Duration = runs.iter().map(|(p, _)| p.cpu).sum();
        println!(
            "    agent CPU: {:.3} s for {eagain} EAGAINs = {:.2} us per EAGAIN (per phase: {})",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / eagain.max(1) as f64,
            runs.iter()
                .map(|(p, _)| format!(
                    "{:.2}",
                    p.cpu.as_secs_f64() * 1e6 / p.storm.eagain.max(1) as f64
                ))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let sum = |f: fn(&Accounted) -> u64| runs.iter().map(|(p, _)| f(&p.accounted)).sum::<u64>();
        let holding = runs
            .iter()
            .filter(|(p, _)| p.accounted.holds(p.storm.eagain))
            .count();
        println!(
            "    events printed {}, aggregated {}, lost {}; kernel total {}; client saw {eagain} EAGAINs: \
             identity {} ({holding} of {} phases)",
            sum(|a| a.events),
            sum(|a| a.aggregated),
            sum(|a| a.lost),
            sum(|a| a.total),
            if holding == runs.len() { "holds" } else { "BROKEN" },
            runs.len()
        );
    }
    let same_round: Vec<f64> = phases[0]
        .iter()
        .zip(&phases[1])
        .map(|((a, _), (b, _))| a.storm.rate() / b.storm.rate())
        .collect();
    println!(
        "  rate {} / {}, same round: {}; median {:.3}x",
        RUNGS[0].0,
        RUNGS[1].0,
        ratios(&same_round),
        median(&same_round)
    );
    match &bpftrace {
        Ok((printf, floor, after)) => {
            let before = without.last().expect("phases without tracer");
            let around = (before.rate() + after.rate()) / 2.0;
            if let Some(b) = printf {
                println!(
                    "  with bpftrace printf: {:.0} EAGAIN/s ({:.3}x of the phases without around it); \
                     bpftrace CPU {:.2} us per EAGAIN ({} lines)",
                    b.storm.rate(),
                    b.storm.rate() / around,
                    b.cpu.as_secs_f64() * 1e6 / b.storm.eagain.max(1) as f64,
                    b.lines
                );
                print_costs("bpftrace", &b.costs);
            }
            match floor {
                Ok(f) => println!(
                    "  with only a do-nothing program on sys_exit_connect (bpftrace filter): \
                     {:.3}x; bpf_stats floor {:.0} ns per call",
                    f.storm.rate() / around,
                    f.ns
                ),
                Err(err) => println!("  bpf_stats floor not measured: {err}"),
            }
        }
        Err(err) => println!("  bpftrace phases skipped: {err}"),
    }
    for (i, what) in [
        "TCP connect() (refused, loopback)",
        "TCP connect() (non-blocking, EINPROGRESS)",
    ]
    .into_iter()
    .enumerate()
    {
        let per_sec = |d: Duration| GUEST_TCP_CONNECTS as f64 / d.as_secs_f64();
        let without = (per_sec(tcp_before[i]) + per_sec(tcp_after[i])) / 2.0;
        let mut line = format!(
            "{what}, {GUEST_TCP_CONNECTS} calls: {without:.0}/s without agent (before and after: {:.0}, {:.0})",
            per_sec(tcp_before[i]),
            per_sec(tcp_after[i])
        );
        let mut costs = Vec::new();
        for ((name, _), tcp) in RUNGS.iter().zip(&tcp_with) {
            line.push_str(&format!(
                ", {name} {:.0}/s ({:.3}x)",
                per_sec(tcp[i].0),
                per_sec(tcp[i].0) / without
            ));
            costs.push((*name, &tcp[i].1));
        }
        println!("{line}");
        for (name, c) in costs {
            print_costs(&format!("agent, {name}"), c);
        }
    }
    let startups: Vec<f64> = phases
        .iter()
        .flatten()
        .map(|(p, _)| p.startup.as_secs_f64())
        .collect();
    println!(
        "guest mode: {:.0} s in all; agent start to ready {:.1}-{:.1} s",
        started.elapsed().as_secs_f64(),
        startups.iter().copied().fold(f64::INFINITY, f64::min),
        startups.iter().copied().fold(0.0, f64::max)
    );
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

    if std::env::args().any(|a| a == "guest") {
        println!(
            "guest mode (-- guest): the storm at two agent settings; no bpftrace where it is \
             missing, no many-processes case (e)"
        );
        rungs(dir.path());
        return;
    }
    // `cargo bench --bench storm -- many` runs only (e), the
    // many-processes case; `-- side` everything but (e).
    if !std::env::args().any(|a| a == "many") {
        side_by_side(dir.path());
    }
    drop(stats);
    // `-- side` stops here: the connect() hooks' costs without the
    // many-processes case.
    if std::env::args().any(|a| a == "side") {
        return;
    }

    println!(
        "(e) {NEW_LISTENERS} new UNIX listeners, each hit by a {} ms storm:",
        SHORT_STORM.as_millis()
    );
    let quiet = many_listeners(dir.path(), "quiet");
    report_many("on this machine as it is", &quiet);
    let mut idle = idle_processes(IDLE_PROCESSES);
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
