//! Loads the eBPF object and attaches, for each drop kind, the best hook
//! this kernel accepts. Every kind ends up either attached (and the hook
//! is named) or not observable (and the reason is given): the user is
//! told which, never left to guess.

use std::path::Path;

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfError, EbpfLoader,
};
use backlog_common::{DropKind, COUNTER_EVENTS_LOST, COUNTER_READ_ERRORS};
use thiserror::Error;

use crate::{
    btf::Btf,
    cli::AttachMode,
    offsets::{self, OffsetError},
    tracefs::EventFormat,
};

/// The eBPF object built by build.rs (empty when the build was skipped).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/backlog"));

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "this backlog-agent was built without its eBPF programs (AYA_BUILD_SKIP was set); \
         rebuild it with the eBPF toolchain: `cargo xtask setup && cargo build`"
    )]
    NoObject,
    #[error(transparent)]
    Offsets(#[from] OffsetError),
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] EbpfError),
    #[error("{kind}: --attach {family} is not possible on this kernel: {reason}")]
    Forced {
        kind: &'static str,
        family: &'static str,
        reason: String,
    },
    #[error("no drop kind can be observed on this kernel:\n{0}")]
    NothingObservable(String),
    #[error("eBPF map {name}: {reason}")]
    Map { name: &'static str, reason: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookFamily {
    Fentry,
    Kprobe,
    Tracepoint,
}

impl HookFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            HookFamily::Fentry => "fentry",
            HookFamily::Kprobe => "kprobe",
            HookFamily::Tracepoint => "tracepoint",
        }
    }

    fn allowed_by(self, mode: AttachMode) -> bool {
        matches!(
            (mode, self),
            (AttachMode::Auto, _)
                | (AttachMode::Fentry, HookFamily::Fentry)
                | (AttachMode::Kprobe, HookFamily::Kprobe)
                | (AttachMode::Tracepoint, HookFamily::Tracepoint)
        )
    }
}

/// One way of observing a kind: a program of the object and where it goes.
#[derive(Clone, Copy, Debug)]
struct Hook {
    family: HookFamily,
    program: &'static str,
    /// `category:name` for tracepoints, a function name otherwise.
    target: &'static str,
}

impl Hook {
    fn describe(&self) -> String {
        format!("{} {}", self.family.as_str(), self.target)
    }
}

const KFREE_SKB: Hook = Hook {
    family: HookFamily::Tracepoint,
    program: "kfree_skb_listen_overflow",
    target: "skb:kfree_skb",
};

/// Candidate hooks per kind, best first (fentry, kprobe, tracepoint).
fn hooks_for(kind: DropKind) -> &'static [Hook] {
    match kind {
        DropKind::AckDroppedAcceptQueueFull => &[KFREE_SKB],
        _ => &[],
    }
}

/// What happened to one kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Attached { family: HookFamily, hook: String },
    NotObservable { reason: String },
}

pub struct Probes {
    /// Owns the programs and their links: dropping it detaches everything.
    pub ebpf: Ebpf,
    pub outcomes: Vec<(DropKind, Outcome)>,
}

/// Per-hook facts checked before load (tracepoint record layouts, enum
/// values): a hook whose precondition failed is not tried.
struct Preconditions {
    kfree_skb: Result<(), String>,
}

impl Preconditions {
    fn of(&self, hook: &Hook) -> Result<(), String> {
        if hook.program == KFREE_SKB.program {
            self.kfree_skb.clone()
        } else {
            Ok(())
        }
    }
}

