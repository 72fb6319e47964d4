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
    /// event) or `json` (JSON lines, for log pipelines).
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

fn parse_ring_kib(text: &str) -> Result<u32, String> {
    let kib: u32 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number of KiB"))?;
    // The kernel wants a power-of-two multiple of the page size; 4 GiB is
    // its upper bound for a ring buffer.
    if kib < 4 || !kib.is_power_of_two() || kib > 4 * 1024 * 1024 {
        return Err(format!(
            "{kib} KiB: expected a power of two from 4 to 4194304"
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
        for bad in [
            vec!["backlog-agent", "-d", "0"],
            vec!["backlog-agent", "-d", "-1"],
            vec!["backlog-agent", "-d", "soon"],
            vec!["backlog-agent", "--ring-buffer-kib", "3000"],
            vec!["backlog-agent", "--ring-buffer-kib", "2"],
            vec!["backlog-agent", "--attach", "uprobe"],
            vec!["backlog-agent", "--output", "xml"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?}");
        }
    }
}
