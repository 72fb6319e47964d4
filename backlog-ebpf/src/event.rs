//! Builds a [`DropEvent`] from a listening socket and the dropped packet,
//! and queues it. Every hook (tracepoint, kprobe, fentry) funnels through
//! here so that all kinds carry the same fields.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use aya_ebpf::{
    bindings::BPF_ANY,
    macros::map,
    maps::{LruHashMap, PerCpuArray, PerCpuHashMap},
};
use backlog_common::{
    DropCounts, DropEvent, DropKind, DropTotalKey, KernelOffsets, PeerKey, AF_INET, AF_INET6,
    COUNTER_READ_ERRORS, EVENT_FLAG_NO_PACKET, EVENT_FLAG_PARTIAL, EVENT_FLAG_RESET_SENT,
};

use crate::{account, count, read::Reader};

/// Where an event is assembled: off the 512-byte stack.
#[map]
static SCRATCH: PerCpuArray<DropEvent> = PerCpuArray::with_max_entries(1, 0);

/// What became of the drops of each listener and kind (see account.rs),
/// counted before any event is queued, so they stay exact when events are
/// rate-limited or the ring buffer overflows. Per-CPU: no atomics on the
/// hot path; the agent sums the CPUs.
#[map]
static DROP_TOTALS: PerCpuHashMap<DropTotalKey, DropCounts> =
    PerCpuHashMap::with_max_entries(16384, 0);

/// The rate limit's token bucket per listener and kind.
#[map]
static DROP_BUCKETS: LruHashMap<DropTotalKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Sources of the suppressed drops per listener and kind, for the
/// aggregates' busiest peers. Shared and updated without atomics: the
/// counts are approximate (a hint of who floods), unlike DROP_TOTALS.
/// The agent empties it every interval.
#[map]
static SUPPRESSED_PEERS: LruHashMap<PeerKey, u64> = LruHashMap::with_max_entries(8192, 0);

/// One suppressed drop in PEER_SAMPLE has its source counted, weighted by
/// PEER_SAMPLE. In a spoofed-source flood nearly every source is new, and
/// an LRU insert per drop doubled the cost of a suppressed SYN (measured
/// in the 5.10 guest: fexit on tcp_conn_request 4.5 us -> 2.2 us per call
/// under emulation without it); a source that matters sends many.
const PEER_SAMPLE: u64 = 16;

/// This CPU's suppressed drops since its last sample.
#[map]
static PEER_SAMPLER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// True for one call in PEER_SAMPLE on this CPU.
#[inline(always)]
fn peer_sampled() -> bool {
    let Some(n) = PEER_SAMPLER.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; programs do not nest on a CPU here.
    unsafe {
        *n += 1;
        *n % PEER_SAMPLE == 0
    }
}

/// `sk_acceptq_is_full()`: more connections waiting than the limit.
#[inline(always)]
pub fn accept_queue_full(sk: *const u8) -> bool {
    let o = crate::offsets();
    let mut r = Reader::new();
    let len = r.at::<u32>(sk, o.sk_ack_backlog);
    let max = r.at::<u32>(sk, o.sk_max_ack_backlog);
    r.ok() && len > max
}

/// Who the listener is: what its drops are counted and limited by.
#[inline(always)]
fn listener_key(kind: u32, o: &KernelOffsets, sk: *const u8, reads: &mut Reader) -> DropTotalKey {
    let mut key = DropTotalKey {
        socket_inode: 0,
        netns_inode: 0,
        kind,
        listener_addr: [0; 16],
        listener_port: reads.at::<u16>(sk, o.sk_num),
        listener_family: reads.at::<u16>(sk, o.sk_family),
        _pad0: 0,
    };
    if key.listener_family == AF_INET6 {
        key.listener_addr = reads.at::<[u8; 16]>(sk, o.sk_v6_rcv_saddr);
    } else {
        let v4: [u8; 4] = reads.at::<[u8; 4]>(sk, o.sk_rcv_saddr);
        key.listener_addr[..4].copy_from_slice(&v4);
    }
    let net = reads.ptr(sk, o.sk_net);
    key.netns_inode = reads.at::<u32>(net, o.net_ns_inum);
    // A listener being closed may have lost its struct socket already:
    // then there is no inode (0), which the reads below just leave so.
    let socket = reads.ptr(sk, o.sk_socket);
    if !socket.is_null() {
        let inode = socket.wrapping_add(o.socket_to_inode as usize);
        key.socket_inode = reads.at::<u64>(inode, o.inode_i_ino);
    }
    key
}

