//! Where a listener lives: its cgroup (and from that the container or
//! systemd unit), the sysctls of its network namespace, and its command
//! line.
//!
//! The eBPF side only hands us numbers: a cgroup v2 id
//! (`sk_cgrp_data.cgroup->kn->id`) and a netns inode (`net.ns.inum`).
//! Everything here turns those into names an operator recognises, reading
//! /sys/fs/cgroup and /proc, and treats anything that vanishes mid-read
//! (containers come and go) as "unknown", never as an error worth dying for.

use std::{
    collections::HashMap,
    ffi::OsString,
    fs, io,
    os::unix::{
        ffi::OsStringExt,
        fs::{DirEntryExt, MetadataExt},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;
use thiserror::Error;

use crate::enrich::sockdiag::SockDiagError;

/// Where systemd (pure v2) mounts the cgroup2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A miss triggers a full walk of the cgroup tree; on a node with
/// thousands of pods that is thousands of readdirs, so a stream of events
/// from a cgroup we cannot find (it was removed, or lives outside our
/// mount) must not turn into a stream of walks.
pub const MIN_REBUILD: Duration = Duration::from_millis(1000);

/// Real trees are shallow (a Kubernetes container is 4 levels down, a
/// systemd service inside a container some 8); the bound only stops a
/// pathological or looping tree from running away.
const MAX_DEPTH: usize = 32;

/// Cap on cgroups remembered per walk so memory stays bounded whatever
/// the node runs.
const MAX_CGROUPS: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ContextError {
    #[error("no cgroup2 mount found in {mountinfo}: cgroup ids cannot be resolved to paths")]
    NoCgroup2 { mountinfo: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot open network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path} (setns needs CAP_SYS_ADMIN): {source}")]
    EnterNetns { path: PathBuf, source: io::Error },
    #[error("cannot start a thread to read the sysctls of network namespace {path}: {source}")]
    SpawnThread { path: PathBuf, source: io::Error },
}

/// What the last walks could not see, for the exit summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CgroupStats {
    pub rebuilds: u64,
    /// Directories removed between being listed and being read.
    pub vanished: u64,
    /// Directories not descended into because of [`MAX_DEPTH`] or
    /// [`MAX_CGROUPS`].
    pub truncated: u64,
}

/// Cgroup v2 id -> path relative to the cgroup2 mount.
///
/// The id the kernel exposes (`cgroup_id()`, `bpf_get_current_cgroup_id()`,
/// `kn->id`) is the kernfs node id, which on 64-bit kernels is also the
/// inode number of the cgroup's directory. There is no reverse lookup in
/// the kernel, so we walk the tree and remember every directory's inode.
pub struct CgroupResolver {
    root: PathBuf,
    min_rebuild: Duration,
    paths: HashMap<u64, String>,
    last_build: Option<Instant>,
    stats: CgroupStats,
}

impl CgroupResolver {
    /// `cgroup_root` must be a cgroup2 mount (normally [`CGROUP_ROOT`]);
    /// on a hybrid host that is /sys/fs/cgroup/unified, see
    /// [`CgroupResolver::system`].
    pub fn new(cgroup_root: impl Into<PathBuf>) -> Self {
        Self::with_min_rebuild(cgroup_root, MIN_REBUILD)
    }

    pub fn with_min_rebuild(cgroup_root: impl Into<PathBuf>, min_rebuild: Duration) -> Self {
        CgroupResolver {
            root: cgroup_root.into(),
            min_rebuild,
            paths: HashMap::new(),
            last_build: None,
            stats: CgroupStats::default(),
        }
    }

    /// A resolver on this host's cgroup2 mount, found in
    /// /proc/self/mountinfo: on hybrid hosts /sys/fs/cgroup is a tmpfs of
    /// v1 hierarchies whose inodes are NOT cgroup v2 ids, and walking it
    /// would give wrong answers rather than none.
    pub fn system() -> Result<Self, ContextError> {
        let mountinfo = PathBuf::from("/proc/self/mountinfo");
        let text = fs::read_to_string(&mountinfo).map_err(|source| ContextError::Read {
            path: mountinfo.clone(),
            source,
        })?;
        let root = cgroup2_mount_point(&text).ok_or(ContextError::NoCgroup2 { mountinfo })?;
        Ok(Self::new(root))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stats(&self) -> CgroupStats {
        self.stats
    }

    /// The cgroup's path relative to the mount ("/" for the root,
    /// "/system.slice/nginx.service"...), or `None` for id 0 (no cgroup
    /// recorded), a cgroup removed since, or one outside this mount (e.g.
    /// above our cgroup namespace).
    pub fn path(&mut self, cgroup_id: u64) -> Option<String> {
        if cgroup_id == 0 {
            return None;
        }
        if !self.paths.contains_key(&cgroup_id) {
            let due = self
                .last_build
                .is_none_or(|last| last.elapsed() >= self.min_rebuild);
            if due {
                self.rebuild();
            }
        }
        self.paths.get(&cgroup_id).cloned()
    }

    /// Re-walks the whole tree. Removed cgroups are forgotten: kernfs
    /// allocates ids cyclically and bumps a generation in the high 32 bits
    /// when the low half wraps, so an id is never reused and keeping dead
    /// ones would only grow the map.
    pub fn rebuild(&mut self) {
        self.last_build = Some(Instant::now());
        self.stats.rebuilds += 1;
        let mut paths = HashMap::new();
        let Ok(root_meta) = fs::metadata(&self.root) else {
            self.paths = paths;
            return;
        };
        paths.insert(root_meta.ino(), "/".to_owned());
        // Depth-first with an explicit stack: no recursion to bound.
        let mut stack: Vec<(PathBuf, String, usize)> = vec![(self.root.clone(), String::new(), 0)];
        while let Some((dir, rel, depth)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    self.stats.vanished += 1;
                    continue;
                }
                Err(_) => continue,
            };
            for entry in entries {
                // An entry that fails mid-listing belongs to a directory
                // being removed: skip it, the rest is still good.
                let Ok(entry) = entry else { continue };
                // file_type() comes from readdir's d_type: no stat, and
                // it does not follow symlinks, so no loops.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if depth + 1 > MAX_DEPTH || paths.len() >= MAX_CGROUPS {
                    self.stats.truncated += 1;
                    continue;
                }
                let child_rel = format!("{rel}/{}", entry.file_name().to_string_lossy());
                // readdir's d_ino on kernfs is kernfs_ino(kn), the same
                // number stat() returns, so a directory removed between
                // readdir and here still gets its (now stale) id rather
                // than a failed stat.
                paths.insert(entry.ino(), child_rel.clone());
                stack.push((entry.path(), child_rel, depth + 1));
            }
        }
        self.paths = paths;
    }
}

