//! A rootless daemon tells what it cannot do and how to fix it: without a delegated cgroup every
//! cgroup limit is a 422 naming the fix (the limits themselves, in a delegated v2 subtree, are in
//! `cgroup_v2.rs`).

use sandboxd_tests::{require_e2e, Daemon, Mode};
use serde_json::{json, Value};

/// Started outside any delegated cgroup (as the harness starts it): each cgroup limit is 422,
/// and the message names the way to a delegated cgroup.
#[test]
fn without_delegation_each_limit_is_422_naming_the_fix() {
    require_e2e!();
    let r = Daemon::start(Mode::Rootless);
    let info: Value = r.get("/v1/info").json();
    assert_eq!(info["limits"], json!([]), "{info}");
    for (field, limits) in [
        ("memory_bytes", json!({"memory_bytes": 64 << 20})),
        ("cpus", json!({"cpus": 0.5})),
        ("pids", json!({"pids": 10})),
    ] {
        let resp = r.post(
            "/v1/sandboxes",
            &json!({"command": ["true"], "limits": limits}),
        );
        assert_eq!(resp.status, 422, "{limits}: {}", resp.body);
        let body = resp.json();
        assert_eq!(body["error"]["code"], "limit_unenforceable", "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{msg}");
        assert!(
            msg.contains("systemd-run --user --scope -p Delegate=yes")
                && msg.contains("deploy/sandboxd-user.service"),
            "{msg}"
        );
    }
}

/// `sbx doctor` against a rootless daemon lists every check, what holds and what does not, each
/// missing one with its fix, and exits 1; the `preflight` of `/v1/info` carries the same checks.
#[test]
fn doctor_says_what_holds_and_what_is_missing_with_each_fix() {
    require_e2e!();
    let r = Daemon::start(Mode::Rootless);
    let out = r.sbx(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with("sandboxd ") && text.contains("(rootless mode)"),
        "{text}"
    );
    let info: Value = r.get("/v1/info").json();
    let checks = info["preflight"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "user_namespaces",
            "apparmor_userns",
            "overlayfs_userns",
            "cgroup_limits",
            "uid_isolation",
            "subordinate_ids",
            "newuidmap",
            "pasta"
        ]
    );
    let lines: Vec<&str> = text.lines().collect();
    for c in checks {
        let name = c["name"].as_str().unwrap();
        let at = lines
            .iter()
            .position(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("{name} is not listed:\n{text}"));
        if c["ok"].as_bool().unwrap() {
            assert!(lines[at].starts_with("ok "), "{text}");
        } else {
            assert!(lines[at].starts_with("MISSING "), "{text}");
            let fix = c["fix"].as_str().unwrap();
            assert!(!fix.is_empty(), "{c}");
            assert!(lines[at + 1].trim_start().starts_with("fix: "), "{text}");
        }
    }
    // This daemon was started outside a delegated cgroup and shares one uid: both are named.
    assert!(text.contains("MISSING cgroup_limits"), "{text}");
    assert!(text.contains("Delegate=yes"), "{text}");
    assert!(text.contains("MISSING uid_isolation"), "{text}");
    // The kernel allows what the rest of the suite does rootless.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok      user_namespaces")),
        "{text}"
    );
}

/// A privileged daemon on a host that enforces every limit passes `sbx doctor` (exit 0).
#[test]
fn doctor_passes_a_privileged_daemon_with_every_limit() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let out = d.sbx(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("ok      cgroup_limits"), "{text}");
    assert!(
        text.ends_with("everything this mode needs is in place\n"),
        "{text}"
    );
}
