//! The kernel x attach family x result table built from the guests'
//! `BACKLOG-MATRIX` lines.

use std::collections::BTreeMap;

use super::guest::GuestOutcome;
use crate::support::{self, Support};

const MARK_MATRIX: &str = "BACKLOG-MATRIX ";
const MARK_SUPPORT: &str = "BACKLOG-SUPPORT ";

/// `BACKLOG-SUPPORT kernel=<uname -r> family=<f> kind=<k>
/// agent=<family|-|unreported> detail=<why, for ->`: what the agent said
/// at start-up about one kind (tests/kernel.rs,
/// startup_matches_support_matrix).
#[derive(Debug, PartialEq)]
pub struct SupportLine {
    pub family: String,
    pub kind: String,
    pub agent: Option<Support>,
}

impl SupportLine {
    pub fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.find(MARK_SUPPORT)? + MARK_SUPPORT.len()..];
        let (words, detail) = match rest.find("detail=") {
            Some(at) => (&rest[..at], rest[at + "detail=".len()..].trim()),
            None => (rest, ""),
        };
        let get = |key: &str| {
            words
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        let agent = match get("agent")? {
            "unreported" => None,
            "-" => Some(Support::NotObservable(detail.to_owned())),
            family => Some(Support::Traced(family.to_owned())),
        };
        Some(Self {
            family: get("family")?.to_owned(),
            kind: get("kind")?.to_owned(),
            agent,
        })
    }
}

/// The differences between what a guest's agent reported and
/// xtask/support-matrix.tsv, per family; a family that reported nothing is
/// one too (the test that reports did not run).
pub fn support_differences(release: &str, lines: &[SupportLine]) -> Vec<String> {
    let table = support::table();
    let mut out = Vec::new();
    for family in support::FAMILIES {
        let expected = match support::expected(&table, release, family) {
            Ok(expected) => expected,
            Err(err) => return vec![err],
        };
        let reported: Vec<&SupportLine> = lines.iter().filter(|l| l.family == family).collect();
        if reported.is_empty() {
            out.push(format!(
                "--attach {family}: no start-up report (startup_matches_support_matrix did not run)"
            ));
            continue;
        }
        let observed: BTreeMap<String, Support> = reported
            .iter()
            .filter_map(|l| Some((l.kind.clone(), l.agent.clone()?)))
            .collect();
        for difference in support::differences(expected, &observed) {
            out.push(format!("--attach {family}: {difference}"));
        }
    }
    out
}

