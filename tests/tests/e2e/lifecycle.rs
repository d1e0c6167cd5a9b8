//! The life of a sandbox from outside: kill, timeout, wait, exec failure, exit codes, delete,
//! a daemon crash and restart, and the host uids sandboxes run as.

use std::path::Path;
use std::time::{Duration, Instant};

use sandboxd_api::{EndReason, Sandbox, SandboxState};
use sandboxd_tests::{
    both_modes, descendants_of, eventually, host_uid_of, process_exists, processes_of_uid,
    require_e2e, Daemon, Mode,
};
use serde_json::json;

/// Wait until the sandbox's combined output contains `marker`.
fn wait_for_output(daemon: &Daemon, id: &str, marker: &str) {
    let found = eventually(Duration::from_secs(30), || {
        String::from_utf8_lossy(&daemon.logs(id, "")).contains(marker)
    });
    assert!(
        found,
        "{marker:?} never appeared in the output of {id}: {:?}\n{}",
        String::from_utf8_lossy(&daemon.logs(id, "")),
        daemon.log()
    );
}

fn kill(daemon: &Daemon, id: &str, body: Option<&str>) -> Sandbox {
    let path = format!("/v1/sandboxes/{id}/kill");
    let reply = match body {
        Some(body) => daemon.request("POST", &path).json_text(body).send(),
        None => daemon.request("POST", &path).send(),
    };
    assert_eq!(
        reply.status,
        200,
        "kill {id} with {body:?}: {}\n{}",
        reply.body,
        daemon.log()
    );
    serde_json::from_str(&reply.body).expect("the kill answer is a sandbox")
}

fn assert_ended(sandbox: &Sandbox, exit_code: i32, signal: Option<&str>, reason: EndReason) {
    assert_eq!(sandbox.state, SandboxState::Exited, "{sandbox:?}");
    assert_eq!(sandbox.exit_code, Some(exit_code), "{sandbox:?}");
    assert_eq!(sandbox.signal.as_deref(), signal, "{sandbox:?}");
    assert_eq!(sandbox.reason, Some(reason), "{sandbox:?}");
    assert!(sandbox.finished_at.is_some(), "{sandbox:?}");
}

