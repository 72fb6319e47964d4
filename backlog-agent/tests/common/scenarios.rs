//! Real overflows on loopback, inside the caller's network namespace.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};

/// How long the kernel may take to do what a scenario waits for.
const KERNEL_DEADLINE: Duration = Duration::from_secs(5);

/// The accept-queue length of a listening socket: for a listener,
/// TCP_INFO's tcpi_unacked is sk_ack_backlog.
pub fn accept_queue_len(listener: &impl AsRawFd) -> u32 {
    // SAFETY: an all-zero tcp_info is valid; getsockopt fills at most len
    // bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, a buffer of `len` bytes and its length.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_unacked
}

/// Polls until the listener's accept queue holds at least `n`: loopback
/// delivers in softirq, possibly after send() returned.
pub fn wait_for_accept_queue(listener: &impl AsRawFd, n: u32) {
    let deadline = Instant::now() + KERNEL_DEADLINE;
    loop {
        let len = accept_queue_len(listener);
        if len >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "accept queue at {len}, not {n}, after {KERNEL_DEADLINE:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the calling thread's namespace's TcpExt counters stop
/// moving (the resets and closes a scenario ends with are processed), so
/// the counts the test reads next are final.
pub fn settle() {
    let deadline = Instant::now() + KERNEL_DEADLINE;
    let mut last = super::tcp_ext();
    loop {
        thread::sleep(Duration::from_millis(50));
        let now = super::tcp_ext();
        if now == last {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "TcpExt counters still moving after {KERNEL_DEADLINE:?}"
        );
        last = now;
    }
}

/// What a scenario set up, for the assertions.
pub struct Listener {
    pub port: u16,
    pub backlog: i32,
}

pub fn set_defer_accept(socket: &Socket, secs: libc::c_int) {
    // SAFETY: setsockopt with a valid fd and a c_int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP_DEFER_ACCEPT: {}",
        std::io::Error::last_os_error()
    );
}

/// Closes with an RST (SO_LINGER 0) so that no request lingers and keeps
/// retransmitting after the scenario: the counts must settle.
fn reset(stream: TcpStream) {
    let socket = Socket::from(stream);
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(socket);
}

/// Final-ACK accept-queue overflows (`ack_dropped_accept_queue_full`).
///
/// On loopback a handshake completes at once, so a plain connect burst
/// overflows at the SYN. TCP_DEFER_ACCEPT keeps completed-but-silent
/// handshakes as requests: fill the accept queue with `backlog` clients
/// that send a byte, park `backlog` more as requests, then let those send
/// a byte: their ACK-with-data reaches tcp_check_req() with the accept
/// queue full and is dropped, then retransmitted and dropped again until
/// `hold` has passed. No SYN is dropped: the SYNs all arrive while the
/// queue has room, so every ListenOverflows increment is a final-ACK drop.
pub fn final_ack_overflow(addr: SocketAddr, backlog: i32, hold: Duration) -> Listener {
    final_ack_overflow_via(addr, addr.ip(), backlog, hold)
}

/// A SYN queue held full (`syn_dropped_syn_queue_full`, or cookies):
/// TCP_DEFER_ACCEPT keeps completed-but-silent handshakes as requests, so
/// `clients` non-blocking connects without data to a listener of
/// `backlog` fill its SYN queue and the rest meet it full. Returns what
/// must stay open for the queue to stay full (listener and clients).
pub fn syn_queue_held_full(backlog: i32, clients: usize) -> (Socket, Vec<Socket>) {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).expect("listener socket");
    set_defer_accept(&listener, 30);
    listener
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .expect("bind");
    listener.listen(backlog).expect("listen");
    let addr = listener.local_addr().expect("local addr");
    let mut held = Vec::new();
    for _ in 0..clients {
        let client = Socket::new(Domain::IPV4, Type::STREAM, None).expect("client socket");
        client.set_nonblocking(true).expect("non-blocking");
        // EINPROGRESS is the normal answer; a dropped SYN shows later.
        let _ = client.connect(&addr);
        held.push(client);
    }
    // Scenario timing, not a wait for the kernel: the held clients' SYN
    // retransmits (after 1 s) would add drops; the caller counts the
    // first round only, within this window.
    thread::sleep(Duration::from_millis(300));
    (listener, held)
}

