//! What the benchmarks measure besides the kernel's counters: a process's
//! CPU time, and each BPF program's run time and run count from
//! kernel.bpf_stats (enabled by the bench while it holds the stats fd).

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// CPU time (user + system) a process has used so far; zero once it has
/// exited (the bench reads it while the process runs).
pub fn process_cpu(pid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

/// Times the process's threads have gone to sleep and been woken since
/// they started (voluntary context switches, summed over its threads):
/// an idle agent's wakeups are its fixed cost.
pub fn process_wakeups(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| fs::read_to_string(task.path().join("status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .sum()
}

/// CPU time of one thread of a process.
pub fn task_cpu(pid: u32, tid: u32) -> Duration {
    stat_cpu(&format!("/proc/{pid}/task/{tid}/stat"))
}

/// utime + stime of a /proc stat file; zero when it cannot be read.
fn stat_cpu(path: &str) -> Duration {
    let stat = fs::read_to_string(path).unwrap_or_default();
    // Fields after the ")" that closes comm: utime and stime are 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// (name, run_time_ns, run_cnt) of every loaded BPF program, by id.
pub type BpfSnapshot = HashMap<u32, (String, u64, u64)>;

pub fn bpf_programs() -> BpfSnapshot {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| {
            (
                p.id(),
                (
                    p.name_as_str().unwrap_or("?").to_owned(),
                    p.run_time().as_nanos() as u64,
                    p.run_count(),
                ),
            )
        })
        .collect()
}

/// Per program that ran between the two snapshots: name, calls, ns/call.
pub fn bpf_costs(before: &BpfSnapshot, after: &BpfSnapshot) -> Vec<(String, u64, f64)> {
    let mut out: Vec<(String, u64, f64)> = after
        .iter()
        .filter_map(|(id, (name, ns, cnt))| {
            let (ns0, cnt0) = before.get(id).map_or((0, 0), |(_, n, c)| (*n, *c));
            let calls = cnt.saturating_sub(cnt0);
            (calls > 0).then(|| {
                (
                    name.clone(),
                    calls,
                    ns.saturating_sub(ns0) as f64 / calls as f64,
                )
            })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

pub fn print_costs(what: &str, costs: &[(String, u64, f64)]) {
    print_costs_indented(4, what, costs);
}

/// [`print_costs`] under a heading of its own (`indent` spaces).
pub fn print_costs_indented(indent: usize, what: &str, costs: &[(String, u64, f64)]) {
    let pad = " ".repeat(indent);
    if costs.is_empty() {
        println!("{pad}{what}: no BPF program ran");
    }
    for (name, calls, ns) in costs {
        println!("{pad}{what}: {name}: {calls} calls, {ns:.0} ns per call");
    }
}

/// `n` idle processes (sleep 600) for the cases that ask whether the
/// agent's cost grows with the processes on the machine; the caller kills
/// them. Fewer when the machine refuses more.
pub fn idle_processes(n: usize) -> Vec<Child> {
    (0..n)
        .filter_map(|_| {
            Command::new(super::outside("sleep"))
                .arg("600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        })
        .collect()
}

/// Runs `work` while the tracer `pid` (the agent or bpftrace) watches:
/// what it returned, the tracer's CPU over it and the 1.2 s after (its
/// last window and drain, or its output of the last events, are part of
/// its cost), and the kernel cost of every program that ran during it.
pub fn traced_phase<T>(
    pid: u32,
    work: impl FnOnce() -> T,
) -> (T, Duration, Vec<(String, u64, f64)>) {
    let cpu0 = process_cpu(pid);
    let before = bpf_programs();
    let result = work();
    let after = bpf_programs();
    thread::sleep(Duration::from_millis(1200));
    let cpu = process_cpu(pid).saturating_sub(cpu0);
    (result, cpu, bpf_costs(&before, &after))
}

/// bpftrace running a one-line program, what it prints kept in a file:
/// the benchmarks' side-by-side tracer.
pub struct Bpftrace {
    child: Child,
    out: PathBuf,
}

impl Bpftrace {
    /// Starts `bpftrace -e program` and waits until it says it has
    /// attached; why not, when it exits first (a probe this kernel lacks)
    /// or `within` runs out (its LLVM is slow under software emulation).
    pub fn attach(
        bpftrace: &Path,
        program: &str,
        out: PathBuf,
        within: Duration,
    ) -> Result<Self, String> {
        let err = out.with_extension("err");
        let create =
            |path: &Path| fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()));
        let mut child = Command::new(bpftrace)
            .args(["-e", program])
            .stdin(Stdio::null())
            .stdout(create(&out)?)
            .stderr(create(&err)?)
            .spawn()
            .map_err(|e| format!("bpftrace did not start: {e}"))?;
        let deadline = Instant::now() + within;
        while !fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("Attaching")
        {
            if let Ok(Some(status)) = child.try_wait() {
                let why = fs::read_to_string(&err).unwrap_or_default();
                return Err(format!(
                    "bpftrace exited ({status}) before attaching: {}",
                    why.lines().last().unwrap_or("no message")
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "bpftrace did not attach within {} s",
                    within.as_secs()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(Self { child, out })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it as Ctrl-C does and counts the lines its program printed
    /// (its own "Attaching" line left out).
    pub fn stop(mut self) -> u64 {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let _ = self.child.wait();
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter(|line| !line.starts_with("Attaching"))
            .count() as u64
    }
}
