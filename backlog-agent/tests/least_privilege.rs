//! The agent as a non-root user with exactly the documented capability set
//! (caps::MINIMAL, what deploy/ grants) reports what a root agent reports,
//! keeps only the run-time capabilities once attached, and names what is
//! missing when it gets too few.

mod common;

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    os::{
        fd::AsRawFd,
        unix::{fs::PermissionsExt, process::CommandExt},
    },
    process::Command,
    sync::mpsc,
    thread,
    time::Duration,
};

use backlog_agent::caps::{self, MINIMAL};
use common::{
    counter_delta, in_new_netns, matrix, netns_inode, privileged, scenarios, serial, set_sysctl,
    tcp_ext, Agent, AgentRun, Started,
};
use socket2::{Domain, Socket, Type};

/// The unprivileged user the agent runs as (nobody on Debian and in the
/// guests' /etc/passwd).
const NOBODY: libc::uid_t = 65534;

fn mask(bits: impl IntoIterator<Item = u32>) -> u64 {
    bits.into_iter().fold(0, |m, b| m | (1 << b))
}

fn minimal_mask() -> u64 {
    mask(MINIMAL.iter().map(|c| c.bit))
}

/// The agent as `nobody` with `caps` as its ambient (hence permitted and
/// effective) capabilities: what `setpriv --reuid=65534 --regid=65534
/// --clear-groups --inh-caps=... --ambient-caps=...` does, done here so
/// that the busybox-only guests need no util-linux.
/// `agent` must be a copy nobody can reach (common::agent_for_any_user):
/// the clone may live where nobody cannot enter.
fn as_nobody(agent: &std::path::Path, caps: u64, args: &[&str]) -> Command {
    let mut command = Command::new(agent);
    command.args(args);
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl,
    // setgroups, setresgid, setresuid, capset) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let check = |rc: libc::c_long| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            // Keep the permitted set across the uid change.
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0).into())?;
            check(libc::setgroups(0, std::ptr::null()).into())?;
            check(libc::setresgid(NOBODY, NOBODY, NOBODY).into())?;
            check(libc::setresuid(NOBODY, NOBODY, NOBODY).into())?;
            #[repr(C)]
            struct Header {
                version: u32,
                pid: libc::c_int,
            }
            #[repr(C)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let mut header = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            let half = |shift: u32| Data {
                effective: (caps >> shift) as u32,
                permitted: (caps >> shift) as u32,
                inheritable: (caps >> shift) as u32,
            };
            let data = [half(0), half(32)];
            check(libc::syscall(
                libc::SYS_capset,
                &mut header as *mut Header,
                data.as_ptr(),
            ))?;
            // Ambient capabilities survive exec of a file without file
            // capabilities: this is how a unit's AmbientCapabilities= works.
            for bit in (0..64).filter(|b| caps & (1 << b) != 0) {
                check(
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        bit as libc::c_ulong,
                        0,
                        0,
                    )
                    .into(),
                )?;
            }
            Ok(())
        });
    }
    command
}

/// Lines about this test's listeners: the TCP one in its namespace, the
/// UNIX one by path.
fn ours(line: &serde_json::Value, netns: u64, unix_path: &str) -> bool {
    line["netns"].as_u64() == Some(netns) || line["listener"]["path"] == unix_path
}

/// What must be equal between two agents watching the same overflows: per
/// event, its kind, listener, holders and queue limit.
fn event_keys(run: &AgentRun, netns: u64, unix_path: &str) -> Vec<String> {
    let mut keys: Vec<String> = run
        .json_events()
        .iter()
        .filter(|e| e["kind"] != "listener_summary" && e["kind"] != "netns_counters")
        .filter(|e| ours(e, netns, unix_path))
        .map(|e| {
            let mut pids: Vec<u64> = e["processes"]
                .as_array()
                .map(|ps| ps.iter().filter_map(|p| p["pid"].as_u64()).collect())
                .unwrap_or_default();
            pids.sort_unstable();
            format!(
                "{} {} {} pids={pids:?} max={}",
                e["kind"], e["listener"], e["local"], e["accept_queue"]["max"]
            )
        })
        .collect();
    keys.sort();
    keys
}

