//! Listening sockets as the kernel's sock_diag netlink interface reports
//! them: what `ss -ltnm` and `ss -xl` show, without running `ss`.
//!
//! Why this exists: on kernels where the agent cannot trace SYN-stage drops
//! (no fentry, no kprobes) it can still report, per TCP listener, the drops
//! the kernel counted itself: `tcp_listendrop()` increments the listener's
//! `sk_drops`, which sock_diag returns as `SK_MEMINFO_DROPS` ("counted, not
//! traced"; see [`TcpListenerInfo::drops`] for what else it counts). For
//! UNIX stream listeners it gives the accept backlog, its limit and the
//! path, which name the listener an EAGAIN `connect()` hit.
//!
//! A netlink socket belongs to the network namespace of the thread that
//! opened it, so every function here sees the calling thread's namespace;
//! [`in_netns`] runs a closure in another one.
//!
//! Replies come from the kernel, but they are parsed as untrusted bytes:
//! every header, message and attribute is bounds-checked by pure functions
//! over `&[u8]`, so a short or garbled reply is an error value, never a
//! panic. Raw netlink through libc keeps the agent free of a netlink crate
//! for two requests.

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use thiserror::Error;

// linux/netlink.h: message types below 0x10 are control messages.
const NLMSG_NOOP: u16 = 0x1;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;
const NLMSG_OVERRUN: u16 = 0x4;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_DUMP: u16 = 0x300; // NLM_F_ROOT | NLM_F_MATCH
const NLMSG_HDRLEN: usize = 16; // struct nlmsghdr
const NLA_HDRLEN: usize = 4; // struct nlattr / struct rtattr
/// The two top bits of an attribute type are flags (nested, byte order).
const NLA_TYPE_MASK: u16 = 0x3fff;

// linux/sock_diag.h
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SK_MEMINFO_DROPS: usize = 8;

// linux/inet_diag.h
const INET_DIAG_REQ_V2_LEN: usize = 56; // 4 + idiag_states 4 + inet_diag_sockid 48
const INET_DIAG_MSG_LEN: usize = 72; // 4 + inet_diag_sockid 48 + 5 * u32
const INET_DIAG_SKMEMINFO: u16 = 7;

// linux/unix_diag.h
const UNIX_DIAG_REQ_LEN: usize = 24;
const UNIX_DIAG_MSG_LEN: usize = 16;
const UDIAG_SHOW_NAME: u32 = 0x01;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_RQLEN: u16 = 4;

// include/net/tcp_states.h; UNIX sockets use the same state numbers.
const TCP_LISTEN: u8 = 10;

/// A dump is a few datagrams that the kernel writes at once; no reply within
/// this time means something is wrong, and the agent must not hang on it.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// The kernel sizes dump datagrams to at most 32 KiB (netlink_recvmsg caps
/// max_recvmsg_len); a larger one is still read whole (see `recv_datagram`).
const RECV_BUFFER: usize = 32 * 1024;

/// Which dump a reply belongs to, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpKind {
    TcpV4,
    TcpV6,
    Unix,
}

impl fmt::Display for DumpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DumpKind::TcpV4 => "TCP/IPv4 listener dump",
            DumpKind::TcpV6 => "TCP/IPv6 listener dump",
            DumpKind::Unix => "UNIX listener dump",
        })
    }
}

#[derive(Debug, Error)]
pub enum SockDiagError {
    // The OS error is part of each one-line message and deliberately not a
    // `source`, so that anyhow's "{:#}" chain does not print it twice.
    #[error("sock_diag: netlink socket: {0}")]
    Socket(io::Error),
    #[error("sock_diag: sending the {dump} request: {error}")]
    Send { dump: DumpKind, error: io::Error },
    #[error("sock_diag: receiving the {dump}: {error}")]
    Recv { dump: DumpKind, error: io::Error },
    #[error("sock_diag: no reply to the {dump} within {} s", RECV_TIMEOUT.as_secs())]
    Timeout { dump: DumpKind },
    #[error("sock_diag: the kernel refused the {dump}: {}", io::Error::from_raw_os_error(*errno))]
    Kernel { dump: DumpKind, errno: i32 },
    #[error("sock_diag: malformed reply to the {dump}: {reason}")]
    Malformed { dump: DumpKind, reason: String },
    #[error("sock_diag: cannot open network namespace {}: {error}", path.display())]
    OpenNetns { path: PathBuf, error: io::Error },
    #[error("sock_diag: cannot enter network namespace {}: {error}", path.display())]
    SetNs { path: PathBuf, error: io::Error },
    #[error("sock_diag: cannot start a thread to enter a network namespace: {0}")]
    Thread(io::Error),
}

fn malformed(dump: DumpKind, reason: impl Into<String>) -> SockDiagError {
    SockDiagError::Malformed {
        dump,
        reason: reason.into(),
    }
}

/// A TCP socket in state LISTEN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpListenerInfo {
    /// `sk_family`: AF_INET or AF_INET6 (a dual-stack listener is AF_INET6).
    pub family: u16,
    pub addr: IpAddr,
    pub port: u16,
    /// Socket inode, as in `/proc/PID/fd/N -> socket:[inode]`.
    pub inode: u64,
    pub uid: u32,
    /// Connections waiting for accept() (`sk_ack_backlog`).
    pub accept_queue_len: u32,
    /// The backlog given to listen(), capped by net.core.somaxconn
    /// (`sk_max_ack_backlog`).
    pub accept_queue_max: u32,
    /// `sk_drops` (what `ss -ltnm` shows as skmem `d`). Every
    /// `tcp_listendrop()` adds one: a SYN dropped for a full SYN or accept
    /// queue, a final ACK dropped for a full accept queue. But tcp_v4_rcv /
    /// tcp_v6_rcv also add one for each segment they discard after finding
    /// the listener, so a final-ACK overflow counts twice and the bare ACKs
    /// that TCP_DEFER_ACCEPT drops on purpose count too (seen on 6.18:
    /// 7 overflows + 16 deferred ACKs gave 30). SYN-stage drops alone
    /// match TcpExt ListenDrops one for one. `None` when the kernel sent no
    /// SK_MEMINFO_DROPS.
    pub drops: Option<u64>,
    /// The socket cookie (`sock_gen_cookie`), stable for the socket's life.
    pub cookie: u64,
}

/// A UNIX stream socket in state LISTEN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixListenerInfo {
    pub inode: u64,
    /// Filesystem path, or an abstract name written as `ss` writes it: the
    /// leading NUL (and any other NUL in the name) shown as '@'. `None` when
    /// the socket has no name.
    pub path: Option<String>,
    /// Connections waiting for accept().
    pub queue_len: u32,
    /// The backlog given to listen(), capped by net.core.somaxconn. A
    /// non-blocking connect() fails with EAGAIN once `queue_len` exceeds it.
    pub queue_max: u32,
    pub cookie: u64,
}

/// All TCP listeners, IPv4 and IPv6, of the calling thread's network
/// namespace.
pub fn tcp_listeners() -> Result<Vec<TcpListenerInfo>, SockDiagError> {
    let socket = NetlinkSocket::open()?;
    let mut listeners = Vec::new();
    for (dump, family, seq) in [
        (DumpKind::TcpV4, libc::AF_INET as u8, 1),
        (DumpKind::TcpV6, libc::AF_INET6 as u8, 2),
    ] {
        socket.dump(dump, &inet_request(family, seq), seq, |payload| {
            if let Some(listener) = parse_inet_listener(dump, payload)? {
                listeners.push(listener);
            }
            Ok(())
        })?;
    }
    Ok(listeners)
}

