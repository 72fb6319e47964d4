//! Socket inode -> the processes holding that socket.
//!
//! There is no kernel interface from a socket to its owners, so, like `ss
//! -p`, this scans `/proc/PID/fd/*` for `socket:[INODE]` links. A scan is
//! costly on a busy host, so the result is cached and refreshed only on a
//! miss, and at most once per `min_rescan` so that a stream of events for
//! a listener nobody holds any more cannot turn into a stream of scans.
//! Processes that exit mid-scan or whose fds are unreadable are skipped
//! and counted, never fatal.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    /// Only with --show-cmdline: command lines can hold secrets.
    pub cmdline: Option<String>,
}

/// What scans could not see, for the exit summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    pub scans: u64,
    /// Processes that exited between listing /proc and reading their fds.
    pub vanished: u64,
    /// Processes whose fd directory could not be read (permissions).
    pub unreadable: u64,
}

pub struct SocketOwners {
    proc_root: PathBuf,
    min_rescan: Duration,
    owners: HashMap<u64, Vec<Process>>,
    last_scan: Option<Instant>,
    stats: ScanStats,
}

impl SocketOwners {
    pub fn new(proc_root: impl Into<PathBuf>, min_rescan: Duration) -> Self {
        SocketOwners {
            proc_root: proc_root.into(),
            min_rescan,
            owners: HashMap::new(),
            last_scan: None,
            stats: ScanStats::default(),
        }
    }

    /// The processes holding socket `inode`, sorted by pid; empty when none
    /// is found (the listener was closed, or is held only by a process we
    /// cannot inspect).
    pub fn lookup(&mut self, inode: u64) -> &[Process] {
        if inode != 0 && !self.owners.contains_key(&inode) {
            let due = self
                .last_scan
                .is_none_or(|last| last.elapsed() >= self.min_rescan);
            if due {
                self.rescan();
            }
        }
        self.owners.get(&inode).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// One walk of /proc: every socket inode and its holders. The resolver
    /// thread publishes the result instead of keeping it here.
    pub fn scan(&mut self) -> HashMap<u64, Vec<Process>> {
        self.rescan();
        std::mem::take(&mut self.owners)
    }

    /// Rebuilds the whole map from /proc.
    pub fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.stats.scans += 1;
        let mut owners: HashMap<u64, Vec<Process>> = HashMap::new();
        let Ok(entries) = fs::read_dir(&self.proc_root) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            match socket_inodes(&entry.path()) {
                Ok(inodes) if inodes.is_empty() => {}
                Ok(inodes) => {
                    let comm = read_comm(&entry.path()).unwrap_or_default();
                    for inode in inodes {
                        let holders = owners.entry(inode).or_default();
                        // One process may hold the same socket on many fds.
                        if holders.last().is_none_or(|p| p.pid != pid) {
                            holders.push(Process {
                                pid,
                                comm: comm.clone(),
                                cmdline: None,
                            });
                        }
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => self.stats.vanished += 1,
                Err(_) => self.stats.unreadable += 1,
            }
        }
        for holders in owners.values_mut() {
            holders.sort();
        }
        self.owners = owners;
    }
}

/// `pid` as a holder of socket `inode`, if it holds it: the check of one
/// process that the resolver makes before walking all of them.
pub fn held_by(proc_root: &Path, pid: u32, inode: u64) -> Option<Process> {
    let dir = proc_root.join(pid.to_string());
    let held = socket_inodes(&dir).ok()?.binary_search(&inode).is_ok();
    held.then(|| Process {
        pid,
        comm: read_comm(&dir).unwrap_or_default(),
        cmdline: None,
    })
}

/// The name of process `pid` (its main thread's comm), if it still runs.
pub fn process_comm(proc_root: &Path, pid: u32) -> Option<String> {
    read_comm(&proc_root.join(pid.to_string()))
}

/// Socket inodes behind `/proc/PID/fd/*`, deduplicated.
pub(crate) fn socket_inodes(pid_dir: &Path) -> io::Result<Vec<u64>> {
    let mut inodes = Vec::new();
    for fd in fs::read_dir(pid_dir.join("fd"))? {
        // An fd closed between readdir and readlink is simply gone.
        let Ok(target) = fd.and_then(|fd| fs::read_link(fd.path())) else {
            continue;
        };
        if let Some(inode) = parse_socket_link(&target) {
            inodes.push(inode);
        }
    }
    inodes.sort_unstable();
    inodes.dedup();
    Ok(inodes)
}

/// `socket:[12345]` -> 12345.
fn parse_socket_link(target: &Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

fn read_comm(pid_dir: &Path) -> Option<String> {
    let comm = fs::read_to_string(pid_dir.join("comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_owned())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn fake_process(root: &Path, pid: u32, comm: &str, links: &[&str]) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        for (fd, target) in links.iter().enumerate() {
            symlink(target, dir.join("fd").join(fd.to_string())).unwrap();
        }
    }

    #[test]
    fn finds_every_holder_of_a_socket() {
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), 10, "nginx", &["socket:[500]", "/dev/null"]);
        // A forked worker sharing the listener, twice (dup'ed fd).
        fake_process(root.path(), 11, "nginx", &["socket:[500]", "socket:[500]"]);
        fake_process(root.path(), 12, "other", &["socket:[501]", "pipe:[9]"]);
        fs::create_dir_all(root.path().join("self")).unwrap();
        fs::write(root.path().join("meminfo"), "").unwrap();

        let mut owners = SocketOwners::new(root.path(), Duration::ZERO);
        let holders = owners.lookup(500).to_vec();
        assert_eq!(
            holders,
            vec![
                Process {
                    pid: 10,
                    comm: "nginx".into(),
                    cmdline: None,
                },
                Process {
                    pid: 11,
                    comm: "nginx".into(),
                    cmdline: None,
                },
            ]
        );
        assert_eq!(owners.lookup(501)[0].pid, 12);
        assert!(owners.lookup(502).is_empty());
        assert!(owners.lookup(0).is_empty());
    }

