//! The table of everything from outside the repository
//! (`xtask/outside-programs.tsv`), parsed.
//!
//! std only: the integration tests include this file too (`#[path]`), so
//! that they and xtask read the one table the same way.

use std::path::PathBuf;

/// The table, compiled in: the tests run in guests where the source tree
/// is absent.
pub const TABLE: &str = include_str!("../outside-programs.tsv");

/// Where the table lives, for messages.
pub const TABLE_PATH: &str = "xtask/outside-programs.tsv";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A Debian package (apt-get install).
    Deb,
    /// `COMPONENT@TOOLCHAIN` (rustup component add).
    Rustup,
    /// `TARGET@TOOLCHAIN` (rustup target add).
    RustupTarget,
    /// `CRATE@VERSION` (cargo install).
    Cargo,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub source: Source,
    pub name: String,
    /// Absolute paths, or bare names looked up in PATH.
    pub programs: Vec<String>,
    pub needed_by: Vec<String>,
    pub why: String,
}

impl Row {
    pub fn needed_by(&self, command: &str) -> bool {
        self.needed_by.iter().any(|c| c == command)
    }
}

/// Commands a row may name in its needed-by column.
pub const COMMANDS: [&str; 5] = ["run", "test", "bench", "vm-test", "dist"];

/// Parses the table; the error names the line.
pub fn parse(text: &str) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let [source, name, programs, needed_by, why] = fields[..] else {
            return Err(format!(
                "{TABLE_PATH}:{}: expected 5 tab-separated columns, found {}",
                n + 1,
                fields.len()
            ));
        };
        let source = match source {
            "deb" => Source::Deb,
            "rustup" => Source::Rustup,
            "rustup-target" => Source::RustupTarget,
            "cargo" => Source::Cargo,
            other => {
                return Err(format!(
                    "{TABLE_PATH}:{}: unknown source `{other}` (deb, rustup, rustup-target, cargo)",
                    n + 1
                ))
            }
        };
        let needed_by: Vec<String> = needed_by.split(',').map(str::to_owned).collect();
        if let Some(bad) = needed_by.iter().find(|c| !COMMANDS.contains(&c.as_str())) {
            return Err(format!(
                "{TABLE_PATH}:{}: unknown command `{bad}` (run, test, bench, vm-test, dist)",
                n + 1
            ));
        }
        let programs = if programs == "-" {
            Vec::new()
        } else {
            programs.split(',').map(str::to_owned).collect()
        };
        rows.push(Row {
            source,
            name: name.to_owned(),
            programs,
            needed_by,
            why: why.to_owned(),
        });
    }
    Ok(rows)
}

/// The compiled-in table. It is checked by xtask's unit tests, so a parse
/// error here is a bug in the checked-in file.
pub fn rows() -> Vec<Row> {
    parse(TABLE).unwrap_or_else(|err| panic!("{err}"))
}

/// The file name of a program entry (`/usr/sbin/nginx` -> `nginx`).
pub fn program_name(entry: &str) -> &str {
    entry.rsplit('/').next().unwrap_or(entry)
}

/// The row that provides `program` (a file name such as `nginx`).
pub fn provider(rows: &[Row], program: &str) -> Option<(Row, String)> {
    rows.iter().find_map(|row| {
        row.programs
            .iter()
            .find(|p| program_name(p) == program)
            .map(|p| (row.clone(), p.clone()))
    })
}

/// How to get a row installed, for messages.
pub fn install_hint(row: &Row) -> String {
    match row.source {
        Source::Deb => format!(
            "Debian package {} (`cargo xtask setup` installs it)",
            row.name
        ),
        Source::Rustup | Source::RustupTarget | Source::Cargo => {
            format!("{} (`cargo xtask setup` installs it)", row.name)
        }
    }
}

/// Where an outside program is, or why it cannot be used: not in the
/// table, or its package is not installed.
pub fn locate(program: &str) -> Result<PathBuf, String> {
    let rows = rows();
    let Some((row, entry)) = provider(&rows, program) else {
        return Err(format!(
            "{program} is not in {TABLE_PATH}: add the package that provides it"
        ));
    };
    let found = if entry.starts_with('/') {
        let path = PathBuf::from(&entry);
        path.is_file().then_some(path)
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(&entry))
                .find(|p| p.is_file())
        })
    };
    found.ok_or_else(|| format!("{program} not installed: {}", install_hint(&row)))
}
