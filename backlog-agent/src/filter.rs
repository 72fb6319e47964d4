//! `--port`, `--pid`, `--netns`, `--cgroup`, `--unix-path`: resolved here
//! into the values the kernel compares (backlog-ebpf/src/filter.rs), so
//! that drops at other listeners are neither queued nor counted.
//!
//! - `--pid`: the socket inodes behind /proc/PID/fd at start-up; the
//!   kernel side adds the sockets of the PIDs' later listen() calls.
//! - `--cgroup`: the cgroup v2 ids (directory inodes of the cgroup2 file
//!   system) of the path and every cgroup below it at start-up.
//! - `--unix-path`: the sun_path bytes, NUL-padded as the kernel side
//!   normalises them.

use std::{
    collections::BTreeSet,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap as BpfHashMap, MapError},
    Ebpf,
};
use backlog_common::{
    FilterConfig, FILTER_CGROUP, FILTER_NETNS, FILTER_PORT, FILTER_SOCKET, FILTER_TCP,
    FILTER_UNIX_PATH, UNIX_PATH_MAX,
};
use thiserror::Error;

use crate::cli::Cli;

/// Entries of the small filter maps (ports, namespaces, paths).
const MAX_VALUES: usize = 64;
/// Entries of the socket and cgroup maps.
const MAX_IDS: usize = 8192;

#[derive(Debug, Error)]
pub enum FilterError {
    #[error("--pid {pid}: cannot read /proc/{pid}/fd ({source})")]
    Pid { pid: u32, source: io::Error },
    #[error("--cgroup {path}: not a cgroup2 directory ({source})")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("--cgroup {0}: no cgroup2 mount found in /proc/self/mountinfo")]
    NoCgroup2(PathBuf),
    #[error("--unix-path {0}: longer than the {UNIX_PATH_MAX} bytes of sun_path")]
    UnixPathTooLong(String),
    #[error("{what}: at most {max} values ({count} given or found)")]
    TooMany {
        what: &'static str,
        max: usize,
        count: usize,
    },
    #[error("cannot fill the kernel's filter map {map}: {source}")]
    Map { map: &'static str, source: MapError },
}

/// The filters of one run, resolved.
#[derive(Debug, Default)]
pub struct Filters {
    ports: Vec<u16>,
    pids: Vec<u32>,
    sockets: BTreeSet<u64>,
    netns: Vec<u32>,
    cgroups: Vec<(PathBuf, BTreeSet<u64>)>,
    unix_paths: Vec<String>,
}

impl Filters {
    pub fn resolve(cli: &Cli) -> Result<Filters, FilterError> {
        let mut filters = Filters {
            ports: dedup(&cli.port),
            pids: dedup(&cli.pid),
            netns: dedup(&cli.netns),
            unix_paths: dedup(&cli.unix_path),
            ..Filters::default()
        };
        for &pid in &filters.pids {
            let inodes = crate::enrich::attribution::socket_inodes(
                &Path::new("/proc").join(pid.to_string()),
            )
            .map_err(|source| FilterError::Pid { pid, source })?;
            filters.sockets.extend(inodes);
        }
        for path in dedup(&cli.cgroup) {
            let dir = cgroup_dir(&path)?;
            let mut ids = BTreeSet::new();
            collect_cgroup_ids(&dir, &mut ids).map_err(|source| FilterError::Cgroup {
                path: path.clone(),
                source,
            })?;
            filters.cgroups.push((path, ids));
        }
        for path in &filters.unix_paths {
            if path.len() > UNIX_PATH_MAX {
                return Err(FilterError::UnixPathTooLong(path.clone()));
            }
        }
        let cgroup_ids: usize = filters.cgroups.iter().map(|(_, ids)| ids.len()).sum();
        for (what, max, count) in [
            ("--port", MAX_VALUES, filters.ports.len()),
            ("--netns", MAX_VALUES, filters.netns.len()),
            ("--pid", MAX_VALUES, filters.pids.len()),
            ("--unix-path", MAX_VALUES, filters.unix_paths.len()),
            ("--pid sockets", MAX_IDS, filters.sockets.len()),
            ("--cgroup cgroups", MAX_IDS, cgroup_ids),
        ] {
            if count > max {
                return Err(FilterError::TooMany { what, max, count });
            }
        }
        Ok(filters)
    }