/// Counts and, within the rate limit, queues one event for `kind` about
/// listener `sk`, with addresses taken from `skb` (may be NULL when the
/// hook has no packet).
///
/// A BPF-to-BPF call rather than inlined, and the event is built in a
/// per-CPU scratch slot rather than on the stack: a hook may emit twice,
/// and the stack is 512 bytes for the whole call chain.
#[inline(never)]
pub fn emit(kind: u32, sk: *const u8, skb: *const u8, extra_flags: u32) {
    let o = crate::offsets();
    let mut reads = Reader { failed: 0 };
    let key = listener_key(kind, &o, sk, &mut reads);
    // The listener filters (--port, --netns, --pid, --cgroup), before
    // anything is counted or queued: a drop nobody asked about costs a few
    // lookups and no accounting.
    if !crate::filter::wants_listener(key.listener_port, key.netns_inode, key.socket_inode, || {
        listener_cgroup(&o, sk)
    }) {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let admission = account::admit(&DROP_TOTALS, &DROP_BUCKETS, &key, now);
    if !admission.send {
        if !skb.is_null() && peer_sampled() {
            count_peer(&key, &o, skb);
        }
        return;
    }
    let Some(event) = SCRATCH.get_ptr_mut(0) else {
        account::queued(&admission, false);
        return;
    };
    // SAFETY: this CPU's scratch slot; programs do not nest on a CPU
    // while one is running here.
    let event = unsafe { &mut *event };
    *event = DropEvent::ZERO;
    event.kind = kind;
    event.timestamp_ns = now;
    event.cpu = unsafe { bpf_get_smp_processor_id() };
    event.flags = extra_flags;
    event.socket_inode = key.socket_inode;
    event.netns_inode = key.netns_inode;
    event.listener_addr = key.listener_addr;
    event.listener_port = key.listener_port;
    event.listener_family = key.listener_family;
    fill_listener(event, &o, sk, &mut reads);
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
    let ok = crate::output(event);
    account::queued(&admission, ok);
}

/// Adds a sampled suppressed drop to its source's count, weighted by
/// PEER_SAMPLE (approximate, see SUPPRESSED_PEERS).
#[inline(always)]
fn count_peer(listener: &DropTotalKey, o: &KernelOffsets, skb: *const u8) {
    let mut r = Reader::new();
    let head = r.ptr(skb, o.skb_head);
    let network = r.at::<u16>(skb, o.skb_network_header);
    let ip = head.wrapping_add(network as usize);
    let mut key = PeerKey {
        socket_inode: listener.socket_inode,
        kind: listener.kind,
        netns_inode: listener.netns_inode,
        family: 0,
        _pad0: [0; 6],
        addr: [0; 16],
    };
    match r.at::<u8>(ip, 0) >> 4 {
        4 => {
            let src = r.at::<[u8; 4]>(ip, 12);
            key.addr[..4].copy_from_slice(&src);
            key.family = AF_INET;
        }
        6 => {
            key.addr = r.at::<[u8; 16]>(ip, 8);
            key.family = AF_INET6;
        }
        _ => return,
    }
    if !r.ok() {
        return;
    }
    match SUPPRESSED_PEERS.get_ptr_mut(key) {
        // SAFETY: a shared value; a racing CPU may lose an increment.
        Some(n) => unsafe { *n += PEER_SAMPLE },
        None => {
            let _ = SUPPRESSED_PEERS.insert(key, PEER_SAMPLE, BPF_ANY as u64);
        }
    }
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

/// The event fields that are not part of the listener's key.
#[inline(always)]
fn fill_listener(event: &mut DropEvent, o: &KernelOffsets, sk: *const u8, reads: &mut Reader) {
    event.accept_queue_len = reads.at::<u32>(sk, o.sk_ack_backlog);
    event.accept_queue_max = reads.at::<u32>(sk, o.sk_max_ack_backlog);
    event.syn_queue_len = reads.at::<u32>(sk, o.icsk_syn_queue_len);
    event.cgroup_id = listener_cgroup(o, sk);
}

/// cgroup v2 id of the listener, 0 when unknown. Optional: no read
/// failure is counted when this kernel lacks the field.
#[inline(always)]
fn listener_cgroup(o: &KernelOffsets, sk: *const u8) -> u64 {
    let mut optional = Reader::new();
    let cgroup = optional.at::<u64>(sk, o.sk_cgroup_ptr);
    // Before 5.15 bit 0 set means the word holds classid/prioidx data, not
    // a cgroup pointer.
    let tagged_data = o.sk_cgroup_ptr_tagged != 0 && cgroup & 1 != 0;
    if optional.ok() && cgroup != 0 && !tagged_data {
        let kn = optional.ptr(cgroup as *const u8, o.cgroup_kn);
        // Zero when unreadable (see read.rs).
        return optional.at::<u64>(kn, o.kernfs_node_id);
    }
    0
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