/// The cgroup2 mount point named in /proc/self/mountinfo text, preferring
/// /sys/fs/cgroup, then the hybrid layout's /sys/fs/cgroup/unified, then
/// any other.
pub fn cgroup2_mount_point(mountinfo: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for line in mountinfo.lines() {
        // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        if after.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mount_point) = before.split_whitespace().nth(4) {
            found.push(unescape_mountinfo(mount_point));
        }
    }
    for preferred in [CGROUP_ROOT, "/sys/fs/cgroup/unified"] {
        if let Some(path) = found.iter().find(|p| p.as_os_str() == preferred) {
            return Some(path.clone());
        }
    }
    found.into_iter().next()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`; the
/// result stays bytes because mount points need not be UTF-8.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(digits)) = (bytes[i], octal) {
            // Above 0o377 is not an escape the kernel writes: keep as is.
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(OsString::from_vec(out))
}

/// Who runs the processes of a cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// "docker", "containerd", "cri-o", "podman" or "systemd".
    pub runtime: &'static str,
    /// The 64-hex container id, or the systemd unit name ("nginx.service").
    pub id: String,
    /// The Kubernetes pod uid, when the path has a kubepods level.
    pub pod: Option<String>,
}

/// Recognises the container or systemd service a cgroup path belongs to.
///
/// The innermost container wins over any systemd unit, because a
/// "service" inside a container (systemd running as the container's init)
/// is less useful to an operator than the container itself. `None` for
/// paths that name neither (the root, user sessions, a pod slice without
/// its container, the cgroupfs-driver Kubernetes layout whose runtime the
/// path does not say).
pub fn workload(cgroup_path: &str) -> Option<Workload> {
    let components: Vec<&str> = cgroup_path.split('/').filter(|c| !c.is_empty()).collect();
    let container = components
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, component)| {
            let parent = i.checked_sub(1).map(|p| components[p]);
            container_in(component, parent)
        });
    if let Some((runtime, id)) = container {
        return Some(Workload {
            runtime,
            id,
            pod: pod_uid(&components),
        });
    }
    let unit = components
        .iter()
        .rev()
        .find(|c| c.len() > ".service".len() && c.ends_with(".service"))?;
    Some(Workload {
        runtime: "systemd",
        id: (*unit).to_owned(),
        pod: None,
    })
}

/// (runtime, container id) if `component` names a container scope.
fn container_in(component: &str, parent: Option<&str>) -> Option<(&'static str, String)> {
    // cgroupfs driver: /docker/<id>.
    if parent == Some("docker") && is_container_id(component) {
        return Some(("docker", component.to_owned()));
    }
    // systemd driver: <prefix><id>.scope; the cgroupfs drivers of cri-o
    // and podman use the same names without ".scope".
    let name = component.strip_suffix(".scope").unwrap_or(component);
    // The conmon monitors of cri-o and podman live in "<prefix>conmon-<id>"
    // scopes of their own; they hold no listener of the workload, and the
    // id is the container's, so taking it would be misleading.
    for (prefix, runtime) in [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
    ] {
        if let Some(id) = name.strip_prefix(prefix) {
            if is_container_id(id) {
                return Some((runtime, id.to_owned()));
            }
        }
    }
    None
}

/// Runtimes name containers by 64 lowercase hex digits; requiring exactly
/// that keeps "docker-compose.scope" or "crio-conmon-<id>.scope" out.
fn is_container_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The pod uid from "kubepods-burstable-pod<uid>.slice" (systemd driver,
/// where systemd's unit-name rules forced '-' to '_') or "pod<uid>"
/// (cgroupfs driver), searched only below a kubepods level.
fn pod_uid(components: &[&str]) -> Option<String> {
    let kubepods = components.iter().position(|c| c.starts_with("kubepods"))?;
    components[kubepods..].iter().rev().find_map(|component| {
        let uid = match component.strip_suffix(".slice") {
            Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
            None => component.strip_prefix("pod")?.to_owned(),
        };
        // Ordinary pods have RFC 4122 uids; static pods a 32-hex hash.
        let plausible = !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        plausible.then_some(uid)
    })
}

/// The netns inode of a `/proc/PID/ns/net`-like file: what `ip netns
/// identify`, `lsns` and the eBPF side's `net.ns.inum` call the namespace.
pub fn netns_inode(netns_file: &Path) -> Option<u64> {
    fs::metadata(netns_file).ok().map(|m| m.ino())
}

