//! Ring-buffer records to [`Event`]s.
//!
//! A record is read field by field at the offsets of the shared
//! `DropEvent` layout with length checks, so a short, long or garbled
//! record becomes a [`DecodeError`] that the caller counts and reports.

use std::{
    mem::offset_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use backlog_common::{
    DropEvent, DropKind, ListenEvent, UnixConnectEvent, AF_INET, AF_INET6, DROP_EVENT_SIZE,
    EVENT_FLAG_NO_PACKET, EVENT_FLAG_PARTIAL, EVENT_FLAG_RESET_SENT, LISTEN_EVENT_SIZE,
    TASK_COMM_LEN, UNIX_CONNECT_EVENT_SIZE, UNIX_PATH_MAX,
};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes matches no record type")]
    UnknownLength { len: usize },
    #[error("record of {len} bytes, expected {expected}")]
    WrongLength { len: usize, expected: usize },
    #[error("unknown drop kind {0}")]
    UnknownKind(u32),
    #[error("unknown listener address family {0}")]
    UnknownFamily(u16),
}

/// A decoded drop event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: DropKind,
    /// CLOCK_MONOTONIC nanoseconds.
    pub timestamp_ns: u64,
    pub cpu: u32,
    pub listener: SocketAddr,
    /// Destination of the dropped packet; `None` when it was not readable.
    pub local: Option<SocketAddr>,
    /// Source of the dropped packet (the client); `None` when not readable.
    pub peer: Option<SocketAddr>,
    pub accept_queue_len: u32,
    pub accept_queue_max: u32,
    pub syn_queue_len: u32,
    pub netns_inode: u32,
    /// 0 when the listener had no socket inode any more.
    pub socket_inode: u64,
    /// 0 when unknown.
    pub cgroup_id: u64,
    /// Some kernel read failed: zero fields may not be true values.
    pub partial: bool,
    /// The dropped final ACK was answered with a RST (tcp_abort_on_overflow).
    pub reset_sent: bool,
}

/// A connect() to a UNIX stream listener that failed with EAGAIN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixConnect {
    pub timestamp_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub cpu: u32,
    pub comm: String,
    /// Filesystem path, or `@name` for an abstract socket; `None` when the
    /// kernel could not read it.
    pub path: Option<String>,
    /// The client's network namespace as the kernel saw it; 0 if unknown.
    pub netns_inode: u32,
}

/// A successful listen().
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenCall {
    pub timestamp_ns: u64,
    pub socket_inode: u64,
    pub pid: u32,
    pub comm: String,
    pub netns_inode: u32,
    pub backlog_requested: i32,
    pub backlog_applied: u32,
    pub family: u16,
    pub port: u16,
    /// The fd listen() was called on: where to look for the socket first.
    pub fd: u32,
}

/// Any record of the ring buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Drop(Event),
    UnixConnect(UnixConnect),
    Listen(ListenCall),
}

/// Decodes one record; the record types have distinct sizes.
pub fn decode_record(data: &[u8]) -> Result<Record, DecodeError> {
    match data.len() {
        DROP_EVENT_SIZE => decode(data).map(Record::Drop),
        UNIX_CONNECT_EVENT_SIZE => Ok(Record::UnixConnect(decode_unix_connect(data))),
        LISTEN_EVENT_SIZE => Ok(Record::Listen(decode_listen(data))),
        len => Err(DecodeError::UnknownLength { len }),
    }
}

/// A NUL-padded kernel string.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// sun_path as `ss` shows it: abstract names (leading NUL) as `@name`.
pub fn unix_path(raw: &[u8]) -> Option<String> {
    match raw.split_first() {
        None => None,
        Some((0, name)) => Some(format!(
            "@{}",
            String::from_utf8_lossy(name).replace('\0', "@")
        )),
        Some(_) => Some(c_string(raw)).filter(|p| !p.is_empty()),
    }
}

