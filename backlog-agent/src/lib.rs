//! backlog-agent: reports TCP connections that listening sockets drop
//! because their SYN or accept queue is full, and who owns the listener.
//!
//! A record travels one way, and the layout follows it:
//! - `kernel/`: what talks to the kernel at start-up (preflight checks,
//!   BTF, tracefs, offsets, the probes' fallback ladder, BPF run-time
//!   stats); `caps`: the capabilities needed, dropped after attaching.
//! - `decode`: ring-buffer records to typed events, by checked reads;
//!   `flood`: the kernel's per-listener totals to aggregate records.
//! - `sink`: drains: decode, enrich, build the model, hand it to a reporter.
//! - `enrich/`: who and where: holders, cgroup and namespace sysctls, UNIX
//!   listeners, accept-queue figures, counted drops.
//! - `model`: typed events, aggregates and listener reports, what every
//!   renderer reads.
//! - `report/`: text, JSON lines, metrics and diagnoses: every format;
//!   `http`: serves the metrics (`--metrics-addr`); `clock`: wall times.

pub mod agent;
pub mod caps;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod enrich;
pub mod filter;
pub mod flood;
pub mod http;
pub mod kernel;
pub mod model;
pub mod report;
pub mod sink;
#[cfg(test)]
mod testing;
pub mod wakeup;
