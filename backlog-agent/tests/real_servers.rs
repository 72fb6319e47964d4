//! The incident the tool exists for, with Debian's own servers: nginx in
//! front of php-fpm over a UNIX socket whose backlog is full. nginx's
//! non-blocking connect() fails with EAGAIN, it logs "connect() to
//! unix:... failed (11: Resource temporarily unavailable)" and answers
//! 502. The agent must report each of those connects, attributed to nginx
//! (client) and php-fpm (listener), with a diagnosis naming php-fpm.
//!
//! Host only: the guests boot a bare initramfs without Debian's userland,
//! so `cargo xtask vm-test` leaves this binary out (see vm/payload.rs).

mod common;

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::{privileged, serial, Agent};

fn start(cmd: &mut Command, what: &str) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} did not come up");
        thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut child: Child) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn nginx_to_php_fpm_eagain_is_reported() {
    if !privileged("nginx_to_php_fpm_eagain_is_reported") {
        return;
    }
    let _serial = serial();
    let nginx = common::outside("nginx");
    let php_fpm = common::outside("php-fpm8.2");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("www.sock");
    let port = free_port();

    fs::write(
        d.join("slow.php"),
        "<?php usleep(400000); echo \"ok\\n\";\n",
    )
    .unwrap();
    // One worker and a backlog of 3: a burst of requests fills the queue.
    fs::write(
        d.join("fpm.conf"),
        format!(
            "[global]\nerror_log = {dir}/fpm.log\ndaemonize = no\n\
             [www]\nuser = root\ngroup = root\nlisten = {sock}\nlisten.backlog = 3\n\
             pm = static\npm.max_children = 1\n",
            dir = d.display(),
            sock = sock.display()
        ),
    )
    .unwrap();
    fs::write(
        d.join("nginx.conf"),
        format!(
            "daemon off;\nuser root;\nworker_processes 1;\nerror_log {dir}/error.log error;\n\
             pid {dir}/nginx.pid;\nevents {{ worker_connections 512; }}\n\
             http {{\n access_log off;\n client_body_temp_path {dir}/body;\n\
             fastcgi_temp_path {dir}/fastcgi;\n proxy_temp_path {dir}/proxy;\n\
             uwsgi_temp_path {dir}/uwsgi;\n scgi_temp_path {dir}/scgi;\n\
             server {{\n  listen 127.0.0.1:{port};\n  location / {{\n\
             fastcgi_pass unix:{sock};\n\
             fastcgi_param SCRIPT_FILENAME {dir}/slow.php;\n\
             fastcgi_param REQUEST_METHOD $request_method;\n  }}\n }}\n}}\n",
            dir = d.display(),
            sock = sock.display(),
        ),
    )
    .unwrap();

    // One event per EAGAIN nginx logs: no rate limit (flood.rs tests it).
    let agent = Agent::expect_ready(&["--output", "json", "--max-events-per-sec", "0"]);
    let fpm = start(
        Command::new(&php_fpm)
            .args(["--nodaemonize", "--allow-to-run-as-root", "--fpm-config"])
            .arg(d.join("fpm.conf")),
        "php-fpm",
    );
    wait_for(&sock, "php-fpm");
    let web = start(
        Command::new(&nginx)
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-p")
            .arg(d),
        "nginx",
    );
    wait_for(&d.join("nginx.pid"), "nginx");

    // A burst of requests: one is served, a few wait in php-fpm's backlog,
    // the rest make nginx's connect() fail with EAGAIN.
    let requests: Vec<_> = (0..24)
        .map(|_| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
                let mut reply = String::new();
                s.read_to_string(&mut reply).ok()?;
                Some(reply)
            })
        })
        .collect();
    let replies: Vec<String> = requests
        .into_iter()
        .filter_map(|t| t.join().ok().flatten())
        .collect();
    let bad_gateway = replies.iter().filter(|r| r.contains(" 502 ")).count();
    // nginx logs each failed connect() before it answers 502: every reply
    // is in, so the log is complete.
    let log = fs::read_to_string(d.join("error.log")).unwrap_or_default();
    let eagain_logged = log
        .lines()
        .filter(|l| l.contains("(11: Resource temporarily unavailable)"))
        .count();
    assert!(
        eagain_logged > 0,
        "nginx logged no EAGAIN ({} replies, {bad_gateway} x 502):\n{log}",
        replies.len()
    );
    // Wait for the agent to have reported them (polling), not a guess.
    let sock_text = sock.to_str().unwrap().to_owned();
    agent.wait_for_events(eagain_logged, Duration::from_secs(20), |e| {
        e["kind"] == "unix_connect_backlog_full" && e["listener"]["path"] == sock_text.as_str()
    });
    let fpm_pid = u64::from(fpm.id());
    let run = agent.stop();
    stop(web);
    stop(fpm);
    assert!(run.status.success(), "{}", run.stderr);

    let events = run.json_events();
    let sock_path = sock.to_str().unwrap();
    let unix: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "unix_connect_backlog_full" && e["listener"]["path"] == sock_path)
        .collect();
    common::figure(&format!(
        "nginx->php-fpm: {} requests, {bad_gateway} x 502, nginx logged {eagain_logged} EAGAIN, agent {} events",
        replies.len(),
        unix.len()
    ));
    assert_eq!(
        unix.len(),
        eagain_logged,
        "one event per EAGAIN nginx logged"
    );
    for e in &unix {
        assert_eq!(e["client"]["comm"], "nginx", "{e}");
        assert_eq!(e["accept_queue"]["max"], 3, "{e}");
        let holders: Vec<u64> = e["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .filter_map(|p| p["pid"].as_u64())
            .collect();
        assert!(
            holders.contains(&fpm_pid),
            "php-fpm master holds the socket: {e}"
        );
        let processes = e["processes"].as_array().expect("processes");
        assert!(!processes.is_empty(), "{e}");
        assert!(
            processes
                .iter()
                .all(|p| p["comm"].as_str().is_some_and(|c| c.starts_with("php-fpm"))),
            "{e}"
        );
    }
    let summary = events
        .iter()
        .rev()
        .find(|e| e["kind"] == "listener_summary" && e["listener"]["path"] == sock_path)
        .expect("a listener_summary for php-fpm's socket");
    let diagnosis = summary["diagnosis"].as_str().unwrap_or("");
    assert!(diagnosis.contains("php-fpm"), "{diagnosis}");
    common::figure(&format!("nginx->php-fpm diagnosis: {diagnosis}"));
    // Before the drop: php-fpm's one worker made nginx's connections wait
    // in its accept queue (400 ms per request), and the summary says so.
    common::figure(&format!(
        "nginx->php-fpm accept_wait_ms={} accept_rate_per_s={} backlog_advice={}",
        summary["accept_wait_ms"], summary["accept_rate_per_s"], summary["backlog_advice"]
    ));
    for line in run.stderr.lines().filter(|l| l.contains(sock_path)) {
        common::figure(&format!("nginx->php-fpm summary: {line}"));
    }
    let p50 = summary["accept_wait_ms"]["p50"].as_f64().unwrap_or(0.0);
    assert!(p50 >= 100.0, "php-fpm's queued requests waited: {summary}");
    assert!(
        diagnosis.contains("connections waited in the accept queue"),
        "{diagnosis}"
    );
}
