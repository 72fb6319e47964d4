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

pub mod caps;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod enrich;
pub mod filter;
pub mod flood;
pub mod http;
pub mod kernel;
pub mod report;
pub mod sink;
#[cfg(test)]
mod testing;
