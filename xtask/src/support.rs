//! The expected-support matrix (`xtask/support-matrix.tsv`): for each
//! kernel series, hook family and drop kind, which family traces the kind
//! or that it is not observable. What the agent really did is read from
//! its start-up lines and compared with it; any difference, in either
//! direction, is a failure.
//!
//! std only: the integration tests include this file too (`#[path]`), so
//! that the host tests, the guests and `cargo xtask vm-test` judge with
//! the same code and the same table.

use std::collections::BTreeMap;

/// The table, compiled in: the guests have no source tree.
pub const TABLE: &str = include_str!("../support-matrix.tsv");
pub const TABLE_PATH: &str = "xtask/support-matrix.tsv";

/// `--attach` values, in the order the matrix prints them.
pub const FAMILIES: [&str; 4] = ["fentry", "kprobe", "tracepoint", "auto"];

/// The agent's drop kinds (README's stable names).
pub const KINDS: [&str; 7] = [
    "syn_dropped_syn_queue_full",
    "syn_cookie_sent",
    "syn_dropped_accept_queue_full",
    "ack_dropped_accept_queue_full",
    "syn_dropped_syn_backlog_pressure",
    "syn_dropped_other",
    "unix_connect_backlog_full",
];

/// What happened to one kind under one `--attach` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// Traced by a hook of this family (fentry, kprobe or tracepoint).
    Traced(String),
    /// Not observable; the reason (from the table, or the agent's words).
    NotObservable(String),
}

impl Support {
    pub fn is_traced(&self) -> bool {
        matches!(self, Support::Traced(_))
    }

    /// Short cell text: the family, or `-`.
    pub fn cell(&self) -> &str {
        match self {
            Support::Traced(family) => family,
            Support::NotObservable(_) => "-",
        }
    }

    /// Equal as far as the matrix is concerned: reasons are for people and
    /// may be worded differently.
    pub fn same(&self, other: &Support) -> bool {
        self.cell() == other.cell()
    }
}

/// series -> family -> kind -> expected.
pub type Table = BTreeMap<String, BTreeMap<String, BTreeMap<String, Support>>>;

pub fn parse(text: &str) -> Result<Table, String> {
    let mut table = Table::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |what: String| format!("{TABLE_PATH}:{}: {what}", n + 1);
        let fields: Vec<&str> = line.split('\t').collect();
        let [series, family, kind, expected, note] = fields[..] else {
            return Err(at(format!(
                "expected 5 tab-separated columns, found {}",
                fields.len()
            )));
        };
        if !FAMILIES.contains(&family) {
            return Err(at(format!("unknown family `{family}`")));
        }
        if !KINDS.contains(&kind) {
            return Err(at(format!("unknown drop kind `{kind}`")));
        }
        let support = match expected {
            "-" if note.trim().is_empty() => {
                return Err(at("a kind that is not observable needs its reason".into()))
            }
            "-" => Support::NotObservable(note.to_owned()),
            f if FAMILIES[..3].contains(&f) => {
                if family != "auto" && f != family {
                    return Err(at(format!("--attach {family} cannot trace with {f}")));
                }
                Support::Traced(f.to_owned())
            }
            other => return Err(at(format!("expected a family or -, found `{other}`"))),
        };
        let previous = table
            .entry(series.to_owned())
            .or_default()
            .entry(family.to_owned())
            .or_default()
            .insert(kind.to_owned(), support);
        if previous.is_some() {
            return Err(at(format!("{series} {family} {kind} is listed twice")));
        }
    }
    // Every series must say something about every family and kind: a hole
    // would let a regression through as "not in the table".
    for (series, families) in &table {
        for family in FAMILIES {
            for kind in KINDS {
                if families.get(family).and_then(|k| k.get(kind)).is_none() {
                    return Err(format!("{TABLE_PATH}: {series} {family} {kind} is missing"));
                }
            }
        }
    }
    Ok(table)
}

