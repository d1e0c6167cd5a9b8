//! Sandboxes that try to wear the system down: a flood of output, deep trees, and more.
//! Each must be stopped by the limits that exist and cleaned up completely.

use std::time::{Duration, Instant};

use sandboxd_api::EndReason;
use sandboxd_tests::{both_modes, require_e2e, Daemon, Mode};
use serde_json::json;

#[test]
fn an_output_flood_cannot_outrun_the_timeout_or_a_kill() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    // Four writers as fast as the pipes go, on 2 cores: the monitor must still enforce the
    // timeout and answer kill requests.
    let flood = "for i in 1 2 3 4; do cat /dev/zero & done; wait";
    let started = Instant::now();
    let (sandbox, _) = {
        let resp = d.post(
            "/v1/sandboxes?wait=true",
            &json!({ "command": ["sh", "-c", flood], "limits": { "timeout_secs": 2 } }),
        );
        assert_eq!(resp.status, 201, "{}", resp.body);
        let s: sandboxd_api::Sandbox = resp.parse();
        (s, ())
    };
    assert_eq!(sandbox.reason, Some(EndReason::Timeout), "{sandbox:?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the timeout was late by far"
    );

    let sandbox = d.create(json!({ "command": ["sh", "-c", flood] }));
    let id = sandbox.id.to_string();
    std::thread::sleep(Duration::from_millis(500));
    let resp = d
        .request("POST", &format!("/v1/sandboxes/{id}/kill"))
        .send();
    assert_eq!(resp.status, 200);
    let done = d.wait(&id);
    assert_eq!(done.reason, Some(EndReason::Killed), "{done:?}");
    // The log and its index agree: the plain log and the two filtered streams add up.
    let all = d.logs(&id, "").len();
    let out = d.logs(&id, "?stream=stdout").len();
    let err = d.logs(&id, "?stream=stderr").len();
    assert_eq!(all, out + err);
    assert!(
        all > 0,
        "the flood wrote nothing: the sums above prove nothing"
    );
    assert!(d.sandbox_dir(&id).exists());
    assert_eq!(d.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    assert!(!d.sandbox_dir(&id).exists());
}

fn a_deep_directory_tree_is_removed_and_the_helper_survives(mode: Mode) {
    let d = Daemon::start(mode);
    // 20000 levels: far deeper than any path can name.
    let sandbox = d.create(json!({ "command": ["perl", "-e",
        "chdir '/work' or die; for (1..20000) { mkdir 'd' or die; chdir 'd' or die } \
         open(F, '>f') or die; chmod 0, '/work/d' or die"] }));
    let id = sandbox.id.to_string();
    let done = d.wait(&id);
    assert_eq!(done.exit_code, Some(0), "{mode:?}: {done:?}");
    assert!(
        d.sandbox_dir(&id).join("private/work/d/d/d").is_dir(),
        "{mode:?}: the tree was made"
    );
    let resp = d.delete(&format!("/v1/sandboxes/{id}"));
    assert_eq!(resp.status, 204, "{mode:?}: {}", resp.body);
    assert!(!d.sandbox_dir(&id).exists(), "{mode:?}: the tree is gone");
    // The helper still serves.
    assert_eq!(d.sh("echo alive"), "alive\n");
}
both_modes!(a_deep_directory_tree_is_removed_and_the_helper_survives);
