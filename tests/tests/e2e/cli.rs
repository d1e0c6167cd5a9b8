//! The `sbx` command line against a real daemon.

use std::process::Output;
use std::time::Duration;

use sandboxd_api::{EndReason, SandboxState};
use sandboxd_tests::{both_modes, eventually, require_e2e, Daemon, Mode};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn describe(args: &[&str], out: &Output) -> String {
    format!(
        "sbx {args:?} exited {:?}\nstdout: {:?}\nstderr: {:?}",
        out.status.code(),
        stdout(out),
        stderr(out)
    )
}

/// Run sbx and assert it exited with `code`.
fn sbx(daemon: &Daemon, args: &[&str], code: i32) -> Output {
    let out = daemon.sbx(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}\n{}",
        describe(args, &out),
        daemon.log()
    );
    out
}

fn run_streams_output_and_exits_with_the_exit_code(mode: Mode) {
    let daemon = Daemon::start(mode);
    let out = sbx(
        &daemon,
        &["run", "--", "sh", "-c", "echo hi; echo err >&2; exit 7"],
        7,
    );
    assert_eq!(stdout(&out), "hi\n", "{mode:?}");
    assert!(
        stderr(&out).contains("err"),
        "{mode:?}: {}",
        describe(&[], &out)
    );

    let out = sbx(&daemon, &["run", "--", "true"], 0);
    assert_eq!(stdout(&out), "");
    // Output without a trailing newline and big output come through exactly.
    let out = sbx(&daemon, &["run", "--", "printf", "abc"], 0);
    assert_eq!(stdout(&out), "abc");
    let out = sbx(&daemon, &["run", "--", "seq", "1", "100000"], 0);
    let want: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    assert!(
        stdout(&out) == want,
        "{mode:?}: seq output differs ({} bytes)",
        out.stdout.len()
    );
}
both_modes!(run_streams_output_and_exits_with_the_exit_code);

#[test]
fn named_sandbox_through_its_whole_life() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let out = sbx(
        &daemon,
        &[
            "run", "--name", "n1", "--env", "A=B", "--", "sh", "-c", "echo $A",
        ],
        0,
    );
    assert_eq!(stdout(&out), "B\n");

    let out = sbx(&daemon, &["ls"], 0);
    let listing = stdout(&out);
    assert!(
        listing
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == "n1")),
        "ls: {listing}"
    );

    let out = sbx(&daemon, &["inspect", "n1"], 0);
    let inspected: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
    let id = daemon.sandbox("n1").id.to_string();
    assert_eq!(inspected["id"], id.as_str(), "{inspected}");
    assert_eq!(inspected["name"], "n1");
    assert_eq!(inspected["exit_code"], 0);
    // By id too.
    let out = sbx(&daemon, &["inspect", &id], 0);
    let by_id: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
    assert_eq!(by_id["id"], id.as_str());

    let out = sbx(&daemon, &["logs", "n1"], 0);
    assert_eq!(stdout(&out), "B\n");
    let out = sbx(&daemon, &["wait", "n1"], 0);
    assert_eq!(stdout(&out).trim(), "0");

    sbx(&daemon, &["rm", "n1"], 0);
    daemon
        .request("GET", "/v1/sandboxes/n1")
        .send()
        .assert_error(404, "GET after sbx rm");
    let out = daemon.sbx(&["inspect", "n1"]);
    assert_ne!(
        out.status.code(),
        Some(0),
        "{}",
        describe(&["inspect", "n1"], &out)
    );
    assert!(
        out.status.code().is_some(),
        "sbx died of a signal: {}",
        describe(&["inspect", "n1"], &out)
    );
    let err = stderr(&out);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "the error should be one line: {err:?}"
    );
    assert!(!err.trim().is_empty(), "no error message");
    assert!(
        stdout(&out).is_empty(),
        "{}",
        describe(&["inspect", "n1"], &out)
    );
}

#[test]
fn run_of_a_missing_command_exits_127() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let out = sbx(&daemon, &["run", "--", "no-such-command"], 127);
    assert!(
        stderr(&out).contains("no-such-command"),
        "{}",
        describe(&[], &out)
    );
    assert_eq!(stdout(&out), "");
}