/// The host's network namespace (`init_net`), or `None` if it cannot be
/// seen from here.
///
/// Kernel threads never leave `init_net`, so kthreadd (pid 2 in the
/// initial pid namespace) is asked first: /proc/1/ns is refused even to
/// root when pid 1 holds capabilities we lack (seen on this project's
/// sandboxed 6.18 machines), and inside a container's pid namespace pid 1
/// is the container's init, whose netns need not be the host's.
pub fn host_netns_inode() -> Option<u64> {
    let kthreadd =
        fs::read_to_string("/proc/2/comm").is_ok_and(|comm| comm.trim_end() == "kthreadd");
    if kthreadd {
        if let Some(inode) = netns_inode(Path::new("/proc/2/ns/net")) {
            return Some(inode);
        }
    }
    netns_inode(Path::new("/proc/1/ns/net"))
}

/// The per-namespace sysctls that decide listen-queue limits; `None` where
/// a value could not be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetnsSysctls {
    pub somaxconn: Option<u32>,
    pub tcp_max_syn_backlog: Option<u32>,
    pub tcp_syncookies: Option<u32>,
    pub tcp_abort_on_overflow: Option<u32>,
}

/// `/proc/PID/task/TID/ns/net` of a thread of `pid` that lives in `netns`:
/// a process's threads may live in different namespaces.
pub fn task_in_netns(pid: u32, netns: u32) -> Option<PathBuf> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|task| {
        let file = task.path().join("ns/net");
        (netns_inode(&file) == Some(u64::from(netns))).then_some(file)
    })
}

/// The sysctls as the calling thread's network namespace sees them.
pub fn read_sysctls_here() -> NetnsSysctls {
    let read = |path: &str| -> Option<u32> { fs::read_to_string(path).ok()?.trim().parse().ok() };
    NetnsSysctls {
        somaxconn: read("/proc/sys/net/core/somaxconn"),
        tcp_max_syn_backlog: read("/proc/sys/net/ipv4/tcp_max_syn_backlog"),
        tcp_syncookies: read("/proc/sys/net/ipv4/tcp_syncookies"),
        tcp_abort_on_overflow: read("/proc/sys/net/ipv4/tcp_abort_on_overflow"),
    }
}

