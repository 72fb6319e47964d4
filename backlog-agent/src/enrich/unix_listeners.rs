//! UNIX listeners by path, for connect() EAGAINs: the kernel's record
//! names the path the client asked for, not the listening socket, so the
//! listener (its socket inode and backlog) is looked up in a sock_diag dump
//! of the client's network namespace (abstract names are per namespace).
//! Under a burst of EAGAINs one dump serves a while.

use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::enrich::{
    attribution::Process,
    context,
    sockdiag::{self, UnixListenerInfo},
};

/// How long one dump of a namespace's UNIX listeners is reused.
const UNIX_DUMP_TTL: Duration = Duration::from_millis(200);

pub struct UnixListeners {
    /// The agent's own network namespace: dumped without entering it.
    own_netns: Option<u64>,
    /// The last dump of each namespace, with when it was made.
    dumps: HashMap<u64, (Instant, Vec<UnixListenerInfo>)>,
}

impl UnixListeners {
    pub fn new(own_netns: Option<u64>) -> Self {
        UnixListeners {
            own_netns,
            dumps: HashMap::new(),
        }
    }

    /// The UNIX listener at `path` as seen from the client's network
    /// namespace, with that namespace's inode. `kernel_netns` is the
    /// namespace the kernel saw the client in, when it could say: when it
    /// is the agent's own, /proc is not asked (a stat per event otherwise).
    pub fn for_client(
        &mut self,
        client_pid: u32,
        kernel_netns: Option<u64>,
        path: &str,
    ) -> (Option<u64>, Option<UnixListenerInfo>) {
        let (netns, netns_file) = match kernel_netns {
            Some(inode) if kernel_netns == self.own_netns => (Some(inode), None),
            _ => {
                let file = PathBuf::from(format!("/proc/{client_pid}/ns/net"));
                // A client that exited already: look in our own namespace.
                match context::netns_inode(&file) {
                    Some(inode) => (Some(inode), Some(file)),
                    None => (self.own_netns, None),
                }
            }
        };
        let key = netns.unwrap_or(0);
        let fresh = |dump: &(Instant, Vec<UnixListenerInfo>)| {
            dump.0.elapsed() < UNIX_DUMP_TTL
                && dump.1.iter().any(|l| l.path.as_deref() == Some(path))
        };
        if !self.dumps.get(&key).is_some_and(fresh) {
            let dump = match &netns_file {
                Some(file) if netns != self.own_netns => {
                    sockdiag::in_netns(file, sockdiag::unix_listeners).and_then(|r| r)
                }
                _ => sockdiag::unix_listeners(),
            };
            match dump {
                Ok(listeners) => {
                    self.dumps.insert(key, (Instant::now(), listeners));
                }
                Err(err) => eprintln!("backlog-agent: cannot list UNIX listeners: {err}"),
            }
        }
        let found = self
            .dumps
            .get(&key)
            .and_then(|(_, listeners)| listeners.iter().find(|l| l.path.as_deref() == Some(path)))
            .cloned();
        (netns, found)
    }

    /// The path of the UNIX listener with socket `inode`, from a fresh
    /// sock_diag dump of its namespace (entered through a holder's thread).
    pub fn path_of(&self, netns: u32, inode: u64, processes: &[Process]) -> Option<String> {
        let dump = if self.own_netns == Some(u64::from(netns)) {
            sockdiag::unix_listeners().ok()?
        } else {
            let file = processes
                .iter()
                .find_map(|p| context::task_in_netns(p.pid, netns))?;
            sockdiag::in_netns(&file, sockdiag::unix_listeners)
                .ok()?
                .ok()?
        };
        dump.into_iter()
            .find(|l| l.inode == inode)
            .and_then(|l| l.path)
    }
}
