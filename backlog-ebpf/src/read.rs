//! Reads of kernel memory at offsets known only at run time.
//!
//! Every read goes through `bpf_probe_read_kernel`, which returns an error
//! instead of faulting; a failed read is reported as `None` so the caller
//! can flag the event partial instead of inventing a value.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use backlog_common::OFFSET_ABSENT;

/// Reads a `T` at `base + offset`; `None` when the field does not exist on
/// this kernel, the base is NULL or the read faults.
#[inline(always)]
pub fn at<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() || offset == OFFSET_ABSENT {
        return None;
    }
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T).ok() }
}

/// Reads a kernel pointer at `base + offset`.
#[inline(always)]
pub fn ptr(base: *const u8, offset: u32) -> Option<*const u8> {
    at::<u64>(base, offset).map(|value| value as *const u8)
}