fn decode_unix_connect(data: &[u8]) -> UnixConnect {
    let r = Bytes(data);
    let path: [u8; UNIX_PATH_MAX] = r.bytes(offset_of!(UnixConnectEvent, path));
    let len = (r.u32(offset_of!(UnixConnectEvent, path_len)) as usize).min(UNIX_PATH_MAX);
    let comm: [u8; TASK_COMM_LEN] = r.bytes(offset_of!(UnixConnectEvent, comm));
    UnixConnect {
        timestamp_ns: r.u64(offset_of!(UnixConnectEvent, timestamp_ns)),
        pid: r.u32(offset_of!(UnixConnectEvent, pid)),
        tid: r.u32(offset_of!(UnixConnectEvent, tid)),
        cpu: r.u32(offset_of!(UnixConnectEvent, cpu)),
        comm: c_string(&comm),
        path: unix_path(&path[..len]),
        netns_inode: r.u32(offset_of!(UnixConnectEvent, netns_inode)),
    }
}

fn decode_listen(data: &[u8]) -> ListenCall {
    let r = Bytes(data);
    let comm: [u8; TASK_COMM_LEN] = r.bytes(offset_of!(ListenEvent, comm));
    ListenCall {
        timestamp_ns: r.u64(offset_of!(ListenEvent, timestamp_ns)),
        socket_inode: r.u64(offset_of!(ListenEvent, socket_inode)),
        pid: r.u32(offset_of!(ListenEvent, pid)),
        comm: c_string(&comm),
        netns_inode: r.u32(offset_of!(ListenEvent, netns_inode)),
        backlog_requested: r.u32(offset_of!(ListenEvent, backlog_requested)) as i32,
        backlog_applied: r.u32(offset_of!(ListenEvent, backlog_applied)),
        family: r.u16(offset_of!(ListenEvent, family)),
        port: r.u16(offset_of!(ListenEvent, port)),
        fd: r.u32(offset_of!(ListenEvent, fd)),
    }
}

/// Checked little cursor over one record: every read is bounds-checked
/// against the record, which `decode` has already length-checked.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn bytes<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.0.get(offset..offset + N) {
            out.copy_from_slice(src);
        }
        out
    }
    fn u16(&self, offset: usize) -> u16 {
        u16::from_ne_bytes(self.bytes(offset))
    }
    fn u32(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.bytes(offset))
    }
    fn u64(&self, offset: usize) -> u64 {
        u64::from_ne_bytes(self.bytes(offset))
    }
}

/// An address as the kernel stores it: IPv4 in the first 4 bytes.
pub fn ip(family: u16, raw: [u8; 16]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(raw))),
        _ => None,
    }
}

pub fn decode(data: &[u8]) -> Result<Event, DecodeError> {
    if data.len() != DROP_EVENT_SIZE {
        return Err(DecodeError::WrongLength {
            len: data.len(),
            expected: DROP_EVENT_SIZE,
        });
    }
    let r = Bytes(data);
    let raw_kind = r.u32(offset_of!(DropEvent, kind));
    let kind = DropKind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    let listener_family = r.u16(offset_of!(DropEvent, listener_family));
    let listener_ip = ip(
        listener_family,
        r.bytes(offset_of!(DropEvent, listener_addr)),
    )
    .ok_or(DecodeError::UnknownFamily(listener_family))?;
    let flags = r.u32(offset_of!(DropEvent, flags));
    let packet_family = r.u16(offset_of!(DropEvent, packet_family));
    let has_packet = flags & EVENT_FLAG_NO_PACKET == 0;
    let packet_addr = |addr_offset: usize, port_offset: usize| {
        let addr = ip(packet_family, r.bytes(addr_offset))?;
        has_packet.then(|| SocketAddr::new(addr, r.u16(port_offset)))
    };
    Ok(Event {
        kind,
        timestamp_ns: r.u64(offset_of!(DropEvent, timestamp_ns)),
        cpu: r.u32(offset_of!(DropEvent, cpu)),
        listener: SocketAddr::new(listener_ip, r.u16(offset_of!(DropEvent, listener_port))),
        local: packet_addr(
            offset_of!(DropEvent, local_addr),
            offset_of!(DropEvent, local_port),
        ),
        peer: packet_addr(
            offset_of!(DropEvent, peer_addr),
            offset_of!(DropEvent, peer_port),
        ),
        accept_queue_len: r.u32(offset_of!(DropEvent, accept_queue_len)),
        accept_queue_max: r.u32(offset_of!(DropEvent, accept_queue_max)),
        syn_queue_len: r.u32(offset_of!(DropEvent, syn_queue_len)),
        netns_inode: r.u32(offset_of!(DropEvent, netns_inode)),
        socket_inode: r.u64(offset_of!(DropEvent, socket_inode)),
        cgroup_id: r.u64(offset_of!(DropEvent, cgroup_id)),
        partial: flags & EVENT_FLAG_PARTIAL != 0,
        reset_sent: flags & EVENT_FLAG_RESET_SENT != 0,
    })
}

