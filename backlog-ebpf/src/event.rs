//! Builds a [`DropEvent`] from a listening socket and the dropped packet,
//! and queues it. Every hook (tracepoint, kprobe, fentry) funnels through
//! here so that all kinds carry the same fields.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap},
};
use backlog_common::{
    DropEvent, DropKind, DropTotalKey, KernelOffsets, AF_INET, AF_INET6, COUNTER_READ_ERRORS,
    COUNTER_TOTALS_FULL, EVENT_FLAG_NO_PACKET, EVENT_FLAG_PARTIAL, EVENT_FLAG_RESET_SENT,
};

use crate::{count, read::Reader};

/// Where an event is assembled: off the 512-byte stack.
#[map]
static SCRATCH: PerCpuArray<DropEvent> = PerCpuArray::with_max_entries(1, 0);

/// Drops per listener and kind, counted before the event is queued, so
/// the totals stay exact when the ring buffer overflows. Per-CPU: no
/// atomics on the hot path; the agent sums the CPUs.
#[map]
static DROP_TOTALS: PerCpuHashMap<DropTotalKey, u64> = PerCpuHashMap::with_max_entries(16384, 0);

/// `sk_acceptq_is_full()`: more connections waiting than the limit.
#[inline(always)]
pub fn accept_queue_full(sk: *const u8) -> bool {
    let o = crate::offsets();
    let mut r = Reader::new();
    let len = r.at::<u32>(sk, o.sk_ack_backlog);
    let max = r.at::<u32>(sk, o.sk_max_ack_backlog);
    r.ok() && len > max
}

#[inline(always)]
fn add_to_totals(event: &DropEvent) {
    let key = DropTotalKey {
        socket_inode: event.socket_inode,
        netns_inode: event.netns_inode,
        kind: event.kind,
        listener_addr: event.listener_addr,
        listener_port: event.listener_port,
        listener_family: event.listener_family,
        _pad0: 0,
    };
    for _ in 0..2 {
        if let Some(total) = DROP_TOTALS.get_ptr_mut(key) {
            // SAFETY: this CPU's value of a per-CPU map entry.
            unsafe { *total += 1 };
            return;
        }
        // Another CPU may create the key between our lookup and insert:
        // then the insert fails with EEXIST and the second lookup finds it.
        if DROP_TOTALS.insert(key, 1, BPF_NOEXIST as u64).is_ok() {
            return;
        }
    }
    count(COUNTER_TOTALS_FULL);
}

/// Counts and queues one event for `kind` about listener `sk`, with
/// addresses taken from `skb` (may be NULL when the hook has no packet).
///
/// A BPF-to-BPF call rather than inlined, and the event is built in a
/// per-CPU scratch slot rather than on the stack: a hook may emit twice,
/// and the stack is 512 bytes for the whole call chain.
#[inline(never)]
pub fn emit(kind: u32, sk: *const u8, skb: *const u8, extra_flags: u32) {
    let Some(event) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on a CPU
    // while one is running here.
    let event = unsafe { &mut *event };
    let o = crate::offsets();
    let mut reads = Reader { failed: 0 };
    *event = DropEvent::ZERO;
    event.kind = kind;
    event.timestamp_ns = unsafe { bpf_ktime_get_ns() };
    event.cpu = unsafe { bpf_get_smp_processor_id() };
    event.flags = extra_flags;
    fill_listener(event, &o, sk, &mut reads);
    if !crate::filter::wants_listener(
        event.listener_port,
        event.netns_inode,
        event.socket_inode,
        event.cgroup_id,
    ) {
        return;
    }
    if skb.is_null() || !fill_packet(event, &o, skb) {
        event.flags |= EVENT_FLAG_NO_PACKET;
    }
    if kind == DropKind::AckDroppedAcceptQueueFull as u32 && abort_on_overflow(&o, sk) {
        event.flags |= EVENT_FLAG_RESET_SENT;
    }
    if reads.failed != 0 {
        event.flags |= EVENT_FLAG_PARTIAL;
        count(COUNTER_READ_ERRORS);
    }
    // Counted before it is queued: if the ring buffer is full, the totals
    // stay exact and the loss is counted.
    add_to_totals(event);
    crate::submit(event);
}

