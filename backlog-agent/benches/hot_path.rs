//! `cargo xtask bench` (third part): the agent's hot path on one core.
//! Ring-buffer records, built exactly as the kernel writes them, go
//! through `Sink::handle_batch` (decode, attribution, summary, JSON or text
//! written through a 256 KiB buffer to /dev/null): the code production
//! runs, minus the ring buffer's memory reads. Listeners are real sockets
//! of this process, so attribution finds their holder through /proc as it
//! would in production. Prints events per second; no assertion.

use std::{
    fs::File,
    hint::black_box,
    net::TcpListener,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    time::Instant,
};

use backlog_agent::{
    cli::OutputFormat,
    sink::{Options, Sink},
};
use backlog_common::{DropEvent, DropKind, AF_INET, DROP_EVENT_SIZE};

const EVENTS: usize = 1_000_000;
const LISTENERS: usize = 4;

fn record(event: &DropEvent) -> Vec<u8> {
    // SAFETY: DropEvent is repr(C) plain data without implicit padding.
    unsafe { std::slice::from_raw_parts((event as *const DropEvent).cast::<u8>(), DROP_EVENT_SIZE) }
        .to_vec()
}

fn socket_inode(listener: &TcpListener) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
        .map(|m| m.ino())
        .unwrap_or(0)
}

fn netns() -> u32 {
    std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino() as u32)
        .unwrap_or(0)
}

fn main() {
    let listeners: Vec<TcpListener> = (0..LISTENERS)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let netns = netns();
    let records: Vec<Vec<u8>> = (0..EVENTS)
        .map(|i| {
            let listener = &listeners[i % LISTENERS];
            let mut e = DropEvent::ZERO;
            e.timestamp_ns = 1_000_000_000 + i as u64 * 1_000;
            e.socket_inode = socket_inode(listener);
            e.kind = if i % 3 == 0 {
                DropKind::SynDroppedSynQueueFull
            } else {
                DropKind::AckDroppedAcceptQueueFull
            } as u32;
            e.cpu = (i % 2) as u32;
            e.netns_inode = netns;
            e.accept_queue_len = 129;
            e.accept_queue_max = 128;
            e.syn_queue_len = 128;
            e.listener_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
            e.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
            e.peer_addr[..4].copy_from_slice(&[198, 19, (i >> 8) as u8, i as u8]);
            e.listener_port = listener.local_addr().unwrap().port();
            e.local_port = e.listener_port;
            e.peer_port = 30_000 + (i % 30_000) as u16;
            e.listener_family = AF_INET;
            e.packet_family = AF_INET;
            record(&e)
        })
        .collect();
    println!("backlog hot-path bench: {EVENTS} drop events over {LISTENERS} listeners");
    for format in [OutputFormat::Json, OutputFormat::Text] {
        let out = File::create("/dev/null").expect("/dev/null");
        let mut sink = Sink::with_output(
            Options {
                format,
                show_cmdline: false,
                max_events_per_sec: 100,
                near_full_percent: 80,
                client_timeout: std::time::Duration::from_secs(10),
            },
            Box::new(out),
        );
        // The first event of each listener resolves it through /proc; that
        // is part of the cost measured.
        let started = Instant::now();
        for batch in records.chunks(4096) {
            sink.handle_batch(batch.iter().map(Vec::as_slice));
        }
        let elapsed = started.elapsed();
        black_box(&sink.summary);
        println!(
            "(d) {:?}: {:.0} events/s decoded, attributed and written ({:.0} ns per event, one core); holders found: {}",
            format,
            EVENTS as f64 / elapsed.as_secs_f64(),
            elapsed.as_nanos() as f64 / EVENTS as f64,
            sink.summary
                .listeners
                .values()
                .filter(|s| !s.processes.is_empty())
                .count()
        );
    }
}
