//! Builds a [`DropEvent`] from a listening socket and the dropped packet,
//! and queues it. Every hook (tracepoint, kprobe, fentry) funnels through
//! here so that all kinds carry the same fields.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use backlog_common::{
    DropEvent, KernelOffsets, AF_INET, AF_INET6, COUNTER_EVENTS_LOST, COUNTER_EVENTS_SENT,
    COUNTER_READ_ERRORS, EVENT_FLAG_NO_PACKET, EVENT_FLAG_PARTIAL, OFFSET_ABSENT,
};

use crate::{count, read, EVENTS};

/// Tracks whether any read for one event failed.
struct Reads {
    failed: bool,
}

impl Reads {
    #[inline(always)]
    fn get<T: Copy + Default>(&mut self, value: Option<T>) -> T {
        match value {
            Some(value) => value,
            None => {
                self.failed = true;
                T::default()
            }
        }
    }

    /// Like `get`, but a field this kernel does not have is not a failure.
    #[inline(always)]
    fn optional<T: Copy + Default>(&mut self, offset: u32, value: Option<T>) -> T {
        if offset == OFFSET_ABSENT {
            T::default()
        } else {
            self.get(value)
        }
    }
}

/// Queues one event for `kind` about listener `sk`, with addresses taken
/// from `skb` (may be NULL when the hook has no packet).
#[inline(always)]
pub fn emit(kind: u32, sk: *const u8, skb: *const u8, extra_flags: u32) {
    let Some(mut entry) = EVENTS.reserve::<DropEvent>(0) else {
        // Ring buffer full: the agent reads this counter and reports the
        // loss; the per-listener totals stay exact (kernel counters).
        count(COUNTER_EVENTS_LOST);
        return;
    };
    let o = crate::offsets();
    let mut reads = Reads { failed: false };
    let mut event = DropEvent::ZERO;
    event.kind = kind;
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    event.cpu = unsafe { bpf_get_smp_processor_id() };
    event.flags = extra_flags;
    fill_listener(&mut event, &o, sk, &mut reads);
    if skb.is_null() || !fill_packet(&mut event, &o, skb) {
        event.flags |= EVENT_FLAG_NO_PACKET;
    }
    if reads.failed {
        event.flags |= EVENT_FLAG_PARTIAL;
        count(COUNTER_READ_ERRORS);
    }
    entry.write(event);
    entry.submit(0);
    count(COUNTER_EVENTS_SENT);
}

#[inline(always)]
fn fill_listener(event: &mut DropEvent, o: &KernelOffsets, sk: *const u8, reads: &mut Reads) {
    event.listener_family = reads.get(read::at::<u16>(sk, o.sk_family));
    event.listener_port = reads.get(read::at::<u16>(sk, o.sk_num));
    if event.listener_family == AF_INET6 {
        event.listener_addr = reads.get(read::at::<[u8; 16]>(sk, o.sk_v6_rcv_saddr));
    } else {
        let v4: [u8; 4] = reads.get(read::at::<[u8; 4]>(sk, o.sk_rcv_saddr));
        event.listener_addr[..4].copy_from_slice(&v4);
    }
    event.accept_queue_len = reads.get(read::at::<u32>(sk, o.sk_ack_backlog));
    event.accept_queue_max = reads.get(read::at::<u32>(sk, o.sk_max_ack_backlog));
    event.syn_queue_len = reads.get(read::at::<u32>(sk, o.icsk_syn_queue_len));

    let net = reads.get(read::ptr(sk, o.sk_net).map(|p| p as u64)) as *const u8;
    event.netns_inode = reads.get(read::at::<u32>(net, o.net_ns_inum));

    // A listener being closed may already have lost its struct socket:
    // then there is no inode to report, which is not a read failure.
    if let Some(socket) = read::ptr(sk, o.sk_socket) {
        if !socket.is_null() && o.socket_to_inode != OFFSET_ABSENT {
            let inode = socket.wrapping_add(o.socket_to_inode as usize);
            event.socket_inode = reads.get(read::at::<u64>(inode, o.inode_i_ino));
        }
    } else {
        reads.failed = true;
    }

    let cgroup = reads.optional(o.sk_cgroup_ptr, read::at::<u64>(sk, o.sk_cgroup_ptr));
    // Before 5.15 bit 0 set means the word holds classid/prioidx data, not
    // a cgroup pointer.
    let tagged_data = o.sk_cgroup_ptr_tagged != 0 && cgroup & 1 != 0;
    if cgroup != 0 && !tagged_data {
        let kn = reads.get(read::ptr(cgroup as *const u8, o.cgroup_kn).map(|p| p as u64));
        event.cgroup_id = reads.optional(
            o.kernfs_node_id,
            read::at::<u64>(kn as *const u8, o.kernfs_node_id),
        );
    }
}

/// Fills peer and local address/port from the IP and TCP headers of `skb`.
/// Returns false when the headers cannot be read.
#[inline(always)]
fn fill_packet(event: &mut DropEvent, o: &KernelOffsets, skb: *const u8) -> bool {
    let Some(head) = read::ptr(skb, o.skb_head) else {
        return false;
    };
    let (Some(network), Some(transport)) = (
        read::at::<u16>(skb, o.skb_network_header),
        read::at::<u16>(skb, o.skb_transport_header),
    ) else {
        return false;
    };
    let ip = head.wrapping_add(network as usize);
    let Some(version_ihl) = read::at::<u8>(ip, 0) else {
        return false;
    };
    match version_ihl >> 4 {
        4 => {
            let (Some(src), Some(dst)) = (read::at::<[u8; 4]>(ip, 12), read::at::<[u8; 4]>(ip, 16))
            else {
                return false;
            };
            event.peer_addr[..4].copy_from_slice(&src);
            event.local_addr[..4].copy_from_slice(&dst);
            event.packet_family = AF_INET;
        }
        6 => {
            let (Some(src), Some(dst)) =
                (read::at::<[u8; 16]>(ip, 8), read::at::<[u8; 16]>(ip, 24))
            else {
                return false;
            };
            event.peer_addr = src;
            event.local_addr = dst;
            event.packet_family = AF_INET6;
        }
        _ => return false,
    }
    let tcp = head.wrapping_add(transport as usize);
    let (Some(sport), Some(dport)) = (read::at::<u16>(tcp, 0), read::at::<u16>(tcp, 2)) else {
        return false;
    };
    event.peer_port = u16::from_be(sport);
    event.local_port = u16::from_be(dport);
    true
}
