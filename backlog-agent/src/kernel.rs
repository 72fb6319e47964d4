//! What talks to the kernel at start-up: the checks that must hold first
//! (`preflight`), kernel layouts resolved from BTF and tracefs (`btf`,
//! `tracefs`, `offsets`, `kallsyms`), the fallback ladder that loads and
//! attaches a hook per drop kind (`probes`), and the kernel's own run-time
//! accounting of those programs (`bpfstats`).

pub mod batch;
pub mod bpfstats;
pub mod btf;
pub mod expire;
pub mod kallsyms;
pub mod offsets;
pub mod preflight;
pub mod probes;
pub mod tracefs;
