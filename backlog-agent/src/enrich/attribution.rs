//! Socket inode -> the processes holding that socket.
//!
//! There is no kernel interface from a socket to its owners, so, like `ss
//! -p`, this scans `/proc/PID/fd/*` for `socket:[INODE]` links. A full
//! walk reads every fd of every process: its cost grows with the machine.
//! So the index is kept between walks, and a partial walk only lists
//! /proc and reads the fds of processes that are new since the last walk
//! and descend from a holder of a listener of interest (a forked worker
//! inherits its parent's listener: php-fpm, nginx, gunicorn). A process
//! that gets a listener otherwise (SCM_RIGHTS, or forked by a holder that
//! exited before the walk) is found by the next full walk, which the
//! resolver runs rarely. Processes that exit mid-scan or whose fds are
//! unreadable are skipped and counted, never fatal.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
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
    /// Full walks (every fd of every process).
    pub scans: u64,
    /// Partial walks (only new descendants of holders).
    pub partial: u64,
    /// Processes whose fds a partial walk read.
    pub partial_reads: u64,
    /// Processes that exited between listing /proc and reading their fds.
    pub vanished: u64,
    /// Processes whose fd directory could not be read (permissions).
    pub unreadable: u64,
}

/// A process that holds sockets, as the last walk saw it.
struct Holder {
    comm: Box<str>,
    inodes: Box<[u64]>,
    /// Its start time (clock ticks after boot), read when it was first
    /// checked: a different value later means the pid was reused.
    start: Option<u64>,
}

/// Every socket's holders, kept between walks.
pub struct ProcIndex {
    proc_root: PathBuf,
    /// Every pid the last walk listed.
    seen: HashSet<u32>,
    holders: HashMap<u32, Holder>,
    owners: HashMap<u64, Vec<u32>>,
    stats: ScanStats,
}

