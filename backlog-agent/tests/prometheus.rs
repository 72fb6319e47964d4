//! Debian's Prometheus scrapes the agent while a scenario overflows a
//! listener in a private namespace; Prometheus's HTTP API must then give
//! the kernel's ListenOverflows of that namespace. promtool checks the
//! exposition. Host only (xtask/src/vm/payload.rs HOST_ONLY_TESTS): the
//! guests have no Prometheus; tests/metrics.rs covers the endpoint there.

mod common;

use std::{
    fs,
    io::Write as _,
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::{
    counter_delta, http, in_new_netns, netns_inode, outside, privileged, scenarios, serial,
    tcp_ext, Agent,
};

const ACK: &str = "ack_dropped_accept_queue_full";
/// Prometheus starts in a few seconds here; its first scrapes follow.
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(60);
/// Scrapes every second: a few of them.
const QUERY_DEADLINE: Duration = Duration::from_secs(30);

/// A Prometheus of the test's own, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Prometheus {
    fn start(dir: &std::path::Path, target: SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: backlog\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        // A free port, released just before Prometheus binds it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let log = dir.join("prometheus.log");
        let child = Command::new(outside("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).expect("log file"))
            .stderr(fs::File::create(dir.join("prometheus.err")).expect("log file"))
            .spawn()
            .expect("start prometheus");
        let log_file = log.clone();
        let mut prometheus = Prometheus { child, addr, log };
        http::poll(
            PROMETHEUS_DEADLINE,
            || {
                if let Ok(Some(status)) = prometheus.child.try_wait() {
                    panic!("prometheus exited ({status}):\n{}", prometheus.logs());
                }
                let ready = http::exchange(addr, b"GET /-/ready HTTP/1.0\r\n\r\n");
                matches!(ready, Ok((200, _))).then_some(())
            },
            || format!("prometheus not ready:\n{}", logs(&log_file)),
        );
        prometheus
    }

    fn logs(&self) -> String {
        logs(&self.log)
    }

    /// The value of an instant query with one result, if it has one.
    fn query(&self, promql: &str) -> Option<f64> {
        let target = format!("/api/v1/query?query={}", http::query_escape(promql));
        let (status, body) = http::get(self.addr, &target);
        assert_eq!(status, 200, "{promql}: {body}");
        let answer: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{promql}: {e}: {body}"));
        assert_eq!(answer["status"], "success", "{promql}: {body}");
        let result = answer["data"]["result"].as_array()?;
        assert!(result.len() <= 1, "{promql}: several series: {body}");
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What Prometheus wrote to its stdout and stderr files.
fn logs(log: &std::path::Path) -> String {
    let err = log.with_file_name("prometheus.err");
    format!(
        "{}{}",
        fs::read_to_string(log).unwrap_or_default(),
        fs::read_to_string(err).unwrap_or_default()
    )
}

/// promtool, Prometheus's own strict checker, accepts the exposition.
fn promtool_check(exposition: &str) {
    let mut child = Command::new(outside("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(exposition.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n{exposition}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn prometheus_sees_the_kernels_listen_overflows() {
    if !privileged("prometheus_sees_the_kernels_listen_overflows") {
        return;
    }
    let _serial = serial();
    let agent = Agent::expect_ready(&["--output", "none", "--metrics-addr", "127.0.0.1:0"]);
    let target = http::metrics_addr(&agent.startup());
    let dir = tempfile::tempdir().expect("temp dir");
    let prometheus = Prometheus::start(dir.path(), target);
    http::poll(
        QUERY_DEADLINE,
        || {
            prometheus
                .query("up{job=\"backlog\"}")
                .filter(|up| *up == 1.0)
        },
        || format!("the agent is not up in Prometheus:\n{}", prometheus.logs()),
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

    // The scenario drops no SYN: every overflow of the namespace is a
    // final-ACK drop of this one listener.
    let promql = format!("sum(backlog_drops_total{{kind=\"{ACK}\",netns=\"{netns}\"}})");
    let seen = http::poll(
        QUERY_DEADLINE,
        || prometheus.query(&promql).filter(|v| *v >= overflows as f64),
        || format!("{promql} short of ListenOverflows +{overflows}"),
    );
    common::figure(&format!(
        "prometheus {promql}={seen} ListenOverflows_delta={overflows}"
    ));
    assert_eq!(seen, overflows as f64, "Prometheus vs ListenOverflows");
    let listener = format!("127.0.0.1:{port}");
    let by_listener = prometheus.query(&format!(
        "backlog_drops_total{{kind=\"{ACK}\",netns=\"{netns}\",listener=\"{listener}\"}}"
    ));
    assert_eq!(by_listener, Some(seen), "the drops are not on {listener}");

    let (status, exposition) = http::get(target, "/metrics");
    assert_eq!(status, 200);
    promtool_check(&exposition);
    // For the record: the scenario's series as the agent serves them.
    let netns_label = format!("netns=\"{netns}\"");
    for line in exposition
        .lines()
        .filter(|l| l.contains(&netns_label) || l.starts_with("backlog_events"))
    {
        eprintln!("BACKLOG-METRICS {line}");
    }
    drop(prometheus);
    let run = agent.stop();
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
}
