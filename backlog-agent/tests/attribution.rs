//! Privileged tests of "who is dropping and why": real processes holding
//! real listeners, checked against what the test set up.

mod common;

use std::{
    io::{ErrorKind, Write},
    net::{SocketAddr, TcpStream},
    os::{
        fd::{AsRawFd, RawFd},
        unix::{fs::MetadataExt, net::UnixStream, process::CommandExt},
    },
    process::{Child, Command},
    sync::mpsc,
    thread,
    time::Duration,
};

use common::{in_new_netns, netns_inode, privileged, serial, set_sysctl, Agent};
use serde_json::Value;
use socket2::{Domain, Socket, Type};

fn listener(backlog: i32, reuseport: bool, addr: &str) -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    if reuseport {
        socket.set_reuse_port(true).expect("SO_REUSEPORT");
    }
    common::scenarios::set_defer_accept(&socket, 30);
    socket
        .bind(&addr.parse::<SocketAddr>().unwrap().into())
        .expect("bind");
    socket.listen(backlog).expect("listen");
    socket
}

fn port_of(socket: &Socket) -> u16 {
    socket.local_addr().unwrap().as_socket().unwrap().port()
}

fn inode_of(fd: RawFd) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{fd}"))
        .expect("stat fd")
        .ino()
}

/// A child process (a worker) that inherits `fd` and just holds it.
fn worker_holding(fd: RawFd) -> Child {
    let mut cmd = Command::new(common::outside("sleep"));
    cmd.arg("60");
    // SAFETY: only async-signal-safe fcntl between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn worker")
}

/// Final-ACK overflows on a listener set up by the caller (see
/// scenarios::final_ack_overflow for why this recipe works on loopback):
/// `wave` clients fill the accept queue, `wave` more overflow it.
fn overflow(port: u16, wave: i32) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    // A connect whose SYN meets a full queue would wait for SYN
    // retransmits: such clients are simply left out.
    let connect = || TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok();
    let mut first = Vec::new();
    for _ in 0..wave {
        if let Some(mut c) = connect() {
            c.write_all(b"x").expect("send");
            first.push(c);
        }
    }
    assert!(!first.is_empty(), "no client of the first wave connected");
    wait_for_queue(port, first.len() as u32);
    let mut parked: Vec<TcpStream> = (0..wave).filter_map(|_| connect()).collect();
    // Scenario timing (see scenarios::final_ack_overflow_via).
    thread::sleep(Duration::from_millis(100));
    for c in &mut parked {
        c.write_all(b"y").expect("send");
    }
    // Scenario timing: retransmissions of the parked data are more drops.
    thread::sleep(Duration::from_millis(700));
    for c in parked.into_iter().chain(first) {
        let s = Socket::from(c);
        let _ = s.set_linger(Some(Duration::ZERO));
    }
    common::scenarios::settle();
}

/// Polls sock_diag until the listener on `port` (in the calling thread's
/// namespace) holds `n` connections in its accept queue.
fn wait_for_queue(port: u16, n: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listeners = backlog_agent::enrich::sockdiag::tcp_listeners().expect("sock_diag");
        let len = listeners
            .iter()
            .find(|l| l.port == port)
            .map(|l| l.accept_queue_len);
        if len.is_some_and(|len| len >= n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "listener on port {port}: accept queue {len:?}, not {n}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// The same recipe on an SO_REUSEPORT group, whose members get clients by
/// a hash the test cannot steer: clients are added one by one until some
/// member's accept queue holds exactly `backlog` (as sock_diag shows), so
/// the parked wave's SYNs still pass and its data then overflows.
fn overflow_group(port: u16, backlog: u32, group: &[(u64, u64)]) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let queue_lens = || -> Vec<u32> {
        let listeners = backlog_agent::enrich::sockdiag::tcp_listeners().expect("sock_diag");
        group
            .iter()
            .filter_map(|(inode, _)| listeners.iter().find(|l| l.inode == *inode))
            .map(|l| l.accept_queue_len)
            .collect()
    };
    let mut first = Vec::new();
    for _ in 0..64 {
        if queue_lens().contains(&backlog) {
            break;
        }
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).expect("connect");
        c.write_all(b"x").expect("send");
        first.push(c);
        // Until sock_diag shows this client queued (or dropped: the
        // length is what the loop reads next).
        let queued = first.len() as u32;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while queue_lens().iter().sum::<u32>() < queued && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(
        queue_lens().contains(&backlog),
        "no group member reached its backlog"
    );
    let mut parked: Vec<TcpStream> = (0..4 * backlog)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok())
        .collect();
    // Scenario timing (see scenarios::final_ack_overflow_via).
    thread::sleep(Duration::from_millis(100));
    for c in &mut parked {
        let _ = c.write_all(b"y");
    }
    // Scenario timing: retransmissions of the parked data are more drops.
    thread::sleep(Duration::from_millis(700));
    for c in parked.into_iter().chain(first) {
        let _ = Socket::from(c).set_linger(Some(Duration::ZERO));
    }
    common::scenarios::settle();
}

