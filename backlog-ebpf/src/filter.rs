//! In-kernel filters (`--port`, `--netns`, `--pid`, `--cgroup`,
//! `--unix-path`): one check per hook, made right after the listener (or
//! the UNIX path) is read and before anything is counted or queued, so a
//! storm on a listener nobody asked about costs a few map lookups and no
//! ring-buffer traffic.
//!
//! Within one filter any value matches; across filters all must match. A
//! filter that cannot apply to a record (a port to a UNIX path, a UNIX
//! path to a TCP listener) does not match it: `--port 80` shows no UNIX
//! connects, `--unix-path` alone no TCP drops.

use aya_ebpf::{macros::map, maps::HashMap};
use backlog_common::{
    FilterConfig, FILTER_CGROUP, FILTER_NETNS, FILTER_PORT, FILTER_SOCKET, FILTER_TCP,
    FILTER_UNIX_PATH, UNIX_PATH_MAX,
};

/// Written by the agent before load.
#[no_mangle]
static FILTER: FilterConfig = FilterConfig::NONE;

#[map]
static FILTER_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(64, 0);
#[map]
static FILTER_NAMESPACES: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);
/// Socket inodes held by the `--pid` processes at start-up, and those
/// their later listen() calls create (added here, in the kernel, so that
/// the first drops at a new listener are not missed).
#[map]
static FILTER_SOCKETS: HashMap<u64, u8> = HashMap::with_max_entries(8192, 0);
/// The `--pid` processes (tgids).
#[map]
static FILTER_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);
#[map]
static FILTER_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(8192, 0);
/// Paths NUL-padded to the full sun_path size.
#[map]
static FILTER_UNIX_PATHS: HashMap<[u8; UNIX_PATH_MAX], u8> = HashMap::with_max_entries(64, 0);

#[inline(always)]
fn flags() -> u32 {
    // Volatile, like OFFSETS: the agent rewrites the initialiser.
    unsafe { core::ptr::read_volatile(&FILTER) }.flags
}

/// Whether a drop at this TCP listener is wanted.
#[inline(always)]
pub fn wants_listener(
    port: u16,
    netns: u32,
    socket_inode: u64,
    cgroup_id: impl FnOnce() -> u64,
) -> bool {
    let flags = flags();
    if flags == 0 {
        return true;
    }
    if flags & FILTER_TCP == 0 {
        return false;
    }
    // SAFETY (all lookups): the values are only tested for presence.
    (flags & FILTER_PORT == 0 || unsafe { FILTER_PORTS.get(port) }.is_some())
        && (flags & FILTER_NETNS == 0 || unsafe { FILTER_NAMESPACES.get(netns) }.is_some())
        && (flags & FILTER_SOCKET == 0 || unsafe { FILTER_SOCKETS.get(socket_inode) }.is_some())
        && (flags & FILTER_CGROUP == 0 || unsafe { FILTER_CGROUPS.get(cgroup_id()) }.is_some())
}

/// Whether an EAGAIN connect() to this UNIX path is wanted. `path` is
/// what connect() passed; bytes after the name's NUL are cleared here so
/// that it compares equal to the agent's NUL-padded key. Abstract names
/// (leading NUL) are matched over `len` bytes.
#[inline(always)]
pub fn wants_unix_path(path: &mut [u8; UNIX_PATH_MAX], len: u32) -> bool {
    let flags = flags();
    if flags == 0 {
        return true;
    }
    if flags & FILTER_UNIX_PATH == 0 {
        return false;
    }
    let abstract_name = path[0] == 0;
    let mut ended = false;
    for (i, byte) in path.iter_mut().enumerate() {
        if (i as u32) >= len || (!abstract_name && *byte == 0) {
            ended = true;
        }
        if ended {
            *byte = 0;
        }
    }
    unsafe { FILTER_UNIX_PATHS.get(path) }.is_some()
}

/// Called for every successful listen(): a `--pid` process's new
/// listener joins the filter.
#[inline(always)]
pub fn note_listen(pid: u32, socket_inode: u64) {
    if flags() & FILTER_SOCKET == 0 || socket_inode == 0 {
        return;
    }
    if unsafe { FILTER_PIDS.get(pid) }.is_some() {
        // A full map leaves the listener out; the agent sized it generously.
        let _ = FILTER_SOCKETS.insert(socket_inode, 1, 0);
    }
}