    /// The flags the kernel side reads before load.
    pub fn config(&self) -> FilterConfig {
        let mut flags = 0;
        for (on, flag) in [
            (!self.ports.is_empty(), FILTER_PORT),
            (!self.netns.is_empty(), FILTER_NETNS),
            (!self.pids.is_empty(), FILTER_SOCKET),
            (!self.cgroups.is_empty(), FILTER_CGROUP),
            (!self.unix_paths.is_empty(), FILTER_UNIX_PATH),
        ] {
            if on {
                flags |= flag;
            }
        }
        FilterConfig { flags, _pad0: 0 }
    }

    pub fn is_active(&self) -> bool {
        self.config().flags != 0
    }

    /// Whether a filter narrows below whole network namespaces: then the
    /// kernel's per-namespace counters cannot be split to match it.
    pub fn narrower_than_netns(&self) -> bool {
        self.config().flags & !FILTER_NETNS != 0
    }

    /// The part of the filters that user space applies to what the kernel
    /// does not filter itself: the accept-queue figures and near-full
    /// warnings (accept.rs keeps them per (netns, port), before a listener
    /// is known).
    pub fn row_filter(&self) -> RowFilter {
        RowFilter {
            flags: self.config().flags,
            ports: self.ports.iter().copied().collect(),
            netns: self.netns.iter().copied().collect(),
            sockets: self.sockets.clone(),
        }
    }

    pub fn wants_netns(&self, netns: u64) -> bool {
        self.netns.is_empty() || self.netns.iter().any(|&n| u64::from(n) == netns)
    }

    /// Writes the values into the kernel's maps (before `ready`; the
    /// kernel adds the sockets of the PIDs' later listen() calls itself).
    pub fn install(&self, ebpf: &mut Ebpf) -> Result<(), FilterError> {
        fill(ebpf, "FILTER_PORTS", self.ports.iter().copied())?;
        fill(ebpf, "FILTER_NAMESPACES", self.netns.iter().copied())?;
        fill(
            ebpf,
            "FILTER_CGROUPS",
            self.cgroups.iter().flat_map(|(_, ids)| ids.iter().copied()),
        )?;
        fill(
            ebpf,
            "FILTER_UNIX_PATHS",
            self.unix_paths.iter().map(|p| unix_key(p)),
        )?;
        fill(ebpf, "FILTER_SOCKETS", self.sockets.iter().copied())?;
        fill(ebpf, "FILTER_PIDS", self.pids.iter().copied())?;
        Ok(())
    }

    /// The start-up line, or `None` without filters.
    pub fn describe(&self) -> Option<String> {
        let join = |items: Vec<String>| items.join(" or ");
        let mut parts = Vec::new();
        if !self.ports.is_empty() {
            parts.push(format!(
                "port {}",
                join(self.ports.iter().map(u16::to_string).collect())
            ));
        }
        if !self.pids.is_empty() {
            parts.push(format!(
                "held by pid {} ({} sockets now; later listen() calls are added)",
                join(self.pids.iter().map(u32::to_string).collect()),
                self.sockets.len()
            ));
        }
        if !self.netns.is_empty() {
            parts.push(format!(
                "netns {}",
                join(self.netns.iter().map(u32::to_string).collect())
            ));
        }
        if !self.cgroups.is_empty() {
            parts.push(format!(
                "cgroup {}",
                join(
                    self.cgroups
                        .iter()
                        .map(|(path, ids)| format!("{} ({} cgroups)", path.display(), ids.len()))
                        .collect()
                )
            ));
        }
        let tcp = parts.join(", ");
        let unix = (!self.unix_paths.is_empty())
            .then(|| format!("UNIX connect()s to {}", join(self.unix_paths.clone())));
        let what = match (tcp.is_empty(), unix) {
            (true, None) => return None,
            (false, None) => format!("TCP listeners with {tcp} (no UNIX connect()s)"),
            (true, Some(unix)) => format!("{unix} (no TCP listeners)"),
            (false, Some(unix)) => format!("TCP listeners with {tcp}; {unix}"),
        };
        Some(format!(
            "filter (in the kernel): only {what}; drops elsewhere are neither reported nor counted"
        ))
    }
}

fn dedup<T: Ord + Clone>(values: &[T]) -> Vec<T> {
    let set: BTreeSet<T> = values.iter().cloned().collect();
    set.into_iter().collect()
}

fn fill<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: impl Iterator<Item = K>,
) -> Result<(), FilterError> {
    let map_err = |source| FilterError::Map { map: name, source };
    let map = ebpf.map_mut(name).ok_or(FilterError::Map {
        map: name,
        source: MapError::InvalidName { name: name.into() },
    })?;
    let mut map: BpfHashMap<_, K, u8> = BpfHashMap::try_from(map).map_err(map_err)?;
    for key in keys {
        map.insert(key, 1, 0).map_err(map_err)?;
    }
    Ok(())
}