/// All UNIX stream listeners of the calling thread's network namespace.
pub fn unix_listeners() -> Result<Vec<UnixListenerInfo>, SockDiagError> {
    let socket = NetlinkSocket::open()?;
    let mut listeners = Vec::new();
    let seq = 1;
    socket.dump(DumpKind::Unix, &unix_request(seq), seq, |payload| {
        if let Some(listener) = parse_unix_listener(DumpKind::Unix, payload)? {
            listeners.push(listener);
        }
        Ok(())
    })?;
    Ok(listeners)
}

/// Runs `f` on a short-lived thread that has entered the network namespace
/// named by `netns_file` (e.g. /proc/PID/ns/net), so that [`tcp_listeners`]
/// and [`unix_listeners`] called inside `f` see that namespace. The calling
/// thread's namespace is never changed. Needs CAP_SYS_ADMIN.
///
/// The file is opened on the calling thread, so /proc/thread-self/ns/net
/// means the caller's namespace, not the helper thread's. A panic in `f` is
/// propagated. Inside `f`, /proc/net still shows the thread-group leader's
/// namespace; /proc/thread-self/net shows the one entered.
pub fn in_netns<R: Send>(
    netns_file: &Path,
    f: impl FnOnce() -> R + Send,
) -> Result<R, SockDiagError> {
    let netns = fs::File::open(netns_file).map_err(|error| SockDiagError::OpenNetns {
        path: netns_file.to_owned(),
        error,
    })?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("sock_diag-netns".into())
            .spawn_scoped(scope, move || {
                // setns(CLONE_NEWNET) moves only this thread, which ends when
                // `f` returns: nothing has to be moved back.
                // SAFETY: plain syscall on an fd that `netns` keeps open.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(SockDiagError::SetNs {
                        path: netns_file.to_owned(),
                        error: io::Error::last_os_error(),
                    });
                }
                drop(netns);
                Ok(f())
            })
            .map_err(SockDiagError::Thread)?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// One entry per distinct network namespace that a process under
/// `proc_root` (normally /proc) is in: the namespace's inode (what the eBPF
/// side reports as `net.ns.inum`) and a /proc/PID/ns/net path for it, of
/// the lowest such PID. Sorted by inode. Processes that vanish or cannot be
/// read are skipped. A namespace that no process is in (kept only by a bind
/// mount, e.g. `ip netns add`) or that only a non-leader thread is in is
/// not found.
///
/// The path names the namespace only while that process lives: a caller
/// that must be sure can compare the inode of /proc/thread-self/ns/net
/// inside [`in_netns`].
pub fn network_namespaces(proc_root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut by_inode: BTreeMap<u64, (u32, PathBuf)> = BTreeMap::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let path = proc_root.join(&name).join("ns").join("net");
        // metadata() follows the magic link to the nsfs inode.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        by_inode
            .entry(meta.ino())
            .and_modify(|kept| {
                if pid < kept.0 {
                    *kept = (pid, path.clone());
                }
            })
            .or_insert((pid, path));
    }
    by_inode
        .into_iter()
        .map(|(inode, (_, path))| (inode, path))
        .collect()
}

/// An AF_NETLINK/NETLINK_SOCK_DIAG socket, in the calling thread's netns.
struct NetlinkSocket {
    fd: OwnedFd,
}

impl NetlinkSocket {
    fn open() -> Result<Self, SockDiagError> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(SockDiagError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        // SAFETY: the option value points to a timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(SockDiagError::Socket(io::Error::last_os_error()));
        }
        Ok(Self { fd })
    }

    /// Sends one dump request and feeds every SOCK_DIAG_BY_FAMILY payload of
    /// the reply to `on_payload`, until NLMSG_DONE.
    fn dump(
        &self,
        dump: DumpKind,
        request: &[u8],
        seq: u32,
        mut on_payload: impl FnMut(&[u8]) -> Result<(), SockDiagError>,
    ) -> Result<(), SockDiagError> {
        self.send(dump, request)?;
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let (len, from_kernel) = self.recv_datagram(dump, &mut buf)?;
            if !from_kernel {
                // Another process can send to our port id; only the kernel's
                // replies count.
                continue;
            }
            let datagram = buf.get(..len).unwrap_or_default();
            if parse_datagram(dump, datagram, seq, &mut on_payload)? == DumpProgress::Done {
                return Ok(());
            }
        }
    }

    fn send(&self, dump: DumpKind, request: &[u8]) -> Result<(), SockDiagError> {
        // SAFETY: an all-zero sockaddr_nl is valid; nl_pid 0 is the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: buffer and address are valid for the lengths given.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    request.as_ptr().cast(),
                    request.len(),
                    0,
                    (&kernel as *const libc::sockaddr_nl).cast(),
                    size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if sent >= 0 {
                if sent as usize != request.len() {
                    return Err(SockDiagError::Send {
                        dump,
                        error: io::Error::other(format!("sent {sent} of {} bytes", request.len())),
                    });
                }
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(SockDiagError::Send { dump, error });
            }
        }
    }

    /// Reads one whole datagram into `buf`, growing it when the datagram is
    /// larger, and says whether the kernel sent it.
    fn recv_datagram(
        &self,
        dump: DumpKind,
        buf: &mut Vec<u8>,
    ) -> Result<(usize, bool), SockDiagError> {
        // MSG_PEEK | MSG_TRUNC returns the datagram's full length without
        // consuming it, so a datagram is never silently cut.
        let size = self.recv(dump, buf, libc::MSG_PEEK | libc::MSG_TRUNC)?.0;
        if size > buf.len() {
            buf.resize(size, 0);
        }
        let (len, from) = self.recv(dump, buf, 0)?;
        if len == 0 {
            return Err(malformed(dump, "empty datagram"));
        }
        Ok((len.min(buf.len()), from.nl_pid == 0))
    }

    fn recv(
        &self,
        dump: DumpKind,
        buf: &mut [u8],
        flags: libc::c_int,
    ) -> Result<(usize, libc::sockaddr_nl), SockDiagError> {
        loop {
            // SAFETY: an all-zero sockaddr_nl is valid.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: buffer and address are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut from_len,
                )
            };
            if n >= 0 {
                return Ok((n as usize, from));
            }
            let error = io::Error::last_os_error();
            match error.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Err(SockDiagError::Timeout { dump }),
                _ => return Err(SockDiagError::Recv { dump, error }),
            }
        }
    }
}

/// netlink.h NLMSG_ALIGN / NLA_ALIGN: 4 bytes.
fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

fn read_u16(buf: &[u8], offset: usize) -> Option<u16> {
    let bytes = buf.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_ne_bytes([bytes[0], bytes[1]]))
}

fn read_u32(buf: &[u8], offset: usize) -> Option<u32> {
    let bytes = buf.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Cookies are two host-order u32s, low word first (sock_diag_save_cookie).
fn read_cookie(buf: &[u8], offset: usize) -> Option<u64> {
    let low = read_u32(buf, offset)?;
    let high = read_u32(buf, offset.checked_add(4)?)?;
    Some(u64::from(high) << 32 | u64::from(low))
}

fn nlmsghdr(len: usize, seq: u32) -> Vec<u8> {
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: filled by the kernel
    msg
}

/// nlmsghdr + struct inet_diag_req_v2 asking for every TCP listener of one
/// family, with the sk_meminfo array (which carries sk_drops).
fn inet_request(family: u8, seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;
    let mut msg = nlmsghdr(len, seq);
    msg.push(family); // sdiag_family
    msg.push(libc::IPPROTO_TCP as u8); // sdiag_protocol
                                       // idiag_ext bit N-1 asks for extension N (inet_diag_msg_attrs_fill).
    msg.push(1 << (INET_DIAG_SKMEMINFO - 1));
    msg.push(0); // pad
    msg.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes()); // idiag_states
    msg.resize(len, 0); // inet_diag_sockid: all zero matches every socket in a dump
    msg
}