/// The compiled-in table; xtask's unit tests parse it, so an error here is
/// a bug in the checked-in file.
pub fn table() -> Table {
    parse(TABLE).unwrap_or_else(|err| panic!("{err}"))
}

/// `6.1.0-50-cloud-amd64` -> `6.1`, `6.12.100+deb12-cloud-amd64` -> `6.12`.
pub fn series_of(release: &str) -> String {
    let version: String = release
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    version.split('.').take(2).collect::<Vec<_>>().join(".")
}

/// The expected row of one kernel series and family, or a message saying
/// the series must be added to the table.
pub fn expected<'t>(
    table: &'t Table,
    release: &str,
    family: &str,
) -> Result<&'t BTreeMap<String, Support>, String> {
    let series = series_of(release);
    table
        .get(&series)
        .and_then(|families| families.get(family))
        .ok_or_else(|| {
            format!(
                "kernel {release} (series {series}) is not in {TABLE_PATH}: add its rows \
                 explicitly (every family and kind), from what the agent reports on it"
            )
        })
}

/// The hook family a start-up description names (`fexit tcp_v4_...`,
/// `kprobe/kretprobe ...`, `tracepoint skb:kfree_skb ...`).
fn family_of(hook: &str) -> String {
    let first = hook.split_whitespace().next().unwrap_or("");
    if first.starts_with("fentry") || first.starts_with("fexit") {
        "fentry".into()
    } else if first.starts_with("kprobe") || first.starts_with("kretprobe") {
        "kprobe".into()
    } else if first.starts_with("tracepoint") || first.starts_with("raw_tp") {
        "tracepoint".into()
    } else {
        format!("unknown({first})")
    }
}

/// What the agent said about each kind at start-up: `backlog-agent: KINDS:
/// HOOK` or `backlog-agent: KINDS: not observable: WHY`, or the one error
/// line `no drop kind can be observed ...` when it served none. A kind the
/// output does not mention is absent from the map (and so a difference).
pub fn observed(stderr: &str) -> BTreeMap<String, Support> {
    let mut seen = BTreeMap::new();
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix("backlog-agent: ") else {
            continue;
        };
        if let Some(why) = rest.strip_prefix("error: ") {
            if why.contains("no drop kind can be observed") {
                for kind in KINDS {
                    seen.entry(kind.to_owned())
                        .or_insert_with(|| Support::NotObservable(why.to_owned()));
                }
            }
            continue;
        }
        let Some((kinds, what)) = rest.split_once(": ") else {
            continue;
        };
        let support = match what.strip_prefix("not observable") {
            Some(why) => Support::NotObservable(why.trim_start_matches(": ").to_owned()),
            None => Support::Traced(family_of(what)),
        };
        for kind in kinds.split(", ") {
            if KINDS.contains(&kind) {
                seen.insert(kind.to_owned(), support.clone());
            }
        }
    }
    seen
}

/// One difference between the table and what the agent did.
pub fn differences(
    expected: &BTreeMap<String, Support>,
    observed: &BTreeMap<String, Support>,
) -> Vec<String> {
    let mut out = Vec::new();
    for kind in KINDS {
        let want = expected.get(kind);
        let got = observed.get(kind);
        match (want, got) {
            (Some(want), Some(got)) if want.same(got) => {}
            (Some(want), Some(got)) => out.push(format!(
                "{kind}: expected {}, agent: {}",
                describe(want),
                describe(got)
            )),
            (Some(want), None) => out.push(format!(
                "{kind}: expected {}, the agent did not mention it",
                describe(want)
            )),
            (None, _) => out.push(format!("{kind}: not in {TABLE_PATH}")),
        }
    }
    out
}

pub fn describe(support: &Support) -> String {
    match support {
        Support::Traced(family) => format!("traced by {family}"),
        Support::NotObservable(why) => format!("not observable ({why})"),
    }
}
