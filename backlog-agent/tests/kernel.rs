//! Privileged end-to-end tests: the real agent against real overflows in
//! private network namespaces, its counts checked against the kernel's.

mod common;

use std::{process::Command, time::Duration};

use common::{
    counter_delta, in_new_netns, matrix, netns_inode, privileged, scenarios, serial,
    symbolic_value, tcp_ext, Agent, Started, TraceInstance,
};
use serde_json::Value;

/// Hook families the agent knows, most preferred first.
const FAMILIES: [&str; 3] = ["fentry", "kprobe", "tracepoint"];

const ACK: &str = "ack_dropped_accept_queue_full";

/// What the agent says at start-up, per `--attach` value and drop kind,
/// must be what xtask/support-matrix.tsv expects on this kernel series:
/// a kind a family stops tracing fails, and so does one it starts to
/// trace without the table saying so. Every cell also goes to the guest
/// console for `cargo xtask vm-test`'s matrix.
#[test]
fn startup_matches_support_matrix() {
    if !privileged("startup_matches_support_matrix") {
        return;
    }
    let _serial = serial();
    let mut differences = Vec::new();
    for family in common::support::FAMILIES {
        let expected = common::expected_support(family);
        let stderr = match Agent::start(&["--attach", family, "--duration", "600"]) {
            Started::Ready(agent) => {
                let startup = agent.startup();
                let run = agent.stop();
                assert!(run.status.success(), "--attach {family}: {}", run.stderr);
                startup
            }
            Started::Exited(run) => run.stderr,
        };
        let observed = common::support::observed(&stderr);
        assert!(
            !observed.is_empty(),
            "--attach {family}: no start-up line names a drop kind:\n{stderr}"
        );
        for kind in common::support::KINDS {
            common::support_line(family, kind, observed.get(kind));
        }
        for difference in common::support::differences(&expected, &observed) {
            differences.push(format!("--attach {family}: {difference}"));
        }
    }
    assert!(
        differences.is_empty(),
        "kernel {} differs from {}:\n{}",
        common::kernel_release(),
        common::support::TABLE_PATH,
        differences.join("\n")
    );
}

/// Where the kernel has bpf_task_pt_regs (5.15+; the agent looks for it in
/// /proc/kallsyms too), no program may run at a sys_enter_* tracepoint:
/// one there sends every syscall on the machine through
/// perf_syscall_enter. Elsewhere (5.10) the enter+exit pairs are the
/// fallback, and the start-up lines, which name each rung, say so.
#[test]
fn no_sys_enter_program_where_the_registers_can_be_read() {
    if !privileged("no_sys_enter_program_where_the_registers_can_be_read") {
        return;
    }
    let _serial = serial();
    let agent = Agent::expect_ready(&["--duration", "600"]);
    let startup = agent.startup();
    let run = agent.stop();
    assert!(run.status.success(), "agent failed:\n{}", run.stderr);
    let syscall_hooks: Vec<&str> = startup
        .lines()
        .filter(|line| line.contains("syscalls:"))
        .collect();
    common::figure(&format!("syscall hooks: {}", syscall_hooks.join(" | ")));
    for what in ["listen() calls: ", "accept-queue wait and rates: "] {
        assert!(
            syscall_hooks.iter().any(|line| line.contains(what)),
            "no syscall hook for {what}in:\n{startup}"
        );
    }
    // The UNIX kind needs no syscall hook where fexit attaches to
    // unix_stream_connect; elsewhere it is on the syscall tracepoints.
    assert!(
        startup.lines().any(|line| {
            line.contains("unix_connect_backlog_full: ")
                && (line.contains("syscalls:") || line.contains("fexit unix_stream_connect"))
        }),
        "no hook for unix_connect_backlog_full in:\n{startup}"
    );
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").expect("read /proc/kallsyms");
    let has_regs = kallsyms
        .lines()
        .any(|line| line.split_whitespace().nth(2) == Some("bpf_task_pt_regs"));
    let enters: Vec<&&str> = syscall_hooks
        .iter()
        .filter(|line| line.contains("sys_enter") || line.contains("sys_{enter"))
        .collect();
    if has_regs {
        assert!(
            enters.is_empty(),
            "bpf_task_pt_regs exists, yet sys_enter_* programs run:\n{}",
            syscall_hooks.join("\n")
        );
    } else {
        assert!(
            enters.iter().any(|line| line.contains("sys_enter_listen")),
            "without bpf_task_pt_regs listen() needs its enter+exit pair:\n{}",
            syscall_hooks.join("\n")
        );
    }
}

fn events_of<'a>(events: &'a [Value], kind: &str, netns: u64) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["netns"].as_u64() == Some(netns))
        .collect()
}

