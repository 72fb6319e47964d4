//! Attribution off the drain path. A walk of /proc costs in proportion to
//! the processes on the machine (every fd of every process), so it must
//! never stall the loop that drains the ring buffer: a thread does the
//! walks, one walk serves every inode asked for since the last one, and
//! the drain loop reads the last published result.
//!
//! Before walking, the resolver asks the one process that is likely to
//! hold the socket: the one the kernel saw calling listen() on it. If it
//! holds it, that answers at once, whatever the number of processes; a
//! full walk (relaxed) later adds holders it forked or handed the socket
//! to.
//!
//! Walks are paced: at most one per `urgent` interval when an event is
//! waiting for its listener's holders, one per `relaxed` interval
//! otherwise, and never sooner than three walk-durations after the last
//! walk ended: on a machine with many processes walks get rarer, so
//! their share of a core stays under a quarter however many processes
//! and new listeners there are. Events that cannot wait that long are
//! written with what is known (the sink waits at most 100 ms).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::enrich::attribution::{held_by, Process, ScanStats, SocketOwners};

type Owners = HashMap<u64, Vec<Process>>;

/// What the resolver knows: the last full walk, and holders found since
/// by asking the listen() caller.
#[derive(Default)]
struct Published {
    walked: Arc<Owners>,
    asked: Owners,
    /// Full walks finished when this was published.
    walks: u64,
}

impl Published {
    fn get(&self, inode: u64) -> Option<&[Process]> {
        self.asked
            .get(&inode)
            .or_else(|| self.walked.get(&inode))
            .map(Vec::as_slice)
    }
}

#[derive(Clone, Copy)]
struct Wanted {
    /// Someone waits for the answer.
    urgent: bool,
    /// The process seen calling listen() on it, asked first.
    hint: Option<u32>,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Wanted>,
    /// Someone waits for an inode of `pending`.
    urgent: bool,
    /// Walks started so far; the next walk serves what is pending now.
    started: u64,
    published: Arc<Published>,
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
    local: Arc<Published>,
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
            local: Arc::new(Published::default()),
            local_version: 0,
            requested: HashMap::new(),
            thread,
        }
    }

    /// Picks up the latest answers if there are new ones.
    fn refresh(&mut self) {
        let version = self.shared.version.load(Ordering::Acquire);
        if version != self.local_version {
            let state = self.shared.lock();
            self.local = Arc::clone(&state.published);
            self.local_version = version;
        }
    }

    /// The holders of `inode` as known now. On a miss an answer is asked
    /// for (`urgent` when an event waits for it; `hint`: the process seen
    /// calling listen() on it); a walk that found nothing is believed for
    /// NOT_FOUND_TTL.
    pub fn lookup(&mut self, inode: u64, urgent: bool, hint: Option<u32>) -> Lookup<'_> {
        self.refresh();
        if self.local.get(inode).is_some() {
            return Lookup::Found(self.local.get(inode).unwrap_or(&[]));
        }
        if inode == 0 {
            return Lookup::NotFound;
        }
        let walks = self.local.walks;
        if let Some(request) = self.requested.get_mut(&inode) {
            if request.walk > walks {
                if urgent && !request.urgent {
                    request.urgent = true;
                    let mut state = self.shared.lock();
                    if let Some(wanted) = state.pending.get_mut(&inode) {
                        wanted.urgent = true;
                    }
                    state.urgent = true;
                    drop(state);
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
        state.pending.insert(inode, Wanted { urgent, hint });
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
    let mut owners = SocketOwners::new(proc_root.clone(), Duration::ZERO);
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
        // First the cheap answers: the listen() callers that still hold
        // their sockets. What they answer stays pending, relaxed, for the
        // walk that adds the other holders.
        let hinted: Vec<(u64, u32)> = state
            .pending
            .iter()
            .filter_map(|(inode, w)| w.hint.map(|pid| (*inode, pid)))
            .collect();
        if !hinted.is_empty() {
            drop(state);
            let found: Vec<(u64, Process)> = hinted
                .iter()
                .filter_map(|&(inode, pid)| Some((inode, held_by(&proc_root, pid, inode)?)))
                .collect();
            state = shared.lock();
            for (inode, _) in &hinted {
                if let Some(wanted) = state.pending.get_mut(inode) {
                    wanted.hint = None;
                }
            }
            if !found.is_empty() {
                let mut published = Published {
                    walked: Arc::clone(&state.published.walked),
                    asked: state.published.asked.clone(),
                    walks: state.published.walks,
                };
                for (inode, process) in found {
                    if let Some(wanted) = state.pending.get_mut(&inode) {
                        wanted.urgent = false;
                    }
                    published.asked.insert(inode, vec![process]);
                }
                state.urgent = state.pending.values().any(|w| w.urgent);
                state.published = Arc::new(published);
                shared.version.fetch_add(1, Ordering::Release);
            }
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
        // A full walk supersedes the answers of single processes.
        state.published = Arc::new(Published {
            walked: Arc::new(found),
            asked: Owners::new(),
            walks: walk,
        });
        state.stats = owners.stats();
        drop(state);
        shared.version.fetch_add(1, Ordering::Release);
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
        wait_hinted(resolver, inode, None)
    }

    fn wait_hinted(resolver: &mut Resolver, inode: u64, hint: Option<u32>) -> Option<Vec<Process>> {
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
        // The first walk runs at once; the next would wait a minute.
        assert!(wait_for(&mut resolver, 1).is_none());
        fake_process(root.path(), 11, "nginx", 600);
        let started = Instant::now();
        let found = wait_hinted(&mut resolver, 600, Some(11)).expect("asked the caller");
        assert_eq!((found[0].pid, found[0].comm.as_str()), (11, "nginx"));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(resolver.stats().scans, 1, "no second walk");
        // A wrong hint is not an answer: the inode keeps waiting.
        fake_process(root.path(), 12, "php-fpm", 700);
        assert!(matches!(
            resolver.lookup(700, true, Some(11)),
            Lookup::Pending
        ));
    }
}
