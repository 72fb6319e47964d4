//! Reads of kernel memory at offsets known only at run time.
//!
//! Every read goes through `bpf_probe_read_kernel`, which returns an error
//! instead of faulting. A failed read yields a defined zero and is
//! remembered in the `Reader`, so the caller can flag the event partial
//! instead of inventing a value.
//!
//! There is deliberately no `Option`-returning read: LLVM computes on the
//! undefined payload of a `None` (e.g. after `(Some(a), Some(b)) => a > b`
//! or `unwrap_or(0)`), and the verifier rejects that as a read of an
//! uninitialised register (seen on 6.1 and 6.12).

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::helpers::generated::bpf_probe_read_kernel;

/// Branch-free reads for filling an event: each failed read leaves its
/// value zero and is remembered in `failed`, instead of a branch per read.
/// An event reads some twenty fields, and a branch each multiplies the
/// paths the verifier explores (it hit 870k instructions on 6.1).
pub struct Reader {
    /// OR of the helper's return codes: non-zero once any read failed.
    pub failed: i64,
}

impl Reader {
    /// `T` at `base + offset`, zero when unreadable. An absent offset or a
    /// NULL base makes an address that faults, so it needs no branch.
    #[inline(always)]
    pub fn at<T: Copy>(&mut self, base: *const u8, offset: u32) -> T {
        let mut value = MaybeUninit::<T>::zeroed();
        // SAFETY: the helper writes at most size_of::<T>() bytes into
        // `value` and reports a fault instead of faulting.
        let rc = unsafe {
            bpf_probe_read_kernel(
                value.as_mut_ptr().cast::<c_void>(),
                core::mem::size_of::<T>() as u32,
                base.wrapping_add(offset as usize).cast::<c_void>(),
            )
        };
        self.failed |= rc;
        // SAFETY: zero-initialised, and fully written on success; T is
        // plain data (integers and byte arrays) for every caller.
        unsafe { value.assume_init() }
    }

    #[inline(always)]
    pub fn ptr(&mut self, base: *const u8, offset: u32) -> *const u8 {
        self.at::<u64>(base, offset) as *const u8
    }

    pub fn new() -> Self {
        Reader { failed: 0 }
    }

    pub fn ok(&self) -> bool {
        self.failed == 0
    }
}

/// A tracepoint record field at a compile-time offset: a plain load, which
/// the verifier allows for tracepoint programs at any aligned constant
/// offset (the kernel refuses the attach if it lies beyond the record),
/// where `ctx.read_at` costs a helper call. The agent attaches a program
/// that reads this way only where tracefs shows the same offset.
///
/// SAFETY: `AT` must be a multiple of `size_of::<T>()` (the verifier
/// rejects a misaligned ctx load) and `T` plain data.
#[inline(always)]
pub unsafe fn tp_field<T: Copy, const AT: usize>(ctx: &aya_ebpf::programs::TracePointContext) -> T {
    use aya_ebpf::EbpfContext as _;
    core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(AT).cast::<T>())
}

/// current->files->fdt->fd[fd]->private_data: the struct socket behind a
/// socket fd of the calling process; NULL when it cannot be read.
#[inline(always)]
pub fn socket_of_fd(walk: &backlog_common::FdWalk, fd: u32) -> *const u8 {
    let mut r = Reader::new();
    // SAFETY: a helper without memory preconditions.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() } as *const u8;
    let files = r.ptr(task, walk.task_files);
    let fdt = r.ptr(files, walk.files_fdt);
    let max_fds = r.at::<u32>(fdt, walk.fdtable_max_fds);
    let fds = r.ptr(fdt, walk.fdtable_fd);
    let file = r.ptr(fds, fd.wrapping_mul(8));
    let socket = r.ptr(file, walk.file_private_data);
    if r.ok() && fd < max_fds {
        socket
    } else {
        core::ptr::null()
    }
}

/// The user registers the current task saved at syscall entry, as a
/// pointer the verifier knows the type of (struct pt_regs).
#[inline(always)]
pub fn syscall_regs() -> *const u8 {
    // SAFETY: helpers without memory preconditions; the verifier checks
    // that the task pointer is a trusted one.
    unsafe {
        aya_ebpf::helpers::generated::bpf_task_pt_regs(
            aya_ebpf::helpers::generated::bpf_get_current_task_btf(),
        ) as *const u8
    }
}

/// The current syscall's first and second arguments, read at its exit
/// from the registers saved at entry (5.15+): what a sys_enter_* program
/// would otherwise keep in a map for the exit. On arm64 the first is
/// orig_x0, x0 holding the return value by then (see
/// KernelOffsets::pt_regs_arg0). Only for programs whose hook needs
/// Needs::SyscallRegs: elsewhere they do not load.
#[inline(always)]
pub fn syscall_args01() -> (u64, u64) {
    let (arg0_at, arg1_at) = (crate::offset!(pt_regs_arg0), crate::offset!(pt_regs_arg1));
    let regs = syscall_regs();
    // SAFETY (both): register slots of pt_regs (see btf_field).
    unsafe {
        (
            btf_field::<u64>(regs, arg0_at),
            btf_field::<u64>(regs, arg1_at),
        )
    }
}

/// A field behind a pointer the verifier has BTF for (the current task,
/// its pt_regs, and the pointers read from their fields): a plain load,
/// which the verifier checks against BTF at load time and turns into a
/// fault-safe load, where a bpf_probe_read_kernel() call would cost a
/// helper call per field. The offset must be known to the verifier: it
/// comes from OFFSETS, in the frozen read-only data.
///
/// SAFETY: `base` must be such a pointer and `offset` a field of type `T`
/// of its struct (else the program does not load, and the agent falls
/// back to the enter+exit pair).
#[inline(always)]
pub unsafe fn btf_field<T: Copy>(base: *const u8, offset: u32) -> T {
    core::ptr::read_volatile(base.wrapping_add(offset as usize).cast::<T>())
}