#[test]
fn kill_of_a_running_sandbox() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let out = sbx(
        &daemon,
        &["run", "-d", "--name", "sleeper", "--", "sleep", "100"],
        0,
    );
    let id = stdout(&out).trim().to_string();
    assert_eq!(
        daemon.sandbox(&id).state,
        SandboxState::Running,
        "sbx run -d printed {id:?}"
    );

    sbx(&daemon, &["kill", "sleeper"], 0);
    let out = sbx(&daemon, &["wait", "sleeper"], 137);
    assert_eq!(stdout(&out).trim(), "137");
    let done = daemon.sandbox(&id);
    assert_eq!(done.signal.as_deref(), Some("SIGKILL"));
    assert_eq!(done.reason, Some(EndReason::Killed));

    // With a signal, by id.
    let out = sbx(&daemon, &["run", "-d", "--", "sleep", "100"], 0);
    let id = stdout(&out).trim().to_string();
    sbx(&daemon, &["kill", "--signal", "TERM", &id], 0);
    assert!(eventually(Duration::from_secs(30), || daemon
        .sandbox(&id)
        .state
        == SandboxState::Exited));
    let done = daemon.sandbox(&id);
    assert_eq!(done.exit_code, Some(143));
    assert_eq!(done.signal.as_deref(), Some("SIGTERM"));

    // Killing an ended sandbox is an error, reported in one line.
    let out = daemon.sbx(&["kill", &id]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&["kill"], &out));
    assert_eq!(
        stderr(&out).trim_end().lines().count(),
        1,
        "{}",
        describe(&["kill"], &out)
    );

    // rm refuses a running sandbox without -f, and removes it with -f.
    let out = sbx(&daemon, &["run", "-d", "--", "sleep", "100"], 0);
    let id = stdout(&out).trim().to_string();
    let refused = daemon.sbx(&["rm", &id]);
    assert_ne!(
        refused.status.code(),
        Some(0),
        "{}",
        describe(&["rm"], &refused)
    );
    assert_eq!(daemon.sandbox(&id).state, SandboxState::Running);
    sbx(&daemon, &["rm", "-f", &id], 0);
    daemon
        .request("GET", &format!("/v1/sandboxes/{id}"))
        .send()
        .assert_error(404, "GET after sbx rm -f");
}

#[test]
fn unreachable_daemon_is_a_one_line_error() {
    require_e2e!();
    let mut daemon = Daemon::start(Mode::Privileged);
    daemon.kill9();
    for args in [&["ls"][..], &["run", "--", "true"], &["inspect", "x"]] {
        let out = daemon.sbx(args);
        assert_eq!(out.status.code(), Some(125), "{}", describe(args, &out));
        assert_eq!(
            stderr(&out).trim_end().lines().count(),
            1,
            "{}",
            describe(args, &out)
        );
    }
}

#[test]
fn sbx_run_with_limits_reports_an_oom_and_removes_the_sandbox_with_rm() {
    sandboxd_tests::require_e2e!();
    let daemon = sandboxd_tests::Daemon::start(sandboxd_tests::Mode::Privileged);
    let out = daemon.sbx(&[
        "run",
        "--memory",
        "64M",
        "--cpus",
        "0.5",
        "--pids",
        "64",
        "--timeout",
        "60",
        "--rm",
        "--",
        "perl",
        "-e",
        "$x = 'a' x (256*1024*1024)",
    ]);
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ran out of memory"), "{stderr}");
    let list: serde_json::Value = daemon.get("/v1/sandboxes").json();
    assert_eq!(list["items"], serde_json::json!([]), "--rm removed it");

    let out = daemon.sbx(&[
        "run",
        "-d",
        "--name",
        "s1",
        "--",
        "sh",
        "-c",
        "echo hi; sleep 30",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = daemon.sbx(&["stats", "--json", "s1"]);
    assert!(out.status.success(), "{out:?}");
    let stats: sandboxd_api::Stats = serde_json::from_slice(&out.stdout).unwrap();
    assert!(stats.memory_bytes.unwrap() > 0, "{stats:?}");
    assert!(daemon.sbx(&["rm", "-f", "s1"]).status.success());
}