/// Listener summaries by listener, with the fields that come from
/// attribution and from inside the listener's network namespace.
fn summaries(run: &AgentRun, netns: u64, unix_path: &str) -> BTreeMap<String, String> {
    run.json_events()
        .iter()
        .filter(|e| e["kind"] == "listener_summary" && ours(e, netns, unix_path))
        .map(|e| {
            (
                e["listener"].to_string(),
                format!(
                    "counts={} somaxconn={} syncookies={} processes={}",
                    e["counts"], e["somaxconn"], e["syncookies"], e["processes"]
                ),
            )
        })
        .collect()
}

/// Start-up lines that say which hook serves each drop kind (or why none
/// can): they must not depend on who runs the agent.
fn hooks(run: &AgentRun) -> Vec<String> {
    run.stderr
        .lines()
        .take_while(|l| !l.starts_with("backlog-agent: ready"))
        .filter(|l| !l.starts_with("backlog-agent: no CAP_"))
        .filter(|l| !l.starts_with("backlog-agent: capabilities:"))
        .map(str::to_owned)
        .collect()
}

/// A root agent and a `nobody` agent with `caps`, side by side over the
/// same overflows.
struct SideBySide {
    root: AgentRun,
    /// `None` when the agent as nobody did not get to `ready`.
    nobody: Option<AgentRun>,
    nobody_uid_ok: bool,
    port: u16,
    eagains: u32,
    netns: u64,
    unix_path: String,
    overflows: u64,
}

impl SideBySide {
    /// Both agents watch one private namespace where a TCP listener
    /// overflows at the final ACK, and a UNIX listener that refuses
    /// non-blocking connects; the listeners belong to this (root)
    /// process, so `nobody` needs CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE
    /// to attribute them, and CAP_SYS_ADMIN to read the namespace's
    /// sysctls.
    fn run(caps: u64) -> SideBySide {
        let args = ["--output", "json"];
        let root = Agent::expect_ready(&args);
        let (_dir, agent) = common::agent_for_any_user();
        let nobody = match Agent::start_command(as_nobody(&agent, caps, &args)) {
            Started::Ready(agent) => Ok(agent),
            Started::Exited(run) => Err(run),
        };

        // The namespace must outlive the overflows: the agents read its
        // sysctls through a thread of a holder that is inside it.
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let holder = thread::spawn(move || {
            in_new_netns(move || {
                // A value no namespace has by default, to tell that it
                // was read from this one.
                set_sysctl("net.core.somaxconn", "1000");
                let before = tcp_ext();
                let tcp = scenarios::final_ack_overflow(
                    "127.0.0.1:0".parse().unwrap(),
                    8,
                    Duration::from_millis(1200),
                );
                let overflows = counter_delta(&before, &tcp_ext(), "ListenOverflows");
                ready_tx.send((tcp.port, netns_inode(), overflows)).unwrap();
                // Stay in the namespace until both agents have stopped.
                let _ = done_rx.recv();
            })
        });
        let (port, netns, overflows) = ready_rx.recv().unwrap();
        // The UNIX listener stays in this namespace: the agent looks UNIX
        // listeners up in the connecting process's namespace.
        let unix = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // SAFETY: listen() on a valid socket fd changes only its backlog.
        assert_eq!(unsafe { libc::listen(unix.as_raw_fd(), 2) }, 0);
        let mut clients = Vec::new();
        let mut eagains = 0;
        for _ in 0..8 {
            let socket = Socket::new(Domain::UNIX, Type::STREAM, None).unwrap();
            socket.set_nonblocking(true).unwrap();
            match socket.connect(&socket2::SockAddr::unix(&path).unwrap()) {
                Ok(()) => clients.push(socket),
                Err(e) if e.kind() == ErrorKind::WouldBlock => eagains += 1,
                Err(e) => panic!("unix connect: {e}"),
            }
        }
        let nobody_uid_ok = nobody.as_ref().is_ok_and(|agent| {
            fs::read_to_string(format!("/proc/{}/status", agent.pid())).is_ok_and(|status| {
                status.contains(&format!("Uid:\t{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}"))
            })
        });
        let root = root.stop();
        let nobody = nobody.ok().map(Agent::stop);
        done_tx.send(()).unwrap();
        holder.join().unwrap();
        drop(clients);
        drop(unix);
        assert!(root.status.success(), "{}", root.stderr);
        SideBySide {
            root,
            nobody,
            nobody_uid_ok,
            port,
            eagains,
            netns,
            unix_path: path.to_string_lossy().into_owned(),
            overflows,
        }
    }