/// The bytes of a record as the kernel writes them (for tests and
/// benchmarks).
pub fn encode<T: aya::Pod>(record: &T) -> Vec<u8> {
    // SAFETY: Pod types are repr(C) plain data with explicit padding, so
    // all of their bytes are initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts((record as *const T).cast::<u8>(), std::mem::size_of::<T>())
    };
    bytes.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DropEvent {
        let mut e = DropEvent::ZERO;
        e.kind = DropKind::AckDroppedAcceptQueueFull as u32;
        e.timestamp_ns = 123_456_789;
        e.cpu = 1;
        e.listener_family = AF_INET;
        e.listener_addr[..4].copy_from_slice(&[0, 0, 0, 0]);
        e.listener_port = 8080;
        e.packet_family = AF_INET;
        e.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        e.local_port = 8080;
        e.peer_addr[..4].copy_from_slice(&[127, 0, 0, 2]);
        e.peer_port = 40000;
        e.accept_queue_len = 9;
        e.accept_queue_max = 8;
        e.syn_queue_len = 3;
        e.netns_inode = 4026531840;
        e.socket_inode = 99;
        e.cgroup_id = 7;
        e
    }

    #[test]
    fn decodes_a_good_record() {
        let event = decode(&encode(&sample())).unwrap();
        assert_eq!(event.kind, DropKind::AckDroppedAcceptQueueFull);
        assert_eq!(event.listener, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(event.local, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(event.peer, Some("127.0.0.2:40000".parse().unwrap()));
        assert_eq!((event.accept_queue_len, event.accept_queue_max), (9, 8));
        assert_eq!(event.syn_queue_len, 3);
        assert_eq!(event.netns_inode, 4026531840);
        assert_eq!(event.socket_inode, 99);
        assert_eq!(event.cgroup_id, 7);
        assert_eq!(event.timestamp_ns, 123_456_789);
        assert!(!event.partial);
    }

    #[test]
    fn decodes_ipv4_packet_on_ipv6_listener() {
        let mut e = sample();
        e.listener_family = AF_INET6;
        e.listener_addr = [0; 16];
        let event = decode(&encode(&e)).unwrap();
        assert_eq!(event.listener, "[::]:8080".parse().unwrap());
        assert_eq!(event.peer, Some("127.0.0.2:40000".parse().unwrap()));
    }

    #[test]
    fn missing_packet_gives_no_peer_and_partial_flag_survives() {
        let mut e = sample();
        e.flags = EVENT_FLAG_NO_PACKET | EVENT_FLAG_PARTIAL;
        let event = decode(&encode(&e)).unwrap();
        assert_eq!(event.peer, None);
        assert_eq!(event.local, None);
        assert!(event.partial);
    }

    #[test]
    fn short_and_long_records_are_errors() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..len]),
                Err(DecodeError::WrongLength {
                    len,
                    expected: DROP_EVENT_SIZE
                })
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            decode(&long),
            Err(DecodeError::WrongLength { .. })
        ));
    }

    #[test]
    fn unknown_kind_and_family_are_errors() {
        let mut e = sample();
        e.kind = 77;
        assert_eq!(decode(&encode(&e)), Err(DecodeError::UnknownKind(77)));
        let mut e = sample();
        e.listener_family = 3;
        assert_eq!(decode(&encode(&e)), Err(DecodeError::UnknownFamily(3)));
    }

    #[test]
    fn dispatches_by_length() {
        assert!(matches!(
            decode_record(&encode(&sample())),
            Ok(Record::Drop(_))
        ));
        assert_eq!(
            decode_record(&[0; 7]),
            Err(DecodeError::UnknownLength { len: 7 })
        );
    }

    #[test]
    fn decodes_unix_connect_paths() {
        let mut e = UnixConnectEvent {
            timestamp_ns: 5,
            pid: 100,
            tid: 101,
            cpu: 1,
            path_len: 0,
            comm: [0; TASK_COMM_LEN],
            path: [0; UNIX_PATH_MAX],
            netns_inode: 0,
        };
        e.comm[..5].copy_from_slice(b"nginx");
        let fs_path = b"/run/php/www.sock\0";
        e.path[..fs_path.len()].copy_from_slice(fs_path);
        e.path_len = fs_path.len() as u32;
        let Ok(Record::UnixConnect(u)) = decode_record(&encode(&e)) else {
            panic!("not a unix record");
        };
        assert_eq!(u.path.as_deref(), Some("/run/php/www.sock"));
        assert_eq!((u.pid, u.tid, u.comm.as_str()), (100, 101, "nginx"));
        // Abstract name: leading NUL, length-delimited.
        e.path = [0; UNIX_PATH_MAX];
        e.path[1..5].copy_from_slice(b"fpm1");
        e.path_len = 5;
        let Ok(Record::UnixConnect(u)) = decode_record(&encode(&e)) else {
            panic!("not a unix record");
        };
        assert_eq!(u.path.as_deref(), Some("@fpm1"));
        // Unreadable path.
        e.path_len = 0;
        let Ok(Record::UnixConnect(u)) = decode_record(&encode(&e)) else {
            panic!("not a unix record");
        };
        assert_eq!(u.path, None);
        // A bogus length is clamped, never out of bounds.
        e.path_len = u32::MAX;
        assert!(decode_record(&encode(&e)).is_ok());
    }

    #[test]
    fn decodes_listen_calls() {
        let mut e = ListenEvent {
            timestamp_ns: 9,
            socket_inode: 4242,
            pid: 77,
            netns_inode: 4026531840,
            backlog_requested: 511,
            backlog_applied: 128,
            family: AF_INET6,
            port: 9000,
            fd: 3,
            comm: [0; TASK_COMM_LEN],
        };
        e.comm[..7].copy_from_slice(b"php-fpm");
        let Ok(Record::Listen(l)) = decode_record(&encode(&e)) else {
            panic!("not a listen record");
        };
        assert_eq!((l.backlog_requested, l.backlog_applied), (511, 128));
        assert_eq!((l.pid, l.comm.as_str(), l.port), (77, "php-fpm", 9000));
        assert_eq!(l.socket_inode, 4242);
        e.backlog_requested = -1;
        let Ok(Record::Listen(l)) = decode_record(&encode(&e)) else {
            panic!("not a listen record");
        };
        assert_eq!(l.backlog_requested, -1);
    }

    /// Deterministic pseudo-random bytes (xorshift64).
    fn noise(state: &mut u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                *state as u8
            })
            .collect()
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: every byte pattern of a full-length
        // record either decodes or is an error value.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let _ = decode(&noise(&mut state, DROP_EVENT_SIZE));
        }
        for len in [UNIX_CONNECT_EVENT_SIZE, LISTEN_EVENT_SIZE] {
            for _ in 0..2_000 {
                let _ = decode_record(&noise(&mut state, len));
            }
        }
    }
}
