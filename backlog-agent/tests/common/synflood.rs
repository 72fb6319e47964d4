//! A spoofed-source SYN flood over a raw socket, inside the caller's
//! private network namespace only: the listener is 198.18.0.1:80 on lo
//! there, the sources are 198.19.x.y (both in the benchmarking range
//! 198.18.0.0/15), and the route for 198.19.0.0/16 points into lo, so the
//! SYN-ACKs go nowhere and every request stays in the SYN queue. Once the
//! queue is full every further SYN is TCPReqQFullDrop (cookies 0) or
//! TCPReqQFullDoCookies (cookies 1).

use std::{
    net::TcpListener,
    os::fd::AsRawFd,
    process::Command,
    time::{Duration, Instant},
};

/// What the flood did, from the namespace's own counters.
pub struct SynFlood {
    pub elapsed: Duration,
    /// The counter's growth: TCPReqQFullDrop or TCPReqQFullDoCookies.
    pub drops: u64,
    pub sent: u64,
    pub netns: u64,
}

impl SynFlood {
    pub fn rate(&self) -> f64 {
        self.drops as f64 / self.elapsed.as_secs_f64()
    }
}

/// The TcpExt counter and the agent's kind for `cookies` ("0" or "1").
pub fn counter_and_kind(cookies: &str) -> (&'static str, &'static str) {
    if cookies == "0" {
        ("TCPReqQFullDrop", "syn_dropped_syn_queue_full")
    } else {
        ("TCPReqQFullDoCookies", "syn_cookie_sent")
    }
}

fn checksum(words: impl Iterator<Item = u16>) -> u16 {
    let mut sum: u32 = words.map(u32::from).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 SYN from `src:sport` to 198.18.0.1:`dport`, checksummed.
fn syn_packet(src: [u8; 4], sport: u16, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45; // IPv4, 5 words of header
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64; // TTL
    p[9] = libc::IPPROTO_TCP as u8;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&[198, 18, 0, 1]);
    // The kernel fills in the IP header checksum (IP_HDRINCL).
    let tcp = 20;
    p[tcp..tcp + 2].copy_from_slice(&sport.to_be_bytes());
    p[tcp + 2..tcp + 4].copy_from_slice(&dport.to_be_bytes());
    p[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    p[tcp + 12] = 5 << 4; // 5 words of header
    p[tcp + 13] = 0x02; // SYN
    p[tcp + 14..tcp + 16].copy_from_slice(&65535u16.to_be_bytes());
    let pseudo = [
        u16::from_be_bytes([src[0], src[1]]),
        u16::from_be_bytes([src[2], src[3]]),
        u16::from_be_bytes([198, 18]),
        u16::from_be_bytes([0, 1]),
        libc::IPPROTO_TCP as u16,
        20,
    ];
    let segment: Vec<u16> = p[tcp..]
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let sum = checksum(pseudo.into_iter().chain(segment));
    p[tcp + 16..tcp + 18].copy_from_slice(&sum.to_be_bytes());
    p
}

fn ip(args: &str) {
    let status = Command::new(super::outside("ip"))
        .args(args.split_whitespace())
        .status()
        .expect("run ip (iproute2)");
    assert!(status.success(), "ip {args} failed");
}

/// Floods for `duration` (or `max_syns`, whichever ends first) in a new
/// network namespace with tcp_syncookies = `cookies`, listener backlog 64.
pub fn syn_flood(cookies: &'static str, duration: Duration, max_syns: u64) -> SynFlood {
    super::in_new_netns(move || {
        super::set_sysctl("net.ipv4.tcp_syncookies", cookies);
        ip("addr add 198.18.0.1/32 dev lo");
        ip("route add 198.19.0.0/16 dev lo");
        let listener = TcpListener::bind("198.18.0.1:80").expect("bind 198.18.0.1:80");
        // SAFETY: listen on a valid socket fd.
        unsafe { libc::listen(listener.as_raw_fd(), 64) };
        // SAFETY: a raw socket; closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_in is plain data; 198.18.0.1 is the only destination.
        let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_addr.s_addr = u32::from_ne_bytes([198, 18, 0, 1]);
        let (counter, _) = counter_and_kind(cookies);
        let before = super::tcp_ext();
        let started = Instant::now();
        let mut sent: u64 = 0;
        while started.elapsed() < duration && sent < max_syns {
            for _ in 0..256 {
                sent += 1;
                let i = sent as u32;
                let src = [198, 19, (i >> 8) as u8, i as u8];
                let packet = syn_packet(src, 1024 + (i % 50_000) as u16, 80, i);
                // SAFETY: a valid buffer and a sockaddr_in of the right size.
                unsafe {
                    libc::sendto(
                        fd,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&to as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
            }
        }
        let elapsed = started.elapsed();
        let after = super::tcp_ext();
        // SAFETY: closing the raw socket opened above.
        unsafe { libc::close(fd) };
        drop(listener);
        SynFlood {
            elapsed,
            drops: super::counter_delta(&before, &after, counter),
            sent,
            netns: super::netns_inode(),
        }
    })
}
