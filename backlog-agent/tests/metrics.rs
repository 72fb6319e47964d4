//! The metrics endpoint (`--metrics-addr`) against real overflows, read
//! with a plain HTTP GET: runs on the host and in the qemu guests.
//! tests/prometheus.rs has a real Prometheus scrape it (host only).

mod common;

use std::{sync::mpsc, thread, time::Duration};

use common::{
    counter_delta, http, in_new_netns, matrix, netns_inode, privileged, scenarios, serial,
    set_sysctl, tcp_ext, Agent,
};

const ACK: &str = "ack_dropped_accept_queue_full";
/// Loopback scenarios settle in well under a second; the agent reads the
/// kernel's totals at each scrape.
const METRICS_DEADLINE: Duration = Duration::from_secs(20);

/// The final-ACK overflows of a listener in a private namespace show up in
/// `backlog_drops_total` exactly as the kernel counted them
/// (ListenOverflows of that namespace), with the listener's gauges; bad
/// requests get an error status and do not stop the endpoint; with
/// `--output none` nothing goes to stdout.
#[test]
fn drops_total_matches_listen_overflows() {
    if !privileged("drops_total_matches_listen_overflows") {
        return;
    }
    let _serial = serial();
    assert!(
        common::expected_traced("auto", &[ACK]),
        "{} says final-ACK overflows are not traced here; this test needs them",
        common::support::TABLE_PATH
    );
    let agent = Agent::expect_ready(&["--output", "none", "--metrics-addr", "127.0.0.1:0"]);
    let addr = http::metrics_addr(&agent.startup());

    // Before any drop: the agent's own series are there.
    let (status, body) = http::get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    for present in [
        "backlog_build_info{",
        "backlog_events_total ",
        "backlog_bpf_stats_enabled ",
    ] {
        assert!(body.contains(present), "no {present}:\n{body}");
    }
    assert_eq!(
        http::sample(&body, "backlog_hook_info", &[("kind", ACK)]),
        Some(1.0),
        "{body}"
    );

    let (port, netns, overflows) = in_new_netns(|| {
        let before = tcp_ext();
        let listener = scenarios::final_ack_overflow(
            "127.0.0.1:0".parse().unwrap(),
            8,
            Duration::from_millis(1200),
        );
        let overflows = counter_delta(&before, &tcp_ext(), "ListenOverflows");
        (listener.port, netns_inode(), overflows)
    });
    assert!(overflows > 0, "the scenario overflowed nothing");

    let listener = format!("127.0.0.1:{port}");
    let netns = netns.to_string();
    let labels = [
        ("kind", ACK),
        ("listener", listener.as_str()),
        ("netns", netns.as_str()),
    ];
    let mut last = String::new();
    let seen = http::poll(
        METRICS_DEADLINE,
        || {
            let (status, body) = http::get(addr, "/metrics");
            assert_eq!(status, 200, "{body}");
            let value = http::sample(&body, "backlog_drops_total", &labels);
            last = body;
            value.filter(|v| *v >= overflows as f64)
        },
        || format!("backlog_drops_total{labels:?} short of ListenOverflows +{overflows}"),
    );
    let (_, body) = http::get(addr, "/metrics");
    common::figure(&format!(
        "metrics backlog_drops_total={seen} ListenOverflows_delta={overflows}"
    ));
    assert_eq!(seen, overflows as f64, "agent vs ListenOverflows\n{last}");
    let gauge = |name: &str| {
        http::sample(
            &body,
            name,
            &[("listener", listener.as_str()), ("netns", netns.as_str())],
        )
    };
    assert_eq!(
        gauge("backlog_accept_queue_limit"),
        Some(8.0),
        "limit\n{body}"
    );
    // The requested backlog is known where listen() is traced.
    if agent.startup().contains("listen() calls: tracepoint") {
        assert_eq!(
            gauge("backlog_listen_backlog_requested"),
            Some(8.0),
            "requested\n{body}"
        );
    }
    // Reset by the scrapes that came before: no drop since.
    assert_eq!(
        gauge("backlog_accept_queue_max_seen"),
        Some(0.0),
        "max seen\n{body}"
    );

    for (request, expected) in [
        (&b"GET /other HTTP/1.0\r\n\r\n"[..], 404),
        (b"DELETE /metrics HTTP/1.0\r\n\r\n", 405),
        (b"\x00\xff garbage\r\n\r\n", 400),
    ] {
        let (status, _) = http::exchange(addr, request).expect("an answer");
        assert_eq!(status, expected, "{:?}", String::from_utf8_lossy(request));
    }
    let oversize = format!(
        "GET /metrics HTTP/1.0\r\nX: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    // The agent answers 431 and closes; the rest of the request may meet
    // a closed socket, which is fine too.
    if let Ok((status, _)) = http::exchange(addr, oversize.as_bytes()) {
        assert_eq!(status, 431);
    }
    let (status, _) = http::get(addr, "/metrics");
    assert_eq!(status, 200, "the endpoint stopped after bad requests");

    let run = agent.stop();
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
    assert_eq!(run.stdout, "", "--output none printed events");
    matrix(
        "auto",
        "metrics_drops_total",
        "pass",
        &format!("metrics={seen},ListenOverflows={overflows}"),
    );
}

/// A slow client that never finishes its request does not hold up a
/// scrape next to it.
#[test]
fn a_stalled_client_does_not_block_scrapes() {
    if !privileged("a_stalled_client_does_not_block_scrapes") {
        return;
    }
    let _serial = serial();
    let agent = Agent::expect_ready(&["--output", "none", "--metrics-addr", "127.0.0.1:0"]);
    let addr = http::metrics_addr(&agent.startup());
    let stalled: Vec<std::net::TcpStream> = (0..4)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            use std::io::Write as _;
            s.write_all(b"GET /metr").expect("half a request");
            s
        })
        .collect();
    let started = std::time::Instant::now();
    let (status, _) = http::get(addr, "/metrics");
    assert_eq!(status, 200);
    common::figure(&format!(
        "metrics scrape next to 4 stalled clients took {:?}",
        started.elapsed()
    ));
    drop(stalled);
    let run = agent.stop();
    assert!(run.status.success(), "{}", run.stderr);
}

