//! The process model's promises: the daemon runs without privileges, the helper is the only
//! privileged process and dies with the daemon, and sandboxes outlive both.

use std::time::Duration;

use sandboxd_tests::{
    both_modes, descendants_of, eventually, host_uid_of, process_exists, require_e2e, Daemon, Mode,
};
use serde_json::json;

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn helper_pid(daemon: &Daemon) -> i32 {
    let helpers: Vec<i32> = descendants_of(daemon.pid() as i32)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .is_ok_and(|c| c.trim() == "sandboxd-helper")
        })
        .collect();
    assert_eq!(
        helpers.len(),
        1,
        "exactly one helper is the daemon's child: {helpers:?}"
    );
    helpers[0]
}

fn the_daemon_holds_no_privilege_and_the_helper_is_its_only_privileged_child(mode: Mode) {
    let daemon = Daemon::start(mode);
    let pid = daemon.pid();
    // Every uid of the daemon (real, effective, saved, fs) is the unprivileged one.
    let uids: Vec<u32> = status_field(pid, "Uid:")
        .split_whitespace()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids, vec![daemon.uid; 4], "{mode:?}");
    for caps in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
        assert_eq!(
            u64::from_str_radix(&status_field(pid, caps), 16).unwrap(),
            0,
            "{mode:?} {caps}"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1", "{mode:?}");
    let helper = helper_pid(&daemon);
    let expected = if mode == Mode::Privileged {
        0
    } else {
        daemon.uid
    };
    assert_eq!(
        host_uid_of(helper),
        Some(expected),
        "{mode:?}: the helper's uid"
    );
}
both_modes!(the_daemon_holds_no_privilege_and_the_helper_is_its_only_privileged_child);

#[test]
fn a_helper_crash_stops_the_daemon_and_a_restart_recovers_everything() {
    require_e2e!();
    let mut daemon = Daemon::start(Mode::Privileged);
    let sandbox = daemon.create(json!({ "command": ["sh", "-c", "sleep 2; echo survived"] }));
    let id = sandbox.id.to_string();
    let init = sandbox.init_pid.unwrap();

    // Without its helper the daemon cannot work and cannot start a new root helper: it exits
    // with an error (a supervisor restarts it) instead of failing every request.
    let helper = helper_pid(&daemon);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(helper),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let status = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon exits when its helper dies");
    assert!(!status.success(), "a helper crash is a failure: {status}");
    assert!(
        process_exists(init),
        "the sandbox outlives the daemon and the helper"
    );

    daemon.restart();
    let done = daemon.wait(&id);
    assert_eq!(done.exit_code, Some(0), "{done:?}");
    assert_eq!(
        String::from_utf8(daemon.logs(&id, "")).unwrap(),
        "survived\n"
    );
}

fn the_helper_dies_with_the_daemon_in_both_modes(mode: Mode) {
    let mut daemon = Daemon::start(mode);
    let helper = helper_pid(&daemon);
    daemon.kill9();
    assert!(
        eventually(Duration::from_secs(10), || !process_exists(helper)),
        "{mode:?}: the helper outlived its SIGKILLed daemon"
    );
}
both_modes!(the_helper_dies_with_the_daemon_in_both_modes);