    fn events(&self, run: &AgentRun) -> Vec<String> {
        event_keys(run, self.netns, &self.unix_path)
    }

    fn summaries(&self, run: &AgentRun) -> BTreeMap<String, String> {
        summaries(run, self.netns, &self.unix_path)
    }

    /// The root run must show what the comparison relies on: a UNIX
    /// EAGAIN and TCP drops attributed to this process, and the private
    /// namespace's somaxconn in the summary.
    fn check_root(&self) {
        let events = self.events(&self.root);
        assert!(self.eagains > 0, "no UNIX connect() got EAGAIN");
        assert!(
            events
                .iter()
                .any(|e| e.contains("unix_connect_backlog_full")),
            "root saw no UNIX EAGAIN: {events:#?}\n{}",
            self.root.stderr
        );
        let port = format!("\"port\":{}", self.port);
        assert!(
            events.iter().any(|e| e.contains(&port)),
            "root saw no TCP drop on port {}: {events:#?}",
            self.port
        );
        let me = format!("pids=[{}]", std::process::id());
        assert!(events.iter().all(|e| e.contains(&me)), "{events:#?}");
        let summaries = self.summaries(&self.root);
        assert!(!summaries.is_empty(), "no listener_summary lines");
        assert!(
            summaries
                .iter()
                .filter(|(listener, _)| listener.contains("\"port\""))
                .all(|(_, s)| s.contains("somaxconn=1000")),
            "root did not read the namespace's somaxconn: {summaries:#?}"
        );
    }

    /// What the nobody run lacks compared with root's, or `None` if the
    /// two reported the same.
    fn difference(&self) -> Option<String> {
        let Some(nobody) = &self.nobody else {
            return Some("did not start".into());
        };
        if !nobody.status.success() {
            return Some(format!("failed: {}", nobody.status));
        }
        let (mine, roots) = (hooks(nobody), hooks(&self.root));
        if mine != roots {
            let lost: Vec<&String> = roots.iter().filter(|l| !mine.contains(l)).collect();
            let got: Vec<&String> = mine.iter().filter(|l| !roots.contains(l)).collect();
            return Some(format!("other hooks: {got:?} instead of {lost:?}"));
        }
        if self.events(nobody) != self.events(&self.root) {
            return Some(format!("other events: {:?}", self.events(nobody)));
        }
        if self.summaries(nobody) != self.summaries(&self.root) {
            return Some(format!(
                "other summaries: {:?} where root's are {:?}",
                self.summaries(nobody),
                self.summaries(&self.root)
            ));
        }
        None
    }
}

#[test]
fn minimal_set_as_nobody_reports_what_root_reports() {
    if !privileged("minimal_set_as_nobody_reports_what_root_reports") {
        return;
    }
    let _serial = serial();
    let run = SideBySide::run(minimal_mask());
    run.check_root();
    assert!(run.nobody_uid_ok, "the agent did not run as nobody");
    common::figure(&format!(
        "least_privilege root_events={} ListenOverflows_delta={} unix_eagain={}",
        run.events(&run.root).len(),
        run.overflows,
        run.eagains
    ));
    if let Some(difference) = run.difference() {
        panic!(
            "nobody with {} did not report what root reported: {difference}\n\
             nobody's stderr:\n{}",
            caps::minimal_names().join(" "),
            run.nobody.map(|r| r.stderr).unwrap_or_default()
        );
    }
    matrix(
        "auto",
        "least_privilege",
        "pass",
        &caps::minimal_names().join(","),
    );
}

/// The measurement behind the documented set, on this kernel: the
/// minimal set minus one capability at a time, compared with root. It
/// prints, per capability, whether this kernel needed it (a figure and a
/// matrix line); it fails only when the comparison itself is unsound.
#[test]
fn which_capabilities_this_kernel_needs() {
    if !privileged("which_capabilities_this_kernel_needs") {
        return;
    }
    let _serial = serial();
    let mut needed = Vec::new();
    for cap in MINIMAL {
        let run = SideBySide::run(minimal_mask() & !(1u64 << cap.bit));
        run.check_root();
        let verdict = match run.difference() {
            Some(difference) => {
                needed.push(cap.name);
                format!("needed ({difference})")
            }
            None => "not needed here".to_owned(),
        };
        common::figure(&format!(
            "least_privilege without {}: {}",
            cap.name,
            verdict.chars().take(600).collect::<String>()
        ));
    }
    matrix("auto", "capabilities_needed", "pass", &needed.join(","));
}

