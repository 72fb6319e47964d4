//! The exposition format, checked with a strict parser of the text formats
//! written here (independent of prometheus-client), and the series cap.

use std::collections::{BTreeMap, HashSet};

use super::*;

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

/// `{a="x",b="y"}` at the start of `text`: the labels and the rest.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let Some(mut rest) = text.strip_prefix('{') else {
        return Ok((labels, text));
    };
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    other => return Err(format!("bad escape \\{other}")),
                },
                (_, '\n') => return Err("raw newline in label value".into()),
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
            if rest.starts_with('}') {
                return Err("trailing comma".into());
            }
        } else if !rest.starts_with('}') {
            return Err("labels not separated by ','".into());
        }
    }
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|_| format!("bad value {text:?}")),
    }
}

/// Parses the Prometheus text format (0.0.4) or, with `openmetrics`,
/// OpenMetrics 1.0 text, strictly: names and escapes, TYPE before its
/// samples and only once, a family's samples together, sample names that
/// fit their family's type, no repeated series, counters not negative,
/// and for OpenMetrics the closing `# EOF`.
fn parse(text: &str, openmetrics: bool) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let mut finished: HashSet<String> = HashSet::new();
    let mut series: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    let mut eof = false;
    if !text.ends_with('\n') {
        return Err("no final newline".into());
    }
    for (n, line) in text.lines().enumerate() {
        let fail = |why: String| format!("line {}: {why}: {line:?}", n + 1);
        if eof {
            return Err(fail("text after # EOF".into()));
        }
        if line.is_empty() {
            return Err(fail("empty line".into()));
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.strip_prefix(' ').unwrap_or(comment).splitn(3, ' ');
            let keyword = words.next().unwrap_or_default();
            match keyword {
                "EOF" if openmetrics => eof = true,
                "TYPE" | "HELP" | "UNIT" => {
                    let name = words.next().ok_or_else(|| fail("no name".into()))?;
                    if !valid_metric_name(name) {
                        return Err(fail(format!("bad metric name {name:?}")));
                    }
                    let arg = words.next();
                    if current.as_ref().is_none_or(|(family, _)| family != name) {
                        if let Some((family, _)) = current.take() {
                            finished.insert(family);
                        }
                        if finished.contains(name) {
                            return Err(fail(format!("family {name} split")));
                        }
                        current = Some((name.to_owned(), "untyped".to_owned()));
                    }
                    match keyword {
                        "TYPE" => {
                            let kind = arg.ok_or_else(|| fail("TYPE without type".into()))?;
                            let known: &[&str] = if openmetrics {
                                &[
                                    "counter",
                                    "gauge",
                                    "info",
                                    "histogram",
                                    "summary",
                                    "unknown",
                                ]
                            } else {
                                &["counter", "gauge", "histogram", "summary", "untyped"]
                            };
                            if !known.contains(&kind) {
                                return Err(fail(format!("unknown type {kind}")));
                            }
                            if types.insert(name.to_owned(), kind.to_owned()).is_some() {
                                return Err(fail(format!("second TYPE for {name}")));
                            }
                            if samples.iter().any(|s: &Sample| s.name.starts_with(name)) {
                                return Err(fail("TYPE after samples".into()));
                            }
                            current = Some((name.to_owned(), kind.to_owned()));
                        }
                        "UNIT" if openmetrics => {
                            let unit = arg.ok_or_else(|| fail("UNIT without unit".into()))?;
                            if !name.ends_with(&format!("_{unit}")) {
                                return Err(fail(format!("{name} does not end in _{unit}")));
                            }
                        }
                        "UNIT" => return Err(fail("UNIT is OpenMetrics only".into())),
                        _ => {}
                    }
                }
                _ if openmetrics => return Err(fail("unknown comment".into())),
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| fail("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(fail(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = parse_labels(&line[name_end..]).map_err(fail)?;
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| fail("no space before value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(fail)?;
        if let Some(timestamp) = fields.next() {
            timestamp
                .parse::<f64>()
                .map_err(|_| fail("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(fail("trailing fields".into()));
        }
        let Some((family, kind)) = &current else {
            return Err(fail("sample without a family".into()));
        };
        let expected = match (openmetrics, kind.as_str()) {
            (true, "counter") => format!("{family}_total"),
            (true, "info") => format!("{family}_info"),
            _ => family.clone(),
        };
        if name != expected {
            return Err(fail(format!("sample {name} in family {family} ({kind})")));
        }
        if kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(fail("counter below zero".into()));
        }
        let key = (
            name.to_owned(),
            labels.clone().into_iter().collect::<Vec<_>>(),
        );
        if !series.insert(key) {
            return Err(fail("repeated series".into()));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    if openmetrics && !eof {
        return Err("no # EOF".into());
    }
    Ok(samples)
}

fn listener(name: &str, netns: u32, drops: &[(&'static str, u64)]) -> ListenerMetrics {
    ListenerMetrics {
        listener: name.to_owned(),
        netns,
        comm: Some("nginx".into()),
        drops: drops.iter().copied().collect(),
        accept_queue_limit: 511,
        accept_queue_max_seen: 512,
        ..ListenerMetrics::default()
    }
}

const ACK: &str = "ack_dropped_accept_queue_full";
const UNIX: &str = "unix_connect_backlog_full";

/// Everything a scrape can show, with label values that need escaping.
fn full_snapshot() -> Snapshot {
    let mut unix = listener("unix:/run/odd \"dir\"\\x\nλ.sock", 7, &[(UNIX, 19)]);
    unix.unit = Some("php8.2-fpm.service".into());
    unix.backlog_requested = Some(-1);
    let mut v6 = listener("[::]:8080", 4026531840, &[(ACK, 3), ("syn_cookie_sent", 0)]);
    v6.container = Some("0123abcd".into());
    v6.pod = Some("8a9b".into());
    v6.backlog_requested = Some(4096);
    Snapshot {
        listeners: vec![listener("127.0.0.1:80", 7, &[(ACK, 35)]), unix, v6],
        other: [(ACK, 5)].into_iter().collect(),
        counted: vec![CountedDrops {
            netns: 7,
            kind: "syn_cookie_sent",
            count: 33,
        }],
        health: Health {
            events: 57,
            events_lost: 1,
            events_undecodable: 0,
            events_partial: 2,
            drops_untracked: 0,
            events_aggregated: 5,
        },
        bpf_stats_sysctl: true,
        programs: vec![ProgramStats {
            name: "kfree_skb".into(),
            run_time_ns: 1_500_000_000,
            run_count: 10,
        }],
        kernel_skips: vec![KernelSkip {
            program: "kfree_skb_listen_overflow".into(),
            observes: vec![ACK, "accept-queue wait"],
            runs: 7,
        }],
        hooks: vec![
            HookInfo {
                kind: ACK,
                family: "tracepoint",
                hook: "tracepoint skb:kfree_skb (reason TCP_LISTEN_OVERFLOW)".into(),
            },
            HookInfo {
                kind: "syn_cookie_sent",
                family: "none",
                hook: String::new(),
            },
        ],
        version: "0.1.0",
        kernel: "6.18.0".into(),
    }
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

#[test]
fn both_formats_parse_strictly_with_the_values_put_in() {
    for openmetrics in [false, true] {
        let text = render(full_snapshot(), openmetrics).unwrap();
        let samples = parse(&text, openmetrics)
            .unwrap_or_else(|err| panic!("openmetrics={openmetrics}: {err}\n{text}"));
        let drops = |labels: &[(&str, &str)]| {
            find(&samples, "backlog_drops_total", labels)
                .unwrap_or_else(|| panic!("no backlog_drops_total {labels:?}:\n{text}"))
                .value
        };
        assert_eq!(
            drops(&[
                ("kind", ACK),
                ("listener", "127.0.0.1:80"),
                ("netns", "7"),
                ("comm", "nginx")
            ]),
            35.0
        );
        assert_eq!(
            drops(&[
                ("listener", "unix:/run/odd \"dir\"\\x\nλ.sock"),
                ("unit", "php8.2-fpm.service")
            ]),
            19.0
        );
        assert_eq!(
            drops(&[
                ("listener", "[::]:8080"),
                ("container", "0123abcd"),
                ("pod", "8a9b")
            ]),
            3.0
        );
        assert_eq!(drops(&[("listener", "other"), ("kind", ACK)]), 5.0);
        let value = |name: &str, labels: &[(&str, &str)]| {
            find(&samples, name, labels)
                .unwrap_or_else(|| panic!("no {name} {labels:?}:\n{text}"))
                .value
        };
        assert_eq!(
            value(
                "backlog_listen_backlog_requested",
                &[("listener", "[::]:8080")]
            ),
            4096.0
        );
        assert_eq!(
            value(
                "backlog_listen_backlog_requested",
                &[
                    ("netns", "7"),
                    ("listener", "unix:/run/odd \"dir\"\\x\nλ.sock")
                ]
            ),
            -1.0
        );
        assert!(
            find(
                &samples,
                "backlog_listen_backlog_requested",
                &[("listener", "127.0.0.1:80")]
            )
            .is_none(),
            "a listen() not seen has no requested backlog"
        );
        assert_eq!(
            value(
                "backlog_accept_queue_limit",
                &[("listener", "127.0.0.1:80")]
            ),
            511.0
        );
        assert_eq!(
            value(
                "backlog_accept_queue_max_seen",
                &[("listener", "127.0.0.1:80")]
            ),
            512.0
        );
        assert_eq!(
            value(
                "backlog_netns_counted_drops_total",
                &[("kind", "syn_cookie_sent"), ("netns", "7")]
            ),
            33.0
        );
        assert_eq!(value("backlog_events_total", &[]), 57.0);
        assert_eq!(value("backlog_events_lost_total", &[]), 1.0);
        assert_eq!(value("backlog_events_partial_total", &[]), 2.0);
        assert_eq!(value("backlog_bpf_stats_enabled", &[]), 1.0);
        assert_eq!(
            value(
                "backlog_bpf_program_run_time_seconds_total",
                &[("program", "kfree_skb")]
            ),
            1.5
        );
        assert_eq!(
            value(
                "backlog_bpf_program_runs_total",
                &[("program", "kfree_skb")]
            ),
            10.0
        );
        assert_eq!(
            value(
                "backlog_bpf_program_skipped_runs_total",
                &[
                    ("program", "kfree_skb_listen_overflow"),
                    (
                        "observes",
                        "ack_dropped_accept_queue_full,accept-queue wait"
                    )
                ]
            ),
            7.0
        );
        assert_eq!(
            value(
                "backlog_hook_info",
                &[("kind", ACK), ("family", "tracepoint")]
            ),
            1.0
        );
        assert_eq!(
            value(
                "backlog_hook_info",
                &[("kind", "syn_cookie_sent"), ("family", "none")]
            ),
            1.0
        );
        assert_eq!(
            value(
                "backlog_build_info",
                &[("version", "0.1.0"), ("kernel", "6.18.0")]
            ),
            1.0
        );
        assert!(
            samples.iter().all(|s| !s.labels.contains_key("pid")),
            "no series may carry a pid"
        );
    }
}

#[test]
fn an_empty_agent_still_renders_health_and_build_info() {
    for openmetrics in [false, true] {
        let text = render(Snapshot::default(), openmetrics).unwrap();
        let samples = parse(&text, openmetrics).unwrap_or_else(|err| panic!("{err}\n{text}"));
        assert!(
            find(&samples, "backlog_events_total", &[]).is_some(),
            "{text}"
        );
        assert!(find(&samples, "backlog_bpf_stats_enabled", &[]).is_some_and(|s| s.value == 0.0));
        assert!(
            find(&samples, "backlog_build_info", &[]).is_some(),
            "{text}"
        );
        assert!(
            !text.contains("backlog_drops_total"),
            "no HELP/TYPE without samples:\n{text}"
        );
    }
}

/// The parser must be able to say no, or the tests above prove nothing.
#[test]
fn the_parser_rejects_malformed_expositions() {
    for (bad, openmetrics) in [
        ("x 1", false),
        ("x{a=\"1\"} one\n", false),
        ("x{a=1} 1\n", false),
        ("x{a=\"1\",a=\"2\"} 1\n", false),
        ("x{__a=\"1\"} 1\n", false),
        ("x{a=\"\\t\"} 1\n", false),
        ("x{a=\"1\",} 1\n", false),
        ("# TYPE x counter\nx -1\n", false),
        ("# TYPE x gauge\nx 1\nx 2\n", false),
        (
            "# TYPE x gauge\nx 1\n# TYPE y gauge\ny 1\n# TYPE x gauge\n",
            false,
        ),
        ("# TYPE x gauge\ny 1\n", false),
        ("# TYPE x frob\nx 1\n", false),
        ("# TYPE x counter\nx_total 1\n", true),
        ("# TYPE x counter\nx_total 1\n# EOF\nx_total 2\n", true),
        (
            "# TYPE x_seconds counter\n# UNIT x_seconds bytes\nx_seconds_total 1\n# EOF\n",
            true,
        ),
        ("# TYPE x counter\nx 1\n# EOF\n", true),
        ("9x 1\n", false),
    ] {
        assert!(
            parse(bad, openmetrics).is_err(),
            "accepted (openmetrics={openmetrics}): {bad:?}"
        );
    }
    assert!(parse("# TYPE x counter\nx_total 1\n# EOF\n", true).is_ok());
    assert!(parse("# HELP x h\n# TYPE x counter\nx 1\n", false).is_ok());
}

#[test]
fn series_cap_keeps_the_first_listeners_and_adds_up_the_rest() {
    let mut cap = SeriesCap::new(2);
    let round = |a: u64, b: u64, c: u64, d: u64| {
        vec![
            listener("10.0.0.1:1", 1, &[(ACK, a)]),
            listener("10.0.0.1:2", 1, &[(ACK, b)]),
            listener("10.0.0.1:3", 1, &[(ACK, c), (UNIX, 1)]),
            listener("10.0.0.1:4", 1, &[(ACK, d)]),
        ]
    };
    // The two busiest are admitted.
    let (kept, other) = cap.apply(round(1, 9, 5, 2));
    let names: Vec<&str> = kept.iter().map(|l| l.listener.as_str()).collect();
    assert_eq!(names, ["10.0.0.1:2", "10.0.0.1:3"]);
    assert_eq!(other, [(ACK, 3)].into_iter().collect());
    // Busier later: still "other", so no series jumps between the two and
    // the "other" sum only grows.
    let (kept, other) = cap.apply(round(100, 9, 5, 50));
    let names: Vec<&str> = kept.iter().map(|l| l.listener.as_str()).collect();
    assert_eq!(names, ["10.0.0.1:2", "10.0.0.1:3"]);
    assert_eq!(other, [(ACK, 150)].into_iter().collect());
    // The same address in another namespace is another listener.
    let (kept, other) = cap.apply(vec![listener("10.0.0.1:2", 2, &[(ACK, 7)])]);
    assert!(kept.is_empty());
    assert_eq!(other, [(ACK, 7)].into_iter().collect());
    // Rendered, the cap shows as listener="other" and no more than two
    // listeners of their own.
    let (kept, other) = cap.apply(round(1, 1, 1, 1));
    let snapshot = Snapshot {
        listeners: kept,
        other,
        ..Snapshot::default()
    };
    let samples = parse(&render(snapshot, false).unwrap(), false).unwrap();
    let listeners: HashSet<&str> = samples
        .iter()
        .filter(|s| s.name == "backlog_drops_total")
        .map(|s| s.labels["listener"].as_str())
        .collect();
    assert_eq!(
        listeners,
        ["10.0.0.1:2", "10.0.0.1:3", "other"].into_iter().collect()
    );
}

#[test]
fn zero_cap_puts_everything_in_other() {
    let mut cap = SeriesCap::new(0);
    let (kept, other) = cap.apply(vec![listener("10.0.0.1:1", 1, &[(ACK, 4)])]);
    assert!(kept.is_empty());
    assert_eq!(other, [(ACK, 4)].into_iter().collect());
}