/// SYN-stage drops reach the metrics on every kernel: per listener where
/// they are traced, as `backlog_netns_counted_drops_total` of the
/// namespace where they are only counted (kept alive while scraped).
#[test]
fn syn_queue_drops_reach_the_metrics() {
    if !privileged("syn_queue_drops_reach_the_metrics") {
        return;
    }
    let _serial = serial();
    const KIND: &str = "syn_dropped_syn_queue_full";
    let traced = common::expected_traced("auto", &[KIND]);
    let agent = Agent::expect_ready(&["--output", "none", "--metrics-addr", "127.0.0.1:0"]);
    let addr = http::metrics_addr(&agent.startup());

    // The namespace must outlive the scrapes: counted drops are read from
    // its counters, and a namespace that is gone has none.
    let (facts_tx, facts) = mpsc::channel();
    let (done, done_rx) = mpsc::channel::<()>();
    let holder = thread::spawn(move || {
        in_new_netns(move || {
            set_sysctl("net.ipv4.tcp_syncookies", "0");
            let before = tcp_ext();
            let (listener, clients) = scenarios::syn_queue_held_full(8, 30);
            let drops = counter_delta(&before, &tcp_ext(), "TCPReqQFullDrop");
            let port = listener.local_addr().unwrap().as_socket().unwrap().port();
            facts_tx.send((port, netns_inode(), drops)).unwrap();
            let _ = done_rx.recv_timeout(Duration::from_secs(60));
            // Everything counted until the last scrape: the upper bound.
            let total = counter_delta(&before, &tcp_ext(), "TCPReqQFullDrop");
            drop((listener, clients));
            total
        })
    });
    let (port, netns, drops) = facts.recv().expect("scenario facts");
    assert!(drops > 0, "the scenario dropped no SYN");
    let netns = netns.to_string();
    let listener = format!("127.0.0.1:{port}");
    let (name, labels) = if traced {
        (
            "backlog_drops_total",
            vec![
                ("kind", KIND),
                ("listener", listener.as_str()),
                ("netns", netns.as_str()),
            ],
        )
    } else {
        (
            "backlog_netns_counted_drops_total",
            vec![("kind", KIND), ("netns", netns.as_str())],
        )
    };
    // The held clients retransmit their SYNs after 1 s: more drops, so
    // the metric may pass the first count; it must reach it.
    let seen = http::poll(
        METRICS_DEADLINE,
        || {
            http::sample(&http::get(addr, "/metrics").1, name, &labels)
                .filter(|v| *v >= drops as f64)
        },
        || format!("{name}{labels:?} short of TCPReqQFullDrop +{drops}"),
    );
    done.send(()).unwrap();
    let total = holder.join().unwrap();
    assert!(
        seen <= total as f64,
        "{name} {seen} above the kernel's TCPReqQFullDrop +{total}"
    );
    let run = agent.stop();
    assert!(run.status.success(), "{}", run.stderr);
    common::figure(&format!(
        "metrics {name}={seen} TCPReqQFullDrop_first_round={drops} TCPReqQFullDrop_total={total} traced={traced}"
    ));
    matrix(
        "auto",
        "metrics_syn_queue_full",
        "pass",
        &format!("{name}={seen},TCPReqQFullDrop={drops}"),
    );
}

