//! Builds the eBPF programs (backlog-ebpf) with nightly for
//! bpfel-unknown-none and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`.
//!
//! With AYA_BUILD_SKIP=1 (for `cargo check`/clippy on a machine without the
//! eBPF toolchain) an empty stub is written instead; the agent refuses to
//! run with it and says why.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, Result};

fn main() -> Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("backlog-agent has no parent directory")?
        .join("backlog-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("the backlog-ebpf path is not UTF-8")?;
    let object = out_dir.join("backlog");
    // aya-build leaves the object alone when skipped: start from a stub so
    // include_bytes always finds a file.
    if !object.exists() {
        fs::write(&object, []).context("cannot write the eBPF stub object")?;
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "backlog-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF programs failed (is the toolchain installed? run `cargo xtask setup`)",
    )
}
