//! Limits on a pure cgroup v2 host: the privileged helper at the root of the unified hierarchy
//! (init born in its cgroup with `CLONE_INTO_CGROUP`), and a rootless daemon started in a
//! delegated subtree (made as systemd delegates one: chowned to the user, the controllers enabled
//! in the parent's `cgroup.subtree_control`).
//!
//! These tests need the unified hierarchy at /sys/fs/cgroup. CI runs them in a VM booted with
//! `cgroup_no_v1=all` (`tests/vm/cgroup-v2.sh`), which sets `SANDBOXD_E2E_CGROUP_V2=1`: then a
//! host without it is a failure, not a skip. On a v1 or hybrid host they are skipped otherwise.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sandboxd_api::{EndReason, Sandbox, Stats};
use sandboxd_tests::{
    cgroup_parent_name, ensure_user, eventually, require_e2e, Daemon, Mode, ROOTLESS_USER,
};
use serde_json::{json, Value};

const ROOT: &str = "/sys/fs/cgroup";

/// Whether the unified hierarchy is mounted at /sys/fs/cgroup (with no v1 hierarchy beside it).
fn pure_v2() -> bool {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v2 = false;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let point = left.split_whitespace().nth(4).unwrap_or("");
        match right.split_whitespace().next() {
            Some("cgroup2") if point == ROOT => v2 = true,
            Some("cgroup") => return false,
            _ => {}
        }
    }
    v2
}

/// Skip (returning early) on a host without the pure unified hierarchy, unless it is required.
macro_rules! require_v2 {
    () => {
        require_e2e!();
        if !pure_v2() {
            if std::env::var("SANDBOXD_E2E_CGROUP_V2").as_deref() == Ok("1") {
                panic!("SANDBOXD_E2E_CGROUP_V2=1 but /sys/fs/cgroup is not a pure cgroup v2 host");
            }
            eprintln!("skipping: not a pure cgroup v2 host (tests/vm/cgroup-v2.sh runs this)");
            return;
        }
    };
}

/// A subtree delegated to the rootless test user, as systemd makes one for `Delegate=yes`: a
/// root-owned parent that enables `controllers` for its child, and the child, chowned to the user.
/// Removed (with what the daemon made in it) on drop.
struct Delegated {
    outer: PathBuf,
    dir: PathBuf,
}

