//! UNIX stream connect() failing with EAGAIN, seen at the exit of
//! `unix_stream_connect()` itself where the kernel lets fexit attach
//! (x86_64 5.5+, arm64 6.0+; not this project's sandboxed 6.18 hosts).
//!
//! Only AF_UNIX stream connect()s reach this function, so a TCP or UDP
//! connect() runs no program of ours at all, where the syscall hook
//! (syscalls.rs) is reached by every connect() on the machine. It also
//! takes no program off the syscall tracing path: with no program on
//! sys_exit_connect, the kernel's perf_syscall_exit leaves connect() at
//! its bitmap test, as it does for every syscall nobody traces.
//!
//! The function returns -EAGAIN exactly when connect() does for a full
//! backlog (`unix_recvq_full()` with no time left to wait), and the
//! sockaddr it was handed is the kernel's copy of the caller's, so the key
//! is built from the same bytes as the syscall hook builds it from.
//! A successful return is the accept-queue wait's UNIX arrival, with the
//! client's `struct socket` as the first argument (no fd walk).

use aya_ebpf::{macros::fexit, programs::FExitContext};

use crate::syscalls::{client_netns, unix_eagain, SockaddrIn};

const EAGAIN: i32 = 11;

// unix_stream_connect(struct socket *sock, struct sockaddr *uaddr,
// int addr_len, int flags) on every kernel from 5.10 to 7.3 (7.x names
// the address type sockaddr_unsized; still a pointer): the return value
// is the fifth slot. The agent checks the argument count in BTF.
const RET_SLOT: usize = 4;

#[fexit(function = "unix_stream_connect")]
pub fn fexit_unix_stream_connect(ctx: FExitContext) -> i32 {
    // An int in a 64-bit slot: only the low half is the function's.
    let ret = ctx.arg::<u64>(RET_SLOT) as i32;
    if ret == -EAGAIN {
        let addr: u64 = ctx.arg(1);
        let addrlen = ctx.arg::<u64>(2) as u32 as u64;
        unix_eagain(addr, addrlen, SockaddrIn::Kernel, client_netns);
    } else if ret == 0 {
        let socket: u64 = ctx.arg(0);
        crate::accept::unix_arrival_of_socket(socket as *const u8);
    }
    0
}