/// nlmsghdr + struct unix_diag_req asking for every listening UNIX socket
/// with its name and queue lengths.
fn unix_request(seq: u32) -> Vec<u8> {
    let len = NLMSG_HDRLEN + UNIX_DIAG_REQ_LEN;
    let mut msg = nlmsghdr(len, seq);
    msg.push(libc::AF_UNIX as u8); // sdiag_family
    msg.push(0); // sdiag_protocol
    msg.extend_from_slice(&0u16.to_ne_bytes()); // pad
    msg.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes()); // udiag_states
    msg.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
    msg.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN).to_ne_bytes());
    msg.resize(len, 0); // udiag_cookie
    msg
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DumpProgress {
    More,
    Done,
}

/// Walks the netlink messages of one datagram: SOCK_DIAG_BY_FAMILY payloads
/// go to `on_payload`, NLMSG_DONE ends the dump, NLMSG_ERROR fails it.
/// Messages of another sequence number (a stale reply) are skipped.
fn parse_datagram(
    dump: DumpKind,
    datagram: &[u8],
    seq: u32,
    on_payload: &mut impl FnMut(&[u8]) -> Result<(), SockDiagError>,
) -> Result<DumpProgress, SockDiagError> {
    let mut rest = datagram;
    while !rest.is_empty() {
        let (Some(len), Some(kind), Some(msg_seq)) =
            (read_u32(rest, 0), read_u16(rest, 4), read_u32(rest, 8))
        else {
            return Err(malformed(
                dump,
                format!("{} bytes left, less than a netlink header", rest.len()),
            ));
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(malformed(
                dump,
                format!(
                    "netlink message length {len} with {} bytes left",
                    rest.len()
                ),
            ));
        }
        let payload = rest.get(NLMSG_HDRLEN..len).unwrap_or_default();
        // The last message need not be padded to 4 bytes.
        rest = rest.get(align4(len)..).unwrap_or_default();
        if msg_seq != seq {
            continue;
        }
        match kind {
            NLMSG_NOOP => {}
            NLMSG_ERROR => {
                // struct nlmsgerr: a negative errno, then the request's header.
                let errno = read_u32(payload, 0)
                    .ok_or_else(|| malformed(dump, "NLMSG_ERROR without an error code"))?
                    as i32;
                if errno != 0 {
                    return Err(SockDiagError::Kernel {
                        dump,
                        errno: errno.wrapping_neg(),
                    });
                }
                // errno 0 is an acknowledgement, which a dump does not ask
                // for: nothing to do.
            }
            NLMSG_DONE => {
                // A dump's NLMSG_DONE carries an int: negative if the dump
                // failed part way (netlink_dump_done).
                if let Some(status) = read_u32(payload, 0).map(|s| s as i32) {
                    if status < 0 {
                        return Err(SockDiagError::Kernel {
                            dump,
                            errno: status.wrapping_neg(),
                        });
                    }
                }
                return Ok(DumpProgress::Done);
            }
            NLMSG_OVERRUN => return Err(malformed(dump, "NLMSG_OVERRUN: data was lost")),
            SOCK_DIAG_BY_FAMILY => on_payload(payload)?,
            // Unknown message types are skipped, as netlink asks of readers.
            _ => {}
        }
    }
    Ok(DumpProgress::More)
}

/// Iterates over the netlink attributes (struct nlattr) in `buf`. A bad
/// length yields one error and ends the iteration.
struct Attributes<'a> {
    dump: DumpKind,
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), SockDiagError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        let (Some(len), Some(kind)) = (read_u16(rest, 0), read_u16(rest, 2)) else {
            return Some(Err(malformed(
                self.dump,
                format!("{} bytes left, less than an attribute header", rest.len()),
            )));
        };
        let len = usize::from(len);
        if len < NLA_HDRLEN || len > rest.len() {
            return Some(Err(malformed(
                self.dump,
                format!(
                    "attribute {kind} of length {len} with {} bytes left",
                    rest.len()
                ),
            )));
        }
        let payload = rest.get(NLA_HDRLEN..len).unwrap_or_default();
        self.rest = rest.get(align4(len)..).unwrap_or_default();
        Some(Ok((kind & NLA_TYPE_MASK, payload)))
    }
}

fn attributes(dump: DumpKind, buf: &[u8]) -> Attributes<'_> {
    Attributes { dump, rest: buf }
}

/// Decodes one struct inet_diag_msg and its attributes. `Ok(None)` for a
/// socket that is not listening (the kernel filters by state already).
fn parse_inet_listener(
    dump: DumpKind,
    payload: &[u8],
) -> Result<Option<TcpListenerInfo>, SockDiagError> {
    let header = payload.get(..INET_DIAG_MSG_LEN).ok_or_else(|| {
        malformed(
            dump,
            format!(
                "inet_diag_msg of {} bytes, expected at least {INET_DIAG_MSG_LEN}",
                payload.len()
            ),
        )
    })?;
    let family = header[0];
    let state = header[1];
    if state != TCP_LISTEN {
        return Ok(None);
    }
    // struct inet_diag_sockid at offset 4: sport, dport (big-endian),
    // src[16], dst[16], if, cookie[2].
    let port = u16::from_be_bytes([header[4], header[5]]);
    let src = &header[8..24];
    let addr = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        libc::AF_INET6 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(src);
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return Err(malformed(dump, format!("unknown address family {family}"))),
    };
    let field = |offset| read_u32(header, offset).unwrap_or_default();
    let cookie = read_cookie(header, 44).unwrap_or_default();
    let mut drops = None;
    let attrs = payload.get(INET_DIAG_MSG_LEN..).unwrap_or_default();
    for attr in attributes(dump, attrs) {
        let (kind, value) = attr?;
        if kind == INET_DIAG_SKMEMINFO {
            // An array of u32 indexed by SK_MEMINFO_*; older kernels may
            // send fewer entries (SK_MEMINFO_DROPS came in 4.x).
            drops = read_u32(value, SK_MEMINFO_DROPS * 4).map(u64::from);
        }
    }
    Ok(Some(TcpListenerInfo {
        family: u16::from(family),
        addr,
        port,
        // idiag_expires 52, idiag_rqueue 56, idiag_wqueue 60, idiag_uid 64,
        // idiag_inode 68. For listeners inet_diag reports sk_ack_backlog as
        // rqueue and sk_max_ack_backlog as wqueue.
        accept_queue_len: field(56),
        accept_queue_max: field(60),
        uid: field(64),
        inode: u64::from(field(68)),
        drops,
        cookie,
    }))
}