/// Turns on the kernel's BPF run-time accounting for as long as the
/// returned fd is open (bpf(BPF_ENABLE_STATS), 5.8+): scoped, unlike a
/// write to kernel.bpf_stats_enabled, so a failing test leaves it off.
fn enable_bpf_stats() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    const BPF_STATS_RUN_TIME: u32 = 0;
    let attr: [u32; 2] = [BPF_STATS_RUN_TIME, 0];
    // SAFETY: the attr is a live u32 `type` (padded to 8 bytes) whose size
    // is passed; the call returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_ENABLE_STATS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd that nothing else owns.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// With the kernel's run-time accounting on, each program's runs and run
/// time are series; the program that traced the overflows ran at least
/// once per overflow.
#[test]
fn program_run_counts_when_bpf_stats_are_on() {
    if !privileged("program_run_counts_when_bpf_stats_are_on") {
        return;
    }
    let _serial = serial();
    let stats = enable_bpf_stats();
    let agent = Agent::expect_ready(&["--output", "none", "--metrics-addr", "127.0.0.1:0"]);
    let addr = http::metrics_addr(&agent.startup());
    let overflows = in_new_netns(|| {
        let before = tcp_ext();
        scenarios::final_ack_overflow(
            "127.0.0.1:0".parse().unwrap(),
            8,
            Duration::from_millis(300),
        );
        counter_delta(&before, &tcp_ext(), "ListenOverflows")
    });
    let (status, body) = http::get(addr, "/metrics");
    drop(stats);
    assert_eq!(status, 200);
    let runs: Vec<(String, f64)> = body
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("backlog_bpf_program_runs_total{program=\"")?;
            let (program, value) = rest.split_once("\"} ")?;
            Some((program.to_owned(), value.parse().ok()?))
        })
        .collect();
    let busiest = runs.iter().map(|(_, n)| *n).fold(0.0, f64::max);
    common::figure(&format!(
        "bpf stats: ListenOverflows_delta={overflows} program runs {runs:?}"
    ));
    assert!(
        overflows > 0 && busiest >= overflows as f64,
        "no program ran {overflows} times: {runs:?}\n{body}"
    );
    assert!(
        body.lines().any(
            |l| l.starts_with("backlog_bpf_program_run_time_seconds_total{") && !l.ends_with(" 0")
        ),
        "no run time:\n{body}"
    );
    let run = agent.stop();
    assert!(run.status.success(), "{}", run.stderr);
}