pub fn start(
    mode: AttachMode,
    ring_buffer_kib: u32,
    btf: &Btf,
    tracefs: &Path,
) -> Result<(Probes, Vec<&'static str>), ProbeError> {
    if OBJECT.is_empty() {
        return Err(ProbeError::NoObject);
    }
    let resolved = offsets::resolve(btf)?;
    let mut kernel_offsets = resolved.offsets;
    let kfree_skb = EventFormat::read(tracefs, "skb", "kfree_skb")
        .map_err(|err| err.to_string())
        .and_then(|format| {
            offsets::apply_kfree_skb(&mut kernel_offsets, btf, &format)
                .map_err(|err| err.to_string())
        });
    let preconditions = Preconditions { kfree_skb };

    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &kernel_offsets, true)
        .map_max_entries("EVENTS", ring_buffer_kib * 1024)
        .load(OBJECT)?;

    let mut outcomes = Vec::new();
    for kind in DropKind::ALL {
        let hooks = hooks_for(kind);
        let mut failures = Vec::new();
        let mut attached = None;
        for hook in hooks.iter().filter(|h| h.family.allowed_by(mode)) {
            match preconditions
                .of(hook)
                .and_then(|()| attach(&mut ebpf, hook))
            {
                Ok(()) => {
                    attached = Some(hook);
                    break;
                }
                Err(reason) => failures.push(format!("{}: {reason}", hook.describe())),
            }
        }
        let outcome = match attached {
            Some(hook) => Outcome::Attached {
                family: hook.family,
                hook: hook.describe(),
            },
            None if hooks.is_empty() => Outcome::NotObservable {
                reason: "this version of backlog has no hook for it yet".into(),
            },
            None if failures.is_empty() => Outcome::NotObservable {
                reason: format!("no {} hook exists for it", mode_name(mode)),
            },
            None => {
                let reason = failures.join("; ");
                if mode != AttachMode::Auto {
                    return Err(ProbeError::Forced {
                        kind: kind.as_str(),
                        family: mode_name(mode),
                        reason,
                    });
                }
                Outcome::NotObservable { reason }
            }
        };
        outcomes.push((kind, outcome));
    }
    if !outcomes
        .iter()
        .any(|(_, o)| matches!(o, Outcome::Attached { .. }))
    {
        let why: Vec<String> = outcomes
            .iter()
            .map(|(kind, outcome)| match outcome {
                Outcome::NotObservable { reason } => format!("  {}: {reason}", kind.as_str()),
                Outcome::Attached { .. } => String::new(),
            })
            .collect();
        return Err(ProbeError::NothingObservable(why.join("\n")));
    }
    Ok((Probes { ebpf, outcomes }, resolved.absent))
}

fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Auto => "auto",
        AttachMode::Fentry => "fentry",
        AttachMode::Kprobe => "kprobe",
        AttachMode::Tracepoint => "tracepoint",
    }
}

/// Loads and attaches one program. Loading alone proves nothing (kprobe
/// programs load on kernels without kprobes), so success means attached.
fn attach(ebpf: &mut Ebpf, hook: &Hook) -> Result<(), String> {
    let program = ebpf
        .program_mut(hook.program)
        .ok_or_else(|| format!("program {} missing from the eBPF object", hook.program))?;
    match hook.family {
        HookFamily::Tracepoint => {
            let (category, name) = hook
                .target
                .split_once(':')
                .ok_or_else(|| format!("bad tracepoint name {}", hook.target))?;
            let tp: &mut TracePoint = program.try_into().map_err(|e| format!("{e}"))?;
            tp.load().map_err(|e| format!("load: {e}"))?;
            tp.attach(category, name)
                .map_err(|e| format!("attach: {e}"))?;
        }
        HookFamily::Fentry | HookFamily::Kprobe => {
            return Err("not built into this version".into());
        }
    }
    Ok(())
}

impl Probes {
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, ProbeError> {
        let map = self.ebpf.take_map("EVENTS").ok_or(ProbeError::Map {
            name: "EVENTS",
            reason: "missing from the eBPF object".into(),
        })?;
        RingBuf::try_from(map).map_err(|e| ProbeError::Map {
            name: "EVENTS",
            reason: e.to_string(),
        })
    }

    pub fn take_counters(&mut self) -> Result<KernelCounters, ProbeError> {
        let map = self.ebpf.take_map("COUNTERS").ok_or(ProbeError::Map {
            name: "COUNTERS",
            reason: "missing from the eBPF object".into(),
        })?;
        let array = PerCpuArray::try_from(map).map_err(|e| ProbeError::Map {
            name: "COUNTERS",
            reason: e.to_string(),
        })?;
        Ok(KernelCounters { array })
    }
}

/// The programs' per-CPU counters of what they could not report.
pub struct KernelCounters {
    array: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    fn sum(&self, index: u32) -> Result<u64, String> {
        let values = self.array.get(&index, 0).map_err(|e| e.to_string())?;
        Ok(values.iter().sum())
    }

    pub fn events_lost(&self) -> Result<u64, String> {
        self.sum(COUNTER_EVENTS_LOST)
    }

    pub fn read_errors(&self) -> Result<u64, String> {
        self.sum(COUNTER_READ_ERRORS)
    }
}
