//! Resource limits, accounting and lifetimes, end to end on this host's real cgroups (v1 hybrid
//! here; pure v2 in the VM job, tests/vm/cgroup-v2.sh, which also runs `cgroup_v2.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sandboxd_api::{EndReason, Sandbox, Stats};
use sandboxd_tests::{eventually, process_exists, processes_of_uid, require_e2e, Daemon, Mode};
use serde_json::{json, Value};

use sandboxd_tests::cgroup_parent_name as parent_name;

/// The hierarchies the helper uses on this host: the v1 controllers' mounts, or the unified
/// hierarchy's root alone on a pure v2 host.
fn hierarchies() -> &'static [&'static str] {
    if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        &[""]
    } else {
        &["memory", "pids", "cpu", "cpuacct"]
    }
}

/// Every cgroup directory of a sandbox on this host.
fn cgroup_dirs(d: &Daemon, id: &str) -> Vec<PathBuf> {
    hierarchies()
        .iter()
        .map(|c| {
            PathBuf::from("/sys/fs/cgroup")
                .join(c)
                .join(parent_name(&d.state_dir))
                .join(id)
        })
        .collect()
}

fn cgroup_children(d: &Daemon) -> Vec<String> {
    let mut out = Vec::new();
    for c in hierarchies() {
        let parent = PathBuf::from("/sys/fs/cgroup")
            .join(c)
            .join(parent_name(&d.state_dir));
        for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.push(format!("{c}/{}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

fn create_status(d: &Daemon, spec: Value) -> (u16, Value) {
    let resp = d.post("/v1/sandboxes", &spec);
    let body = serde_json::from_slice(&resp.bytes).unwrap_or(Value::Null);
    (resp.status, body)
}

fn stats(d: &Daemon, id: &str) -> Stats {
    let resp = d.get(&format!("/v1/sandboxes/{id}/stats"));
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.parse()
}

fn delete(d: &Daemon, id: &str) {
    let resp = d.delete(&format!("/v1/sandboxes/{id}"));
    assert_eq!(resp.status, 204, "{}", resp.body);
}

#[test]
fn privileged_info_says_every_limit_is_enforceable() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let info: Value = d.get("/v1/info").json();
    let limits: Vec<&str> = info["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // disk: a loop-mounted filesystem of the sandbox's own (tests/tests/e2e/images.rs).
    assert_eq!(limits, vec!["memory", "cpus", "pids", "disk"], "{info}");
}

/// Rootless on cgroup v1: nothing is enforceable, and asking is a clear 422, not a silent no.
#[test]
fn rootless_info_says_no_limit_is_enforceable_and_asking_is_422() {
    require_e2e!();
    let r = Daemon::start(Mode::Rootless);
    let info: Value = r.get("/v1/info").json();
    assert_eq!(info["limits"], json!([]), "{info}");
    // disk_bytes needs the privileged helper: never silently ignored.
    let (status, body) = create_status(
        &r,
        json!({"command": ["true"], "limits": {"disk_bytes": 1 << 30}}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("disk_bytes"),
        "{body}"
    );
    for limits in [
        json!({"memory_bytes": 64 << 20}),
        json!({"cpus": 0.5}),
        json!({"pids": 10}),
    ] {
        let (status, body) = create_status(&r, json!({"command": ["true"], "limits": limits}));
        assert_eq!(status, 422, "{limits}: {body}");
        assert_eq!(body["error"]["code"], "limit_unenforceable", "{body}");
    }
    // Without limits, rootless still works (daemon defaults for unenforceable limits are not applied).
    assert_eq!(r.sh("echo ok"), "ok\n");
}

#[test]
fn a_request_above_the_daemons_maximum_is_422_naming_the_limit() {
    require_e2e!();
    let d = Daemon::start_with(
        Mode::Privileged,
        &[
            "--max-memory",
            "256M",
            "--max-pids",
            "100",
            "--default-pids",
            "50",
        ],
    );
    let (status, body) = create_status(
        &d,
        json!({"command": ["true"], "limits": {"memory_bytes": 1u64 << 30}}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory_bytes"),
        "{body}"
    );
    let (status, body) = create_status(&d, json!({"command": ["true"], "limits": {"pids": 1000}}));
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("pids"),
        "{body}"
    );
    let (status, body) = create_status(
        &d,
        json!({"command": ["true"], "limits": {"memory_bytes": 128 << 20, "pids": 50}}),
    );
    assert_eq!(status, 201, "{body}");
}

#[test]
fn a_memory_hog_is_killed_as_a_whole_with_reason_oom() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    // A helper process that sleeps, and a hog that allocates 512 MiB against a 64 MiB limit:
    // the OOM killer takes the hog, and the monitor ends the whole sandbox.
    let resp = d.post(
        "/v1/sandboxes?wait=true",
        &json!({"command": ["sh", "-c", "sleep 100 & perl -e '$x = \"a\" x (512*1024*1024); print length $x'; wait"],
                "limits": {"memory_bytes": 64 << 20}}),
    );
    assert_eq!(resp.status, 201);
    let s: Sandbox = resp.parse();
    assert_eq!(s.reason, Some(EndReason::Oom), "{s:?}");
    assert_eq!(s.exit_code, Some(137), "{s:?}");
    let st = stats(&d, &s.id.to_string());
    assert!(st.memory_peak_bytes.unwrap() <= 64 << 20, "{st:?}");
    assert!(st.memory_peak_bytes.unwrap() > 32 << 20, "{st:?}");
    // The cgroup is gone with the sandbox's processes.
    for dir in cgroup_dirs(&d, &s.id.to_string()) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    // A sandbox under its limit is unaffected.
    let (ok, out) = d.run_spec(
        json!({"command": ["perl", "-e", "$x = \"a\" x (8*1024*1024); print length $x"],
                                      "limits": {"memory_bytes": 64 << 20}}),
    );
    assert_eq!(ok.exit_code, Some(0), "{ok:?} {out}");
}

#[test]
fn a_fork_bomb_is_contained_and_deleted_promptly() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let bomb = d.create(
        json!({"command": ["sh", "-c", "b() { b | b & }; b; sleep 100"], "limits": {"pids": 64}}),
    );
    let id = bomb.id.to_string();
    std::thread::sleep(Duration::from_secs(2));
    // The daemon answers, and other sandboxes run.
    for _ in 0..5 {
        assert_eq!(d.get("/healthz").status, 200);
    }
    assert_eq!(d.sh("echo still-fine"), "still-fine\n");
    let st = stats(&d, &id);
    assert!(st.pids.unwrap() <= 64, "{st:?}");
    let uid = bomb.host_uid.unwrap();
    // Its cgroups are where the checks after the delete look (so their absence there counts).
    for dir in cgroup_dirs(&d, &id) {
        assert!(dir.is_dir(), "{} of the running bomb", dir.display());
    }
    let started = Instant::now();
    delete(&d, &id);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "DELETE of a fork bomb took {:?}",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(10), || processes_of_uid(uid).is_empty()),
        "processes of the bomb remain"
    );
    for dir in cgroup_dirs(&d, &id) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn a_busy_loop_gets_about_its_cpu_share() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let s = d.create(json!({"command": ["perl", "-e", "1 while 1"], "limits": {"cpus": 0.5}}));
    let id = s.id.to_string();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let wall = started.elapsed().as_micros() as f64;
    let used = stats(&d, &id).cpu_usec.unwrap() as f64;
    // About half a core. The upper bound is what proves the limit (unlimited, the loop takes a
    // whole core); the lower one only that it ran, however busy other tests keep the machine.
    let share = used / wall;
    assert!(
        (0.1..=0.7).contains(&share),
        "a 0.5-cpu sandbox used {share:.2} of a core"
    );
    delete(&d, &id);
}

#[test]
fn output_past_the_cap_is_truncated_with_a_marker_and_the_daemon_stays_flat() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let rss = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .unwrap()
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = rss();
    let (s, _) = d.run_spec(
        json!({"command": ["sh", "-c", "head -c 300000000 /dev/zero; echo done >&2"],
                                   "limits": {"output_bytes": 1 << 20}}),
    );
    assert_eq!(s.exit_code, Some(0), "the writer was never blocked: {s:?}");
    assert!(s.output_truncated, "{s:?}");
    let id = s.id.to_string();
    let log = d.logs(&id, "");
    assert!(
        log.len() >= 1 << 20 && log.len() < (1 << 20) + 200,
        "{}",
        log.len()
    );
    let tail = String::from_utf8_lossy(&log[1 << 20..]).into_owned();
    assert!(tail.contains("output truncated"), "{tail}");
    let st = stats(&d, &id);
    assert!(st.output_truncated, "{st:?}");
    assert_eq!(st.output_bytes, log.len() as u64, "{st:?}");
    let after = rss();
    assert!(
        after < before + 64 * 1024,
        "daemon RSS grew from {before} kB to {after} kB"
    );
}