/// Decodes one struct unix_diag_msg and its attributes. `Ok(None)` for a
/// socket that is not a listening SOCK_STREAM socket.
fn parse_unix_listener(
    dump: DumpKind,
    payload: &[u8],
) -> Result<Option<UnixListenerInfo>, SockDiagError> {
    let header = payload.get(..UNIX_DIAG_MSG_LEN).ok_or_else(|| {
        malformed(
            dump,
            format!(
                "unix_diag_msg of {} bytes, expected at least {UNIX_DIAG_MSG_LEN}",
                payload.len()
            ),
        )
    })?;
    let (family, sock_type, state) = (header[0], header[1], header[2]);
    if i32::from(family) != libc::AF_UNIX {
        return Err(malformed(
            dump,
            format!("address family {family}, not AF_UNIX"),
        ));
    }
    // The state filter covers SOCK_SEQPACKET listeners too.
    if i32::from(sock_type) != libc::SOCK_STREAM || state != TCP_LISTEN {
        return Ok(None);
    }
    let inode = u64::from(read_u32(header, 4).unwrap_or_default());
    let cookie = read_cookie(header, 8).unwrap_or_default();
    let mut path = None;
    let mut queue = None;
    let attrs = payload.get(UNIX_DIAG_MSG_LEN..).unwrap_or_default();
    for attr in attributes(dump, attrs) {
        let (kind, value) = attr?;
        match kind {
            UNIX_DIAG_NAME => path = unix_name(value),
            UNIX_DIAG_RQLEN => {
                // struct unix_diag_rqlen; for a listener: the length of the
                // queue of pending connections and sk_max_ack_backlog.
                let (Some(len), Some(max)) = (read_u32(value, 0), read_u32(value, 4)) else {
                    return Err(malformed(
                        dump,
                        format!("UNIX_DIAG_RQLEN of {} bytes, expected 8", value.len()),
                    ));
                };
                queue = Some((len, max));
            }
            _ => {}
        }
    }
    let (queue_len, queue_max) = queue.ok_or_else(|| {
        malformed(
            dump,
            format!("listener with inode {inode} has no UNIX_DIAG_RQLEN"),
        )
    })?;
    Ok(Some(UnixListenerInfo {
        inode,
        path,
        queue_len,
        queue_max,
        cookie,
    }))
}