/// Kernel x family rows, one column per drop kind: the family that traced
/// it or `-`, with `!` and the table's value where they differ.
pub fn render_support(outcomes: &[GuestOutcome]) -> String {
    let table = support::table();
    let short = |kind: &str| -> String {
        kind.split('_')
            .map(|w| w.chars().next().unwrap_or('?'))
            .collect()
    };
    let mut rows: Vec<Vec<String>> = vec![["kernel", "family"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(support::KINDS.iter().map(|k| short(k)))
        .collect()];
    for outcome in outcomes.iter().filter(|o| o.check_support) {
        let release = outcome.uname.clone().unwrap_or_default();
        for family in support::FAMILIES {
            let expected = support::expected(&table, &release, family).ok();
            let mut row = vec![
                outcome
                    .uname
                    .clone()
                    .unwrap_or_else(|| format!("{} (not run)", outcome.label)),
                family.to_owned(),
            ];
            for kind in support::KINDS {
                let got = outcome
                    .support
                    .iter()
                    .find(|l| l.family == family && l.kind == kind)
                    .and_then(|l| l.agent.as_ref());
                let want = expected.and_then(|e| e.get(kind));
                let cell = got.map_or("?", Support::cell);
                row.push(match want {
                    Some(want) if got.is_some_and(|g| g.same(want)) => cell.to_owned(),
                    Some(want) => format!("{cell}!(table {})", want.cell()),
                    None => format!("{cell}!(not in table)"),
                });
            }
            rows.push(row);
        }
    }
    let mut out = String::from(
        "support matrix (agent's start-up per kernel and --attach; ! = differs from \
         xtask/support-matrix.tsv):\n",
    );
    out.push_str(&align(&rows));
    let legend: Vec<String> = support::KINDS
        .iter()
        .map(|k| format!("{} {k}", short(k)))
        .collect();
    out.push_str(&format!("  columns: {}\n", legend.join(", ")));
    for outcome in outcomes.iter().filter(|o| o.check_support) {
        for difference in &outcome.support_differences {
            out.push_str(&format!("  {}: {difference}\n", outcome.label));
        }
    }
    out
}

fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(text, width)| format!("{text:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Families in the order the agent falls back through them; others a test
/// reports are appended as they appear.
const FAMILIES: &[&str] = &["fentry", "kprobe", "tracepoint"];
const RESULTS: &[&str] = &["pass", "fail", "unsupported"];

/// `BACKLOG-MATRIX kernel=<uname -r> family=<f> test=<name>
/// result=<pass|fail|unsupported> [detail=<free text>]`
#[derive(Debug, PartialEq)]
pub struct MatrixLine {
    pub kernel: String,
    pub family: String,
    pub test: String,
    pub result: String,
    pub detail: Option<String>,
}

impl MatrixLine {
    pub fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.find(MARK_MATRIX)? + MARK_MATRIX.len()..];
        // detail= is free text and runs to the end of the line.
        let (words, detail) = match rest.find("detail=") {
            Some(at) => (&rest[..at], Some(rest[at + "detail=".len()..].trim())),
            None => (rest, None),
        };
        let get = |key: &str| {
            words
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some(Self {
            kernel: get("kernel").unwrap_or_else(|| "?".to_owned()),
            family: get("family")?,
            test: get("test")?,
            result: get("result")?,
            detail: detail.filter(|d| !d.is_empty()).map(str::to_owned),
        })
    }
}

pub fn render_table(outcomes: &[GuestOutcome]) -> String {
    let mut families: Vec<String> = FAMILIES.iter().map(|f| (*f).to_owned()).collect();
    for line in outcomes.iter().flat_map(|o| &o.matrix) {
        if !families.contains(&line.family) {
            families.push(line.family.clone());
        }
    }

    let mut rows: Vec<Vec<String>> = vec![std::iter::once("kernel".to_owned())
        .chain(families.iter().cloned())
        .collect()];
    for outcome in outcomes {
        let kernel = outcome
            .uname
            .clone()
            .or_else(|| outcome.matrix.first().map(|m| m.kernel.clone()))
            .unwrap_or_else(|| format!("{} (not run)", outcome.label));
        let mut row = vec![kernel];
        for family in &families {
            row.push(cell(outcome, family));
        }
        rows.push(row);
    }

    let columns = families.len() + 1;
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::from("vm-test matrix (tests per kernel and attach family):\n");
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(text, width)| format!("{text:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }

    // What is not a pass deserves its name and reason: failures one by
    // one, the expected "unsupported" grouped by reason.
    for outcome in outcomes {
        let mut groups: Vec<(&MatrixLine, Vec<&str>)> = Vec::new();
        for line in outcome.matrix.iter().filter(|m| m.result != "pass") {
            let same = |(first, _): &&mut (&MatrixLine, Vec<&str>)| {
                line.result != "fail"
                    && first.result == line.result
                    && first.family == line.family
                    && first.detail == line.detail
            };
            match groups.iter_mut().find(same) {
                Some((_, tests)) => tests.push(&line.test),
                None => groups.push((line, vec![&line.test])),
            }
        }
        for (line, tests) in groups {
            out.push_str(&format!(
                "  {} {} {}: {}{}\n",
                line.kernel,
                line.family,
                tests.join(", "),
                line.result,
                line.detail
                    .as_deref()
                    .map_or(String::new(), |d| format!(" ({d})"))
            ));
        }
    }
    out
}

/// One aligned line per guest: kernel, PASS/FAIL, package, timings, log
/// and the reason of a failure.
pub fn render_summary(outcomes: &[GuestOutcome]) -> String {
    let rows: Vec<[String; 7]> = outcomes.iter().map(GuestOutcome::summary_fields).collect();
    let mut widths = [0usize; 7];
    for row in &rows {
        for (width, field) in widths.iter_mut().zip(row) {
            *width = (*width).max(field.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(text, width)| format!("{text:<width$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// "2 pass, 1 unsupported" for one guest and family; "-" when no test
/// reported on it.
fn cell(outcome: &GuestOutcome, family: &str) -> String {
    let lines: Vec<&MatrixLine> = outcome
        .matrix
        .iter()
        .filter(|m| m.family == family)
        .collect();
    if lines.is_empty() {
        return "-".to_owned();
    }
    let mut results: Vec<&str> = RESULTS.to_vec();
    for line in &lines {
        if !results.contains(&line.result.as_str()) {
            results.push(&line.result);
        }
    }
    results
        .iter()
        .filter_map(|result| {
            let n = lines.iter().filter(|l| l.result == *result).count();
            (n > 0).then(|| format!("{n} {result}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_support_lines() {
        let line = SupportLine::parse(
            "[ 3.1] BACKLOG-SUPPORT kernel=6.1.0-57-cloud-amd64 family=fentry \
             kind=ack_dropped_accept_queue_full agent=- detail=ENOTSUPP: 7 args",
        )
        .expect("parses");
        assert_eq!(line.family, "fentry");
        assert_eq!(
            line.agent,
            Some(Support::NotObservable("ENOTSUPP: 7 args".into()))
        );
        let traced = SupportLine::parse(
            "BACKLOG-SUPPORT kernel=k family=auto kind=syn_cookie_sent agent=kprobe detail=",
        )
        .expect("parses");
        assert_eq!(traced.agent, Some(Support::Traced("kprobe".into())));
    }

    /// A guest that matches the table passes; one family that stops (or
    /// starts) tracing a kind, an unreported family or an unknown kernel
    /// series each fail.
    #[test]
    fn support_differences_catch_both_directions() {
        let table = support::table();
        let lines = |series: &str| -> Vec<SupportLine> {
            let mut lines = Vec::new();
            for family in support::FAMILIES {
                for (kind, want) in &table[series][family] {
                    lines.push(SupportLine {
                        family: family.to_owned(),
                        kind: kind.clone(),
                        agent: Some(want.clone()),
                    });
                }
            }
            lines
        };
        let good = lines("6.12");
        assert!(!good.is_empty());
        assert_eq!(
            support_differences("6.12.100+deb12-cloud-amd64", &good),
            Vec::<String>::new()
        );

        let mut regressed = lines("6.12");
        let cell = regressed
            .iter_mut()
            .find(|l| l.family == "kprobe" && l.kind == "syn_cookie_sent")
            .expect("a kprobe cell");
        cell.agent = Some(Support::NotObservable("attach failed".into()));
        assert_eq!(support_differences("6.12.1", &regressed).len(), 1);

        let mut gained = lines("6.12");
        let cell = gained
            .iter_mut()
            .find(|l| l.family == "tracepoint" && l.kind == "syn_cookie_sent")
            .expect("a tracepoint cell");
        cell.agent = Some(Support::Traced("tracepoint".into()));
        assert_eq!(support_differences("6.12.1", &gained).len(), 1);

        let missing: Vec<SupportLine> = lines("6.12")
            .into_iter()
            .filter(|l| l.family != "auto")
            .collect();
        assert_eq!(support_differences("6.12.1", &missing).len(), 1);

        let unknown = support_differences("9.9.0-1-cloud-amd64", &good);
        assert_eq!(unknown.len(), 1);
        assert!(
            unknown[0].contains("add its rows explicitly"),
            "{unknown:?}"
        );
    }

    #[test]
    fn parses_matrix_lines_with_and_without_detail() {
        let line = MatrixLine::parse(
            "[  3.1] BACKLOG-MATRIX kernel=6.1.0-50-cloud-amd64 family=fentry test=syn_flood result=unsupported detail=no BTF for x=y",
        )
        .expect("parses");
        assert_eq!(line.kernel, "6.1.0-50-cloud-amd64");
        assert_eq!(line.family, "fentry");
        assert_eq!(line.test, "syn_flood");
        assert_eq!(line.result, "unsupported");
        assert_eq!(line.detail.as_deref(), Some("no BTF for x=y"));

        let plain = MatrixLine::parse("BACKLOG-MATRIX kernel=k family=kprobe test=t result=pass")
            .expect("parses");
        assert_eq!(plain.detail, None);
        assert!(MatrixLine::parse("BACKLOG-MATRIX family=kprobe").is_none());
        assert!(MatrixLine::parse("unrelated").is_none());
    }
}
