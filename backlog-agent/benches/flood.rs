//! `cargo xtask bench`: a flood of listen-queue drops in a private network
//! namespace, with and without the agent, printing
//! 1. the flood's drop rate with the agent divided by the rate without,
//! 2. events per second the agent decoded and wrote as JSON,
//! 3. the agent's CPU time per million events,
//! 4. events lost in the kernel and whether the exact totals match.
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

use common::{counter_delta, in_new_netns, tcp_ext, Agent};
use socket2::{Domain, Socket, Type};

const BACKLOG: i32 = 1024;
const WAVE: usize = 1024;
const FLOOD: Duration = Duration::from_secs(4);

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
        let elapsed = started.elapsed();
        let after = tcp_ext();
        Flood {
            elapsed,
            overflows: counter_delta(&before, &after, "ListenOverflows"),
            drops: counter_delta(&before, &after, "ListenDrops"),
            netns: common::netns_inode(),
        }
    })
}

fn children_cpu() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    if !common::privileged("bench flood") {
        return;
    }
    raise_fd_limit();
    let without = flood();
    let cpu_before = children_cpu();
    let agent = Agent::expect_ready(&["--output", "json"]);
    let with = flood();
    let run = agent.stop();
    let cpu = children_cpu().saturating_sub(cpu_before);
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);

    let events = run.json_events();
    let in_flood = |e: &&serde_json::Value| e["netns"].as_u64() == Some(with.netns);
    let drop_events = events
        .iter()
        .filter(|e| e["kind"] != "listener_summary" && e["kind"] != "netns_counters")
        .filter(in_flood)
        .count() as u64;
    let ack_events = events
        .iter()
        .filter(|e| e["kind"] == "ack_dropped_accept_queue_full")
        .filter(in_flood)
        .count() as u64;
    let totals: u64 = events
        .iter()
        .filter(|e| e["kind"] == "listener_summary")
        .filter(in_flood)
        .filter_map(|e| e["counts"]["ack_dropped_accept_queue_full"].as_u64())
        .sum();
    let lost = run
        .stderr
        .lines()
        .find_map(|l| {
            let rest = l.split(" reported, ").nth(1)?;
            rest.split(' ').next()?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    let rate = |f: &Flood| f.drops as f64 / f.elapsed.as_secs_f64();
    let events_per_sec = drop_events as f64 / with.elapsed.as_secs_f64();
    let cpu_per_million = if drop_events > 0 {
        cpu.as_secs_f64() * 1e6 / drop_events as f64
    } else {
        f64::NAN
    };
    println!("backlog bench (flood of final-ACK overflows, {WAVE}+{WAVE} clients, backlog {BACKLOG}, {:.1} s)", FLOOD.as_secs_f64());
    println!("kernel: {}", common::kernel_release());
    println!(
        "without agent: {} ListenDrops in {:.2} s = {:.0}/s",
        without.drops,
        without.elapsed.as_secs_f64(),
        rate(&without)
    );
    println!(
        "with agent:    {} ListenDrops in {:.2} s = {:.0}/s",
        with.drops,
        with.elapsed.as_secs_f64(),
        rate(&with)
    );
    println!(
        "(1) drop rate with agent / without: {:.3}",
        rate(&with) / rate(&without)
    );
    println!("(2) events decoded and written as JSON: {drop_events} ({events_per_sec:.0}/s over the flood)");
    println!(
        "(3) agent CPU time: {:.3} s, {:.2} s per million events",
        cpu.as_secs_f64(),
        cpu_per_million
    );
    println!(
        "(4) lost in the kernel: {lost}; exact totals: ack_dropped_accept_queue_full={totals} \
         (events {ack_events}), kernel ListenOverflows={}: {}",
        with.overflows,
        if totals == with.overflows {
            "match"
        } else {
            "MISMATCH"
        }
    );
}
