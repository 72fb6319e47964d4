//! Attribution off the drain path. A walk of /proc costs in proportion to
//! the processes on the machine (every fd of every process), so it must
//! never stall the loop that drains the ring buffer: a thread keeps an
//! index of every socket's holders (attribution.rs) and the drain loop
//! reads the answers it last published.
//!
//! The thread walks all of /proc once at start, then keeps the index
//! current with partial walks that read only new processes descending
//! from a holder of a listener asked about (forked workers), so that
//! their cost follows what changes, not the number of processes. For a
//! listener the index does not know, it first asks the process the
//! kernel saw calling listen() on it; a partial walk later adds the
//! holders it forked. A full walk runs only every FULL_WALK_EVERY, or
//! when an event waits for a listener nobody is known to have created
//! (its listen() came before the agent, or was lost).
//!
//! Walks are paced: at most one per `urgent` interval when an event is
//! waiting for its listener's holders, one per `relaxed` interval
//! otherwise, and never sooner than three walk-durations after the last
//! walk of the same kind ended: on a machine with many processes full
//! walks get rarer, so their share of a core stays under a quarter.
//! Events that cannot wait that long are written with what is known (the
//! sink waits at most 100 ms).
//!
//! Only listeners asked about are published, and a listener nobody holds
//! any more drops out at the next walk: the answers stay bounded by the
//! live listeners, whatever the number of sockets on the machine.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::enrich::attribution::{held_at, socket_inodes, ProcIndex, Process, ScanStats};

/// Where to look first for a listener: the process the kernel saw
/// calling listen() on it, and the fd it called it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hint {
    pub pid: u32,
    pub fd: u32,
}

#[derive(Clone, Copy)]
struct Wanted {
    /// Someone waits for the answer.
    urgent: bool,
    /// Asked first, once.
    hint: Option<Hint>,
    /// A listen() caller was known: a partial walk may serve it.
    hinted: bool,
}

/// A change of the answers: a listener's holders, or None once nobody
/// holds it any more.
type Change = (u64, Option<Vec<Process>>);

#[derive(Default)]
struct State {
    pending: HashMap<u64, Wanted>,
    /// Someone waits for an inode of `pending`.
    urgent: bool,
    /// Walks started so far; the next walk serves what is pending now.
    started: u64,
    /// Walks finished.
    walks: u64,
    /// Answers changed since the drain loop last took them: publishing
    /// costs what changed, not every answer (10,000 listeners appear one
    /// by one).
    changes: Vec<Change>,
    /// `changes` is the whole list: the reader forgets what it had.
    reset: bool,
    stats: ScanStats,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Bumped at every publication, readable without the lock.
    version: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn published(&self) {
        self.version.fetch_add(1, Ordering::Release);
        self.wake.notify_all();
    }
}

/// How long "no holder" stands before a miss asks again.
const NOT_FOUND_TTL: Duration = Duration::from_secs(1);
/// Bounds the request book-keeping (one entry per inode asked for).
const MAX_REQUESTS: usize = 65536;
/// A full walk finds what partial walks cannot see (a listener passed
/// over a UNIX socket, a worker whose parent exited before the walk).
pub const FULL_WALK_EVERY: Duration = Duration::from_secs(60);

struct Request {
    /// The walk that serves (or served) it.
    walk: u64,
    urgent: bool,
    asked: Instant,
}

pub struct Resolver {
    shared: Arc<Shared>,
    /// The answers as last taken from the thread.
    answers: HashMap<u64, Vec<Process>>,
    walks: u64,
    local_version: u64,
    requested: HashMap<u64, Request>,
    thread: Option<JoinHandle<()>>,
}

/// What is known of an inode's holders right now.
pub enum Lookup<'a> {
    Found(&'a [Process]),
    /// Not in the last walk; a walk that will look for it is on its way.
    Pending,
    /// A walk looked for it after it was asked for, and found no holder.
    NotFound,
}