    #[test]
    fn a_miss_rescans_but_not_more_often_than_allowed() {
        let root = tempfile::tempdir().unwrap();
        let mut owners = SocketOwners::new(root.path(), Duration::from_secs(3600));
        assert!(owners.lookup(600).is_empty());
        assert_eq!(owners.stats().scans, 1);
        // A listener that appears later is not seen until the rescan
        // interval passes...
        fake_process(root.path(), 20, "late", &["socket:[600]"]);
        assert!(owners.lookup(600).is_empty());
        assert_eq!(owners.stats().scans, 1);
        // ...and is found on the next miss once it has.
        let mut owners = SocketOwners::new(root.path(), Duration::ZERO);
        assert_eq!(owners.lookup(600)[0].comm, "late");
        // Hits do not rescan.
        assert_eq!(owners.lookup(600)[0].pid, 20);
        assert_eq!(owners.stats().scans, 1);
    }

    #[test]
    fn a_process_without_fd_dir_is_counted_not_fatal() {
        let root = tempfile::tempdir().unwrap();
        // Listed in /proc but gone before its fds could be read.
        fs::create_dir_all(root.path().join("30")).unwrap();
        fake_process(root.path(), 31, "alive", &["socket:[700]"]);
        let mut owners = SocketOwners::new(root.path(), Duration::ZERO);
        assert_eq!(owners.lookup(700)[0].pid, 31);
        assert_eq!(owners.stats().vanished, 1);
    }

    #[test]
    fn missing_proc_root_yields_nothing() {
        let mut owners = SocketOwners::new("/nonexistent/proc", Duration::ZERO);
        assert!(owners.lookup(1).is_empty());
    }

    #[test]
    fn parses_only_socket_links() {
        assert_eq!(parse_socket_link(Path::new("socket:[42]")), Some(42));
        assert_eq!(parse_socket_link(Path::new("socket:[x]")), None);
        assert_eq!(parse_socket_link(Path::new("pipe:[42]")), None);
        assert_eq!(parse_socket_link(Path::new("/tmp/socket:[42]")), None);
    }
}
