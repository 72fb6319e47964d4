//! Real overflows on loopback, inside the caller's network namespace.

use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

use socket2::{Domain, Socket, Type};

/// What a scenario set up, for the assertions.
pub struct Listener {
    pub port: u16,
    pub backlog: i32,
}

fn set_defer_accept(socket: &Socket, secs: libc::c_int) {
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
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let listener = Socket::new(domain, Type::STREAM, None).expect("listener socket");
    set_defer_accept(&listener, 30);
    listener.bind(&addr.into()).expect("bind");
    listener.listen(backlog).expect("listen");
    let local = listener
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("inet addr");

    let mut clients = Vec::new();
    for _ in 0..backlog {
        let mut c = TcpStream::connect(local).expect("connect (first wave)");
        c.write_all(b"x").expect("send (first wave)");
        clients.push(c);
    }
    // Let the first wave's data complete their handshakes into the queue.
    thread::sleep(Duration::from_millis(100));
    let mut parked = Vec::new();
    for _ in 0..backlog {
        parked.push(TcpStream::connect(local).expect("connect (second wave)"));
    }
    thread::sleep(Duration::from_millis(100));
    for c in &mut parked {
        c.write_all(b"y").expect("send (second wave)");
    }
    thread::sleep(hold);
    for c in parked.into_iter().chain(clients) {
        reset(c);
    }
    drop(listener);
    // Let the RSTs and the listener's close settle before counting.
    thread::sleep(Duration::from_millis(300));
    Listener {
        port: local.port(),
        backlog,
    }
}
