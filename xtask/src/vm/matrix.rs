//! The kernel x attach family x result table built from the guests'
//! `BACKLOG-MATRIX` lines.

use super::guest::GuestOutcome;

const MARK_MATRIX: &str = "BACKLOG-MATRIX ";

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

    // What is not a pass deserves its name and reason.
    for outcome in outcomes {
        for line in outcome.matrix.iter().filter(|m| m.result != "pass") {
            out.push_str(&format!(
                "  {} {} {}: {}{}\n",
                line.kernel,
                line.family,
                line.test,
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
