//! `cargo xtask bench`: a flood of listen-queue drops in a private network
//! namespace, with and without the agent, printing
//! 1. the flood's drop rate with the agent divided by the rate without,
//! 2. events the agent wrote as JSON lines (the rest go into aggregates at
//!    the default rate limit),
//! 3. the agent's CPU time per drop,
//! 4. events printed, aggregated and lost, and whether
//!    events + aggregated + lost = the namespace's TcpExt counter.
//!
//! The flood: a listener whose accept queue is kept full while `clients`
//! connections complete their handshake and send data (TCP_DEFER_ACCEPT,
//! as in the tests), so every data segment and its retransmissions is a
//! final-ACK drop (`ack_dropped_accept_queue_full`, traced on every kernel
//! the agent supports) and, where SYN-stage hooks exist, connects beyond
//! the SYN queue are SYN-stage drops. Figures, not assertions: ratios from
//! one run on one machine.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use common::{
    accounting::{accounted, in_netns},
    bench::process_cpu,
    counter_delta, in_new_netns, tcp_ext, Agent,
};
use socket2::{Domain, Socket, Type};

const BACKLOG: i32 = 1024;
const WAVE: usize = 1024;
const FLOOD: Duration = Duration::from_secs(4);

/// SYN flood: non-blocking connects to a listener whose SYN queue is held
/// full with cookies off, so each SYN (and its retransmits) is a
/// SYN-stage drop (`syn_dropped_syn_queue_full`, traced where
/// tcp_conn_request can be hooked).
const SYN_CLIENTS: usize = 6000;

struct Flood {
    elapsed: Duration,
    overflows: u64,
    drops: u64,
    netns: u64,
}

fn raise_fd_limit() {
    let limit = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: a valid rlimit passed by reference.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
}

fn flood() -> Flood {
    in_new_netns(|| {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        common::scenarios::set_defer_accept(&listener, 60);
        listener
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .expect("bind");
        listener.listen(BACKLOG).expect("listen");
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let connect = || TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok();
        let before = tcp_ext();
        let started = Instant::now();
        let mut queued = Vec::new();
        for _ in 0..WAVE {
            if let Some(mut c) = connect() {
                let _ = c.write_all(b"x");
                queued.push(c);
            }
        }
        thread::sleep(Duration::from_millis(100));
        let mut parked: Vec<TcpStream> = (0..WAVE).filter_map(|_| connect()).collect();
        for c in &mut parked {
            let _ = c.write_all(b"y");
        }
        // Retransmissions keep dropping until the clients are reset.
        thread::sleep(FLOOD.saturating_sub(started.elapsed()));
        for c in parked.into_iter().chain(queued) {
            let _ = Socket::from(c).set_linger(Some(Duration::ZERO));
        }
        thread::sleep(Duration::from_millis(300));
        measured(&before, started)
    })
}

/// What the kernel counted in this namespace since `before`/`started`.
fn measured(before: &std::collections::HashMap<String, u64>, started: Instant) -> Flood {
    let elapsed = started.elapsed();
    let after = tcp_ext();
    Flood {
        elapsed,
        overflows: counter_delta(before, &after, "ListenOverflows"),
        drops: counter_delta(before, &after, "ListenDrops"),
        netns: common::netns_inode(),
    }
}

fn syn_flood() -> Flood {
    in_new_netns(|| {
        common::set_sysctl("net.ipv4.tcp_syncookies", "0");
        let before = tcp_ext();
        let started = Instant::now();
        let (listener, clients) = common::scenarios::syn_queue_held_full(128, SYN_CLIENTS);
        // Retransmitted SYNs (1 s, 3 s) keep hitting the full queue.
        thread::sleep(FLOOD.saturating_sub(started.elapsed()));
        drop(clients);
        thread::sleep(Duration::from_millis(300));
        drop(listener);
        measured(&before, started)
    })
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    if !common::privileged("bench flood") {
        return;
    }
    raise_fd_limit();
    let without = flood();
    let syn_without = syn_flood();
    let agent = Agent::expect_ready(&["--output", "json"]);
    // Which hooks the figures are about.
    for line in agent.startup().lines() {
        println!("  {line}");
    }
    // CPU from `ready` on: start-up (BTF, verification) is a fixed cost
    // that says nothing about the cost per event.
    let cpu_at_ready = process_cpu(agent.pid());
    let with = flood();
    let syn_with = syn_flood();
    // Let the agent catch up before measuring its CPU.
    thread::sleep(Duration::from_millis(500));
    let cpu = process_cpu(agent.pid()).saturating_sub(cpu_at_ready);
    let run = agent.stop();
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);

    let records = run.json_events();
    let not_traced = |kind: &str| {
        run.stderr
            .lines()
            .any(|l| l.contains(kind) && l.contains("not observable"))
    };
    let ack_kind = "ack_dropped_accept_queue_full";
    let ack = accounted(&records, &[ack_kind], in_netns(with.netns));
    // Which kind the SYN flood produces depends on the kernel's defaults
    // (a small tcp_max_syn_backlog drops by the 3/4 rule before the queue
    // is full), and handshakes whose TCP_DEFER_ACCEPT ran out overflow at
    // the final ACK: every drop kind together is ListenDrops.
    let syn = accounted(
        &records,
        &[
            "syn_dropped_syn_queue_full",
            "syn_dropped_accept_queue_full",
            "syn_dropped_syn_backlog_pressure",
            "syn_dropped_other",
            ack_kind,
        ],
        in_netns(syn_with.netns),
    );
    let printed = ack.events + syn.events;
    let rate = |f: &Flood| f.drops as f64 / f.elapsed.as_secs_f64();
    let seconds = with.elapsed.as_secs_f64() + syn_with.elapsed.as_secs_f64();
    println!("backlog bench on {}", common::kernel_release());
    println!(
        "final-ACK flood ({WAVE}+{WAVE} clients, backlog {BACKLOG}): without agent {:.0} drops/s, with {:.0}/s",
        rate(&without),
        rate(&with)
    );
    println!(
        "SYN flood ({SYN_CLIENTS} SYNs, cookies off, backlog 128): without agent {:.0} drops/s, with {:.0}/s",
        rate(&syn_without),
        rate(&syn_with)
    );
    println!(
        "(1) drop rate with agent / without: final-ACK {:.3}, SYN {:.3}",
        rate(&with) / rate(&without),
        rate(&syn_with) / rate(&syn_without)
    );
    println!(
        "(2) events written as JSON lines: {printed} ({:.0}/s over both floods), the rest in aggregates at the default rate limit",
        printed as f64 / seconds
    );
    println!(
        "(3) agent CPU from ready to the end of the floods: {:.3} s for {} drops ({:.2} us per drop)",
        cpu.as_secs_f64(),
        with.drops + syn_with.drops,
        cpu.as_secs_f64() * 1e6 / (with.drops + syn_with.drops).max(1) as f64
    );
    println!(
        "(4) final-ACK flood, {ack_kind}: {}",
        ack.line("ListenOverflows", with.overflows)
    );
    if not_traced("syn_dropped_syn_queue_full") {
        println!("    SYN flood: the SYN stage is counted, not traced, on this kernel");
    } else {
        println!(
            "    SYN flood, every kind: {}",
            syn.line("ListenDrops", syn_with.drops)
        );
    }
}