fn kill_with_sigterm_and_with_the_default_sigkill(mode: Mode) {
    let daemon = Daemon::start(mode);
    let id = daemon.start_sandbox(&["sleep", "100"]);
    kill(&daemon, &id, Some(r#"{"signal":"SIGTERM"}"#));
    assert_ended(&daemon.wait(&id), 143, Some("SIGTERM"), EndReason::Killed);

    let id = daemon.start_sandbox(&["sleep", "100"]);
    kill(&daemon, &id, None);
    assert_ended(&daemon.wait(&id), 137, Some("SIGKILL"), EndReason::Killed);

    // Short names and numbers are signals too.
    let id = daemon.start_sandbox(&["sleep", "100"]);
    kill(&daemon, &id, Some(r#"{"signal":"TERM"}"#));
    assert_ended(&daemon.wait(&id), 143, Some("SIGTERM"), EndReason::Killed);
    let id = daemon.start_sandbox(&["sleep", "100"]);
    kill(&daemon, &id, Some(r#"{"signal":"15"}"#));
    assert_ended(&daemon.wait(&id), 143, Some("SIGTERM"), EndReason::Killed);
}
both_modes!(kill_with_sigterm_and_with_the_default_sigkill);

fn init_forwards_signals_to_the_command(mode: Mode) {
    let daemon = Daemon::start(mode);
    let script = r#"trap "echo got-term; exit 5" TERM; echo ready; sleep 100 & wait"#;
    let id = daemon.start_sandbox(&["sh", "-c", script]);
    wait_for_output(&daemon, &id, "ready");
    kill(&daemon, &id, Some(r#"{"signal":"SIGTERM"}"#));
    let done = daemon.wait(&id);
    assert_eq!(done.state, SandboxState::Exited, "{mode:?}: {done:?}");
    assert_eq!(
        done.exit_code,
        Some(5),
        "{mode:?}: the trap's exit code: {done:?}"
    );
    assert_eq!(
        done.signal, None,
        "{mode:?}: it exited, no signal ended it: {done:?}"
    );
    assert_eq!(daemon.logs(&id, ""), b"ready\ngot-term\n", "{mode:?}");
}
both_modes!(init_forwards_signals_to_the_command);

fn timeout_kills_the_sandbox(mode: Mode) {
    let daemon = Daemon::start(mode);
    let started = Instant::now();
    let resp = daemon.post(
        "/v1/sandboxes?wait=true",
        &json!({"command": ["sleep", "100"], "limits": {"timeout_secs": 1}}),
    );
    assert_eq!(resp.status, 201);
    let done: Sandbox = resp.parse();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{mode:?}: the timeout did not fire"
    );
    assert_ended(&done, 137, Some("SIGKILL"), EndReason::Timeout);
    assert_eq!(done.spec.limits.timeout_secs, Some(1));

    // A command that ends in time is not affected by its timeout.
    let (quick, _) = daemon.run_spec(json!({"command": ["true"], "limits": {"timeout_secs": 100}}));
    assert_ended(&quick, 0, None, EndReason::Exited);
}
both_modes!(timeout_kills_the_sandbox);

#[test]
fn wait_query_and_wait_endpoint_return_final_objects() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let (done, out) = daemon.run(&["sh", "-c", "sleep 0.5; echo waited"]);
    assert_ended(&done, 0, None, EndReason::Exited);
    assert_eq!(out, "waited\n");

    let id = daemon.start_sandbox(&["sh", "-c", "sleep 2; exit 6"]);
    assert_eq!(daemon.sandbox(&id).state, SandboxState::Running);
    let done = daemon.wait(&id);
    assert_ended(&done, 6, None, EndReason::Exited);
    // Waiting again on an ended sandbox answers at once with the same object.
    assert_eq!(daemon.wait(&id), done);
    assert_eq!(daemon.sandbox(&id), done);

    // Several waiters on one sandbox all get the end.
    let id = daemon.start_sandbox(&["sh", "-c", "sleep 1; exit 2"]);
    let results: Vec<Sandbox> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|_| s.spawn(|| daemon.wait(&id))).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("waiter"))
            .collect()
    });
    for result in results {
        assert_ended(&result, 2, None, EndReason::Exited);
    }
}

fn exec_failure_is_reported(mode: Mode) {
    let daemon = Daemon::start(mode);
    let (sandbox, out) = daemon.run(&["no-such-command", "arg"]);
    assert_eq!(sandbox.exit_code, Some(127), "{mode:?}: {sandbox:?}");
    assert_eq!(
        sandbox.reason,
        Some(EndReason::ExecFailed),
        "{mode:?}: {sandbox:?}"
    );
    let error = sandbox.error.clone().unwrap_or_default();
    assert!(
        error.contains("no-such-command"),
        "{mode:?}: error should name the command: {sandbox:?}"
    );
    let stderr = String::from_utf8_lossy(&daemon.logs(&sandbox.id.to_string(), "?stream=stderr"))
        .into_owned();
    assert!(
        stderr.contains("no-such-command"),
        "{mode:?}: stderr: {stderr:?}"
    );
    assert_eq!(out, stderr, "{mode:?}: nothing on stdout");

    // A file that exists but is not executable fails the same way, with 126 or 127.
    let (sandbox, _) = daemon.run(&["/etc/passwd"]);
    assert_eq!(
        sandbox.reason,
        Some(EndReason::ExecFailed),
        "{mode:?}: {sandbox:?}"
    );
    assert!(
        matches!(sandbox.exit_code, Some(126 | 127)),
        "{mode:?}: {sandbox:?}"
    );
}
both_modes!(exec_failure_is_reported);

#[test]
fn exit_codes_and_signals_of_the_command() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    for (script, code) in [
        ("exit 0", 0),
        ("exit 3", 3),
        ("exit 255", 255),
        ("false", 1),
    ] {
        let (sandbox, _) = daemon.run(&["sh", "-c", script]);
        assert_ended(&sandbox, code, None, EndReason::Exited);
    }
    let (sandbox, _) = daemon.run(&["sh", "-c", "kill -9 $$"]);
    assert_ended(&sandbox, 137, Some("SIGKILL"), EndReason::Exited);
    let (sandbox, _) = daemon.run(&["sh", "-c", "kill -TERM $$"]);
    assert_ended(&sandbox, 143, Some("SIGTERM"), EndReason::Exited);
}

fn delete_of_a_running_sandbox_removes_processes_and_files(mode: Mode) {
    let daemon = Daemon::start(mode);
    let script = "echo data > /work/file && mkdir /work/ro && touch /work/ro/f && chmod 000 /work/ro \
                  && mkdir -p /work/deep/a/b && echo x > /work/deep/a/b/c && echo ready && sleep 100";
    let id = daemon.start_sandbox(&["sh", "-c", script]);
    wait_for_output(&daemon, &id, "ready");
    let sandbox = daemon.sandbox(&id);
    assert_eq!(
        sandbox.state,
        SandboxState::Running,
        "{mode:?}: {sandbox:?}"
    );
    let init = sandbox.init_pid.expect("a running sandbox has an init pid");
    let host_uid = sandbox.host_uid.expect("a sandbox has a host uid");
    assert!(process_exists(init), "{mode:?}: init {init} is not running");
    let descendants = descendants_of(init);
    assert!(
        !descendants.is_empty(),
        "{mode:?}: the command should run under init {init}"
    );
    let dir = daemon.sandbox_dir(&id);
    assert!(
        dir.join("private/work/file").exists(),
        "{mode:?}: {} has no private/work/file",
        dir.display()
    );

    let resp = daemon.delete(&format!("/v1/sandboxes/{id}"));
    assert_eq!(
        resp.status,
        204,
        "{mode:?}: DELETE of a running sandbox\n{}",
        daemon.log()
    );
    daemon
        .request("GET", &format!("/v1/sandboxes/{id}"))
        .send()
        .assert_error(404, "GET after DELETE");
    daemon
        .request("GET", &format!("/v1/sandboxes/{id}/logs"))
        .send()
        .assert_error(404, "logs after DELETE");
    assert!(
        eventually(Duration::from_secs(10), || !process_exists(init)),
        "{mode:?}: init {init} survived DELETE"
    );
    let survivors: Vec<i32> = descendants
        .iter()
        .copied()
        .filter(|p| process_exists(*p))
        .collect();
    assert!(
        survivors.is_empty(),
        "{mode:?}: processes of the sandbox survived DELETE: {survivors:?}"
    );
    if mode == Mode::Privileged {
        assert_ne!(host_uid, daemon.uid);
        assert!(
            eventually(Duration::from_secs(10), || processes_of_uid(host_uid)
                .is_empty()),
            "{mode:?}: processes of uid {host_uid} survived DELETE: {:?}",
            processes_of_uid(host_uid)
        );
    }
    assert!(
        !dir.exists(),
        "{mode:?}: {} survived DELETE: {:?}",
        dir.display(),
        list_tree(&dir)
    );

    daemon
        .request("DELETE", &format!("/v1/sandboxes/{id}"))
        .send()
        .assert_error(404, "DELETE twice");

    // An ended sandbox is deleted the same way, by name.
    let (ended, _) =
        daemon.run_spec(json!({"command": ["sh", "-c", "echo x > /work/y"], "name": "gone"}));
    let dir = daemon.sandbox_dir(&ended.id.to_string());
    assert_eq!(daemon.delete("/v1/sandboxes/gone").status, 204, "{mode:?}");
    assert!(!dir.exists(), "{mode:?}: {} survived DELETE", dir.display());
    daemon
        .request("GET", "/v1/sandboxes/gone")
        .send()
        .assert_error(404, "GET by name after DELETE");
}
both_modes!(delete_of_a_running_sandbox_removes_processes_and_files);

fn list_tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.filter_map(Result::ok) {
                out.push(e.path().display().to_string());
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

/// The daemon's helper: its child process running `sandboxd-helper`.
fn helper_pid(daemon: &Daemon) -> Option<i32> {
    let daemon_pid = daemon.pid() as i32;
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .find(|pid| {
            sandboxd_tests::parent_of(*pid) == Some(daemon_pid)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("sandboxd-helper"))
        })
}

fn sandboxes_survive_a_daemon_crash_and_are_recovered(mode: Mode) {
    let mut daemon = Daemon::start(mode);
    let script = "for i in $(seq 1 40); do echo line$i; sleep 0.1; done";
    let sandbox = daemon.create(json!({"command": ["sh", "-c", script], "name": "survivor"}));
    let id = sandbox.id.to_string();
    wait_for_output(&daemon, &id, "line2\n");
    let init = daemon.sandbox(&id).init_pid.expect("init pid");
    let helper = helper_pid(&daemon).expect("the daemon has a helper child");

    daemon.kill9();
    assert!(
        process_exists(init),
        "{mode:?}: the sandbox died with the daemon"
    );
    assert!(
        eventually(Duration::from_secs(10), || !process_exists(helper)),
        "{mode:?}: the helper {helper} outlived its SIGKILLed daemon"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        process_exists(init),
        "{mode:?}: the sandbox died after the daemon"
    );

    daemon.restart();
    let after = daemon.sandbox("survivor");
    match after.state {
        SandboxState::Running => {}
        SandboxState::Exited => assert_eq!(after.exit_code, Some(0), "{mode:?}: {after:?}"),
        _ => panic!(
            "{mode:?}: after a restart the sandbox is {after:?}\n{}",
            daemon.log()
        ),
    }
    let done = daemon.wait(&id);
    assert_ended(&done, 0, None, EndReason::Exited);
    let want: String = (1..=40).map(|i| format!("line{i}\n")).collect();
    assert_eq!(
        String::from_utf8_lossy(&daemon.logs(&id, "")),
        want,
        "{mode:?}"
    );
    let ws = sandboxd_tests::read_websocket(daemon.logs_websocket(&id, ""));
    assert_eq!(
        String::from_utf8_lossy(&ws.bytes(None)),
        want,
        "{mode:?}: websocket after restart"
    );

    // The restarted daemon still runs new sandboxes and can delete the recovered one.
    assert_eq!(daemon.sh("echo new"), "new\n");
    assert_eq!(daemon.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    assert!(!daemon.sandbox_dir(&id).exists());
}
both_modes!(sandboxes_survive_a_daemon_crash_and_are_recovered);

fn a_sandbox_that_ends_while_the_daemon_is_down_is_reported_after_restart(mode: Mode) {
    let mut daemon = Daemon::start(mode);
    let id = daemon.start_sandbox(&["sh", "-c", "echo before; sleep 1; echo after >&2; exit 7"]);
    wait_for_output(&daemon, &id, "before");
    let init = daemon.sandbox(&id).init_pid.expect("init pid");
    // A second one that is still running when the daemon comes back, and is killed then.
    let long = daemon.start_sandbox(&["sleep", "100"]);

    daemon.kill9();
    assert!(
        eventually(Duration::from_secs(30), || !process_exists(init)),
        "{mode:?}: the sandbox did not end while the daemon was down"
    );
    // Its monitor finishes a moment after init: status written, control socket removed.
    let dir = daemon.sandbox_dir(&id);
    assert!(
        eventually(Duration::from_secs(30), || dir.join("status.json").exists()
            && !dir.join("monitor.sock").exists()),
        "{mode:?}: the monitor did not record the exit while the daemon was down"
    );
    daemon.restart();
    let after = daemon.sandbox(&id);
    assert_ended(&after, 7, None, EndReason::Exited);
    assert_eq!(daemon.logs(&id, ""), b"before\nafter\n", "{mode:?}");
    assert_eq!(daemon.logs(&id, "?stream=stderr"), b"after\n", "{mode:?}");

    assert_eq!(
        daemon.sandbox(&long).state,
        SandboxState::Running,
        "{mode:?}\n{}",
        daemon.log()
    );
    kill(&daemon, &long, None);
    assert_ended(&daemon.wait(&long), 137, Some("SIGKILL"), EndReason::Killed);
}
both_modes!(a_sandbox_that_ends_while_the_daemon_is_down_is_reported_after_restart);

/// A daemon in `mode` running two sleeping sandboxes.
fn two_sleepers(mode: Mode) -> (Daemon, Sandbox, Sandbox) {
    let daemon = Daemon::start(mode);
    let a = daemon.create(json!({"command": ["sleep", "100"]}));
    let b = daemon.create(json!({"command": ["sleep", "100"]}));
    (daemon, a, b)
}

#[test]
fn privileged_sandboxes_run_as_their_own_host_uids() {
    require_e2e!();
    let (daemon, a, b) = two_sleepers(Mode::Privileged);
    let (ua, ub) = (a.host_uid.expect("host uid"), b.host_uid.expect("host uid"));
    assert_ne!(ua, ub, "two running sandboxes share a host uid");
    for uid in [ua, ub] {
        assert_ne!(uid, 0);
        assert_ne!(uid, daemon.uid);
    }
    // The command really runs as that uid on the host.
    for sandbox in [&a, &b] {
        let init = sandbox.init_pid.expect("init pid");
        let uid = sandbox.host_uid.expect("host uid");
        assert!(
            eventually(Duration::from_secs(10), || descendants_of(init)
                .iter()
                .any(|p| host_uid_of(*p) == Some(uid))),
            "no process of {uid} under init {init}"
        );
        assert!(
            descendants_of(init)
                .iter()
                .all(|p| host_uid_of(*p) != Some(0)),
            "a process of the sandbox runs as host root"
        );
    }
}

#[test]
fn rootless_sandboxes_run_as_the_daemons_uid() {
    require_e2e!();
    let (daemon, c, d) = two_sleepers(Mode::Rootless);
    assert_eq!(c.host_uid, Some(daemon.uid));
    assert_eq!(d.host_uid, Some(daemon.uid));
}