impl ProcIndex {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        ProcIndex {
            proc_root: proc_root.into(),
            seen: HashSet::new(),
            holders: HashMap::new(),
            owners: HashMap::new(),
            stats: ScanStats::default(),
        }
    }

    pub fn stats(&self) -> ScanStats {
        self.stats
    }

    /// The processes holding socket `inode`, sorted by pid; empty when none
    /// is known (the listener was closed, or is held only by a process we
    /// cannot inspect).
    pub fn holders_of(&self, inode: u64) -> Vec<Process> {
        let Some(pids) = self.owners.get(&inode) else {
            return Vec::new();
        };
        pids.iter()
            .filter_map(|pid| {
                Some(Process {
                    pid: *pid,
                    comm: self.holders.get(pid)?.comm.to_string(),
                    cmdline: None,
                })
            })
            .collect()
    }

    /// The pids holding socket `inode`.
    pub fn pids_of(&self, inode: u64) -> &[u32] {
        self.owners.get(&inode).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Records that `process` holds `inode` (found by asking it directly).
    pub fn add(&mut self, inode: u64, process: &Process) {
        let holder = self.holders.entry(process.pid).or_insert_with(|| Holder {
            comm: process.comm.as_str().into(),
            inodes: Box::new([]),
            start: None,
        });
        if !holder.inodes.contains(&inode) {
            let mut inodes = holder.inodes.to_vec();
            inodes.push(inode);
            inodes.sort_unstable();
            holder.inodes = inodes.into();
            let pids = self.owners.entry(inode).or_default();
            if let Err(at) = pids.binary_search(&process.pid) {
                pids.insert(at, process.pid);
            }
        }
    }

    /// Rebuilds the whole index from /proc: every fd of every process.
    pub fn full_walk(&mut self) {
        self.stats.scans += 1;
        self.seen.clear();
        self.holders.clear();
        self.owners.clear();
        for pid in list_pids(&self.proc_root) {
            self.seen.insert(pid);
            self.read_process(pid);
        }
        self.owners.shrink_to_fit();
        self.holders.shrink_to_fit();
    }

    /// Lists /proc and reads only what changed: processes gone are
    /// dropped, and the fds of new processes are read when they descend
    /// from one of `interesting` (holders of the listeners asked about) or
    /// from a new process read in the same walk. Holders among
    /// `interesting` whose pid was reused since are dropped too.
    pub fn partial_walk(&mut self, interesting: &HashSet<u32>) {
        self.stats.partial += 1;
        let now: HashSet<u32> = list_pids(&self.proc_root).into_iter().collect();
        let gone: Vec<u32> = self.seen.difference(&now).copied().collect();
        for pid in gone {
            self.forget(pid);
        }
        let mut live_holders: HashSet<u32> = HashSet::new();
        for &pid in interesting {
            if !self.holders.contains_key(&pid) {
                continue;
            }
            let start = read_stat(&self.proc_root.join(pid.to_string())).map(|s| s.start);
            let holder = self.holders.get_mut(&pid).expect("checked above");
            match (start, holder.start) {
                (Some(now), Some(then)) if now != then => self.forget(pid),
                (Some(now), _) => {
                    holder.start = Some(now);
                    live_holders.insert(pid);
                }
                (None, _) => self.forget(pid),
            }
        }
        // Parents of the new processes, read once each.
        let fresh: HashMap<u32, u32> = now
            .difference(&self.seen)
            .filter_map(|&pid| Some((pid, read_stat(&self.proc_root.join(pid.to_string()))?.ppid)))
            .collect();
        // A descendant may come before its parent in any order: repeat
        // until no new process joins.
        let mut descend: HashSet<u32> = HashSet::new();
        loop {
            let before = descend.len();
            for (&pid, ppid) in &fresh {
                if !descend.contains(&pid)
                    && (live_holders.contains(ppid) || descend.contains(ppid))
                {
                    descend.insert(pid);
                }
            }
            if descend.len() == before {
                break;
            }
        }
        for pid in descend {
            self.stats.partial_reads += 1;
            self.read_process(pid);
        }
        self.seen = now;
    }

    /// Reads `pid`'s sockets into the index.
    fn read_process(&mut self, pid: u32) {
        let dir = self.proc_root.join(pid.to_string());
        match socket_inodes(&dir) {
            Ok(inodes) if inodes.is_empty() => {}
            Ok(inodes) => {
                for inode in &inodes {
                    let pids = self.owners.entry(*inode).or_default();
                    if let Err(at) = pids.binary_search(&pid) {
                        pids.insert(at, pid);
                    }
                }
                let comm = read_comm(&dir).unwrap_or_default();
                self.holders.insert(
                    pid,
                    Holder {
                        comm: comm.into(),
                        inodes: inodes.into(),
                        start: None,
                    },
                );
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => self.stats.vanished += 1,
            Err(_) => self.stats.unreadable += 1,
        }
    }

    /// Drops `pid` and its sockets from the index.
    fn forget(&mut self, pid: u32) {
        self.seen.remove(&pid);
        let Some(holder) = self.holders.remove(&pid) else {
            return;
        };
        for inode in holder.inodes.iter() {
            if let Some(pids) = self.owners.get_mut(inode) {
                pids.retain(|p| *p != pid);
                if pids.is_empty() {
                    self.owners.remove(inode);
                }
            }
        }
    }
}

/// The numeric entries of /proc.
fn list_pids(proc_root: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

struct Stat {
    ppid: u32,
    start: u64,
}

/// The parent and start time from /proc/PID/stat. The comm field may
/// hold spaces and parentheses, so fields are counted after its last ')'.
fn read_stat(pid_dir: &Path) -> Option<Stat> {
    let stat = fs::read_to_string(pid_dir.join("stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state(3) ppid(4) ... starttime(22).
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
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

/// `pid` as a holder of socket `inode` through its fd `fd` (the fd it
/// called listen() on): one readlink, however many fds the process has.
pub fn held_at(proc_root: &Path, pid: u32, fd: u32, inode: u64) -> Option<Process> {
    let dir = proc_root.join(pid.to_string());
    let target = fs::read_link(dir.join("fd").join(fd.to_string())).ok()?;
    (parse_socket_link(&target) == Some(inode)).then(|| Process {
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
        fake_child(root, pid, 1, comm, links);
    }

    /// A process whose parent is `ppid`, with a stat file as the kernel
    /// writes it (a comm with a space and a parenthesis, to be parsed
    /// from its last ')').
    fn fake_child(root: &Path, pid: u32, ppid: u32, comm: &str, links: &[&str]) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(
            dir.join("stat"),
            format!(
                "{pid} ({comm} x)) S {ppid} 1 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {} 1 1\n",
                1000 + pid
            ),
        )
        .unwrap();
        for (fd, target) in links.iter().enumerate() {
            symlink(target, dir.join("fd").join(fd.to_string())).unwrap();
        }
    }

    fn pids(index: &ProcIndex, inode: u64) -> Vec<u32> {
        index.holders_of(inode).iter().map(|p| p.pid).collect()
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

        let mut index = ProcIndex::new(root.path());
        index.full_walk();
        assert_eq!(
            index.holders_of(500),
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
        assert_eq!(pids(&index, 501), [12]);
        assert!(index.holders_of(502).is_empty());
        assert!(index.holders_of(0).is_empty());
    }

    #[test]
    fn a_partial_walk_reads_new_descendants_of_holders_only() {
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), 10, "php-fpm", &["socket:[500]"]);
        fake_process(root.path(), 20, "idle", &["socket:[900]"]);
        let mut index = ProcIndex::new(root.path());
        index.full_walk();
        // Forked after the walk: a worker, its own child, and a process
        // unrelated to any listener that also holds a socket.
        fake_child(root.path(), 11, 10, "php-fpm", &["socket:[500]"]);
        fake_child(root.path(), 9, 11, "php-fpm", &["socket:[500]"]);
        fake_child(root.path(), 30, 20, "other", &["socket:[500]"]);
        index.partial_walk(&HashSet::from([10]));
        assert_eq!(pids(&index, 500), [9, 10, 11]);
        assert_eq!(index.stats().partial_reads, 2, "30 descends from no holder");
        // Seen once, not read again by the next partial walk...
        index.partial_walk(&HashSet::from([10]));
        assert_eq!(index.stats().partial_reads, 2);
        // ...and found by the next full walk.
        index.full_walk();
        assert_eq!(pids(&index, 500), [9, 10, 11, 30]);
    }

    #[test]
    fn a_partial_walk_forgets_processes_gone_and_pids_reused() {
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), 10, "nginx", &["socket:[500]"]);
        fake_process(root.path(), 11, "nginx", &["socket:[500]"]);
        let mut index = ProcIndex::new(root.path());
        index.full_walk();
        index.partial_walk(&HashSet::from([10]));
        fs::remove_dir_all(root.path().join("11")).unwrap();
        index.partial_walk(&HashSet::from([10]));
        assert_eq!(pids(&index, 500), [10]);
        // Pid 10 now names another process (another start time).
        fs::remove_dir_all(root.path().join("10")).unwrap();
        fake_child(root.path(), 10, 1, "reused", &[]);
        let stat = root.path().join("10/stat");
        let text = fs::read_to_string(&stat)
            .unwrap()
            .replace(" 1010 ", " 5000 ");
        fs::write(&stat, text).unwrap();
        index.partial_walk(&HashSet::from([10]));
        assert!(index.holders_of(500).is_empty());
    }

    #[test]
    fn a_holder_found_by_asking_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let mut index = ProcIndex::new(root.path());
        index.full_walk();
        let nginx = Process {
            pid: 7,
            comm: "nginx".into(),
            cmdline: None,
        };
        index.add(600, &nginx);
        index.add(600, &nginx);
        assert_eq!(index.holders_of(600), vec![nginx]);
    }

    #[test]
    fn a_process_without_fd_dir_is_counted_not_fatal() {
        let root = tempfile::tempdir().unwrap();
        // Listed in /proc but gone before its fds could be read.
        fs::create_dir_all(root.path().join("30")).unwrap();
        fake_process(root.path(), 31, "alive", &["socket:[700]"]);
        let mut index = ProcIndex::new(root.path());
        index.full_walk();
        assert_eq!(pids(&index, 700), [31]);
        assert_eq!(index.stats().vanished, 1);
    }

    #[test]
    fn missing_proc_root_yields_nothing() {
        let mut index = ProcIndex::new("/nonexistent/proc");
        index.full_walk();
        index.partial_walk(&HashSet::from([1]));
        assert!(index.holders_of(1).is_empty());
    }

    #[test]
    fn parses_only_socket_links() {
        assert_eq!(parse_socket_link(Path::new("socket:[42]")), Some(42));
        assert_eq!(parse_socket_link(Path::new("socket:[x]")), None);
        assert_eq!(parse_socket_link(Path::new("pipe:[42]")), None);
        assert_eq!(parse_socket_link(Path::new("/tmp/socket:[42]")), None);
    }
}