/// tcp_check_req() answers an overflowed final ACK with a RST only when
/// the listener's netns has tcp_abort_on_overflow set.
#[inline(always)]
fn abort_on_overflow(o: &KernelOffsets, sk: *const u8) -> bool {
    let mut r = Reader::new();
    let net = r.ptr(sk, o.sk_net);
    let value = r.at::<u8>(net, o.net_abort_on_overflow);
    r.ok() && value != 0
}

#[inline(always)]
fn fill_listener(event: &mut DropEvent, o: &KernelOffsets, sk: *const u8, reads: &mut Reader) {
    event.listener_family = reads.at::<u16>(sk, o.sk_family);
    event.listener_port = reads.at::<u16>(sk, o.sk_num);
    if event.listener_family == AF_INET6 {
        event.listener_addr = reads.at::<[u8; 16]>(sk, o.sk_v6_rcv_saddr);
    } else {
        let v4: [u8; 4] = reads.at::<[u8; 4]>(sk, o.sk_rcv_saddr);
        event.listener_addr[..4].copy_from_slice(&v4);
    }
    event.accept_queue_len = reads.at::<u32>(sk, o.sk_ack_backlog);
    event.accept_queue_max = reads.at::<u32>(sk, o.sk_max_ack_backlog);
    event.syn_queue_len = reads.at::<u32>(sk, o.icsk_syn_queue_len);
    let net = reads.ptr(sk, o.sk_net);
    event.netns_inode = reads.at::<u32>(net, o.net_ns_inum);
    // A listener being closed may have lost its struct socket already:
    // then there is no inode (0), which the reads below just leave so.
    let socket = reads.ptr(sk, o.sk_socket);
    if !socket.is_null() {
        let inode = socket.wrapping_add(o.socket_to_inode as usize);
        event.socket_inode = reads.at::<u64>(inode, o.inode_i_ino);
    }
    // The cgroup is optional (no read failure when this kernel lacks it).
    let mut optional = Reader::new();
    let cgroup = optional.at::<u64>(sk, o.sk_cgroup_ptr);
    // Before 5.15 bit 0 set means the word holds classid/prioidx data, not
    // a cgroup pointer.
    let tagged_data = o.sk_cgroup_ptr_tagged != 0 && cgroup & 1 != 0;
    if optional.ok() && cgroup != 0 && !tagged_data {
        let kn = optional.ptr(cgroup as *const u8, o.cgroup_kn);
        event.cgroup_id = optional.at::<u64>(kn, o.kernfs_node_id);
    }
}

/// IP version of the packet in `skb` (4 or 6), 0 when unreadable.
#[inline(always)]
pub fn packet_ip_version(skb: *const u8) -> u8 {
    let o = crate::offsets();
    let mut r = Reader::new();
    let head = r.ptr(skb, o.skb_head);
    let network = r.at::<u16>(skb, o.skb_network_header);
    let first = r.at::<u8>(head.wrapping_add(network as usize), 0);
    if r.ok() {
        first >> 4
    } else {
        0
    }
}

/// Fills peer and local address/port from the IP and TCP headers of `skb`.
/// Returns false when the headers cannot be read.
#[inline(always)]
fn fill_packet(event: &mut DropEvent, o: &KernelOffsets, skb: *const u8) -> bool {
    let mut r = Reader::new();
    let head = r.ptr(skb, o.skb_head);
    let network = r.at::<u16>(skb, o.skb_network_header);
    let transport = r.at::<u16>(skb, o.skb_transport_header);
    let ip = head.wrapping_add(network as usize);
    match r.at::<u8>(ip, 0) >> 4 {
        4 => {
            let src = r.at::<[u8; 4]>(ip, 12);
            let dst = r.at::<[u8; 4]>(ip, 16);
            event.peer_addr[..4].copy_from_slice(&src);
            event.local_addr[..4].copy_from_slice(&dst);
            event.packet_family = AF_INET;
        }
        6 => {
            event.peer_addr = r.at::<[u8; 16]>(ip, 8);
            event.local_addr = r.at::<[u8; 16]>(ip, 24);
            event.packet_family = AF_INET6;
        }
        _ => return false,
    }
    let tcp = head.wrapping_add(transport as usize);
    event.peer_port = u16::from_be(r.at::<u16>(tcp, 0));
    event.local_port = u16::from_be(r.at::<u16>(tcp, 2));
    r.ok()
}