/// sun_path as the kernel side compares it: the name, NUL-padded.
pub fn unix_key(path: &str) -> [u8; UNIX_PATH_MAX] {
    let mut key = [0u8; UNIX_PATH_MAX];
    let bytes = path.as_bytes();
    let len = bytes.len().min(UNIX_PATH_MAX);
    key[..len].copy_from_slice(&bytes[..len]);
    key
}

/// `path` if it is a directory of a cgroup2 file system, else the same
/// path below the cgroup2 mount (so `/system.slice/nginx.service` works
/// as systemd and /proc/PID/cgroup write it).
fn cgroup_dir(path: &Path) -> Result<PathBuf, FilterError> {
    if is_cgroup2(path) {
        return Ok(path.to_owned());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = crate::enrich::context::cgroup2_mount_point(&mountinfo)
        .ok_or_else(|| FilterError::NoCgroup2(path.to_owned()))?;
    let below = root.join(path.strip_prefix("/").unwrap_or(path));
    if is_cgroup2(&below) {
        Ok(below)
    } else {
        Err(FilterError::Cgroup {
            path: path.to_owned(),
            source: io::Error::new(
                io::ErrorKind::NotFound,
                format!("neither it nor {} is a cgroup2 directory", below.display()),
            ),
        })
    }
}

fn is_cgroup2(path: &Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(cpath) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a valid C string and a zeroed statfs for the kernel to fill.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(cpath.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == CGROUP2_SUPER_MAGIC && path.is_dir()
}

/// On cgroup2 a cgroup's id is its directory's inode number (the kernfs
/// node id the kernel side reads).
fn collect_cgroup_ids(dir: &Path, ids: &mut BTreeSet<u64>) -> io::Result<()> {
    ids.insert(fs::metadata(dir)?.ino());
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // A cgroup removed during the walk is simply not there.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = collect_cgroup_ids(&entry.path(), ids);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn filters(args: &[&str]) -> Filters {
        let mut argv = vec!["backlog-agent"];
        argv.extend_from_slice(args);
        Filters::resolve(&Cli::try_parse_from(argv).unwrap()).unwrap()
    }

    #[test]
    fn flags_follow_the_options() {
        assert_eq!(filters(&[]).config().flags, 0);
        assert!(filters(&[]).describe().is_none());
        let f = filters(&["--port", "80", "--port", "443", "--port", "80"]);
        assert_eq!(f.config().flags, FILTER_PORT);
        assert_eq!(f.ports, vec![80, 443]);
        assert!(f.narrower_than_netns());
        let line = f.describe().unwrap();
        assert!(line.contains("port 80 or 443"), "{line}");
        assert!(line.contains("no UNIX"), "{line}");
        let f = filters(&["--netns", "4026531840"]);
        assert_eq!(f.config().flags, FILTER_NETNS);
        assert!(!f.narrower_than_netns());
        assert!(f.wants_netns(4026531840) && !f.wants_netns(1));
        let f = filters(&["--unix-path", "/run/php/fpm.sock"]);
        assert_eq!(f.config().flags, FILTER_UNIX_PATH);
        assert!(f.describe().unwrap().contains("no TCP listeners"));
    }

    #[test]
    fn pid_resolves_to_its_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = {
            use std::os::fd::AsRawFd as _;
            fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd()))
                .unwrap()
                .ino()
        };
        let f = filters(&["--pid", &std::process::id().to_string()]);
        assert!(f.sockets.contains(&inode));
        assert_eq!(f.config().flags, FILTER_SOCKET);
    }

    #[test]
    fn bad_values_are_one_line_errors() {
        let cli = Cli::try_parse_from(["backlog-agent", "--pid", "4294967294"]).unwrap();
        let err = Filters::resolve(&cli).unwrap_err().to_string();
        assert!(err.starts_with("--pid 4294967294: cannot read"), "{err}");
        let cli = Cli::try_parse_from(["backlog-agent", "--cgroup", "/nonexistent/x"]).unwrap();
        assert!(Filters::resolve(&cli).is_err());
        let long = "x".repeat(UNIX_PATH_MAX + 1);
        let cli = Cli::try_parse_from(["backlog-agent", "--unix-path", long.as_str()]).unwrap();
        assert!(matches!(
            Filters::resolve(&cli),
            Err(FilterError::UnixPathTooLong(_))
        ));
    }

    #[test]
    fn unix_keys_are_nul_padded() {
        let key = unix_key("/run/a.sock");
        assert_eq!(&key[..11], b"/run/a.sock");
        assert!(key[11..].iter().all(|&b| b == 0));
    }
}

