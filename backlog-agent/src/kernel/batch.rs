//! A hash map read and emptied with BPF_MAP_LOOKUP_AND_DELETE_BATCH (5.6+):
//! a few syscalls for the whole map, where iterating and removing costs
//! three per entry. The peers of suppressed SYNs fill thousands of
//! entries a second in a spoofed-source flood, and emptying them one by
//! one was most of the agent's CPU there (about 9,000 bpf() calls a
//! second).

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{maps::MapData, Pod};
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per call: a hash bucket larger than this makes the
/// kernel answer ENOSPC, then the call is retried with room for more.
const CHUNK: usize = 1024;

/// Takes every entry out of the hash map `map` (keys `K`, values `V`).
/// Err when the kernel refuses the command on its first call (too old, or
/// not a hash map); entries a later failed call left behind stay for the
/// next read.
pub fn take_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // Where to go on: a bucket index, a u32 for hash maps.
    let mut token_in: u32 = 0;
    let mut token_out: u32 = 0;
    let mut first = true;
    loop {
        let mut keys: Vec<MaybeUninit<K>> = Vec::with_capacity(chunk);
        let mut values: Vec<MaybeUninit<V>> = Vec::with_capacity(chunk);
        // SAFETY: bpf_attr is plain data; zero is its "unset" for every
        // field this command does not use.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the batch member of a zeroed union.
        unsafe {
            let batch = &mut attr.batch;
            batch.in_batch = if first {
                0
            } else {
                std::ptr::addr_of!(token_in) as u64
            };
            batch.out_batch = std::ptr::addr_of_mut!(token_out) as u64;
            batch.keys = keys.as_mut_ptr() as u64;
            batch.values = values.as_mut_ptr() as u64;
            batch.count = chunk as u32;
            batch.map_fd = fd as u32;
        }
        // The kernel writes at most `count` keys and values into buffers
        // of that capacity, and one token into token_out.
        let err = bpf(bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_BATCH, &mut attr).err();
        let errno = err.as_ref().and_then(io::Error::raw_os_error);
        // The kernel sets count to the entries it wrote on success, on
        // ENOENT (no more buckets) and on ENOSPC; on any other error the
        // buffers are not to be trusted.
        let count = match errno {
            None | Some(libc::ENOENT) | Some(libc::ENOSPC) => {
                // SAFETY: reading the member the kernel wrote.
                (unsafe { attr.batch.count } as usize).min(chunk)
            }
            Some(_) => 0,
        };
        // SAFETY: the first `count` keys and values were written.
        unsafe {
            keys.set_len(count);
            values.set_len(count);
        }
        out.extend(
            keys.into_iter()
                .zip(values)
                // SAFETY: written by the kernel (see above).
                .map(|(k, v)| unsafe { (k.assume_init(), v.assume_init()) }),
        );
        match err {
            None => {}
            Some(_) if errno == Some(libc::ENOENT) => return Ok(out),
            Some(_) if errno == Some(libc::ENOSPC) && chunk < 1 << 16 => {
                // The next bucket holds more than `chunk`: ask again with
                // more room, from that bucket (the kernel said where).
                chunk *= 4;
            }
            Some(e) if first => return Err(e),
            Some(_) => return Ok(out),
        }
        first = false;
        token_in = token_out;
    }
}

/// bpf(2) with `attr`, whose pointers must outlive the call.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: the kernel reads and writes only within `attr` and the
    // buffers its fields point at, which the caller keeps alive.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_int,
            std::ptr::from_mut(attr),
            size_of::<bpf_attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    use super::*;

    /// bpf(2) on a zeroed attr that `fill` sets up.
    fn bpf_with(cmd: bpf_cmd, fill: impl FnOnce(&mut bpf_attr)) -> io::Result<i64> {
        // SAFETY: plain data, zero is "unset".
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        fill(&mut attr);
        bpf(cmd, &mut attr)
    }

    /// An LRU hash map like SUPPRESSED_PEERS (u64 keys here), filled with
    /// `n` entries.
    fn lru_map(n: u64) -> MapData {
        let fd = bpf_with(bpf_cmd::BPF_MAP_CREATE, |attr| {
            // SAFETY: the map-create member of a zeroed union.
            let create = unsafe { &mut attr.__bindgen_anon_1 };
            create.map_type = aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32;
            create.key_size = 8;
            create.value_size = 8;
            create.max_entries = 8192;
        })
        .expect("BPF_MAP_CREATE");
        // SAFETY: a new fd the kernel just gave us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let raw = fd.as_raw_fd();
        for key in 0..n {
            let value = key * 10;
            bpf_with(bpf_cmd::BPF_MAP_UPDATE_ELEM, |attr| {
                // SAFETY: the element member of a zeroed union.
                let elem = unsafe { &mut attr.__bindgen_anon_2 };
                elem.map_fd = raw as u32;
                elem.key = std::ptr::addr_of!(key) as u64;
                elem.__bindgen_anon_1.value = std::ptr::addr_of!(value) as u64;
            })
            .expect("BPF_MAP_UPDATE_ELEM");
        }
        MapData::from_fd(fd).expect("MapData::from_fd")
    }

    #[test]
    fn takes_every_entry_and_leaves_the_map_empty() {
        let test = "takes_every_entry_and_leaves_the_map_empty";
        if !crate::testing::is_root() {
            return crate::testing::skip(test, "needs root (BPF maps)");
        }
        // More than one chunk, so the kernel's bucket token is followed
        // (and well under what the LRU map keeps per CPU before evicting).
        let n = 2 * CHUNK as u64 + 17;
        let map = lru_map(n);
        let mut taken: Vec<(u64, u64)> = take_all(&map).expect("batch read");
        taken.sort_unstable();
        let expected: Vec<(u64, u64)> = (0..n).map(|k| (k, k * 10)).collect();
        assert_eq!(taken.len(), expected.len());
        assert_eq!(taken, expected);
        let again: Vec<(u64, u64)> = take_all(&map).expect("second batch read");
        assert!(again.is_empty(), "entries left behind: {}", again.len());
    }
}
