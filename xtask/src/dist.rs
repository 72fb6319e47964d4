//! `cargo xtask dist`: one static file per architecture, for boxes that
//! have no compiler, and their checksums.
//!
//! Each binary is a musl static-pie with the eBPF object embedded. The
//! object is built by the agent's build script through aya-build, which
//! passes `--cfg bpf_target_arch` from the *agent's* target
//! (CARGO_CFG_TARGET_ARCH), so the aarch64 binary carries programs whose
//! kprobe argument reads use arm64's `struct pt_regs`: building per target
//! is what makes that right, nothing here has to choose it.
//!
//! Linkers: x86_64-unknown-linux-musl links with the host's cc and the
//! self-contained musl CRT objects rustup ships with the target; for
//! aarch64 there is no cross cc on the box, so rust-lld (shipped with
//! every rustup toolchain, found by rustc in its own sysroot) links it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{cargo, run, workspace_root};

/// A release target: the Rust target triple, the suffix of the file name,
/// the ELF machine number the result must carry, and the linker override.
pub struct DistTarget {
    pub triple: &'static str,
    pub suffix: &'static str,
    elf_machine: u16,
    linker: Option<&'static str>,
}

impl DistTarget {
    /// The environment variable and value that select this target's linker
    /// for cargo, if it needs one other than the host's cc.
    pub fn linker_override(&self) -> Option<(String, &'static str)> {
        self.linker.map(|linker| (linker_env(self.triple), linker))
    }
}

const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const EM_BPF: u16 = 247;

pub const TARGETS: &[DistTarget] = &[
    DistTarget {
        triple: "x86_64-unknown-linux-musl",
        suffix: "x86_64-linux-musl",
        elf_machine: EM_X86_64,
        linker: None,
    },
    DistTarget {
        triple: "aarch64-unknown-linux-musl",
        suffix: "aarch64-linux-musl",
        elf_machine: EM_AARCH64,
        linker: Some("rust-lld"),
    },
];

/// Builds the agent for `target` (release, `--locked`) and returns the
/// path of the binary cargo left in `target/<triple>/release`.
pub fn build_agent(target: &DistTarget) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--package",
        "backlog-agent",
        "--target",
        target.triple,
    ]);
    if let Some((var, linker)) = target.linker_override() {
        cmd.env(var, linker);
    }
    run(&mut cmd)?;
    Ok(workspace_root()
        .join("target")
        .join(target.triple)
        .join("release/backlog-agent"))
}

/// CARGO_TARGET_<TRIPLE>_LINKER, the way cargo spells it.
fn linker_env(triple: &str) -> String {
    format!(
        "CARGO_TARGET_{}_LINKER",
        triple.to_ascii_uppercase().replace('-', "_")
    )
}

pub fn dist() -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let out = workspace_root().join("target/dist");
    fs::create_dir_all(&out).with_context(|| format!("failed to create {}", out.display()))?;
    let mut names = Vec::new();
    for target in TARGETS {
        let built = build_agent(target)?;
        let bytes =
            fs::read(&built).with_context(|| format!("failed to read {}", built.display()))?;
        check_release_binary(&bytes, target.elf_machine)
            .with_context(|| format!("{} is not fit to ship", built.display()))?;
        let name = format!("backlog-agent-{version}-{}", target.suffix);
        let dest = out.join(&name);
        // Copied, not hard-linked: a later build must not change a file
        // whose checksum is already written.
        fs::copy(&built, &dest)
            .with_context(|| format!("failed to copy {} to {}", built.display(), dest.display()))?;
        println!("dist: {name}: {} bytes", bytes.len());
        names.push(name);
    }
    // The x86_64 build must at least start on this (x86_64) box: a static
    // binary that cannot print its version is not worth shipping.
    let host_binary = out.join(&names[0]);
    run(Command::new(&host_binary).arg("--version"))?;

    write_checksums(&out, &names)?;
    println!("dist: wrote {}", out.join("SHA256SUMS").display());
    Ok(())
}