/// ack_dropped_accept_queue_full: every family this kernel supports must
/// report each final-ACK overflow, attributed to this process and the
/// listener's port, with the count equal to the kernel's.
#[test]
fn final_ack_overflow_matches_kernel_counters() {
    if !privileged("final_ack_overflow_matches_kernel_counters") {
        return;
    }
    let _serial = serial();
    let mut attached_any = false;
    for family in FAMILIES {
        // What this family may do here is the support table's to say, not
        // the agent's: an unsupported family must be one the table expects.
        let expected = common::expected_support(family);
        let traced = expected[ACK].is_traced();
        let agent = match Agent::start(&[
            "--output",
            "json",
            "--attach",
            family,
            // One event per drop: no rate limit (flood.rs tests it).
            "--max-events-per-sec",
            "0",
        ]) {
            Started::Ready(agent) => agent,
            Started::Exited(run) => {
                for line in run.stderr.lines() {
                    common::figure(&format!("family={family} agent-stderr: {line}"));
                }
                assert!(
                    expected.values().all(|s| !s.is_traced()),
                    "--attach {family} exited, but {} expects it to trace some kind here:\n{}",
                    common::support::TABLE_PATH,
                    run.stderr
                );
                assert!(
                    run.stderr.contains("no drop kind can be observed"),
                    "--attach {family} failed for another reason:\n{}",
                    run.stderr
                );
                matrix(
                    family,
                    "final_ack_overflow",
                    "unsupported",
                    "no kind observable",
                );
                continue;
            }
        };
        let observed = common::support::observed(&agent.startup());
        let says_traced = observed.get(ACK).is_some_and(|s| s.is_traced());
        assert_eq!(
            says_traced,
            traced,
            "--attach {family}: {ACK} traced per the agent: {says_traced}, per {}: {traced}:\n{}",
            common::support::TABLE_PATH,
            agent.startup()
        );
        if !traced {
            drop(agent);
            matrix(
                family,
                "final_ack_overflow",
                "unsupported",
                &common::support::describe(&expected[ACK]),
            );
            continue;
        }
        attached_any = true;
        // Independent count where the kernel has the event: skb:kfree_skb
        // with the listen-overflow reason (6.15+), numbered from the
        // tracepoint's own print format, not from BTF.
        let reference = symbolic_value("skb/kfree_skb", "TCP_LISTEN_OVERFLOW")
            .map(|reason| TraceInstance::new("skb/kfree_skb", &format!("reason == {reason}")));
        if let Some(trace) = &reference {
            trace.enable();
        }
        let (listener, netns, before, after) = in_new_netns(|| {
            let before = tcp_ext();
            let listener = scenarios::final_ack_overflow(
                "127.0.0.1:0".parse().unwrap(),
                8,
                Duration::from_millis(1200),
            );
            (listener, netns_inode(), before, tcp_ext())
        });
        let traced = reference.as_ref().map(|trace| {
            trace.disable();
            trace.count()
        });
        let run = agent.stop();
        assert!(
            run.status.success(),
            "agent failed: {}\n{}",
            run.status,
            run.stderr
        );

        let events = run.json_events();
        let acks = events_of(&events, "ack_dropped_accept_queue_full", netns);
        let overflows = counter_delta(&before, &after, "ListenOverflows");
        common::figure(&format!(
            "family={family} agent_ack_dropped_accept_queue_full={} \
             kfree_skb_TCP_LISTEN_OVERFLOW={} ListenOverflows_delta={overflows} \
             ListenDrops_delta={}",
            acks.len(),
            traced.map_or("n/a".into(), |t| t.to_string()),
            counter_delta(&before, &after, "ListenDrops"),
        ));
        assert!(
            !acks.is_empty(),
            "no events from {family}; stderr:\n{}",
            run.stderr
        );
        for event in &acks {
            assert_eq!(event["listener"]["port"], listener.port, "{event}");
            assert_eq!(event["listener"]["addr"], "127.0.0.1", "{event}");
            assert_eq!(event["peer"]["addr"], "127.0.0.1", "{event}");
            assert_eq!(event["accept_queue"]["max"], listener.backlog, "{event}");
            assert!(
                event["accept_queue"]["len"].as_i64() > Some(i64::from(listener.backlog) - 1),
                "queue not full in {event}"
            );
            let pids: Vec<u64> = event["processes"]
                .as_array()
                .expect("processes array")
                .iter()
                .filter_map(|p| p["pid"].as_u64())
                .collect();
            assert_eq!(pids, vec![u64::from(std::process::id())], "{event}");
            assert_eq!(event["partial"], false, "{event}");
        }
        if let Some(traced) = traced {
            assert_eq!(
                acks.len() as u64,
                traced,
                "agent vs kfree_skb tracepoint count"
            );
        }
        // The scenario drops no SYN, so every overflow the kernel counted
        // in this namespace is a final-ACK drop.
        assert_eq!(acks.len() as u64, overflows, "agent vs ListenOverflows");
        assert!(
            run.stderr.contains("ack_dropped_accept_queue_full"),
            "summary lacks the kind:\n{}",
            run.stderr
        );
        matrix(
            family,
            "final_ack_overflow",
            "pass",
            &format!("agent={},ListenOverflows={overflows}", acks.len()),
        );
    }
    assert!(
        attached_any,
        "no hook family could observe final-ACK overflows"
    );
}