/// Filters for accept-queue rows, applied in user space. A row names its
/// listener by netns and port (TCP) or socket inode (UNIX); `--pid` and
/// `--cgroup` are matched by the listener's socket inode against the
/// sockets the kernel's filter admitted (the `--pid` sockets, and every
/// listener a drop event passed the filter for). A UNIX row's path is not
/// known here, so with any filter on, UNIX rows are left out.
#[derive(Clone, Debug, Default)]
pub struct RowFilter {
    flags: u32,
    ports: BTreeSet<u16>,
    netns: BTreeSet<u32>,
    sockets: BTreeSet<u64>,
}

impl RowFilter {
    /// A listener socket the kernel's filter let through (a drop event).
    pub fn admit(&mut self, socket_inode: u64) {
        if self.flags & (FILTER_SOCKET | FILTER_CGROUP) != 0 && socket_inode != 0 {
            self.sockets.insert(socket_inode);
        }
    }

    /// Whether figures about a TCP listener on `port` in `netns`, last
    /// seen as socket `socket_inode` (0: unknown), are wanted.
    pub fn wants_tcp(&self, netns: u32, port: u16, socket_inode: u64) -> bool {
        if self.flags == 0 {
            return true;
        }
        if self.flags & FILTER_TCP == 0 {
            return false;
        }
        (self.flags & FILTER_PORT == 0 || self.ports.contains(&port))
            && (self.flags & FILTER_NETNS == 0 || self.netns.contains(&netns))
            && (self.flags & (FILTER_SOCKET | FILTER_CGROUP) == 0
                || self.sockets.contains(&socket_inode))
    }

    pub fn wants_unix(&self) -> bool {
        self.flags == 0
    }

    pub fn wants(&self, row: &crate::enrich::accept_wait::RowListener) -> bool {
        match *row {
            crate::enrich::accept_wait::RowListener::Tcp {
                netns,
                port,
                socket_inode,
                ..
            } => self.wants_tcp(netns, port, socket_inode),
            crate::enrich::accept_wait::RowListener::Unix { .. } => self.wants_unix(),
        }
    }
}

#[cfg(test)]
mod row_filter_tests {
    use super::*;

    #[test]
    fn rows_follow_the_filters() {
        let none = RowFilter::default();
        assert!(none.wants_tcp(1, 80, 0) && none.wants_unix());
        let mut by_port = RowFilter {
            flags: FILTER_PORT,
            ports: [8080].into(),
            ..RowFilter::default()
        };
        assert!(by_port.wants_tcp(1, 8080, 0));
        assert!(!by_port.wants_tcp(1, 8081, 0));
        assert!(!by_port.wants_unix());
        by_port.admit(5);
        assert!(by_port.sockets.is_empty(), "ports need no socket list");
        let mut by_pid = RowFilter {
            flags: FILTER_SOCKET,
            ..RowFilter::default()
        };
        assert!(!by_pid.wants_tcp(1, 8080, 7));
        by_pid.admit(7);
        assert!(by_pid.wants_tcp(1, 8080, 7));
        assert!(!by_pid.wants_tcp(1, 8080, 0));
        let unix_only = RowFilter {
            flags: FILTER_UNIX_PATH,
            ..RowFilter::default()
        };
        assert!(!unix_only.wants_tcp(1, 8080, 7));
    }
}