/// SHA256SUMS in the format `sha256sum -c` reads, so the box that gets the
/// file can check it with coreutils alone.
fn write_checksums(dir: &Path, names: &[String]) -> Result<()> {
    let out = Command::new("sha256sum")
        .args(names)
        .current_dir(dir)
        .output()
        .context("failed to start sha256sum (coreutils)")?;
    if !out.status.success() {
        bail!(
            "sha256sum failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = dir.join("SHA256SUMS");
    fs::write(&path, &out.stdout).with_context(|| format!("failed to write {}", path.display()))
}

/// Refuses a binary that would not run on a bare box: wrong machine, a
/// program interpreter (dynamic linking), or no embedded eBPF object (a
/// build with AYA_BUILD_SKIP embeds an empty stub).
pub fn check_release_binary(bytes: &[u8], machine: u16) -> Result<()> {
    let elf = Elf64::parse(bytes)?;
    if elf.machine != machine {
        bail!("ELF machine {} where {machine} was expected", elf.machine);
    }
    if elf.has_interpreter(bytes)? {
        bail!("it is dynamically linked (it has a PT_INTERP program header)");
    }
    if !contains_bpf_object(bytes) {
        bail!("no eBPF object is embedded (was it built with AYA_BUILD_SKIP=1?)");
    }
    Ok(())
}

/// Whether `bytes` contain a little-endian 64-bit ELF header for EM_BPF
/// (the object `include_bytes_aligned!` put in .rodata).
fn contains_bpf_object(bytes: &[u8]) -> bool {
    const MAGIC: &[u8] = b"\x7fELF\x02\x01\x01";
    bytes
        .windows(MAGIC.len())
        .enumerate()
        .skip(1) // the binary's own header
        .filter(|(_, w)| *w == MAGIC)
        .any(|(at, _)| {
            bytes
                .get(at + 18..at + 20)
                .is_some_and(|m| u16::from_le_bytes([m[0], m[1]]) == EM_BPF)
        })
}

/// The few fields of a 64-bit little-endian ELF header this check reads.
struct Elf64 {
    machine: u16,
    phoff: usize,
    phentsize: usize,
    phnum: usize,
}

impl Elf64 {
    fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 64 || !bytes.starts_with(b"\x7fELF\x02\x01") {
            bail!("not a 64-bit little-endian ELF file");
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let mut phoff = [0u8; 8];
        phoff.copy_from_slice(&bytes[32..40]);
        Ok(Self {
            machine: u16_at(18),
            phoff: usize::try_from(u64::from_le_bytes(phoff)).context("bad e_phoff")?,
            phentsize: usize::from(u16_at(54)),
            phnum: usize::from(u16_at(56)),
        })
    }

    fn has_interpreter(&self, bytes: &[u8]) -> Result<bool> {
        const PT_INTERP: u32 = 3;
        for i in 0..self.phnum {
            let at = self.phoff + i * self.phentsize;
            let Some(p_type) = bytes.get(at..at + 4) else {
                bail!("program header {i} lies outside the file");
            };
            if u32::from_le_bytes([p_type[0], p_type[1], p_type[2], p_type[3]]) == PT_INTERP {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linker_variable_is_spelled_like_cargo() {
        assert_eq!(
            linker_env("aarch64-unknown-linux-musl"),
            "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER"
        );
    }

    /// The checks must be able to fail: the dynamically linked xtask
    /// itself is refused, for being dynamic or for lacking a BPF object.
    #[test]
    fn refuses_this_dynamic_binary() {
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = check_release_binary(&me, EM_X86_64).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("dynamically linked") || text.contains("no eBPF object"),
            "{text}"
        );
        assert!(check_release_binary(&me, EM_AARCH64).is_err());
        assert!(check_release_binary(b"not an elf", EM_X86_64).is_err());
    }
}