#[test]
fn stats_are_live_while_running_and_final_after_exit() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let s = d.create(json!({"command": ["sh", "-c", "echo hello; head -c 3000000 /dev/urandom > /work/blob; sleep 100"]}));
    let id = s.id.to_string();
    assert!(eventually(Duration::from_secs(10), || stats(&d, &id)
        .disk_bytes
        .unwrap_or(0)
        >= 3_000_000));
    let live = stats(&d, &id);
    assert!(
        live.memory_bytes.unwrap() > 0 && live.pids.unwrap() >= 2,
        "{live:?}"
    );
    assert_eq!(live.output_bytes, 6);
    d.request("POST", &format!("/v1/sandboxes/{id}/kill"))
        .send();
    d.wait(&id);
    let done = stats(&d, &id);
    assert!(
        done.memory_peak_bytes.unwrap() > 0 && done.cpu_usec.is_some(),
        "{done:?}"
    );
    assert_eq!(done.output_bytes, 6);
    assert!(done.disk_bytes.unwrap() >= 3_000_000, "{done:?}");
}

#[test]
fn ttl_kills_and_removes_and_extend_moves_the_deadline() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let s = d.create(json!({"command": ["sleep", "100"], "ttl_secs": 2}));
    let id = s.id.to_string();
    let init = s.init_pid.unwrap();
    // A waiter sees how it ended before the record goes.
    let ended = d.wait(&id);
    assert_eq!(ended.reason, Some(EndReason::Ttl), "{ended:?}");
    assert!(eventually(Duration::from_secs(15), || d
        .get(&format!("/v1/sandboxes/{id}"))
        .status
        == 404));
    assert!(!process_exists(init));
    assert!(!d.sandbox_dir(&id).exists());
    for dir in cgroup_dirs(&d, &id) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    // Extend: a 2 s TTL moved to 60 s keeps the sandbox alive past the first deadline.
    let s = d.create(json!({"command": ["sleep", "100"], "ttl_secs": 2}));
    let id = s.id.to_string();
    let resp = d.post(
        &format!("/v1/sandboxes/{id}/extend"),
        &json!({"ttl_secs": 60}),
    );
    assert_eq!(resp.status, 200, "{}", resp.body);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(d.sandbox(&id).state, sandboxd_api::SandboxState::Running);
    delete(&d, &id);
}

