//! Command-line options. The doc comments are the `--help` text.

use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Reports TCP connections that listening sockets drop because their SYN
/// or accept queue is full, with the port and the processes that own the
/// listener.
///
/// Runs until Ctrl-C, SIGTERM or --duration, then detaches and prints a
/// per-listener summary to stderr. Events go to stdout; what could not be
/// observed on this kernel, and why, goes to stderr at start-up. Needs
/// root, or CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE,
/// CAP_SYS_ADMIN and CAP_SYSLOG (see README), and a kernel with BTF.
#[derive(Debug, Parser)]
#[command(name = "backlog-agent", version, about, long_about)]
pub struct Cli {
    /// Output format of the events on stdout: `text` (one readable line per
    /// event), `json` (JSON lines, for log pipelines) or `none` (nothing on
    /// stdout: metrics only, with --metrics-addr).
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Stop after this many seconds (default: run until Ctrl-C or SIGTERM).
    #[arg(short, long, value_name = "SECS", value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Which hook family to use: `auto` picks, per drop kind, the best one
    /// that loads and attaches on this kernel (fentry, then kprobe, then
    /// tracepoint); the others force that family and fail if the kernel
    /// cannot serve it.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,

    /// Also print the per-listener summary every SECS seconds (it is
    /// always printed at exit).
    #[arg(short, long, value_name = "SECS", value_parser = parse_duration)]
    pub interval: Option<Duration>,

    /// Add each process's command line to events (off by default: command
    /// lines can hold secrets).
    #[arg(long)]
    pub show_cmdline: bool,

    /// Size of the kernel-to-agent ring buffer in KiB (a power of two, at
    /// least 4). Events that do not fit are counted and reported as lost.
    #[arg(long, value_name = "KIB", default_value_t = 4096, value_parser = parse_ring_kib)]
    pub ring_buffer_kib: u32,

    /// Full events per second per listener and drop kind (0: unlimited).
    /// Beyond it (flood mode) the kernel only counts, exactly, and the agent
    /// writes one aggregate record per listener and kind every second with
    /// the count and the busiest peers.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_events_per_sec: u32,

    /// Remove a listener's row from the kernel's per-listener counts once
    /// it has not changed for SECS (a closed listener, or one quiet that
    /// long), keeping its totals in the agent: the kernel maps do not fill
    /// up with listeners that are gone. 0: never.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub expire_after: u64,
    /// Warn (event `accept_queue_near_full`, at most once a second per
    /// listener) when a listener's accept queue reaches PERCENT of its
    /// limit, before anything is dropped; 0 turns the warning off.
    #[arg(long, value_name = "PERCENT", default_value_t = 80,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub near_full: u32,

    /// How long the clients or the proxy in front wait for a connection
    /// before giving up (nginx's fastcgi/proxy timeouts, a load
    /// balancer's): the backlog advice keeps a full queue drainable within
    /// it, since a deeper one only turns drops into timeouts (504).
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    pub client_timeout: Duration,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g.
    /// 127.0.0.1:9877; port 0 picks a free port, printed at start-up).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// At most this many listeners get series of their own in the metrics;
    /// the drops of the others are added up under listener="other", so a
    /// host with many listeners cannot swamp Prometheus.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub metrics_max_listeners: usize,
    /// Only TCP listeners on this port (repeatable). Filters are applied
    /// in the kernel: drops at other listeners are neither reported nor
    /// counted. Each filter given must match; within one, any value does.
    #[arg(long, value_name = "PORT")]
    pub port: Vec<u16>,

    /// Only TCP listeners held by this process (repeatable): its sockets
    /// at start-up and those its later listen() calls create.
    #[arg(long, value_name = "PID")]
    pub pid: Vec<u32>,

    /// Only listeners in this network namespace (repeatable), by inode as
    /// `lsns -t net` and the events show it.
    #[arg(long, value_name = "INODE")]
    pub netns: Vec<u32>,

    /// Only TCP listeners created in this cgroup v2 or below it
    /// (repeatable): a path under the cgroup2 mount or as /proc/PID/cgroup
    /// shows it, e.g. /system.slice/nginx.service. Cgroups created after
    /// start-up are not included.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Vec<std::path::PathBuf>,

    /// Only non-blocking UNIX connect()s to this path that got EAGAIN
    /// (repeatable).
    #[arg(long, value_name = "PATH")]
    pub unix_path: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachMode {
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(format!("`{text}`: expected a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The largest ring buffer in KiB: the map size is a u32 of bytes.
const MAX_RING_KIB: u32 = 2 * 1024 * 1024;

fn parse_ring_kib(text: &str) -> Result<u32, String> {
    let kib: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number of KiB"))?;
    // The kernel wants a power-of-two multiple of the page size in a u32
    // byte count: 2 GiB (2097152 KiB) is the largest it accepts.
    if kib < 4 || !kib.is_power_of_two() || kib > MAX_RING_KIB {
        return Err(format!(
            "{kib} KiB: expected a power of two from 4 to {MAX_RING_KIB} (2 GiB)"
        ));
    }
    Ok(kib)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn help_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_and_rejects() {
        let cli = Cli::try_parse_from(["backlog-agent", "-o", "json", "-d", "2.5"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
        assert_eq!(cli.duration, Some(Duration::from_millis(2500)));
        assert_eq!(cli.attach, AttachMode::Auto);
        assert_eq!(cli.ring_buffer_kib, 4096);
        assert_eq!(cli.max_events_per_sec, 100);
        assert_eq!(cli.near_full, 80);
        assert_eq!(cli.client_timeout, Duration::from_secs(10));
        assert_eq!(cli.metrics_addr, None);
        assert_eq!(cli.metrics_max_listeners, 1000);
        let metrics = Cli::try_parse_from([
            "backlog-agent",
            "--output",
            "none",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(metrics.output, OutputFormat::None);
        assert_eq!(metrics.metrics_addr, Some("127.0.0.1:0".parse().unwrap()));
        for bad in [
            vec!["backlog-agent", "-d", "0"],
            vec!["backlog-agent", "-d", "-1"],
            vec!["backlog-agent", "-d", "soon"],
            vec!["backlog-agent", "--ring-buffer-kib", "3000"],
            // 4 GiB in bytes wraps a u32 to 0.
            vec!["backlog-agent", "--ring-buffer-kib", "4194304"],
            vec!["backlog-agent", "--ring-buffer-kib", "2"],
            vec!["backlog-agent", "--attach", "uprobe"],
            vec!["backlog-agent", "--output", "xml"],
            vec!["backlog-agent", "--max-events-per-sec", "-1"],
            vec!["backlog-agent", "--near-full", "101"],
            vec!["backlog-agent", "--client-timeout", "0"],
            vec!["backlog-agent", "--metrics-addr", "localhost"],
            vec!["backlog-agent", "--metrics-max-listeners", "-1"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
        let largest =
            Cli::try_parse_from(["backlog-agent", "--ring-buffer-kib", "2097152"]).unwrap();
        // 2 GiB: the largest power of two a u32 byte count holds.
        assert_eq!(u64::from(largest.ring_buffer_kib) * 1024, 1 << 31);
    }
}