fn pids(event: &Value) -> Vec<u64> {
    let mut pids: Vec<u64> = event["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    pids.sort_unstable();
    pids
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn attributes_workers_reuseport_groups_netns_limits_and_unix_sockets() {
    if !privileged("attributes_workers_reuseport_groups_netns_limits_and_unix_sockets") {
        return;
    }
    let _serial = serial();
    let me = u64::from(std::process::id());

    // (a) A forking server whose workers share one listener, created
    // before the agent starts: attribution must come from /proc.
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let forked = thread::spawn(move || {
        in_new_netns(move || {
            let socket = listener(8, false, "127.0.0.1:0");
            let workers = [
                worker_holding(socket.as_raw_fd()),
                worker_holding(socket.as_raw_fd()),
            ];
            let worker_pids: Vec<u64> = workers.iter().map(|w| u64::from(w.id())).collect();
            let port = port_of(&socket);
            let inode = inode_of(socket.as_raw_fd());
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            overflow(port, 8);
            drop(socket);
            for w in workers {
                kill(w);
            }
            (netns_inode(), port, inode, worker_pids)
        })
    });
    ready_rx.recv().expect("forked server ready");

    let agent = Agent::expect_ready(&["--output", "json", "--show-cmdline", "--interval", "2"]);
    go_tx.send(()).unwrap();
    let (forked_netns, forked_port, forked_inode, worker_pids) = forked.join().unwrap();

    // (b) An SO_REUSEPORT group: each socket of the group held by its own
    // process is a listener of its own.
    let (group_netns, group) = in_new_netns(|| {
        let a = listener(4, true, "127.0.0.1:0");
        let port = port_of(&a);
        let b = listener(4, true, &format!("127.0.0.1:{port}"));
        let (wa, wb) = (worker_holding(a.as_raw_fd()), worker_holding(b.as_raw_fd()));
        let group = vec![
            (inode_of(a.as_raw_fd()), u64::from(wa.id())),
            (inode_of(b.as_raw_fd()), u64::from(wb.id())),
        ];
        // Only the workers hold the sockets now.
        drop(a);
        drop(b);
        overflow_group(port, 4, &group);
        kill(wa);
        kill(wb);
        (netns_inode(), group)
    });

    // (c) A listener in a namespace with its own somaxconn, asking for
    // more: listen(511) is cut to 64.
    let (cut_netns, cut_port) = in_new_netns(|| {
        set_sysctl("net.core.somaxconn", "64");
        let socket = listener(511, false, "127.0.0.1:0");
        let port = port_of(&socket);
        overflow(port, 64);
        drop(socket);
        (netns_inode(), port)
    });

    // (d) A UNIX stream listener with a small backlog hit by non-blocking
    // connects until EAGAIN.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("www.sock");
    let unix_listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // SAFETY: listen() on a valid socket fd changes only its backlog.
    assert_eq!(unsafe { libc::listen(unix_listener.as_raw_fd(), 2) }, 0);
    let unix_inode = inode_of(unix_listener.as_raw_fd());
    let mut clients = Vec::new();
    let mut eagains = 0;
    for _ in 0..8 {
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        socket.set_nonblocking(true).unwrap();
        match socket.connect(&socket2::SockAddr::unix(&path).unwrap()) {
            Ok(()) => clients.push(socket),
            Err(e) if e.kind() == ErrorKind::WouldBlock => eagains += 1,
            Err(e) => panic!("unix connect: {e}"),
        }
    }
    // The agent looks the listener up with sock_diag while it is full and
    // prints the event after: wait for those events, not for a time.
    let unix_path = path.to_str().unwrap().to_owned();
    agent.wait_for_events(eagains, Duration::from_secs(20), |e| {
        e["kind"] == "unix_connect_backlog_full" && e["listener"]["path"] == unix_path.as_str()
    });
    let run = agent.stop();
    drop(clients);
    drop(unix_listener);
    let _ = UnixStream::connect(&path); // the listener is gone: nothing to see
    assert!(run.status.success(), "{}\n{}", run.status, run.stderr);
    let events = run.json_events();

    // Namespaces are told apart by inode only while they live: a later one
    // may reuse a freed number, so events are matched by socket inode.
    // (a)
    let forked_events: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["kind"] == "ack_dropped_accept_queue_full" && e["socket_inode"] == forked_inode
        })
        .collect();
    assert!(!forked_events.is_empty(), "no events for the forked server");
    let mut expected: Vec<u64> = worker_pids.clone();
    expected.push(me);
    expected.sort_unstable();
    for e in &forked_events {
        assert_eq!(e["listener"]["port"], forked_port, "{e}");
        assert_eq!(e["netns"], forked_netns, "{e}");
        assert_eq!(pids(e), expected, "all holders of the shared socket: {e}");
        assert_eq!(e["host_netns"], false, "{e}");
        // --show-cmdline: the workers are `sleep 60` (by the path
        // common::outside found).
        let workers: Vec<&Value> = e["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["comm"] == "sleep")
            .collect();
        assert_eq!(workers.len(), worker_pids.len(), "{e}");
        let sleep = common::outside("sleep");
        let cmdline = format!("{} 60", sleep.display());
        assert!(
            workers.iter().all(|p| p["cmdline"] == cmdline.as_str()),
            "{e}"
        );
    }
    // --interval 2: the forked server's drops (in the first second) are
    // summarised at least once before the final summary.
    let forked_summaries = events
        .iter()
        .filter(|e| e["kind"] == "listener_summary" && e["socket_inode"] == forked_inode)
        .count();
    assert!(
        forked_summaries >= 2,
        "{forked_summaries} summaries:\n{}",
        run.stdout
    );

    // (b)
    let group_events: Vec<(&Value, u64)> = events
        .iter()
        .filter(|e| e["kind"] == "ack_dropped_accept_queue_full")
        .filter_map(|e| {
            let inode = e["socket_inode"].as_u64()?;
            let (_, worker) = group.iter().find(|(i, _)| *i == inode)?;
            Some((e, *worker))
        })
        .collect();
    assert!(
        !group_events.is_empty(),
        "no events for the reuseport group"
    );
    for (e, worker) in &group_events {
        assert_eq!(e["netns"], group_netns, "{e}");
        assert_eq!(pids(e), vec![*worker], "each socket its own holder: {e}");
    }

    // (c) The summary line explains the cut.
    // The final summary: the last one for the listener.
    let summary = events
        .iter()
        .rev()
        .find(|e| {
            e["kind"] == "listener_summary"
                && e["netns"] == cut_netns
                && e["listener"]["port"] == cut_port
        })
        .unwrap_or_else(|| panic!("no listener_summary for the cut listener:\n{}", run.stdout));
    assert_eq!(summary["backlog_requested"], 511, "{summary}");
    assert_eq!(summary["backlog_limit"], 64, "{summary}");
    assert_eq!(summary["somaxconn"], 64, "{summary}");
    assert!(summary["processes"][0]["pid"] == me, "{summary}");
    assert!(
        summary["counts"]["ack_dropped_accept_queue_full"].as_u64() > Some(0),
        "{summary}"
    );
    let diagnosis = summary["diagnosis"].as_str().unwrap();
    assert!(
        diagnosis.contains("listen(511) was cut to 64 by net.core.somaxconn=64"),
        "{diagnosis}"
    );
    assert!(diagnosis.contains(&cut_netns.to_string()), "{diagnosis}");
    common::figure(&format!("diagnosis: {diagnosis}"));

    // (d)
    assert!(eagains > 0, "the UNIX backlog never filled");
    let unix_events: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "unix_connect_backlog_full")
        .filter(|e| e["listener"]["path"] == path.to_str().unwrap())
        .collect();
    assert_eq!(
        unix_events.len(),
        eagains,
        "one event per EAGAIN:\n{}",
        run.stdout
    );
    for e in &unix_events {
        assert_eq!(e["client"]["pid"], me, "{e}");
        assert_eq!(e["socket_inode"], unix_inode, "{e}");
        assert_eq!(pids(e), vec![me], "{e}");
        assert_eq!(e["accept_queue"]["max"], 2, "{e}");
    }
    let unix_summary = events
        .iter()
        .rev()
        .find(|e| {
            e["kind"] == "listener_summary" && e["listener"]["path"] == path.to_str().unwrap()
        })
        .expect("listener_summary for the UNIX listener");
    assert_eq!(
        unix_summary["counts"]["unix_connect_backlog_full"].as_u64(),
        Some(eagains as u64)
    );
    common::figure(&format!(
        "unix: {eagains} EAGAINs, {} events; diagnosis: {}",
        unix_events.len(),
        unix_summary["diagnosis"]
    ));
}