/// A listener on `addr` (port 0 picks one). An unspecified IPv6 address
/// is made dual-stack explicitly, whatever net.ipv6.bindv6only says, so
/// that IPv4 clients reach it as v4-mapped peers.
fn listener_on(addr: SocketAddr, backlog: i32, defer_accept: bool) -> (Socket, u16) {
    let listener =
        Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("listener socket");
    if let SocketAddr::V6(v6) = addr {
        if v6.ip().is_unspecified() {
            listener.set_only_v6(false).expect("IPV6_V6ONLY off");
        }
    }
    if defer_accept {
        set_defer_accept(&listener, 30);
    }
    listener.bind(&addr.into()).expect("bind");
    listener.listen(backlog).expect("listen");
    let port = listener
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("inet addr")
        .port();
    (listener, port)
}

/// Starts a handshake without waiting for it. On loopback the SYN, and
/// the SYN-ACK and ACK when the listener answers, are processed before
/// connect() returns, so the listener's queues have moved by then.
fn connect_nonblocking(to: SocketAddr) -> Socket {
    let client = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("client socket");
    client.set_nonblocking(true).expect("non-blocking client");
    match client.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => panic!("connect {to}: {e}"),
    }
    client
}

/// SYN-stage drops: `clients` non-blocking connects, no data, to a
/// listener on `listen` that never accepts, through `connect` (e.g.
/// 127.0.0.1 to reach a dual-stack [::] listener as a v4-mapped peer).
///
/// With `defer_accept`, completed-but-silent handshakes stay in the SYN
/// queue, so it fills after `backlog` clients (syn_dropped_syn_queue_full
/// with tcp_syncookies=0, syn_cookie_sent otherwise, or the SYN-backlog
/// pressure rule when tcp_max_syn_backlog is the smaller limit). Without
/// it, handshakes complete into the accept queue at once, and once that
/// holds `backlog + 1` the next SYNs are dropped
/// (syn_dropped_accept_queue_full).
///
/// Dropped SYNs are retransmitted after 1 s: `hold` below that keeps one
/// drop per client. Every client is then closed with a RST (its request
/// or child is removed), the listener is closed, and nothing is left to
/// retransmit: the counters settle.
pub fn connect_burst(
    listen: SocketAddr,
    connect: std::net::IpAddr,
    backlog: i32,
    clients: usize,
    defer_accept: bool,
    hold: Duration,
) -> Listener {
    let (listener, port) = listener_on(listen, backlog, defer_accept);
    let to = SocketAddr::new(connect, port);
    let burst: Vec<Socket> = (0..clients).map(|_| connect_nonblocking(to)).collect();
    // Scenario timing: the queues stay full for `hold`, below the 1 s SYN
    // retransmit (see above).
    thread::sleep(hold);
    for client in burst {
        let _ = client.set_linger(Some(Duration::ZERO));
        drop(client);
    }
    drop(listener);
    settle();
    Listener { port, backlog }
}

/// [`final_ack_overflow`] with the clients connecting to `connect` rather
/// than to the listener's own address: 127.0.0.1 to a dual-stack [::]
/// listener makes the drops go through tcp_v6_syn_recv_sock() ->
/// tcp_v4_syn_recv_sock(), where one drop must stay one event.
pub fn final_ack_overflow_via(
    listen: SocketAddr,
    connect: std::net::IpAddr,
    backlog: i32,
    hold: Duration,
) -> Listener {
    let (listener, port) = listener_on(listen, backlog, true);
    let to = SocketAddr::new(connect, port);
    let mut clients = Vec::new();
    for _ in 0..backlog {
        let mut c = TcpStream::connect(to).expect("connect (first wave)");
        c.write_all(b"x").expect("send (first wave)");
        clients.push(c);
    }
    wait_for_accept_queue(&listener, backlog as u32);
    let mut parked = Vec::new();
    for _ in 0..backlog {
        parked.push(TcpStream::connect(to).expect("connect (second wave)"));
    }
    // Scenario timing: the parked clients' bare ACKs arrive (and their
    // requests stay deferred) before their data, as a real client's
    // would. No kernel state shows a deferred request to poll for.
    thread::sleep(Duration::from_millis(100));
    for c in &mut parked {
        // With tcp_abort_on_overflow=1 the first drop answers with a RST,
        // which a later write may report: that is the point, not an error.
        let _ = c.write_all(b"y");
    }
    // Scenario timing: each retransmission of the parked data during
    // `hold` is one more final-ACK drop.
    thread::sleep(hold);
    for c in parked.into_iter().chain(clients) {
        reset(c);
    }
    drop(listener);
    settle();
    Listener { port, backlog }
}
