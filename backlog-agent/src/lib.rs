//! backlog-agent: reports TCP connections that listening sockets drop
//! because their SYN or accept queue is full, and who owns the listener.
//!
//! The binary (`main.rs`) wires these modules together:
//! - `caps`: the capabilities needed, checked first, dropped after attaching.
//! - `preflight`: BTF, tracefs, memlock: what must hold first.
//! - `btf`, `tracefs`, `offsets`: kernel layouts resolved at start-up.
//! - `probes`: loads the eBPF object and attaches a hook for each kind.
//! - `decode`: ring-buffer records to events, by checked reads.
//! - `attribution`: socket inode to the processes holding it.
//! - `output`, `summary`, `clock`: what the user sees.
//! - `metrics`, `http`, `bpfstats`: the Prometheus endpoint (`--metrics-addr`).

pub mod accept_wait;
pub mod advice;
pub mod attribution;
pub mod bpfstats;
pub mod btf;
pub mod caps;
pub mod cli;
pub mod clock;
pub mod context;
pub mod counted;
pub mod decode;
pub mod diagnosis;
pub mod filter;
pub mod flood;
pub mod http;
pub mod kallsyms;
pub mod metrics;
pub mod offsets;
pub mod output;
pub mod preflight;
pub mod probes;
pub mod resolver;
pub mod sink;
pub mod sockdiag;
pub mod summary;
#[cfg(test)]
mod testing;
pub mod tracefs;
