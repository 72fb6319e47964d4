//! Reads of kernel memory at offsets known only at run time.
//!
//! Every read goes through `bpf_probe_read_kernel`, which returns an error
//! instead of faulting; a failed read is reported as `None` so the caller
//! can flag the event partial instead of inventing a value.

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::helpers::generated::bpf_probe_read_kernel;
use backlog_common::OFFSET_ABSENT;

/// Reads a `T` at `base + offset`; `None` when the field does not exist on
/// this kernel, the base is NULL or the read faults.
///
/// The destination is zeroed first: with an uninitialised one, LLVM may
/// compute with the undefined value on the error path, which the verifier
/// rejects as a read of an uninitialised register (seen on 6.12 fexit).
#[inline(always)]
pub fn at<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() || offset == OFFSET_ABSENT {
        return None;
    }
    let mut value = MaybeUninit::<T>::zeroed();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `value`
    // and reports a fault instead of faulting.
    let rc = unsafe {
        bpf_probe_read_kernel(
            value.as_mut_ptr().cast::<c_void>(),
            core::mem::size_of::<T>() as u32,
            base.wrapping_add(offset as usize).cast::<c_void>(),
        )
    };
    // SAFETY: zero-initialised, and fully written when rc == 0; T is plain
    // data (integers and byte arrays) for every caller.
    (rc == 0).then(|| unsafe { value.assume_init() })
}

/// Reads a kernel pointer at `base + offset`.
#[inline(always)]
pub fn ptr(base: *const u8, offset: u32) -> Option<*const u8> {
    at::<u64>(base, offset).map(|value| value as *const u8)
}
