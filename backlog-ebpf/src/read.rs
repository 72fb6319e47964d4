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