/// The sysctls of the network namespace behind `netns_file` (e.g.
/// /proc/PID/ns/net, /proc/PID/task/TID/ns/net, /run/netns/NAME).
///
/// /proc/sys/net resolves against the netns of the *thread* that looks the
/// files up, not of the process or of /proc's mount, so the reads happen
/// on a throw-away thread that first setns()es into the namespace; the
/// namespace switch dies with the thread and no other thread of the agent
/// (tokio workers included) ever leaves the host namespace.
pub fn read_sysctls_in(netns_file: &Path) -> Result<NetnsSysctls, ContextError> {
    // One mechanism for entering a namespace: sockdiag's, which opens the
    // file on the calling thread (so the caller's view of /proc decides
    // what the path means) and setns()es a scoped thread.
    crate::enrich::sockdiag::in_netns(netns_file, read_sysctls_here).map_err(|err| match err {
        SockDiagError::OpenNetns { path, error } => ContextError::OpenNetns {
            path,
            source: error,
        },
        // EINVAL when the file is not a network namespace, EPERM without
        // CAP_SYS_ADMIN.
        SockDiagError::SetNs { path, error } => ContextError::EnterNetns {
            path,
            source: error,
        },
        other => ContextError::SpawnThread {
            path: netns_file.to_owned(),
            source: io::Error::other(other.to_string()),
        },
    })
}

/// Longest command line kept: one report line per listener should not
/// carry a JVM's 100 KiB classpath.
const MAX_CMDLINE: usize = 4096;

