//! `cargo xtask bench` (and `cargo xtask vm-test --bench` in the guests,
//! where the SYN stage can be traced): a spoofed-source SYN flood over a
//! raw socket in a private network namespace (tests/common/synflood.rs),
//! tcp_syncookies 0 then 1, without a tracer and with the agent at its
//! default settings, printing
//! 1. the flood's drop rate with the agent divided by the rate without;
//! 2. kernel ns per call of every program that ran (kernel.bpf_stats:
//!    run_time_ns / run_cnt) and the agent's CPU per SYN;
//! 3. events printed, aggregated and lost, and whether
//!    events + aggregated + lost = the namespace's TcpExt counter
//!    (TCPReqQFullDrop, TCPReqQFullDoCookies);
//! 4. the same floods with bpftrace printing one line per SYN that
//!    reaches tcp_conn_request() (every SYN of the flood is a drop or a
//!    cookie), where kprobes exist and bpftrace is there (the guests of
//!    `vm-test --bench` carry it): its rate ratio, CPU and ns per call
//!    beside the agent's.
//!
//! Figures from one run on one machine, not assertions. Bounded: each
//! phase sends at most MAX_SYNS SYNs for at most FLOOD.

#[path = "../tests/common/mod.rs"]
mod common;

use std::{path::Path, time::Duration};

use common::{
    accounting::{accounted, in_netns},
    bench::{print_costs, process_wakeups, traced_phase, Bpftrace},
    synflood::{counter_and_kind, syn_flood, SynFlood},
    Agent,
};

const FLOOD: Duration = Duration::from_secs(3);
const MAX_SYNS: u64 = 3_000_000;
const COOKIES: [&str; 2] = ["0", "1"];
/// Per program: name, calls, ns per call (bench::bpf_costs).
type Costs = Vec<(String, u64, f64)>;
/// bpftrace's one-line answer to the same question: a line per SYN.
const BPFTRACE_PROGRAM: &str = "kprobe:tcp_conn_request { printf(\"%d %s\\n\", cpu, comm); }";

/// One flood with bpftrace printing a line per SYN: the flood, bpftrace's
/// CPU, the kernel cost of its program and the lines it wrote; why not,
/// when it cannot attach (no kprobes, as on this project's 6.18 hosts).
fn bpftrace_flood(
    bpftrace: &Path,
    cookies: &'static str,
    dir: &Path,
) -> Result<(SynFlood, Duration, Costs, u64), String> {
    // Under software emulation bpftrace's LLVM takes a while to compile.
    let tracer = Bpftrace::attach(
        bpftrace,
        BPFTRACE_PROGRAM,
        dir.join(format!("bpftrace-{cookies}.out")),
        Duration::from_secs(180),
    )?;
    let (flood, cpu, costs) = traced_phase(tracer.pid(), || syn_flood(cookies, FLOOD, MAX_SYNS));
    let lines = tracer.stop();
    // bpftrace says "Attaching" and carries on where the kprobe cannot
    // attach (6.18 here: no kprobes): figures of a tracer that traced
    // nothing would read as a free one.
    if costs.is_empty() && lines == 0 {
        return Err(format!(
            "bpftrace said it attached, but no program of its ran during {} drops (no kprobe on tcp_conn_request here)",
            flood.drops
        ));
    }
    Ok((flood, cpu, costs, lines))
}