impl Resolver {
    pub fn start(proc_root: impl Into<PathBuf>, urgent: Duration, relaxed: Duration) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            version: AtomicU64::new(0),
        });
        let worker = Arc::clone(&shared);
        let proc_root = proc_root.into();
        let thread = thread::Builder::new()
            .name("attribution".into())
            .spawn(move || walk_on_demand(&worker, proc_root, urgent, relaxed))
            .ok();
        Resolver {
            shared,
            answers: HashMap::new(),
            walks: 0,
            local_version: 0,
            requested: HashMap::new(),
            thread,
        }
    }

    /// Waits (at most `limit`) for the walk the resolver makes at start,
    /// so that its cost falls in the agent's start-up.
    pub fn wait_first_walk(&self, limit: Duration) {
        let state = self.shared.lock();
        let _ = self
            .shared
            .wake
            .wait_timeout_while(state, limit, |s| s.walks == 0 && !s.stop);
    }

    /// Picks up the latest answers if there are new ones.
    fn refresh(&mut self) {
        let version = self.shared.version.load(Ordering::Acquire);
        if version == self.local_version {
            return;
        }
        let mut state = self.shared.lock();
        if std::mem::take(&mut state.reset) {
            self.answers.clear();
        }
        for (inode, holders) in state.changes.drain(..) {
            match holders {
                Some(holders) => self.answers.insert(inode, holders),
                None => self.answers.remove(&inode),
            };
        }
        self.walks = state.walks;
        self.local_version = version;
    }

    /// The holders of `inode` as known now. On a miss an answer is asked
    /// for (`urgent` when an event waits for it; `hint`: where the kernel
    /// saw listen() called on it); a walk that found nothing is believed
    /// for NOT_FOUND_TTL.
    pub fn lookup(&mut self, inode: u64, urgent: bool, hint: Option<Hint>) -> Lookup<'_> {
        self.refresh();
        if self.answers.contains_key(&inode) {
            return Lookup::Found(self.answers.get(&inode).map_or(&[], Vec::as_slice));
        }
        if inode == 0 {
            return Lookup::NotFound;
        }
        if let Some(request) = self.requested.get_mut(&inode) {
            if request.walk > self.walks {
                if urgent && !request.urgent {
                    request.urgent = true;
                    let mut state = self.shared.lock();
                    if let Some(wanted) = state.pending.get_mut(&inode) {
                        wanted.urgent = true;
                    }
                    state.urgent = true;
                    drop(state);
                    self.shared.wake.notify_all();
                }
                return Lookup::Pending;
            }
            if request.asked.elapsed() < NOT_FOUND_TTL {
                return Lookup::NotFound;
            }
        }
        if self.requested.len() >= MAX_REQUESTS {
            self.requested.clear();
        }
        let mut state = self.shared.lock();
        state.pending.insert(
            inode,
            Wanted {
                urgent,
                hint,
                hinted: hint.is_some(),
            },
        );
        state.urgent |= urgent;
        let walk = state.started + 1;
        drop(state);
        self.shared.wake.notify_all();
        self.requested.insert(
            inode,
            Request {
                walk,
                urgent,
                asked: Instant::now(),
            },
        );
        Lookup::Pending
    }

    pub fn stats(&self) -> ScanStats {
        self.shared.lock().stats
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Asks the listen() callers whether they hold their sockets: first at
/// the fd they called listen() on (one readlink), else among all their
/// fds, once per process.
fn ask_callers(proc_root: &std::path::Path, hinted: &[(u64, Hint)]) -> Vec<(u64, Process)> {
    let mut found = Vec::new();
    let mut moved: HashMap<u32, Vec<u64>> = HashMap::new();
    for &(inode, hint) in hinted {
        match held_at(proc_root, hint.pid, hint.fd, inode) {
            Some(process) => found.push((inode, process)),
            None => moved.entry(hint.pid).or_default().push(inode),
        }
    }
    for (pid, inodes) in moved {
        let dir = proc_root.join(pid.to_string());
        let Ok(held) = socket_inodes(&dir) else {
            continue;
        };
        let comm = crate::enrich::attribution::process_comm(proc_root, pid).unwrap_or_default();
        for inode in inodes {
            if held.binary_search(&inode).is_ok() {
                let process = Process {
                    pid,
                    comm: comm.clone(),
                    cmdline: None,
                };
                found.push((inode, process));
            }
        }
    }
    found
}

fn walk_on_demand(shared: &Shared, proc_root: PathBuf, urgent: Duration, relaxed: Duration) {
    let mut index = ProcIndex::new(proc_root.clone());
    // Inodes with an answer published.
    let mut answered: HashSet<u64> = HashSet::new();
    let began = Instant::now();
    shared.lock().started = 1;
    index.full_walk();
    let mut full_took = began.elapsed();
    let mut last_full = Instant::now();
    let mut last_walk = last_full;
    let mut partial_took = Duration::ZERO;
    {
        let mut state = shared.lock();
        state.stats = index.stats();
        state.walks = 1;
    }
    shared.published();
    loop {
        // While listeners are known, a partial walk every `relaxed` keeps
        // their holders current (workers forked later) and expires the
        // listeners that were closed.
        let mut state = shared.lock();
        let mut periodic = false;
        loop {
            if state.stop {
                return;
            }
            if !state.pending.is_empty() {
                break;
            }
            if answered.is_empty() {
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            let Some(left) = relaxed.checked_sub(last_walk.elapsed()) else {
                periodic = true;
                break;
            };
            state = shared
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        // First the cheap answers: the index, and the listen() callers
        // that still hold their sockets. What a caller answers stays
        // pending, relaxed, for the walk that adds the holders it forked.
        let mut changed = false;
        let known: Vec<u64> = state
            .pending
            .iter()
            .filter(|(inode, w)| w.hint.is_none() && !index.pids_of(**inode).is_empty())
            .map(|(inode, _)| *inode)
            .collect();
        for inode in known {
            state.pending.remove(&inode);
            state.changes.push((inode, Some(index.holders_of(inode))));
            answered.insert(inode);
            changed = true;
        }
        let hinted: Vec<(u64, Hint)> = state
            .pending
            .iter()
            .filter_map(|(inode, w)| w.hint.map(|hint| (*inode, hint)))
            .filter(|(inode, hint)| !index.pids_of(*inode).contains(&hint.pid))
            .collect();
        let asked: Vec<u64> = state
            .pending
            .iter()
            .filter(|(_, w)| w.hint.is_some())
            .map(|(inode, _)| *inode)
            .collect();
        if !asked.is_empty() {
            drop(state);
            for (inode, process) in ask_callers(&proc_root, &hinted) {
                index.add(inode, &process);
            }
            state = shared.lock();
            for inode in asked {
                if let Some(wanted) = state.pending.get_mut(&inode) {
                    wanted.hint = None;
                    if !index.pids_of(inode).is_empty() {
                        wanted.urgent = false;
                        state.changes.push((inode, Some(index.holders_of(inode))));
                        answered.insert(inode);
                        changed = true;
                    }
                }
            }
        }
        if changed {
            state.urgent = state.pending.values().any(|w| w.urgent);
            drop(state);
            shared.published();
            state = shared.lock();
        }
        if state.pending.is_empty() && !periodic {
            continue;
        }
        // A listener nobody is known to have created can only be found
        // by reading every process.
        let full = last_full.elapsed() >= FULL_WALK_EVERY
            || state.pending.values().any(|w| w.urgent && !w.hinted);
        let was_urgent = state.urgent;
        let took = if full { full_took } else { partial_took };
        let pace = if was_urgent { urgent } else { relaxed }.max(took * 3);
        drop(state);
        if let Some(wait) = pace.checked_sub(last_walk.elapsed()) {
            // An urgent request may arrive while a relaxed one waits: wake
            // early for it, and pace again.
            let state = shared.lock();
            let (state, _) = shared
                .wake
                .wait_timeout_while(state, wait, |s| !s.stop && (!s.urgent || was_urgent))
                .unwrap_or_else(|p| p.into_inner());
            let early = state.urgent && !was_urgent;
            drop(state);
            if early {
                continue;
            }
        }
        let (walk, asked) = {
            let mut state = shared.lock();
            if state.stop {
                return;
            }
            let asked: Vec<u64> = state.pending.keys().copied().collect();
            state.pending.clear();
            state.urgent = false;
            state.started += 1;
            (state.started, asked)
        };
        let began = Instant::now();
        if full {
            index.full_walk();
            full_took = began.elapsed();
            last_full = Instant::now();
        } else {
            // Holders of the listeners asked about: their new children
            // may hold them too.
            let interesting: HashSet<u32> = answered
                .iter()
                .chain(&asked)
                .flat_map(|inode| index.pids_of(*inode).iter().copied())
                .collect();
            index.partial_walk(&interesting);
            partial_took = began.elapsed();
        }
        last_walk = Instant::now();
        answered.extend(asked);
        let mut changes: Vec<Change> = Vec::with_capacity(answered.len());
        answered.retain(|&inode| {
            let holders = index.holders_of(inode);
            let held = !holders.is_empty();
            changes.push((inode, held.then_some(holders)));
            held
        });
        let mut state = shared.lock();
        if state.changes.len() + changes.len() > 2 * answered.len() + 1024 {
            // The reader has not looked for a while: the whole list
            // replaces what it has, so changes cannot pile up.
            changes.retain(|(_, holders)| holders.is_some());
            state.changes = changes;
            state.reset = true;
        } else {
            state.changes.extend(changes);
        }
        state.walks = walk;
        state.stats = index.stats();
        drop(state);
        shared.published();
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    fn fake_process(root: &std::path::Path, pid: u32, comm: &str, inode: u64) {
        fake_child(root, pid, 1, comm, inode);
    }

    /// Built aside and renamed into place: the resolver's thread must not
    /// see a process half made (/proc shows a process whole).
    fn fake_child(root: &std::path::Path, pid: u32, ppid: u32, comm: &str, inode: u64) {
        let dir = root.join(format!("new-{pid}"));
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        fs::write(
            dir.join("stat"),
            format!("{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {pid} 1 1\n"),
        )
        .unwrap();
        symlink(format!("socket:[{inode}]"), dir.join("fd/3")).unwrap();
        fs::rename(&dir, root.join(pid.to_string())).unwrap();
    }

    #[test]
    fn a_forked_holder_is_found_without_a_full_walk_and_a_closed_listener_expires() {
        let root = tempfile::tempdir().unwrap();
        let tick = Duration::from_millis(10);
        let mut resolver = Resolver::start(root.path(), tick, tick);
        resolver.wait_first_walk(Duration::from_secs(5));
        fake_process(root.path(), 11, "php-fpm", 600);
        let found = wait_hinted(&mut resolver, 600, Some(hint(11))).expect("asked the caller");
        assert_eq!(found.len(), 1);
        // The master forks a worker, which inherits the listener.
        fake_child(root.path(), 12, 11, "php-fpm", 600);
        let deadline = Instant::now() + Duration::from_secs(5);
        let both = loop {
            // Asked again after the answer's TTL, as the sink does.
            let pids: Vec<u32> = match resolver.lookup(600, false, Some(hint(11))) {
                Lookup::Found(p) => p.iter().map(|p| p.pid).collect(),
                _ => Vec::new(),
            };
            if pids.len() == 2 || Instant::now() > deadline {
                break pids;
            }
            thread::sleep(tick);
        };
        assert_eq!(both, [11, 12]);
        assert_eq!(resolver.stats().scans, 1, "no full walk");
        assert!(resolver.stats().partial >= 1);
        // Both exit: the listener is gone from the answers.
        fs::remove_dir_all(root.path().join("11")).unwrap();
        fs::remove_dir_all(root.path().join("12")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(resolver.lookup(600, false, None), Lookup::Found(_)) {
            assert!(Instant::now() < deadline, "600 still answered");
            thread::sleep(tick);
        }
    }

    /// The fake processes hold their socket at fd 3.
    fn hint(pid: u32) -> Hint {
        Hint { pid, fd: 3 }
    }

    fn wait_for(resolver: &mut Resolver, inode: u64) -> Option<Vec<Process>> {
        wait_hinted(resolver, inode, None)
    }

    fn wait_hinted(
        resolver: &mut Resolver,
        inode: u64,
        hint: Option<Hint>,
    ) -> Option<Vec<Process>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match resolver.lookup(inode, true, hint) {
                Lookup::Found(p) => return Some(p.to_vec()),
                Lookup::NotFound => return None,
                Lookup::Pending => thread::sleep(Duration::from_millis(5)),
            }
        }
        panic!("no answer for {inode} within 5 s");
    }

    #[test]
    fn a_miss_is_answered_by_a_walk_and_a_later_one_by_the_next() {
        let root = tempfile::tempdir().unwrap();
        fake_process(root.path(), 10, "php-fpm", 500);
        let mut resolver = Resolver::start(
            root.path(),
            Duration::from_millis(10),
            Duration::from_millis(10),
        );
        let found = wait_for(&mut resolver, 500).expect("holder of 500");
        assert_eq!((found[0].pid, found[0].comm.as_str()), (10, "php-fpm"));
        // Not there yet: the walk answers "not found", without blocking.
        assert!(wait_for(&mut resolver, 600).is_none());
        fake_process(root.path(), 11, "nginx", 600);
        // Believed for a while, then a new miss asks again and finds it.
        thread::sleep(NOT_FOUND_TTL);
        let found = wait_for(&mut resolver, 600).expect("holder of 600");
        assert_eq!(found[0].pid, 11);
        assert!(resolver.stats().scans >= 3);
    }

    #[test]
    fn the_listen_caller_answers_without_waiting_for_a_walk() {
        let root = tempfile::tempdir().unwrap();
        let minute = Duration::from_secs(60);
        let mut resolver = Resolver::start(root.path(), minute, minute);
        // The first walk runs at start; the next would wait a minute.
        resolver.wait_first_walk(Duration::from_secs(5));
        assert_eq!(resolver.stats().scans, 1);
        fake_process(root.path(), 11, "nginx", 600);
        let started = Instant::now();
        let found = wait_hinted(&mut resolver, 600, Some(hint(11))).expect("asked the caller");
        assert_eq!((found[0].pid, found[0].comm.as_str()), (11, "nginx"));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(resolver.stats().scans, 1, "no second walk");
        // A wrong hint is not an answer: the inode keeps waiting.
        fake_process(root.path(), 12, "php-fpm", 700);
        assert!(matches!(
            resolver.lookup(700, true, Some(hint(11))),
            Lookup::Pending
        ));
    }
}
