//! Every format the user sees, in one wing, each a renderer of the model
//! (model.rs): readable lines (`text`), JSON lines (`json`) and Prometheus
//! metrics (`metrics`), with the diagnoses they show (`diagnosis`).
//! [`Reporter`] writes the first two to stdout and stderr.

pub mod diagnosis;
pub mod json;
pub mod metrics;
pub mod text;

use std::{
    io::{BufWriter, Write},
    time::SystemTime,
};

use crate::{
    cli::OutputFormat,
    clock::{self, Rfc3339Cache},
    model::{
        AggregateRecord, CountedNetns, DropEvent, ListenerAddr, ListenerReport, NearFullWarning,
        Summary, UnixDrop,
    },
};

const OUT_BUFFER: usize = 256 * 1024;

/// A one-line note for the operator on stderr, named for the tool, so it
/// stays apart from the events on stdout.
pub fn note(message: impl std::fmt::Display) {
    eprintln!("backlog-agent: {message}");
}

/// What the renderers need besides the model.
pub struct ReportOptions {
    pub format: OutputFormat,
    /// The kernel's rate limit, named in aggregate records.
    pub max_events_per_sec: u32,
    /// `--near-full`, shown in the warning.
    pub near_full_percent: u32,
}

/// Writes model values in the `--output` format: events on stdout,
/// summaries on stderr (and, as JSON lines, on stdout too). With
/// `--output none` (metrics only) stdout stays silent.
pub struct Reporter {
    options: ReportOptions,
    out: BufWriter<Box<dyn Write + Send>>,
    /// The JSON line being written, reused.
    line: Vec<u8>,
    times: Rfc3339Cache,
    /// Set once a write to stdout failed (a closed pipe): the agent stops.
    pub closed: bool,
}

impl Reporter {
    pub fn new(options: ReportOptions, out: Box<dyn Write + Send>) -> Self {
        Reporter {
            options,
            // Large enough that a flood is written in few syscalls.
            out: BufWriter::with_capacity(OUT_BUFFER, out),
            line: Vec::with_capacity(1024),
            times: Rfc3339Cache::default(),
            closed: false,
        }
    }

    pub fn flush(&mut self) {
        if !self.closed && self.out.flush().is_err() {
            self.closed = true;
        }
    }

    fn write_line(&mut self, line: &str) {
        if !self.closed && writeln!(self.out, "{line}").is_err() {
            self.closed = true;
        }
    }

    /// The hot path: a flood writes a million of these a second.
    pub fn drop_event(&mut self, drop: &DropEvent) {
        self.line.clear();
        match self.options.format {
            OutputFormat::Text => {
                self.line
                    .extend_from_slice(text::drop_line(drop).as_bytes());
                self.line.push(b'\n');
            }
            OutputFormat::Json => {
                json::write_drop(&mut self.line, drop, self.times.format(drop.time))
            }
            OutputFormat::None => return,
        }
        if !self.closed && self.out.write_all(&self.line).is_err() {
            self.closed = true;
        }
    }

    pub fn unix_drop(&mut self, drop: &UnixDrop) {
        let line = match self.options.format {
            OutputFormat::Text => text::unix_line(drop),
            OutputFormat::Json => json::unix_line(drop),
            OutputFormat::None => return,
        };
        self.write_line(&line);
    }

    pub fn aggregate(&mut self, record: &AggregateRecord) {
        let line = match self.options.format {
            OutputFormat::Text => text::aggregate_line(record),
            OutputFormat::Json => json::aggregate_line(record, self.options.max_events_per_sec),
            OutputFormat::None => return,
        };
        self.write_line(&line);
    }

    pub fn near_full(&mut self, warning: &NearFullWarning) {
        let percent = self.options.near_full_percent;
        let line = match self.options.format {
            OutputFormat::Text => text::near_full_line(warning, percent),
            OutputFormat::Json => json::near_full_line(warning, percent),
            OutputFormat::None => return,
        };
        self.write_line(&line);
    }

