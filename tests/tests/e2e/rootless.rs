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