/// The process's arguments joined by spaces; `None` when the process is
/// gone, unreadable, or has no arguments (kernel threads, zombies).
pub fn cmdline(proc_root: &Path, pid: u32) -> Option<String> {
    let raw = fs::read(proc_root.join(pid.to_string()).join("cmdline")).ok()?;
    // Daemons that rewrite their title (nginx, php-fpm, postgres) leave a
    // single NUL-less string, sometimes padded with NULs or spaces.
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    let joined = args.join(" ");
    let trimmed = joined.trim_end();
    if trimmed.is_empty() {
        return None;
    }
    if trimmed.len() <= MAX_CMDLINE {
        return Some(trimmed.to_owned());
    }
    let mut end = MAX_CMDLINE;
    while !trimmed.is_char_boundary(end) {
        end -= 1;
    }
    Some(format!("{}...", &trimmed[..end]))
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::symlink, sync::mpsc};

    use super::*;

    const CID: &str = "3f7c2a9d0b1e4f5a6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
    // systemd's unit-name rules turn the uid's '-' into '_' in slice names.
    const POD_SLICE_UID: &str = "0f5d7a0e_3c1b_4d6e_9a2f_8b7c6d5e4f3a";
    const POD_UID: &str = "0f5d7a0e-3c1b-4d6e-9a2f-8b7c6d5e4f3a";

    fn container(runtime: &'static str, pod: Option<&str>) -> Option<Workload> {
        Some(Workload {
            runtime,
            id: CID.to_owned(),
            pod: pod.map(str::to_owned),
        })
    }

    fn unit(name: &str) -> Option<Workload> {
        Some(Workload {
            runtime: "systemd",
            id: name.to_owned(),
            pod: None,
        })
    }

    #[test]
    fn docker_under_systemd_and_cgroupfs_drivers() {
        assert_eq!(
            workload(&format!("/system.slice/docker-{CID}.scope")),
            container("docker", None)
        );
        assert_eq!(
            workload(&format!("/docker/{CID}")),
            container("docker", None)
        );
        // dockerd itself is a plain service.
        assert_eq!(
            workload("/system.slice/docker.service"),
            unit("docker.service")
        );
        // systemd as the container's init: the container is the answer.
        assert_eq!(
            workload(&format!(
                "/system.slice/docker-{CID}.scope/system.slice/nginx.service"
            )),
            container("docker", None)
        );
    }

    #[test]
    fn kubernetes_pods_on_containerd_and_cri_o() {
        let burstable = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_SLICE_UID}.slice"
        );
        assert_eq!(
            workload(&format!("{burstable}/cri-containerd-{CID}.scope")),
            container("containerd", Some(POD_UID))
        );
        // Guaranteed QoS pods sit directly under kubepods.slice.
        assert_eq!(
            workload(&format!(
                "/kubepods.slice/kubepods-pod{POD_SLICE_UID}.slice/cri-containerd-{CID}.scope"
            )),
            container("containerd", Some(POD_UID))
        );
        assert_eq!(
            workload(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod{POD_SLICE_UID}.slice/crio-{CID}.scope"
            )),
            container("cri-o", Some(POD_UID))
        );
        // Docker as the Kubernetes runtime (dockershim, cri-dockerd).
        assert_eq!(
            workload(&format!("{burstable}/docker-{CID}.scope")),
            container("docker", Some(POD_UID))
        );
        // cri-o's conmon monitor is not the workload.
        assert_eq!(
            workload(&format!("{burstable}/crio-conmon-{CID}.scope")),
            None
        );
        // The pod slice alone names no container.
        assert_eq!(workload(&burstable), None);
        // Static pods have a 32-hex hash for a uid.
        assert_eq!(
            workload(&format!(
                "/kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-podd41d8cd98f00b204e9800998ecf8427e.slice/cri-containerd-{CID}.scope"
            )),
            container("containerd", Some("d41d8cd98f00b204e9800998ecf8427e"))
        );
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        // cri-o keeps its prefix under the cgroupfs driver.
        assert_eq!(
            workload(&format!("/kubepods/burstable/pod{POD_UID}/crio-{CID}")),
            container("cri-o", Some(POD_UID))
        );
        // containerd's cgroupfs layout is a bare id: the runtime is not in
        // the path, and guessing one would be inventing it.
        assert_eq!(
            workload(&format!("/kubepods/burstable/pod{POD_UID}/{CID}")),
            None
        );
    }

    #[test]
    fn podman_rootful_rootless_and_conmon() {
        assert_eq!(
            workload(&format!("/machine.slice/libpod-{CID}.scope")),
            container("podman", None)
        );
        // --cgroups=split / systemd in the container adds a child cgroup.
        assert_eq!(
            workload(&format!("/machine.slice/libpod-{CID}.scope/container")),
            container("podman", None)
        );
        assert_eq!(
            workload(&format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope"
            )),
            container("podman", None)
        );
        assert_eq!(
            workload(&format!("/machine.slice/libpod-conmon-{CID}.scope")),
            None
        );
        assert_eq!(
            workload(&format!("/libpod_parent/libpod-{CID}")),
            container("podman", None)
        );
    }

    #[test]
    fn systemd_system_and_user_services() {
        assert_eq!(
            workload("/system.slice/nginx.service"),
            unit("nginx.service")
        );
        assert_eq!(
            workload("/system.slice/system-getty.slice/getty@tty1.service"),
            unit("getty@tty1.service")
        );
        assert_eq!(
            workload("/user.slice/user-1000.slice/user@1000.service/app.slice/syncthing.service"),
            unit("syncthing.service")
        );
        assert_eq!(
            workload("/system.slice/php8.2-fpm.service/"),
            unit("php8.2-fpm.service")
        );
    }

    #[test]
    fn paths_that_name_no_workload() {
        for path in [
            "",
            "/",
            "/init.scope",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice",
            "/.service",
            "/system.slice/docker-abc123.scope",
            "/system.slice/docker-compose.scope",
            // Runtimes write ids in lowercase only.
            &format!("/system.slice/docker-{}.scope", CID.to_uppercase()),
            &format!("/system.slice/docker-{CID}0.scope"),
            &format!("/notdocker/{CID}"),
        ] {
            assert_eq!(workload(path), None, "{path}");
        }
    }

    fn ino(path: &Path) -> u64 {
        fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn resolves_directory_inodes_to_paths() {
        let root = tempfile::tempdir().unwrap();
        let nginx = root.path().join("system.slice/nginx.service");
        let pod = root.path().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_SLICE_UID}.slice/cri-containerd-{CID}.scope"
        ));
        fs::create_dir_all(&nginx).unwrap();
        fs::create_dir_all(&pod).unwrap();
        fs::write(root.path().join("cgroup.procs"), "").unwrap();
        fs::write(nginx.join("cgroup.procs"), "").unwrap();

        let mut resolver = CgroupResolver::with_min_rebuild(root.path(), Duration::ZERO);
        assert_eq!(
            resolver.path(ino(&nginx)).as_deref(),
            Some("/system.slice/nginx.service")
        );
        let pod_path = resolver.path(ino(&pod)).unwrap();
        assert!(pod_path.starts_with("/kubepods.slice/kubepods-burstable.slice/"));
        assert_eq!(workload(&pod_path), container("containerd", Some(POD_UID)));
        assert_eq!(resolver.path(ino(root.path())).as_deref(), Some("/"));
        // Files are not cgroups.
        assert_eq!(resolver.path(ino(&nginx.join("cgroup.procs"))), None);
        assert_eq!(resolver.path(0), None);
        assert_eq!(resolver.stats().vanished, 0);
    }

    #[test]
    fn a_miss_rebuilds_but_not_more_often_than_allowed() {
        let root = tempfile::tempdir().unwrap();
        let mut resolver = CgroupResolver::with_min_rebuild(root.path(), Duration::from_secs(3600));
        assert_eq!(resolver.path(u64::MAX), None);
        assert_eq!(resolver.stats().rebuilds, 1);
        let late = root.path().join("late.service");
        fs::create_dir(&late).unwrap();
        // Not seen until the interval passes...
        assert_eq!(resolver.path(ino(&late)), None);
        assert_eq!(resolver.stats().rebuilds, 1);
        // ...or until someone asks for a rebuild.
        resolver.rebuild();
        assert_eq!(resolver.path(ino(&late)).as_deref(), Some("/late.service"));
        // Hits never rebuild.
        assert_eq!(resolver.stats().rebuilds, 2);
        assert_eq!(CgroupResolver::new(root.path()).min_rebuild, MIN_REBUILD);
    }

    #[test]
    fn removed_cgroups_are_forgotten_on_rebuild() {
        let root = tempfile::tempdir().unwrap();
        let gone = root.path().join("gone.scope");
        fs::create_dir(&gone).unwrap();
        let gone_id = ino(&gone);
        let mut resolver = CgroupResolver::with_min_rebuild(root.path(), Duration::ZERO);
        assert!(resolver.path(gone_id).is_some());
        fs::remove_dir(&gone).unwrap();
        resolver.rebuild();
        assert_eq!(resolver.path(gone_id), None);
    }

    #[test]
    fn depth_is_bounded_and_symlinks_are_not_followed() {
        let root = tempfile::tempdir().unwrap();
        let mut deep = root.path().to_path_buf();
        for level in 0..MAX_DEPTH + 3 {
            deep.push(format!("l{level}"));
        }
        fs::create_dir_all(&deep).unwrap();
        let mut at_limit = root.path().to_path_buf();
        for level in 0..MAX_DEPTH {
            at_limit.push(format!("l{level}"));
        }
        // A loop a naive walk would never leave.
        symlink(root.path(), root.path().join("l0/loop")).unwrap();

        let mut resolver = CgroupResolver::with_min_rebuild(root.path(), Duration::ZERO);
        assert!(resolver.path(ino(&at_limit)).is_some());
        assert_eq!(resolver.path(ino(&deep)), None);
        assert!(resolver.stats().truncated >= 1);
    }

    #[test]
    fn missing_root_and_churn_never_panic() {
        let mut missing = CgroupResolver::with_min_rebuild("/nonexistent/cgroup", Duration::ZERO);
        assert_eq!(missing.path(1), None);

        let root = tempfile::tempdir().unwrap();
        let churn_root = root.path().to_path_buf();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                // Containers starting and stopping during a walk.
                let mut round = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && round < 100_000 {
                    let dir = churn_root.join(format!("pod{}/c/d", round % 8));
                    let _ = fs::create_dir_all(&dir);
                    let _ = fs::remove_dir_all(churn_root.join(format!("pod{}", (round + 4) % 8)));
                    round += 1;
                }
            });
            let mut resolver = CgroupResolver::with_min_rebuild(root.path(), Duration::ZERO);
            for _ in 0..300 {
                resolver.rebuild();
                assert_eq!(resolver.path(ino(root.path())).as_deref(), Some("/"));
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }

    // This machine's layout: /sys/fs/cgroup is a tmpfs of v1 hierarchies
    // and cgroup2 sits at /sys/fs/cgroup/unified.
    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_cgroup2_mount() {
        assert_eq!(
            cgroup2_mount_point(HYBRID_MOUNTINFO),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "\
22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
99 28 0:40 / /mnt/my\\040cg rw shared:50 - cgroup2 cgroup2 rw
26 23 0:24 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        assert_eq!(
            cgroup2_mount_point(unified),
            Some(PathBuf::from(CGROUP_ROOT))
        );
        assert_eq!(
            cgroup2_mount_point(&unified.replace("/sys/fs/cgroup ", "/elsewhere ")),
            Some(PathBuf::from("/mnt/my cg"))
        );
        assert_eq!(cgroup2_mount_point(""), None);
        assert_eq!(cgroup2_mount_point("garbage\n1 2 3\n"), None);
        assert_eq!(
            unescape_mountinfo("a\\134b\\011\\\\9\\"),
            PathBuf::from("a\\b\t\\\\9\\")
        );
    }

    use crate::testing::{is_root, skip};

    /// The kernel's own cgroup id for `dir`: cgroup2's file handle is the
    /// 8-byte kernfs id (FILEID_KERNFS), the number bpf and systemd use.
    fn kernel_cgroup_id(dir: &Path) -> Option<u64> {
        #[repr(C)]
        struct Handle {
            handle_bytes: u32,
            handle_type: i32,
            f_handle: [u8; 8],
        }
        let mut handle = Handle {
            handle_bytes: 8,
            handle_type: 0,
            f_handle: [0; 8],
        };
        let mut mount_id = 0;
        let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: handle has room for the 8 bytes announced in
        // handle_bytes; both pointers outlive the call.
        let rc = unsafe {
            libc::name_to_handle_at(
                libc::AT_FDCWD,
                c_path.as_ptr(),
                (&raw mut handle).cast(),
                &mut mount_id,
                0,
            )
        };
        (rc == 0 && handle.handle_bytes == 8).then(|| u64::from_ne_bytes(handle.f_handle))
    }

    #[test]
    fn live_own_cgroup_resolves_through_its_id() {
        let Ok(mut resolver) = CgroupResolver::system() else {
            skip(
                "live_own_cgroup_resolves_through_its_id",
                "no cgroup2 mount",
            );
            return;
        };
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let own_path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("a cgroup2 line in /proc/self/cgroup");
        let dir = resolver.root().join(own_path.trim_start_matches('/'));
        let id = ino(&dir);
        let resolved = resolver.path(id);
        eprintln!(
            "cgroup2 mount {}; own cgroup {own_path:?} has id {id} (kernel id {:?}) -> {resolved:?}, workload {:?}",
            resolver.root().display(),
            kernel_cgroup_id(&dir),
            resolved.as_deref().and_then(workload),
        );
        assert_eq!(resolved.as_deref(), Some(own_path));
        if let Some(kernel_id) = kernel_cgroup_id(&dir) {
            assert_eq!(kernel_id, id, "directory inode is not the cgroup id");
        }

        // A child cgroup of our own, to check a non-root id too.
        if !is_root() {
            skip(
                "live_own_cgroup_resolves_through_its_id",
                "the child cgroup needs root",
            );
            return;
        }
        let child = dir.join(format!("backlog-test-{}", std::process::id()));
        if let Err(err) = fs::create_dir(child.join("nginx.service").parent().unwrap()) {
            skip(
                "live_own_cgroup_resolves_through_its_id",
                &format!("cannot create a child cgroup: {err}"),
            );
            return;
        }
        struct Remove<'a>(&'a Path);
        impl Drop for Remove<'_> {
            fn drop(&mut self) {
                let _ = fs::remove_dir(self.0.join("nginx.service"));
                let _ = fs::remove_dir(self.0);
            }
        }
        let _guard = Remove(&child);
        fs::create_dir(child.join("nginx.service")).unwrap();
        let service = child.join("nginx.service");
        let service_id = ino(&service);
        let expected = format!(
            "{}/backlog-test-{}/nginx.service",
            own_path.trim_end_matches('/'),
            std::process::id()
        );
        resolver.rebuild();
        let resolved = resolver.path(service_id);
        eprintln!("child cgroup {expected} has id {service_id} -> {resolved:?}");
        assert_eq!(resolved, Some(expected));
        if let Some(kernel_id) = kernel_cgroup_id(&service) {
            assert_eq!(kernel_id, service_id);
        }
    }

    #[test]
    fn cmdline_joins_arguments_and_handles_rewritten_titles() {
        let proc_root = tempfile::tempdir().unwrap();
        let write = |pid: u32, bytes: &[u8]| {
            let dir = proc_root.path().join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            fs::write(dir.join("cmdline"), bytes).unwrap();
        };
        write(1, b"nginx\0-g\0daemon off;\0");
        write(2, b"php-fpm: pool www\0\0\0\0\0\0");
        write(3, b"postgres: checkpointer   ");
        write(4, b"");
        write(5, &[b'x'; MAX_CMDLINE + 100]);
        write(6, b"caf\xc3\xa9\0\xff\0");
        let root = proc_root.path();
        assert_eq!(cmdline(root, 1).as_deref(), Some("nginx -g daemon off;"));
        assert_eq!(cmdline(root, 2).as_deref(), Some("php-fpm: pool www"));
        assert_eq!(cmdline(root, 3).as_deref(), Some("postgres: checkpointer"));
        // Kernel threads and zombies have an empty cmdline.
        assert_eq!(cmdline(root, 4), None);
        let long = cmdline(root, 5).unwrap();
        assert_eq!(long.len(), MAX_CMDLINE + 3);
        assert!(long.ends_with("..."));
        assert_eq!(cmdline(root, 6).as_deref(), Some("café \u{fffd}"));
        // The process exited.
        assert_eq!(cmdline(root, 7), None);
        let own = cmdline(Path::new("/proc"), std::process::id()).unwrap();
        assert!(!own.contains('\0'), "{own:?}");
    }

    #[test]
    fn errors_name_the_path_on_one_line() {
        let err = read_sysctls_in(Path::new("/nonexistent/ns/net")).unwrap_err();
        assert!(matches!(err, ContextError::OpenNetns { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("/nonexistent/ns/net"), "{message}");
        assert!(!message.contains('\n'), "{message}");

        // Not a namespace file at all: setns refuses it (EINVAL).
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = read_sysctls_in(file.path()).unwrap_err();
        assert!(matches!(err, ContextError::EnterNetns { .. }), "{err:?}");
        assert!(err.to_string().contains(&file.path().display().to_string()));

        let err = ContextError::NoCgroup2 {
            mountinfo: "/proc/self/mountinfo".into(),
        };
        assert!(err.to_string().contains("/proc/self/mountinfo"));
    }

    #[test]
    fn live_host_sysctls_are_readable() {
        let here = read_sysctls_here();
        let somaxconn: Option<u32> = fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        assert_eq!(here.somaxconn, somaxconn);
        assert!(here.tcp_syncookies.is_some(), "{here:?}");
        if is_root() {
            let host_ns = host_netns_inode();
            eprintln!(
                "host netns {host_ns:?}, ours {:?}",
                netns_inode(Path::new("/proc/self/ns/net"))
            );
            assert!(host_ns.is_some());
            assert_eq!(
                read_sysctls_in(Path::new("/proc/self/ns/net")).unwrap(),
                here
            );
        }
    }

    #[test]
    fn live_sysctls_are_read_from_the_target_namespace() {
        if !is_root() {
            skip(
                "live_sysctls_are_read_from_the_target_namespace",
                "needs root to unshare a network namespace",
            );
            return;
        }
        let host = read_sysctls_here();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(u32, i32), String>>();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            // SAFETY: unshare(CLONE_NEWNET) affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let _ = ready_tx.send(Err(io::Error::last_os_error().to_string()));
                return;
            }
            let set = fs::write("/proc/sys/net/core/somaxconn", "77");
            if let Err(err) = set {
                let _ = ready_tx.send(Err(format!("set somaxconn: {err}")));
                return;
            }
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let _ = ready_tx.send(Ok((std::process::id(), tid)));
            // Keep the namespace alive (it dies with its last thread)
            // until the main thread has read it; a dropped sender also
            // releases us if the test fails first.
            let _ = done_rx.recv();
        });
        let (pid, tid) = match ready_rx.recv().unwrap() {
            Ok(ids) => ids,
            Err(err) => {
                drop(done_tx);
                holder.join().unwrap();
                skip(
                    "live_sysctls_are_read_from_the_target_namespace",
                    &format!("cannot unshare a network namespace: {err}"),
                );
                return;
            }
        };
        let ns_file = PathBuf::from(format!("/proc/{pid}/task/{tid}/ns/net"));
        let inside = read_sysctls_in(&ns_file);
        let here_after = read_sysctls_here();
        let ns_inode = netns_inode(&ns_file);
        drop(done_tx);
        holder.join().unwrap();

        let inside = inside.unwrap();
        eprintln!(
            "netns {ns_inode:?} (host {:?}): {inside:?}; host: {here_after:?}",
            host_netns_inode()
        );
        assert_eq!(inside.somaxconn, Some(77));
        // Fresh namespaces get the defaults, not the host's values.
        assert!(inside.tcp_max_syn_backlog.is_some());
        assert!(inside.tcp_syncookies.is_some());
        assert!(inside.tcp_abort_on_overflow.is_some());
        assert_eq!(here_after, host);
        assert_ne!(here_after.somaxconn, Some(77));
        assert_ne!(ns_inode, host_netns_inode());
    }
}
