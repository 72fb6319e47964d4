//! Attribution off the drain path. A walk of /proc costs in proportion to
//! the processes on the machine (every fd of every process), so it must
//! never stall the loop that drains the ring buffer: a thread does the
//! walks, one walk serves every inode asked for since the last one, and
//! the drain loop reads the last published result.
//!
//! Walks are paced: at most one per `urgent` interval when an event is
//! waiting for its listener's holders, one per `relaxed` interval
//! otherwise, and never sooner than three walk-durations after the last
//! walk ended: on a machine with many processes walks get rarer, so
//! their share of a core stays under a quarter however many processes
//! and new listeners there are. Events that cannot wait that long are
//! written with what is known (the sink waits at most 100 ms).

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

use crate::attribution::{Process, ScanStats, SocketOwners};

type Owners = HashMap<u64, Vec<Process>>;

#[derive(Default)]
struct State {
    pending: HashSet<u64>,
    /// Someone waits for an inode of `pending`.
    urgent: bool,
    /// Walks started so far; the next walk serves what is pending now.
    started: u64,
    published: Arc<Owners>,
    stats: ScanStats,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Walks finished (and published) so far, readable without the lock.
    finished: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long "no holder" stands before a miss asks again.
const NOT_FOUND_TTL: Duration = Duration::from_secs(1);
/// Bounds the request book-keeping (one entry per inode asked for).
const MAX_REQUESTS: usize = 65536;

struct Request {
    /// The walk that serves (or served) it.
    walk: u64,
    urgent: bool,
    asked: Instant,
}

pub struct Resolver {
    shared: Arc<Shared>,
    local: Arc<Owners>,
    local_generation: u64,
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
            finished: AtomicU64::new(0),
        });
        let worker = Arc::clone(&shared);
        let proc_root = proc_root.into();
        let thread = thread::Builder::new()
            .name("attribution".into())
            .spawn(move || walk_on_demand(&worker, proc_root, urgent, relaxed))
            .ok();
        Resolver {
            shared,
            local: Arc::new(Owners::new()),
            local_generation: 0,
            requested: HashMap::new(),
            thread,
        }
    }

    /// Picks up the latest walk if one finished since the last call.
    fn refresh(&mut self) {
        let finished = self.shared.finished.load(Ordering::Acquire);
        if finished != self.local_generation {
            let state = self.shared.lock();
            self.local = Arc::clone(&state.published);
            self.local_generation = finished;
        }
    }

    /// The holders of `inode` as of the last walk. On a miss a walk is
    /// asked for (`urgent` when an event waits for the answer); a walk
    /// that found nothing is believed for NOT_FOUND_TTL.
    pub fn lookup(&mut self, inode: u64, urgent: bool) -> Lookup<'_> {
        self.refresh();
        if self.local.contains_key(&inode) {
            return Lookup::Found(self.local.get(&inode).map(Vec::as_slice).unwrap_or(&[]));
        }
        if inode == 0 {
            return Lookup::NotFound;
        }
        if let Some(request) = self.requested.get_mut(&inode) {
            if request.walk > self.local_generation {
                if urgent && !request.urgent {
                    request.urgent = true;
                    self.shared.lock().urgent = true;
                    self.shared.wake.notify_one();
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
        state.pending.insert(inode);
        state.urgent |= urgent;
        let walk = state.started + 1;
        drop(state);
        self.shared.wake.notify_one();
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
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn walk_on_demand(shared: &Shared, proc_root: PathBuf, urgent: Duration, relaxed: Duration) {
    let mut owners = SocketOwners::new(proc_root, Duration::ZERO);
    let mut last_walk: Option<Instant> = None;
    let mut walk_took = Duration::ZERO;
    loop {
        let mut state = shared.lock();
        while state.pending.is_empty() && !state.stop {
            state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        if state.stop {
            return;
        }
        let was_urgent = state.urgent;
        let pace = if was_urgent { urgent } else { relaxed }.max(walk_took * 3);
        drop(state);
        if let Some(wait) = last_walk.and_then(|last| pace.checked_sub(last.elapsed())) {
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
        let walk = {
            let mut state = shared.lock();
            if state.stop {
                return;
            }
            state.pending.clear();
            state.urgent = false;
            state.started += 1;
            state.started
        };
        let began = Instant::now();
        let found = owners.scan();
        walk_took = began.elapsed();
        last_walk = Some(Instant::now());
        let mut state = shared.lock();
        state.published = Arc::new(found);
        state.stats = owners.stats();
        drop(state);
        shared.finished.store(walk, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    fn fake_process(root: &std::path::Path, pid: u32, comm: &str, inode: u64) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(dir.join("fd")).unwrap();
        fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        symlink(format!("socket:[{inode}]"), dir.join("fd/3")).unwrap();
    }

    fn wait_for(resolver: &mut Resolver, inode: u64) -> Option<Vec<Process>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match resolver.lookup(inode, true) {
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
}