/// Without privileges the agent says what is missing in one line and
/// exits non-zero.
#[test]
fn unprivileged_run_fails_with_one_clear_line() {
    if !privileged("unprivileged_run_fails_with_one_clear_line") {
        return;
    }
    use std::os::unix::process::CommandExt;
    // nobody must reach the binary wherever the clone lives.
    let (_dir, agent) = common::agent_for_any_user();
    let out = Command::new(&agent)
        .arg("--duration=1")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run agent as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("error: missing capability CAP_BPF"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// Where SYN-stage drops cannot be traced (this machine's kernel), the
/// agent reports the kernel's own counts per namespace instead, marked as
/// counted: checked against the namespace's TcpExt deltas.
#[test]
fn untraceable_syn_drops_are_counted_per_namespace() {
    if !privileged("untraceable_syn_drops_are_counted_per_namespace") {
        return;
    }
    let _serial = serial();
    let agent = Agent::expect_ready(&["--output", "json"]);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (result_tx, result_rx) = std::sync::mpsc::channel();
    // The namespace must outlive the agent: it is counted at the agent's
    // exit, so the scenario's thread waits for the agent to stop.
    let scenario = std::thread::spawn(move || {
        in_new_netns(move || {
            common::set_sysctl("net.ipv4.tcp_syncookies", "0");
            let before = tcp_ext();
            let (listener, clients) = scenarios::syn_queue_held_full(8, 30);
            // Closing the clients stops their SYN retransmits; the counts
            // are then final and the agent's exit snapshot must match them.
            drop(clients);
            scenarios::settle();
            let after = tcp_ext();
            result_tx.send((netns_inode(), before, after)).unwrap();
            done_rx.recv().unwrap();
            drop(listener);
        })
    });
    let (netns, before, after) = result_rx.recv().expect("scenario result");
    let run = agent.stop();
    done_tx.send(()).unwrap();
    scenario.join().unwrap();
    assert!(run.status.success(), "{}", run.stderr);
    let queue_full = counter_delta(&before, &after, "TCPReqQFullDrop");
    assert!(queue_full > 0, "the scenario dropped no SYN");
    let events = run.json_events();
    // Where the support table says the SYN stage is traced (the guests),
    // the SYN drops are events instead; the agent must say which it does.
    let traced_here = common::expected_traced("auto", &["syn_dropped_syn_queue_full"]);
    assert_eq!(
        !run.stderr.contains("counted from kernel counters"),
        traced_here,
        "SYN-stage drops traced per {}: {traced_here}; agent:\n{}",
        common::support::TABLE_PATH,
        run.stderr
    );
    if traced_here {
        let traced = events_of(&events, "syn_dropped_syn_queue_full", netns).len() as u64;
        assert_eq!(
            traced, queue_full,
            "traced SYN-queue drops vs TCPReqQFullDrop"
        );
        matrix("auto", "syn_counted", "pass", &format!("traced={traced}"));
        return;
    }
    let counted = events
        .iter()
        .find(|e| e["kind"] == "netns_counters" && e["netns"] == netns)
        .unwrap_or_else(|| panic!("no netns_counters line for {netns}:\n{}", run.stdout));
    assert_eq!(counted["traced"], false, "{counted}");
    assert_eq!(
        counted["counts"]["syn_dropped_syn_queue_full"], queue_full,
        "{counted}"
    );
    assert_eq!(
        counted["counters"]["ListenDrops"],
        counter_delta(&before, &after, "ListenDrops"),
        "{counted}"
    );
    let sk_drops: u64 = counted["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["sk_drops"].as_u64())
        .sum();
    assert!(
        sk_drops >= queue_full,
        "sk_drops is an upper bound: {counted}"
    );
    common::figure(&format!(
        "counted: TCPReqQFullDrop={queue_full} agent_counted={} sk_drops={sk_drops}",
        counted["counts"]["syn_dropped_syn_queue_full"]
    ));
    matrix(
        "auto",
        "syn_counted",
        "pass",
        &format!("counted={queue_full}"),
    );
}