impl Delegated {
    fn new(controllers: &str) -> Delegated {
        let (uid, gid) = ensure_user(ROOTLESS_USER);
        let root = Path::new(ROOT);
        let enable = |dir: &Path, controllers: &str| {
            let list: Vec<String> = controllers
                .split_whitespace()
                .map(|c| format!("+{c}"))
                .collect();
            std::fs::write(dir.join("cgroup.subtree_control"), list.join(" "))
                .unwrap_or_else(|e| panic!("enable {controllers} in {}: {e}", dir.display()));
        };
        enable(root, "memory pids cpu");
        let outer = root.join(format!(
            "sbx-e2e-delegated-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir(&outer).expect("create the delegating cgroup");
        enable(&outer, controllers);
        let dir = outer.join("user");
        std::fs::create_dir(&dir).expect("create the delegated cgroup");
        for p in [
            dir.clone(),
            dir.join("cgroup.procs"),
            dir.join("cgroup.subtree_control"),
            dir.join("cgroup.threads"),
        ] {
            nix::unistd::chown(&p, Some(uid.into()), Some(gid.into())).expect("chown");
        }
        Delegated { outer, dir }
    }
}

impl Drop for Delegated {
    fn drop(&mut self) {
        // Deepest first; a cgroup.kill empties each of processes before its rmdir.
        let mut dirs = Vec::new();
        let mut stack = vec![self.outer.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
            dirs.push(d);
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            eventually(Duration::from_secs(5), || {
                std::fs::remove_dir(d).is_ok() || !d.exists()
            });
        }
    }
}

/// The cgroup limits the daemon says it enforces (`disk` is not a cgroup's).
fn limits(d: &Daemon) -> Vec<String> {
    let info: Value = d.get("/v1/info").json();
    let all: Vec<String> = serde_json::from_value(info["limits"].clone()).unwrap();
    all.into_iter().filter(|l| l != "disk").collect()
}

fn stats(d: &Daemon, id: &str) -> Stats {
    let resp = d.get(&format!("/v1/sandboxes/{id}/stats"));
    assert_eq!(resp.status, 200, "{}", resp.body);
    resp.parse()
}

/// The cgroup of a process as the host sees it (`0::/path`).
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// What both modes must do on v2: memory, cpu and pids limits written where the sandbox runs,
/// init born in its cgroup, an OOM kill of the whole sandbox reported as `oom`, live and final
/// stats, the cgroup gone after the delete. `base` is the directory the daemon's parent cgroup is
/// in (the root, or the delegated subtree).
fn limits_are_enforced(d: &Daemon, base: &Path) {
    assert_eq!(limits(d), vec!["memory", "cpus", "pids"], "{}", d.log());
    let s = d.create(json!({"command": ["sleep", "100"],
        "limits": {"memory_bytes": 96 << 20, "cpus": 0.5, "pids": 40}}));
    let id = s.id.to_string();
    let dir = base.join(cgroup_parent_name(&d.state_dir)).join(&id);
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(read("memory.max"), (96u64 << 20).to_string());
    assert_eq!(read("memory.oom.group"), "1");
    assert_eq!(read("pids.max"), "40");
    assert_eq!(read("cpu.max"), "50000 100000");
    // Init was born in the sandbox's cgroup: the host sees it there.
    let init = s.init_pid.unwrap();
    let rel = dir.strip_prefix(ROOT).unwrap();
    assert_eq!(cgroup_of(init), format!("0::/{}", rel.display()));
    let live = stats(d, &id);
    assert!(
        live.memory_bytes.unwrap() > 0 && live.pids.unwrap() >= 1,
        "{live:?}"
    );
    let resp = d.delete(&format!("/v1/sandboxes/{id}"));
    assert_eq!(resp.status, 204, "{}", resp.body);
    assert!(!dir.exists(), "{} left behind", dir.display());

    // A hog and a sleeper: the OOM killer strikes, and the whole sandbox ends with reason oom.
    let resp = d.post(
        "/v1/sandboxes?wait=true",
        &json!({"command": ["sh", "-c", "sleep 100 & perl -e '$x = \"a\" x (256*1024*1024); print length $x'; wait"],
                "limits": {"memory_bytes": 48 << 20}}),
    );
    assert_eq!(resp.status, 201, "{}", resp.body);
    let s: Sandbox = resp.parse();
    assert_eq!(s.reason, Some(EndReason::Oom), "{s:?}");
    let done = stats(d, &s.id.to_string());
    let peak = done.memory_peak_bytes;
    assert!(peak.is_none_or(|p| p <= 48 << 20), "{done:?}");
    assert!(done.cpu_usec.is_some(), "{done:?}");

    // pids: a fork bomb stays below its limit.
    let bomb = d.create(
        json!({"command": ["sh", "-c", "b() { b | b & }; b; sleep 100"], "limits": {"pids": 32}}),
    );
    std::thread::sleep(Duration::from_secs(2));
    let st = stats(d, &bomb.id.to_string());
    assert!(st.pids.unwrap() <= 32, "{st:?}");
    let resp = d.delete(&format!("/v1/sandboxes/{}", bomb.id));
    assert_eq!(resp.status, 204, "{}", resp.body);
}

/// Privileged on pure v2: the parent at the root of the unified hierarchy.
#[test]
fn privileged_limits_oom_and_stats_on_pure_v2() {
    require_v2!();
    let d = Daemon::start(Mode::Privileged);
    limits_are_enforced(&d, Path::new(ROOT));
}

/// Rootless in a delegated subtree: the helper moves the daemon and itself into a leaf, enables
/// the controllers below the subtree's root, and enforces limits as the privileged helper does;
/// across a restart of daemon and helper too.
#[test]
fn rootless_in_a_delegated_subtree_enforces_limits() {
    require_v2!();
    let delegated = Delegated::new("memory pids cpu");
    let mut d = Daemon::start_in_cgroup(Mode::Rootless, &delegated.dir, &[]);
    limits_are_enforced(&d, &delegated.dir);
    let rel = delegated.dir.strip_prefix(ROOT).unwrap();
    assert_eq!(
        cgroup_of(d.pid() as i32),
        format!("0::/{}/sandboxd-daemon", rel.display()),
        "the daemon moved into the leaf"
    );
    // sbx doctor agrees: the limits hold, below the delegated subtree.
    let doctor = d.sbx(&["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(" cgroup_limits "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.starts_with("ok ") && line.contains(&delegated.dir.display().to_string()),
        "{text}"
    );
    // Restarted in the leaf (the subtree's root has controllers enabled, so no process may
    // enter it again), as systemd's DelegateSubgroup= restarts a unit.
    d.set_cgroup(&delegated.dir.join("sandboxd-daemon"));
    d.restart();
    assert_eq!(limits(&d), vec!["memory", "cpus", "pids"], "{}", d.log());
    let (s, out) =
        d.run_spec(json!({"command": ["echo", "again"], "limits": {"memory_bytes": 64 << 20}}));
    assert_eq!((s.exit_code, out.as_str()), (Some(0), "again\n"), "{s:?}");
}

/// A subtree with only some controllers delegated: those limits work, the others are 422 naming
/// the missing delegation.
#[test]
fn rootless_with_a_controller_not_delegated_names_it() {
    require_v2!();
    let delegated = Delegated::new("pids");
    let d = Daemon::start_in_cgroup(Mode::Rootless, &delegated.dir, &[]);
    assert_eq!(limits(&d), vec!["pids"], "{}", d.log());
    let resp = d.post(
        "/v1/sandboxes",
        &json!({"command": ["true"], "limits": {"memory_bytes": 64 << 20}}),
    );
    assert_eq!(resp.status, 422, "{}", resp.body);
    let msg = resp.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("not delegated"), "{msg}");
    let (s, _) = d.run_spec(json!({"command": ["true"], "limits": {"pids": 16}}));
    assert_eq!(s.exit_code, Some(0), "{s:?}");
}