    /// The per-listener summary: a table and diagnoses on stderr, and with
    /// `--output json` one `listener_summary` line per listener on stdout.
    /// The time a listener summary's JSON lines carry.
    pub fn summary_time() -> String {
        clock::rfc3339(SystemTime::now())
    }

    /// With `--output json`, the `listener_summary` line of one listener
    /// on stdout. The summary writes them one listener at a time, then
    /// listener_summary_text.
    pub fn listener_summary_line(&mut self, time: &str, report: &ListenerReport) {
        if self.options.format == OutputFormat::Json {
            self.write_line(&json::listener_summary_line(time, report));
        }
    }

    /// The heading and the table (from `summary`) on stderr, after what
    /// is pending on stdout; each listener's diagnosis follows through the
    /// writer returned, as its report is made.
    pub fn listener_summary_text(&mut self, heading: &str, summary: &Summary) -> Diagnoses {
        self.flush();
        let mut stderr = StderrLines(std::io::BufWriter::new(std::io::stderr().lock()));
        text::write_summary_head(&mut stderr, heading, summary);
        let _ = std::io::Write::flush(&mut stderr.0);
        Diagnoses(StderrLines(std::io::BufWriter::new(std::io::stderr())))
    }

    /// With `--output json`, the line of the listeners folded out of the
    /// summary and the line of the kernel's skipped runs, after the
    /// listeners' lines.
    pub fn folded_summary_line(&mut self, summary: &Summary) {
        if self.options.format == OutputFormat::Json {
            let time = clock::rfc3339(SystemTime::now());
            if let Some(line) = json::folded_line(&time, &summary.folded) {
                self.write_line(&line);
            }
            if let Some(line) = json::kernel_skips_line(&time, &summary.kernel_skips) {
                self.write_line(&line);
            }
        }
        self.flush();
    }

    /// Drops counted by the kernel during the run in namespaces where they
    /// could not be traced: on stderr, and as JSON lines on stdout.
    pub fn counted(&mut self, namespaces: &[CountedNetns]) {
        if self.options.format == OutputFormat::Json {
            let time = clock::rfc3339(SystemTime::now());
            for counted in namespaces {
                self.write_line(&json::counted_line(&time, counted));
            }
        }
        self.flush();
        eprint!("{}", text::counted(namespaces));
    }
}

/// The diagnoses of a summary, one line per listener on stderr (buffered:
/// one write per few lines, not one per listener).
pub struct Diagnoses(StderrLines<std::io::BufWriter<std::io::Stderr>>);

impl Diagnoses {
    pub fn write(&mut self, listener: &ListenerAddr, diagnosis: Option<&str>) {
        text::write_diagnosis(&mut self.0, listener, diagnosis.unwrap_or_default());
    }

    pub fn finish(mut self) {
        let _ = std::io::Write::flush(&mut self.0 .0);
    }
}

/// stderr as a `fmt::Write`, buffered: the summary is written to it line
/// by line instead of being built as one string first.
struct StderrLines<W: std::io::Write>(W);

impl<W: std::io::Write> std::fmt::Write for StderrLines<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.write_all(s.as_bytes()).map_err(|_| std::fmt::Error)
    }
}

/// Values the renderers' unit tests share.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use backlog_common::DropKind;

    use crate::{decode::Event, enrich::attribution::Process};

    pub(crate) fn event() -> Event {
        Event {
            kind: DropKind::AckDroppedAcceptQueueFull,
            timestamp_ns: 1,
            cpu: 1,
            listener: "[::]:8080".parse().unwrap(),
            local: Some("127.0.0.1:8080".parse().unwrap()),
            peer: Some("127.0.0.1:40000".parse().unwrap()),
            accept_queue_len: 9,
            accept_queue_max: 8,
            syn_queue_len: 2,
            netns_inode: 4026531840,
            socket_inode: 555,
            cgroup_id: 77,
            partial: false,
            reset_sent: false,
        }
    }

    pub(crate) fn procs() -> Vec<Process> {
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
    }

    pub(crate) fn time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_316_400)
    }
}
