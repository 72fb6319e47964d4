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
    DropEvent, DropKind, AF_INET, AF_INET6, DROP_EVENT_SIZE, EVENT_FLAG_NO_PACKET,
    EVENT_FLAG_PARTIAL,
};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
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
}

/// Checked little cursor over one record: every read is bounds-checked
/// against the record, which `decode` has already length-checked.
struct Record<'a>(&'a [u8]);

impl Record<'_> {
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
    let r = Record(data);
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
    })
}

/// The bytes of a `DropEvent` as the kernel writes them (for tests and
/// benchmarks).
pub fn encode(event: &DropEvent) -> Vec<u8> {
    // SAFETY: DropEvent is repr(C) plain data with explicit padding, so all
    // of its bytes are initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts((event as *const DropEvent).cast::<u8>(), DROP_EVENT_SIZE)
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
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: every byte pattern of a full-length
        // record either decodes or is an error value.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let record: Vec<u8> = (0..DROP_EVENT_SIZE)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode(&record);
        }
    }
}