fn main() {
    if !common::privileged("bench syn_flood") {
        return;
    }
    // Run-time statistics for every BPF program while this fd is open.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime);
    if let Err(err) = &stats {
        println!("kernel.bpf_stats unavailable ({err}): no ns per call");
    }
    println!("backlog SYN flood bench on {}", common::kernel_release());
    let without: Vec<SynFlood> = COOKIES
        .into_iter()
        .map(|c| syn_flood(c, FLOOD, MAX_SYNS))
        .collect();

    let agent = Agent::expect_ready(&["--output", "json"]);
    let not_traced: Vec<String> = agent
        .startup()
        .lines()
        .filter(|l| l.contains("not observable"))
        .map(str::to_owned)
        .collect();
    // What the agent costs with nothing to report (its timers and polls),
    // to tell its fixed cost from its cost per drop.
    let idle_wakeups = process_wakeups(agent.pid());
    let ((), idle_cpu, _) = traced_phase(agent.pid(), || std::thread::sleep(FLOOD));
    let idle_wakeups = process_wakeups(agent.pid()) - idle_wakeups;
    let mut with = Vec::new();
    let mut wakeups = Vec::new();
    for cookies in COOKIES {
        let before = process_wakeups(agent.pid());
        with.push(traced_phase(agent.pid(), || {
            syn_flood(cookies, FLOOD, MAX_SYNS)
        }));
        wakeups.push(process_wakeups(agent.pid()) - before);
    }
    let run = agent.stop();
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);
    let records = run.json_events();
    let dir = tempfile::tempdir().expect("tempdir");
    let bpftraced: Result<Vec<_>, String> = common::try_outside("bpftrace").and_then(|bpftrace| {
        COOKIES
            .into_iter()
            .map(|cookies| bpftrace_flood(&bpftrace, cookies, dir.path()))
            .collect()
    });
    drop(stats);

    println!(
        "(a) spoofed-source SYN flood over a raw socket, at most {} s and {MAX_SYNS} SYNs per phase, listener backlog 64, agent at default settings:",
        FLOOD.as_secs()
    );
    // traced_phase's CPU includes the 1.2 s after the work.
    let phase_secs = FLOOD.as_secs_f64() + 1.2;
    println!(
        "  agent idle: {:.1} ms CPU per s, {:.0} wakeups per s",
        idle_cpu.as_secs_f64() * 1e3 / phase_secs,
        idle_wakeups as f64 / phase_secs
    );
    for (i, cookies) in COOKIES.iter().enumerate() {
        let (counter, kind) = counter_and_kind(cookies);
        let (flood, cpu, costs) = &with[i];
        println!(
            "  tcp_syncookies={cookies}: {counter} without agent {:.0}/s, with {:.0}/s ({:.3}x)",
            without[i].rate(),
            flood.rate(),
            flood.rate() / without[i].rate().max(1.0)
        );
        println!(
            "    agent CPU {:.3} s for {} drops ({:.3} us per drop), {} wakeups; kernel cost:",
            cpu.as_secs_f64(),
            flood.drops,
            cpu.as_secs_f64() * 1e6 / flood.drops.max(1) as f64,
            wakeups[i]
        );
        print_costs("agent", costs);
        if let Some(line) = not_traced.iter().find(|l| l.contains(kind)) {
            println!("    {kind} is counted, not traced, on this kernel: {line}");
            continue;
        }
        let a = accounted(&records, &[kind], in_netns(flood.netns));
        println!("    {kind}: {}", a.line(counter, flood.drops));
    }
    match &bpftraced {
        Ok(floods) => {
            println!("(c) the same floods with bpftrace: {BPFTRACE_PROGRAM}");
            for (i, (cookies, (flood, cpu, costs, lines))) in COOKIES.iter().zip(floods).enumerate()
            {
                let (counter, _) = counter_and_kind(cookies);
                let per_drop =
                    |cpu: &Duration, drops: u64| cpu.as_secs_f64() * 1e6 / drops.max(1) as f64;
                let agent_us = per_drop(&with[i].1, with[i].0.drops);
                let bpftrace_us = per_drop(cpu, flood.drops);
                println!(
                    "  tcp_syncookies={cookies}: {counter} with bpftrace {:.0}/s ({:.3}x of without), {lines} lines for {} drops",
                    flood.rate(),
                    flood.rate() / without[i].rate().max(1.0),
                    flood.drops
                );
                println!(
                    "    bpftrace CPU {:.3} s ({bpftrace_us:.3} us per drop); agent CPU per drop / bpftrace's: {:.3}; kernel cost:",
                    cpu.as_secs_f64(),
                    agent_us / bpftrace_us.max(1e-9)
                );
                print_costs("bpftrace", costs);
            }
        }
        Err(why) => println!("(c) bpftrace not run: {why}"),
    }
}
