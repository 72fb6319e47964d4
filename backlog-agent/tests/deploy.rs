//! deploy/: the systemd unit, the Dockerfile and the DaemonSet grant
//! exactly the capability set the agent documents (caps::MINIMAL), and
//! systemd accepts the unit. Host only (the guests have no systemd).

mod common;

use std::{fs, path::PathBuf, process::Command};

use backlog_agent::caps;

fn deploy_file(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn minimal() -> Vec<String> {
    caps::minimal_names()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The words of a `Key=` line of the unit, which must occur once.
fn unit_words(unit: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .collect();
    assert_eq!(lines.len(), 1, "{key}= must be set once: {lines:?}");
    lines[0].split_whitespace().map(str::to_owned).collect()
}

#[test]
fn unit_grants_exactly_the_minimal_set() {
    let unit = deploy_file("backlog-agent.service");
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        assert_eq!(unit_words(&unit, key), minimal(), "{key}");
    }
    for setting in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "DynamicUser=yes",
        "StandardOutput=journal",
    ] {
        assert!(unit.lines().any(|l| l == setting), "{setting} missing");
    }
    assert!(
        unit_words(&unit, "ExecStart")
            .windows(2)
            .any(|w| w == ["--output", "json"]),
        "the unit must log JSON"
    );
}

/// The `- NAME` items under `add:` in the DaemonSet's capabilities.
fn daemonset_added_capabilities(yaml: &str) -> Vec<String> {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "add:");
    assert!(lines.next().is_some(), "no capabilities add: list");
    lines
        .map_while(|l| l.trim().strip_prefix("- "))
        .map(|name| format!("CAP_{}", name.trim()))
        .collect()
}

#[test]
fn daemonset_grants_exactly_the_minimal_set() {
    let yaml = deploy_file("daemonset.yaml");
    assert_eq!(daemonset_added_capabilities(&yaml), minimal());
    for setting in [
        "drop: [\"ALL\"]",
        "privileged: false",
        "allowPrivilegeEscalation: false",
        "readOnlyRootFilesystem: true",
        "hostPID: true",
    ] {
        assert!(
            yaml.lines().any(|l| l.trim() == setting),
            "{setting} missing"
        );
    }
    assert!(!yaml.contains("privileged: true") && !yaml.contains("hostNetwork"));
    // Every host path is mounted read-only.
    let mounts = yaml.matches("mountPath:").count();
    assert!(mounts > 0);
    assert_eq!(yaml.matches("readOnly: true").count(), mounts);
}

#[test]
fn dockerfile_is_the_static_binary_alone() {
    let dockerfile = deploy_file("Dockerfile");
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(instructions.first(), Some(&"FROM scratch"));
    assert_eq!(
        instructions
            .iter()
            .filter(|l| l.starts_with("COPY "))
            .count(),
        1
    );
    // The `docker run` example adds exactly the minimal set.
    let added: Vec<String> = dockerfile
        .split("--cap-add=")
        .skip(1)
        .map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            format!("CAP_{name}")
        })
        .collect();
    assert_eq!(added, minimal());
    assert!(dockerfile.contains("--cap-drop=ALL"));
}

/// `systemd-analyze verify` on the unit, pointed at the agent this test
/// suite built (verify insists that ExecStart exists). Warnings count as
/// failures: verify exits 0 on an unknown key.
#[test]
fn systemd_accepts_the_unit() {
    // From the table of outside programs: missing means setup was not run,
    // a failure, not a skip.
    let systemd_analyze = common::outside("systemd-analyze");
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_backlog-agent"));
    let unit = deploy_file("backlog-agent.service").replace(
        "ExecStart=/usr/local/bin/backlog-agent ",
        &format!("ExecStart={} ", agent.display()),
    );
    assert!(unit.contains(&agent.display().to_string()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backlog-agent.service");
    fs::write(&path, unit).unwrap();
    let out = Command::new(&systemd_analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stderr}", out.status);
    assert_eq!(stderr.trim(), "", "systemd-analyze verify complained");
}

/// The checks above must be able to fail.
#[test]
fn capability_parsers_see_a_difference() {
    let yaml = "capabilities:\n  add:\n    - BPF\n    - NET_ADMIN\n  drop: []\n";
    assert_eq!(
        daemonset_added_capabilities(yaml),
        vec!["CAP_BPF", "CAP_NET_ADMIN"]
    );
    assert_ne!(daemonset_added_capabilities(yaml), minimal());
    assert_eq!(
        unit_words("AmbientCapabilities=CAP_BPF\n", "AmbientCapabilities"),
        vec!["CAP_BPF"]
    );
}