/// `sun_path` as the kernel keeps it: a filesystem path (which recent
/// kernels store with its terminating NUL), or an abstract name, which
/// starts with a NUL and may hold any byte.
fn unix_name(raw: &[u8]) -> Option<String> {
    match raw.split_first() {
        None => None,
        Some((0, name)) => {
            let shown: Vec<u8> = name
                .iter()
                .map(|&b| if b == 0 { b'@' } else { b })
                .collect();
            Some(format!("@{}", String::from_utf8_lossy(&shown)))
        }
        Some(_) => {
            let path = raw.split(|&b| b == 0).next().unwrap_or_default();
            Some(String::from_utf8_lossy(path).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, SockAddr, Socket, Type};
    use std::{
        net::SocketAddr,
        os::unix::ffi::OsStrExt,
        thread,
        time::{Duration, Instant},
    };

    // ---- synthetic replies ----

    fn pad4(buf: &mut Vec<u8>) {
        buf.resize(align4(buf.len()), 0);
    }

    fn nlmsg(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&4242u32.to_ne_bytes());
        msg.extend_from_slice(payload);
        pad4(&mut msg);
        msg
    }

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut attr = Vec::new();
        attr.extend_from_slice(&((NLA_HDRLEN + value.len()) as u16).to_ne_bytes());
        attr.extend_from_slice(&kind.to_ne_bytes());
        attr.extend_from_slice(value);
        pad4(&mut attr);
        attr
    }

    fn meminfo(entries: usize, drops: u32) -> Vec<u8> {
        let mut value = Vec::new();
        for i in 0..entries {
            let v = if i == SK_MEMINFO_DROPS {
                drops
            } else {
                1000 + i as u32
            };
            value.extend_from_slice(&v.to_ne_bytes());
        }
        value
    }

    struct InetMsg {
        family: u8,
        state: u8,
        port: u16,
        src: [u8; 16],
        rqueue: u32,
        wqueue: u32,
        uid: u32,
        inode: u32,
        cookie: u64,
    }

    impl InetMsg {
        fn v4() -> Self {
            let mut src = [0u8; 16];
            src[..4].copy_from_slice(&[127, 0, 0, 1]);
            InetMsg {
                family: libc::AF_INET as u8,
                state: TCP_LISTEN,
                port: 8080,
                src,
                rqueue: 3,
                wqueue: 128,
                uid: 33,
                inode: 123_456,
                cookie: 0x1122_3344_5566_7788,
            }
        }

        fn bytes(&self, attrs: &[u8]) -> Vec<u8> {
            let mut msg = vec![self.family, self.state, 0, 0];
            msg.extend_from_slice(&self.port.to_be_bytes());
            msg.extend_from_slice(&[0, 0]); // dport
            msg.extend_from_slice(&self.src);
            msg.extend_from_slice(&[0; 16]); // dst
            msg.extend_from_slice(&0u32.to_ne_bytes()); // if
            msg.extend_from_slice(&(self.cookie as u32).to_ne_bytes());
            msg.extend_from_slice(&((self.cookie >> 32) as u32).to_ne_bytes());
            for v in [0, self.rqueue, self.wqueue, self.uid, self.inode] {
                msg.extend_from_slice(&v.to_ne_bytes());
            }
            assert_eq!(msg.len(), INET_DIAG_MSG_LEN);
            msg.extend_from_slice(attrs);
            msg
        }
    }

    fn unix_msg(sock_type: u8, state: u8, inode: u32, cookie: u64, attrs: &[u8]) -> Vec<u8> {
        let mut msg = vec![libc::AF_UNIX as u8, sock_type, state, 0];
        msg.extend_from_slice(&inode.to_ne_bytes());
        msg.extend_from_slice(&(cookie as u32).to_ne_bytes());
        msg.extend_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
        msg.extend_from_slice(attrs);
        msg
    }

    fn rqlen(len: u32, max: u32) -> Vec<u8> {
        let mut value = len.to_ne_bytes().to_vec();
        value.extend_from_slice(&max.to_ne_bytes());
        nla(UNIX_DIAG_RQLEN, &value)
    }

    /// Collects the payloads of one datagram.
    fn walk(datagram: &[u8], seq: u32) -> Result<(DumpProgress, Vec<Vec<u8>>), SockDiagError> {
        let mut payloads = Vec::new();
        let progress = parse_datagram(DumpKind::TcpV4, datagram, seq, &mut |p: &[u8]| {
            payloads.push(p.to_vec());
            Ok(())
        })?;
        Ok((progress, payloads))
    }

    fn reason(error: SockDiagError) -> String {
        match error {
            SockDiagError::Malformed { reason, .. } => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    // ---- requests ----

    #[test]
    fn inet_request_layout() {
        let req = inet_request(libc::AF_INET6 as u8, 7);
        assert_eq!(req.len(), 72);
        assert_eq!(read_u32(&req, 0), Some(72));
        assert_eq!(read_u16(&req, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(read_u16(&req, 6), Some(NLM_F_REQUEST | NLM_F_DUMP));
        assert_eq!(read_u32(&req, 8), Some(7));
        assert_eq!(req[16], libc::AF_INET6 as u8);
        assert_eq!(req[17], libc::IPPROTO_TCP as u8);
        assert_eq!(req[18], 1 << 6, "INET_DIAG_SKMEMINFO is extension 7");
        assert_eq!(read_u32(&req, 20), Some(1 << 10));
        assert!(req[24..].iter().all(|&b| b == 0));
    }

    #[test]
    fn unix_request_layout() {
        let req = unix_request(3);
        assert_eq!(req.len(), 40);
        assert_eq!(read_u32(&req, 0), Some(40));
        assert_eq!(req[16], libc::AF_UNIX as u8);
        assert_eq!(read_u32(&req, 20), Some(1 << 10));
        assert_eq!(read_u32(&req, 24), Some(0));
        assert_eq!(read_u32(&req, 28), Some(0x11));
    }

    // ---- netlink messages ----

    #[test]
    fn multi_part_dump() {
        let mut first = nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"one");
        first.extend(nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"two!"));
        let (progress, payloads) = walk(&first, 1).unwrap();
        assert_eq!(progress, DumpProgress::More);
        assert_eq!(payloads, vec![b"one".to_vec(), b"two!".to_vec()]);

        let mut second = nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"three");
        second.extend(nlmsg(NLMSG_DONE, 1, &0i32.to_ne_bytes()));
        // Anything after NLMSG_DONE is not read.
        second.extend(nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"after"));
        let (progress, payloads) = walk(&second, 1).unwrap();
        assert_eq!(progress, DumpProgress::Done);
        assert_eq!(payloads, vec![b"three".to_vec()]);
    }

    #[test]
    fn skips_other_sequence_numbers_noop_and_unknown_types() {
        let mut datagram = nlmsg(SOCK_DIAG_BY_FAMILY, 9, b"stale");
        datagram.extend(nlmsg(NLMSG_ERROR, 9, &(-1i32).to_ne_bytes()));
        datagram.extend(nlmsg(NLMSG_NOOP, 1, b""));
        datagram.extend(nlmsg(0x77, 1, b"unknown"));
        datagram.extend(nlmsg(NLMSG_ERROR, 1, &0i32.to_ne_bytes())); // an ACK
        datagram.extend(nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"mine"));
        datagram.extend(nlmsg(NLMSG_DONE, 1, b""));
        let (progress, payloads) = walk(&datagram, 1).unwrap();
        assert_eq!(progress, DumpProgress::Done);
        assert_eq!(payloads, vec![b"mine".to_vec()]);
    }

    #[test]
    fn unpadded_last_message() {
        let mut datagram = nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"x");
        datagram.truncate(NLMSG_HDRLEN + 1);
        let (_, payloads) = walk(&datagram, 1).unwrap();
        assert_eq!(payloads, vec![b"x".to_vec()]);
    }

    #[test]
    fn nlmsg_error_is_the_kernels_errno() {
        let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
        payload.extend_from_slice(&inet_request(libc::AF_INET as u8, 1)[..16]);
        let error = walk(&nlmsg(NLMSG_ERROR, 1, &payload), 1).unwrap_err();
        assert!(
            matches!(error, SockDiagError::Kernel { errno, dump: DumpKind::TcpV4 } if errno == libc::EPERM),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.starts_with(
                "sock_diag: the kernel refused the TCP/IPv4 listener dump: Operation not permitted"
            ),
            "{text}"
        );
        assert!(!text.contains('\n'));

        let error = walk(&nlmsg(NLMSG_DONE, 1, &(-libc::EINTR).to_ne_bytes()), 1).unwrap_err();
        assert!(matches!(error, SockDiagError::Kernel { errno, .. } if errno == libc::EINTR));

        // i32::MIN must not overflow on negation.
        let error = walk(&nlmsg(NLMSG_ERROR, 1, &i32::MIN.to_ne_bytes()), 1).unwrap_err();
        let _ = error.to_string();

        let error = walk(&nlmsg(NLMSG_ERROR, 1, b"ab"), 1).unwrap_err();
        assert!(reason(error).contains("without an error code"));
        let error = walk(&nlmsg(NLMSG_OVERRUN, 1, b""), 1).unwrap_err();
        assert!(reason(error).contains("OVERRUN"));
    }

    #[test]
    fn bad_message_lengths() {
        let good = nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"payload!");
        for bad_len in [0u32, 1, 15, good.len() as u32 + 1, u32::MAX] {
            let mut datagram = good.clone();
            datagram[..4].copy_from_slice(&bad_len.to_ne_bytes());
            let error = walk(&datagram, 1).unwrap_err();
            assert!(
                reason(error).contains(&format!("netlink message length {bad_len}")),
                "len {bad_len}"
            );
        }
        // An on_payload error stops the walk.
        let error = parse_datagram(DumpKind::Unix, &good, 1, &mut |_: &[u8]| {
            Err(malformed(DumpKind::Unix, "from the callback"))
        })
        .unwrap_err();
        assert_eq!(reason(error), "from the callback");
    }

    #[test]
    fn datagram_truncated_at_every_length() {
        let messages = [
            nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"first"),
            nlmsg(SOCK_DIAG_BY_FAMILY, 1, b"second"),
            nlmsg(NLMSG_DONE, 1, &0i32.to_ne_bytes()),
        ];
        let datagram = messages.concat();
        // A message is whole once nlmsg_len bytes are there: the last
        // message of a datagram need not be (fully) padded.
        let mut ends = vec![0];
        let mut start = 0;
        for m in &messages {
            ends.extend(start + read_u32(m, 0).unwrap() as usize..=start + m.len());
            start += m.len();
        }
        for n in 0..datagram.len() {
            let result = walk(&datagram[..n], 1);
            if ends.contains(&n) {
                assert_eq!(result.unwrap().0, DumpProgress::More, "length {n}");
            } else {
                assert!(result.is_err(), "length {n}");
            }
        }
        assert_eq!(walk(&datagram, 1).unwrap().0, DumpProgress::Done);
    }

    // ---- attributes ----

    #[test]
    fn attribute_walk() {
        let mut buf = nla(1, b"abc");
        buf.extend(nla(2 | 0x8000, b"")); // NLA_F_NESTED is masked off
        buf.extend(nla(3, b"abcd"));
        let attrs: Vec<(u16, Vec<u8>)> = attributes(DumpKind::Unix, &buf)
            .map(|a| a.map(|(k, v)| (k, v.to_vec())))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            attrs,
            vec![(1, b"abc".to_vec()), (2, vec![]), (3, b"abcd".to_vec())]
        );

        // The last attribute need not be padded.
        let mut unpadded = nla(5, b"z");
        unpadded.truncate(5);
        assert_eq!(attributes(DumpKind::Unix, &unpadded).count(), 1);
    }

    #[test]
    fn bad_attribute_lengths_end_the_walk_with_one_error() {
        for bad_len in [0u16, 1, 3, 17, u16::MAX] {
            let mut buf = nla(1, b"abcd");
            buf[..2].copy_from_slice(&bad_len.to_ne_bytes());
            buf.extend(nla(2, b"more"));
            let results: Vec<_> = attributes(DumpKind::Unix, &buf).collect();
            assert_eq!(results.len(), 1, "len {bad_len}");
            assert!(results[0].is_err(), "len {bad_len}");
        }
        let results: Vec<_> = attributes(DumpKind::Unix, &[4, 0]).collect();
        assert_eq!(results.len(), 1);
        assert!(reason(results.into_iter().next().unwrap().unwrap_err()).contains("2 bytes left"));
    }

    // ---- inet_diag_msg ----

    #[test]
    fn inet_listener_v4() {
        let attrs = nla(INET_DIAG_SKMEMINFO, &meminfo(9, 17));
        let info = parse_inet_listener(DumpKind::TcpV4, &InetMsg::v4().bytes(&attrs))
            .unwrap()
            .unwrap();
        assert_eq!(
            info,
            TcpListenerInfo {
                family: libc::AF_INET as u16,
                addr: "127.0.0.1".parse().unwrap(),
                port: 8080,
                inode: 123_456,
                uid: 33,
                accept_queue_len: 3,
                accept_queue_max: 128,
                drops: Some(17),
                cookie: 0x1122_3344_5566_7788,
            }
        );
    }

    #[test]
    fn inet_listener_v6_and_attributes() {
        let mut msg = InetMsg::v4();
        msg.family = libc::AF_INET6 as u8;
        msg.src = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        // Other attributes around SKMEMINFO; an older kernel's short array
        // has no drops entry.
        let mut attrs = nla(INET_DIAG_SHUTDOWN_FOR_TEST, &[0]);
        attrs.extend(nla(INET_DIAG_SKMEMINFO, &meminfo(8, 0)));
        let info = parse_inet_listener(DumpKind::TcpV6, &msg.bytes(&attrs))
            .unwrap()
            .unwrap();
        assert_eq!(info.addr, "2001:db8::7".parse::<IpAddr>().unwrap());
        assert_eq!(info.family, libc::AF_INET6 as u16);
        assert_eq!(info.drops, None);

        let info = parse_inet_listener(DumpKind::TcpV6, &msg.bytes(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(info.drops, None);
        // A longer array from a newer kernel is fine.
        let attrs = nla(INET_DIAG_SKMEMINFO, &meminfo(12, 5));
        let info = parse_inet_listener(DumpKind::TcpV6, &msg.bytes(&attrs))
            .unwrap()
            .unwrap();
        assert_eq!(info.drops, Some(5));
    }

    const INET_DIAG_SHUTDOWN_FOR_TEST: u16 = 8;

    #[test]
    fn inet_non_listener_and_unknown_family() {
        let mut msg = InetMsg::v4();
        msg.state = 1; // TCP_ESTABLISHED
        assert_eq!(
            parse_inet_listener(DumpKind::TcpV4, &msg.bytes(&[])).unwrap(),
            None
        );
        let mut msg = InetMsg::v4();
        msg.family = 42;
        let error = parse_inet_listener(DumpKind::TcpV4, &msg.bytes(&[])).unwrap_err();
        assert!(reason(error).contains("unknown address family 42"));
    }

    #[test]
    fn inet_msg_truncated_at_every_length() {
        let mut attrs = nla(INET_DIAG_SHUTDOWN_FOR_TEST, &[0]);
        // The shutdown attribute is whole after its 1-byte value: the last
        // attribute need not be (fully) padded.
        let mut ends = vec![INET_DIAG_MSG_LEN];
        ends.extend(INET_DIAG_MSG_LEN + NLA_HDRLEN + 1..=INET_DIAG_MSG_LEN + attrs.len());
        attrs.extend(nla(INET_DIAG_SKMEMINFO, &meminfo(9, 17)));
        let full = InetMsg::v4().bytes(&attrs);
        for n in 0..full.len() {
            let result = parse_inet_listener(DumpKind::TcpV4, &full[..n]);
            match n {
                n if n < INET_DIAG_MSG_LEN => assert!(result.is_err(), "length {n}"),
                n if ends.contains(&n) => {
                    assert_eq!(result.unwrap().unwrap().drops, None, "length {n}")
                }
                n => assert!(result.is_err(), "length {n}"),
            }
        }
        assert_eq!(
            parse_inet_listener(DumpKind::TcpV4, &full)
                .unwrap()
                .unwrap()
                .drops,
            Some(17)
        );
    }

    // ---- unix_diag_msg ----

    #[test]
    fn unix_names() {
        assert_eq!(
            unix_name(b"/run/php/fpm.sock\0"),
            Some("/run/php/fpm.sock".into())
        );
        assert_eq!(
            unix_name(b"/old/kernel/no/nul"),
            Some("/old/kernel/no/nul".into())
        );
        assert_eq!(unix_name(b"\0abstract"), Some("@abstract".into()));
        assert_eq!(unix_name(b"\0a\0b"), Some("@a@b".into()));
        assert_eq!(unix_name(b"\0"), Some("@".into()));
        assert_eq!(unix_name(b""), None);
        assert_eq!(unix_name(b"\xff/x\0"), Some("\u{fffd}/x".into()));
    }

    #[test]
    fn unix_listener() {
        let mut attrs = nla(UNIX_DIAG_NAME, b"/run/app.sock\0");
        attrs.extend(nla(UNIX_DIAG_VFS_FOR_TEST, &[0; 8]));
        attrs.extend(rqlen(2, 5));
        let stream = libc::SOCK_STREAM as u8;
        let msg = unix_msg(stream, TCP_LISTEN, 99, 0xabc_0000_0001, &attrs);
        assert_eq!(
            parse_unix_listener(DumpKind::Unix, &msg).unwrap(),
            Some(UnixListenerInfo {
                inode: 99,
                path: Some("/run/app.sock".into()),
                queue_len: 2,
                queue_max: 5,
                cookie: 0xabc_0000_0001,
            })
        );
        // Unnamed: no UNIX_DIAG_NAME.
        let msg = unix_msg(stream, TCP_LISTEN, 99, 1, &rqlen(0, 1));
        assert_eq!(
            parse_unix_listener(DumpKind::Unix, &msg)
                .unwrap()
                .unwrap()
                .path,
            None
        );
        // SOCK_SEQPACKET listeners and non-listeners are not reported.
        let seqpacket = libc::SOCK_SEQPACKET as u8;
        let msg = unix_msg(seqpacket, TCP_LISTEN, 99, 1, &attrs);
        assert_eq!(parse_unix_listener(DumpKind::Unix, &msg).unwrap(), None);
        let msg = unix_msg(stream, 1, 99, 1, &attrs);
        assert_eq!(parse_unix_listener(DumpKind::Unix, &msg).unwrap(), None);
        // Missing or short UNIX_DIAG_RQLEN.
        let msg = unix_msg(stream, TCP_LISTEN, 99, 1, &nla(UNIX_DIAG_NAME, b"\0x"));
        assert!(
            reason(parse_unix_listener(DumpKind::Unix, &msg).unwrap_err())
                .contains("no UNIX_DIAG_RQLEN")
        );
        let msg = unix_msg(
            stream,
            TCP_LISTEN,
            99,
            1,
            &nla(UNIX_DIAG_RQLEN, &[1, 0, 0, 0]),
        );
        assert!(
            reason(parse_unix_listener(DumpKind::Unix, &msg).unwrap_err())
                .contains("UNIX_DIAG_RQLEN of 4 bytes")
        );
        // Wrong family.
        let mut msg = unix_msg(stream, TCP_LISTEN, 99, 1, &rqlen(0, 1));
        msg[0] = libc::AF_INET as u8;
        assert!(parse_unix_listener(DumpKind::Unix, &msg).is_err());
    }

    const UNIX_DIAG_VFS_FOR_TEST: u16 = 1;

    #[test]
    fn unix_msg_truncated_at_every_length() {
        let mut attrs = rqlen(2, 5);
        let boundary = UNIX_DIAG_MSG_LEN + attrs.len();
        attrs.extend(nla(UNIX_DIAG_NAME, b"\0name"));
        let name_end = boundary + NLA_HDRLEN + 5; // unpadded
        let full = unix_msg(libc::SOCK_STREAM as u8, TCP_LISTEN, 7, 8, &attrs);
        for n in 0..full.len() {
            let result = parse_unix_listener(DumpKind::Unix, &full[..n]);
            if n == boundary {
                assert_eq!(result.unwrap().unwrap().path, None);
            } else if n >= name_end {
                assert_eq!(result.unwrap().unwrap().path.as_deref(), Some("@name"));
            } else {
                assert!(result.is_err(), "length {n}");
            }
        }
        let info = parse_unix_listener(DumpKind::Unix, &full).unwrap().unwrap();
        assert_eq!(info.path.as_deref(), Some("@name"));
    }

    /// Random corruption of a valid reply never panics.
    #[test]
    fn corrupted_replies_never_panic() {
        let inet = InetMsg::v4().bytes(&nla(INET_DIAG_SKMEMINFO, &meminfo(9, 1)));
        let unix = unix_msg(
            libc::SOCK_STREAM as u8,
            TCP_LISTEN,
            7,
            8,
            &[rqlen(1, 2), nla(UNIX_DIAG_NAME, b"/x\0")].concat(),
        );
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for original in [&inet, &unix] {
            let datagram = [
                nlmsg(SOCK_DIAG_BY_FAMILY, 1, original),
                nlmsg(NLMSG_DONE, 1, &0i32.to_ne_bytes()),
            ]
            .concat();
            for _ in 0..20_000 {
                let mut bytes = datagram.clone();
                for _ in 0..1 + next() % 4 {
                    let i = (next() % bytes.len() as u64) as usize;
                    bytes[i] = next() as u8;
                }
                let cut = (next() % (bytes.len() as u64 + 1)) as usize;
                let _ = parse_datagram(DumpKind::Unix, &bytes[..cut], 1, &mut |p: &[u8]| {
                    let _ = parse_inet_listener(DumpKind::TcpV4, p);
                    let _ = parse_unix_listener(DumpKind::Unix, p);
                    Ok(())
                });
            }
        }
    }

    // ---- live: the running kernel ----

    fn root(test: &str) -> bool {
        if crate::testing::is_root() {
            return true;
        }
        crate::testing::skip(test, "needs root");
        false
    }

    fn inode_of(fd: &impl AsRawFd) -> u64 {
        // SAFETY: an all-zero stat is valid; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open and st is a valid out-pointer.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        st.st_ino
    }

    fn tcp_listener(addr: &str, backlog: i32) -> io::Result<Socket> {
        let addr: SocketAddr = addr.parse().unwrap();
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        Ok(socket)
    }

    fn find_tcp(inode: u64) -> Option<TcpListenerInfo> {
        tcp_listeners()
            .unwrap()
            .into_iter()
            .find(|l| l.inode == inode)
    }

    /// Polls until `check` holds: on loopback the final ACK that moves a
    /// connection into the accept queue is processed in softirq, possibly
    /// after connect() returned.
    fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn check_tcp_listener(addr: &str, family: i32) {
        let listener = match tcp_listener(addr, 7) {
            Ok(l) => l,
            Err(e) if family == libc::AF_INET6 => {
                eprintln!("SKIPPED the IPv6 part: cannot listen on {addr}: {e}");
                return;
            }
            Err(e) => panic!("listen on {addr}: {e}"),
        };
        let local = listener.local_addr().unwrap().as_socket().unwrap();
        let inode = inode_of(&listener);
        let info = find_tcp(inode).unwrap_or_else(|| panic!("{addr}: inode {inode} not listed"));
        assert_eq!(info.family, family as u16);
        assert_eq!(info.addr, local.ip());
        assert_eq!(info.port, local.port());
        assert_eq!(info.accept_queue_max, 7);
        assert_eq!(info.accept_queue_len, 0);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(info.uid, unsafe { libc::geteuid() });
        assert_ne!(info.cookie, 0);
        assert_eq!(info.drops, Some(0));

        let clients: Vec<_> = (0..3)
            .map(|_| {
                let client = Socket::new(Domain::for_address(local), Type::STREAM, None).unwrap();
                client.connect(&local.into()).unwrap();
                client
            })
            .collect();
        eventually("3 connections in the accept queue", || {
            find_tcp(inode).unwrap().accept_queue_len == 3
        });
        let again = find_tcp(inode).unwrap();
        assert_eq!(again.cookie, info.cookie);
        assert_eq!(again.accept_queue_max, 7);
        drop(clients);
    }

    #[test]
    fn live_tcp_listeners_v4() {
        check_tcp_listener("127.0.0.1:0", libc::AF_INET);
    }

    #[test]
    fn live_tcp_listeners_v6() {
        check_tcp_listener("[::1]:0", libc::AF_INET6);
    }

    fn unix_listener_at(addr: &SockAddr, backlog: i32) -> Socket {
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        socket.bind(addr).unwrap();
        socket.listen(backlog).unwrap();
        socket
    }

    fn check_unix_listener(addr: &SockAddr, expected_path: &str) {
        let listener = unix_listener_at(addr, 5);
        let inode = inode_of(&listener);
        let find = || {
            unix_listeners()
                .unwrap()
                .into_iter()
                .find(|l| l.inode == inode)
                .unwrap_or_else(|| panic!("{expected_path}: inode {inode} not listed"))
        };
        let info = find();
        assert_eq!(info.path.as_deref(), Some(expected_path));
        assert_eq!((info.queue_len, info.queue_max), (0, 5));
        assert_ne!(info.cookie, 0);

        let clients: Vec<_> = (0..2)
            .map(|_| {
                let client = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
                client.set_nonblocking(true).unwrap();
                client.connect(addr).unwrap();
                client
            })
            .collect();
        let info = find();
        assert_eq!((info.queue_len, info.queue_max), (2, 5));
        drop(clients);
    }

    #[test]
    fn live_unix_listeners_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("listener.sock");
        check_unix_listener(&SockAddr::unix(&path).unwrap(), path.to_str().unwrap());
    }

    #[test]
    fn live_unix_listeners_abstract() {
        let name = format!("backlog-sockdiag-test-{}", std::process::id());
        let raw = format!("\0{name}");
        let addr = SockAddr::unix(std::ffi::OsStr::from_bytes(raw.as_bytes())).unwrap();
        check_unix_listener(&addr, &format!("@{name}"));
    }

    #[test]
    fn live_unix_listeners_skip_non_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bound-only.sock");
        let bound = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
        bound.bind(&SockAddr::unix(&path).unwrap()).unwrap();
        let inode = inode_of(&bound);
        // A real listener next to it: the dump must not be empty for the
        // absence of the bound-only socket to mean anything.
        let listening = unix_listener_at(
            &SockAddr::unix(dir.path().join("listening.sock")).unwrap(),
            2,
        );
        let listed = unix_listeners().unwrap();
        assert!(
            listed.iter().any(|l| l.inode == inode_of(&listening)),
            "the listener is not in the dump: {listed:?}"
        );
        assert!(listed.iter().all(|l| l.inode != inode));
    }

    #[test]
    fn in_netns_of_this_process() {
        if !root("in_netns_of_this_process") {
            // setns needs CAP_SYS_ADMIN even into one's own namespace.
            let error = in_netns(Path::new("/proc/self/ns/net"), || ()).unwrap_err();
            assert!(
                matches!(&error, SockDiagError::SetNs { error, .. }
                    if error.raw_os_error() == Some(libc::EPERM)),
                "{error:?}"
            );
            return;
        }
        let listener = tcp_listener("127.0.0.1:0", 3).unwrap();
        let inode = inode_of(&listener);
        for netns in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            let listeners = in_netns(Path::new(netns), tcp_listeners).unwrap().unwrap();
            assert!(listeners.iter().any(|l| l.inode == inode), "{netns}");
        }
        // Borrowed data works because the thread is scoped.
        let local = String::from("borrowed, not moved");
        let len = in_netns(Path::new("/proc/self/ns/net"), || local.len());
        assert_eq!(len.unwrap(), local.len());
    }

    #[test]
    fn in_netns_errors() {
        let error = in_netns(Path::new("/nonexistent/ns/net"), || ()).unwrap_err();
        assert!(
            matches!(error, SockDiagError::OpenNetns { .. }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "sock_diag: cannot open network namespace /nonexistent/ns/net: \
             No such file or directory (os error 2)"
        );
        // Not a network namespace: setns(CLONE_NEWNET) says EINVAL.
        let error = in_netns(Path::new("/proc/self/ns/uts"), || ()).unwrap_err();
        assert!(matches!(error, SockDiagError::SetNs { .. }), "{error:?}");
    }

    /// A panic inside the namespace's thread reaches the caller. Caught
    /// and compared here rather than with should_panic, which a skip that
    /// panics with a similar message would satisfy.
    #[test]
    fn in_netns_propagates_panics() {
        if !root("in_netns_propagates_panics") {
            return;
        }
        let caught = std::panic::catch_unwind(|| {
            let _ = in_netns(Path::new("/proc/self/ns/net"), || {
                panic!("inside the namespace")
            });
        });
        let payload = caught.expect_err("the panic inside must reach the caller");
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
        assert_eq!(message, Some("inside the namespace"));
    }

    #[test]
    fn network_namespaces_of_this_machine() {
        let namespaces = network_namespaces(Path::new("/proc"));
        let own = fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(namespaces.iter().any(|(inode, _)| *inode == own));
        assert!(
            namespaces.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, unique"
        );
        for (inode, path) in &namespaces {
            assert!(path.ends_with("ns/net"), "{}", path.display());
            // Processes may exit in between; most paths still resolve.
            if let Ok(meta) = fs::metadata(path) {
                assert_eq!(meta.ino(), *inode, "{}", path.display());
            }
        }
        assert!(network_namespaces(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn network_namespaces_dedupes_and_keeps_the_lowest_pid() {
        let root_dir = tempfile::tempdir().unwrap();
        let target = root_dir.path().join("a-namespace");
        fs::write(&target, "").unwrap();
        let other = root_dir.path().join("b-namespace");
        fs::write(&other, "").unwrap();
        for (pid, to) in [("30", &target), ("4", &target), ("200", &other)] {
            let ns = root_dir.path().join(pid).join("ns");
            fs::create_dir_all(&ns).unwrap();
            std::os::unix::fs::symlink(to, ns.join("net")).unwrap();
        }
        // Not processes, or gone: skipped.
        fs::create_dir_all(root_dir.path().join("self-like/ns")).unwrap();
        fs::create_dir_all(root_dir.path().join("77")).unwrap();
        let found = network_namespaces(root_dir.path());
        let mut expected = vec![
            (
                fs::metadata(&target).unwrap().ino(),
                root_dir.path().join("4/ns/net"),
            ),
            (
                fs::metadata(&other).unwrap().ino(),
                root_dir.path().join("200/ns/net"),
            ),
        ];
        expected.sort();
        assert_eq!(found, expected);
    }

    /// A new, empty network namespace with loopback up, kept alive by the
    /// returned file (the thread that made it is gone).
    fn fresh_netns() -> fs::File {
        thread::spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) moves only this thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
            set_loopback_up();
            fs::File::open("/proc/thread-self/ns/net").unwrap()
        })
        .join()
        .unwrap()
    }

    fn set_loopback_up() {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        // SAFETY: an all-zero ifreq is valid.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        // SAFETY: ifr is a valid ifreq naming "lo". (`as _`: musl declares
        // the request an int, glibc an unsigned long.)
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) };
        assert_eq!(rc, 0, "SIOCGIFFLAGS: {}", io::Error::last_os_error());
        // SAFETY: SIOCGIFFLAGS filled ifru_flags.
        unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: as above.
        let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut ifr) };
        assert_eq!(rc, 0, "SIOCSIFFLAGS: {}", io::Error::last_os_error());
    }

    fn fd_path(file: &fs::File) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
    }

    fn netstat(field: &str) -> u64 {
        // /proc/thread-self/net, not /proc/net: the latter follows the
        // thread-group leader's namespace.
        let text = fs::read_to_string("/proc/thread-self/net/netstat").unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                if name == field && names.starts_with("TcpExt:") {
                    return value.parse().unwrap();
                }
            }
        }
        panic!("no TcpExt {field} in netstat");
    }

    #[test]
    fn live_other_namespace_is_separate() {
        if !root("live_other_namespace_is_separate") {
            return;
        }
        let netns = fresh_netns();
        let netns_inode = inode_of(&netns);
        let (listener, listed, unix_listed) = in_netns(&fd_path(&netns), || {
            let own = fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
            assert_eq!(own, netns_inode);
            let listener = tcp_listener("127.0.0.1:0", 4).unwrap();
            let name = format!("\0backlog-sockdiag-netns-{}", std::process::id());
            let unix = unix_listener_at(
                &SockAddr::unix(std::ffi::OsStr::from_bytes(name.as_bytes())).unwrap(),
                2,
            );
            let listed = tcp_listeners().unwrap();
            let unix_listed = unix_listeners().unwrap();
            ((listener, unix), listed, unix_listed)
        })
        .unwrap();
        let inode = inode_of(&listener.0);
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].inode, inode);
        assert_eq!(listed[0].accept_queue_max, 4);
        // Abstract UNIX names are per network namespace; the dump is too.
        assert_eq!(unix_listed.len(), 1, "{unix_listed:?}");
        assert_eq!(unix_listed[0].inode, inode_of(&listener.1));
        // Not visible from the test's own namespace.
        assert!(find_tcp(inode).is_none());
        let unix_inode = inode_of(&listener.1);
        // A listener of our own in this namespace, so that the dump it is
        // absent from is not empty.
        let dir = tempfile::tempdir().unwrap();
        let here = unix_listener_at(&SockAddr::unix(dir.path().join("here.sock")).unwrap(), 2);
        let here_listed = unix_listeners().unwrap();
        assert!(
            here_listed.iter().any(|l| l.inode == inode_of(&here)),
            "{here_listed:?}"
        );
        assert!(here_listed.iter().all(|l| l.inode != unix_inode));
    }

    /// Does SK_MEMINFO_DROPS count tcp_listendrop()? A backlog-1 listener
    /// holds 2 connections (full means sk_ack_backlog > sk_max_ack_backlog);
    /// the other SYNs of a burst of 10 are dropped at the SYN stage.
    #[test]
    fn live_drops_count_listen_drops() {
        if !root("live_drops_count_listen_drops") {
            return;
        }
        let netns = fresh_netns();
        let (info, listen_drops, overflows) = in_netns(&fd_path(&netns), || {
            let before = netstat("ListenDrops");
            let listener = tcp_listener("127.0.0.1:0", 1).unwrap();
            let addr = listener.local_addr().unwrap();
            let clients: Vec<_> = (0..10)
                .map(|_| {
                    let client = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
                    client.set_nonblocking(true).unwrap();
                    let _ = client.connect(&addr); // EINPROGRESS
                    client
                })
                .collect();
            // The handshakes complete in softirq: wait for the two that
            // fit rather than for a guessed time.
            let inode = inode_of(&listener);
            eventually("two connections in the accept queue", || {
                find_tcp(inode).is_some_and(|i| i.accept_queue_len == 2)
            });
            let info = find_tcp(inode).unwrap();
            let listen_drops = netstat("ListenDrops") - before;
            let overflows = netstat("ListenOverflows");
            drop(clients);
            (info, listen_drops, overflows)
        })
        .unwrap();
        eprintln!(
            "sk_drops after 10 connects to a backlog-1 listener: {:?}; \
             accept queue {}/{}; TcpExt ListenDrops +{listen_drops}, ListenOverflows {overflows}",
            info.drops, info.accept_queue_len, info.accept_queue_max
        );
        assert_eq!(info.accept_queue_max, 1);
        assert_eq!(info.accept_queue_len, 2);
        assert!(listen_drops > 0);
        // Equal when every drop was at the SYN stage (what loopback does);
        // a final-ACK overflow would count twice in sk_drops.
        let drops = info.drops.expect("6.18 sends SK_MEMINFO_DROPS");
        assert!(drops >= listen_drops, "{drops} < {listen_drops}");
    }
}