#[test]
fn remove_after_exit_deletes_everything_even_across_a_restart() {
    require_e2e!();
    let mut d = Daemon::start(Mode::Privileged);
    let s = d.create(json!({"command": ["true"], "remove_after_exit_secs": 2}));
    let id = s.id.to_string();
    d.wait(&id);
    assert_eq!(
        d.sandbox(&id).state,
        sandboxd_api::SandboxState::Exited,
        "kept until the deadline"
    );
    // The daemon is down when the deadline passes: the reaper catches up at start.
    d.kill9();
    std::thread::sleep(Duration::from_secs(3));
    d.restart();
    assert!(eventually(Duration::from_secs(10), || d
        .get(&format!("/v1/sandboxes/{id}"))
        .status
        == 404));
    assert!(!d.sandbox_dir(&id).exists());
}

#[test]
fn kill_9_of_daemon_and_helper_during_creates_leaves_no_orphan() {
    require_e2e!();
    let mut d = Daemon::start(Mode::Privileged);
    // Creates in flight while the daemon and its helper die (from a thread of their own, so
    // with a client of their own: the daemon's requests borrow the daemon, which dies meanwhile).
    let url = d.url.clone();
    let auth = d.auth_header().unwrap_or_default();
    let creator = std::thread::spawn(move || {
        let http = reqwest::blocking::Client::new();
        for _ in 0..40 {
            let _ = http
                .post(format!("{url}/v1/sandboxes"))
                .header("authorization", &auth)
                .json(&json!({"command": ["sleep", "100"], "limits": {"memory_bytes": 64 << 20}}))
                .send();
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    d.kill9();
    let _ = creator.join();
    d.restart();
    // Delete everything the restarted daemon knows; nothing else may remain.
    let list: Value = d.get("/v1/sandboxes?limit=1000").json();
    for item in list["items"].as_array().unwrap() {
        delete(&d, item["id"].as_str().unwrap());
    }
    assert!(
        eventually(Duration::from_secs(10), || cgroup_children(&d).is_empty()),
        "orphan cgroups: {:?}",
        cgroup_children(&d)
    );
    let dirs: Vec<_> = std::fs::read_dir(d.state_dir.join("sandboxes"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name())
        .collect();
    assert!(dirs.is_empty(), "orphan sandbox directories: {dirs:?}");
}

#[test]
fn a_sandbox_whose_row_was_lost_is_stopped_and_removed_at_start() {
    require_e2e!();
    let mut d = Daemon::start(Mode::Privileged);
    let s = d.create(json!({"command": ["sleep", "100"]}));
    let id = s.id.to_string();
    let init = s.init_pid.unwrap();
    d.kill9();
    // The database loses the row (a restored backup, a hand edit): the sandbox runs on, unknown.
    let db = d.state_dir.join("sandboxd.db");
    let status = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(format!("DELETE FROM sandboxes WHERE id = '{id}'"))
        .status()
        .expect("sqlite3");
    assert!(status.success());
    assert!(process_exists(init));
    d.restart();
    assert!(
        eventually(Duration::from_secs(15), || !process_exists(init)),
        "the orphan still runs"
    );
    assert!(
        eventually(Duration::from_secs(5), || !d.sandbox_dir(&id).exists()),
        "its directory remains"
    );
    for dir in cgroup_dirs(&d, &id) {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