/// Once attached, every thread holds only the run-time capabilities
/// (caps::run_time_set) and can never regain others.
#[test]
fn attached_agent_keeps_only_run_time_capabilities() {
    if !privileged("attached_agent_keeps_only_run_time_capabilities") {
        return;
    }
    let _serial = serial();
    let (_dir, copy) = common::agent_for_any_user();
    for (who, agent) in [
        ("root", Agent::expect_ready(&[])),
        (
            "nobody",
            match Agent::start_command(as_nobody(&copy, minimal_mask(), &[])) {
                Started::Ready(agent) => agent,
                Started::Exited(run) => panic!("{}", run.stderr),
            },
        ),
    ] {
        let kept = caps::run_time_set(caps::CapSet(u64::MAX)).0;
        let tasks = fs::read_dir(format!("/proc/{}/task", agent.pid())).unwrap();
        for task in tasks.flatten() {
            let status = fs::read_to_string(task.path().join("status")).unwrap();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                    .unwrap_or_else(|| panic!("no {name} in {status}"))
            };
            for set in ["CapEff:", "CapPrm:"] {
                assert_eq!(field(set), kept, "{who} {set} of {:?}", task.path());
            }
            assert_eq!(field("CapInh:"), 0, "{who}");
            assert_eq!(field("CapAmb:"), 0, "{who}");
            assert!(status.contains("NoNewPrivs:\t1"), "{who}: {status}");
            if who == "root" {
                // Root has CAP_SETPCAP, so the bounding set shrinks too.
                assert_eq!(field("CapBnd:"), kept, "{who}");
            }
        }
        let run = agent.stop();
        assert!(run.status.success(), "{who}: {}", run.stderr);
        assert!(
            run.stderr
                .contains("capabilities: kept CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_SYS_ADMIN"),
            "{who}: {}",
            run.stderr
        );
    }
}

/// With a capability short, the agent names it: a one-line error for
/// what it cannot start without, a warning for what it runs without.
#[test]
fn too_few_capabilities_are_named() {
    if !privileged("too_few_capabilities_are_named") {
        return;
    }
    let _serial = serial();
    let without = |names: &[&str]| {
        mask(
            MINIMAL
                .iter()
                .filter(|c| !names.contains(&c.name))
                .map(|c| c.bit),
        )
    };
    // tracefs is root-only (0700) on recent kernels; where others may
    // read it, the agent starts and only warns.
    let tracefs_private = fs::metadata(common::tracefs())
        .map(|m| m.permissions().mode() & 0o005 == 0)
        .unwrap_or(true);
    let dac_expected = if tracefs_private {
        "error: cannot read tracefs at /sys/kernel/tracing (it is root-only): \
         missing capability CAP_DAC_READ_SEARCH"
    } else {
        "no CAP_DAC_READ_SEARCH:"
    };
    // CAP_SYS_ADMIN also passes the kernel's CAP_BPF and CAP_PERFMON
    // checks, so those two are missed only without it.
    let cases: [(&[&str], &str); 5] = [
        (
            &["CAP_BPF", "CAP_SYS_ADMIN"],
            "error: missing capability CAP_BPF",
        ),
        (
            &["CAP_PERFMON", "CAP_SYS_ADMIN"],
            "error: missing capability CAP_PERFMON",
        ),
        (&["CAP_DAC_READ_SEARCH"], dac_expected),
        (&["CAP_SYS_PTRACE"], "no CAP_SYS_PTRACE:"),
        (&["CAP_SYS_ADMIN"], "no CAP_SYS_ADMIN:"),
    ];
    let (_dir, agent) = common::agent_for_any_user();
    for (removed, expected) in cases {
        let run =
            match Agent::start_command(as_nobody(&agent, without(removed), &["--duration", "1"])) {
                Started::Ready(agent) => agent.stop(),
                Started::Exited(run) => run,
            };
        let fatal = expected.starts_with("error:");
        assert_eq!(
            !run.status.success(),
            fatal,
            "without {removed:?}: {}\n{}",
            run.status,
            run.stderr
        );
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains(expected))
            .unwrap_or_else(|| panic!("without {removed:?}, no {expected:?} in:\n{}", run.stderr));
        if fatal {
            assert_eq!(
                run.stderr.lines().last(),
                Some(line),
                "the error must be the last line"
            );
        }
    }
}
