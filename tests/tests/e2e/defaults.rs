//! A daemon started without limit flags still bounds each sandbox: a default memory limit (which
//! its tmpfs mounts are charged to) and a default disk cap; `--default-memory` and
//! `--default-disk` change them, and where the host cannot enforce one, `GET /v1/info` says so.

use sandboxd_api::{EndReason, Sandbox};
use sandboxd_tests::{require_e2e, Daemon, Mode};
use serde_json::{json, Value};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[test]
fn without_flags_a_sandbox_gets_a_memory_limit_and_a_disk_cap() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let (s, out) = d.run_spec(json!({"command": ["sh", "-c", "df -k /work | tail -1"]}));
    assert_eq!(s.spec.limits.memory_bytes, Some(GIB), "{s:?}");
    assert_eq!(s.spec.limits.disk_bytes, Some(10 * GIB), "{s:?}");
    // /work is the sandbox's own filesystem of (about) 10 GiB, not the host's.
    let size_kib: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        (9 * GIB / 1024..=10 * GIB / 1024).contains(&size_kib),
        "{out}"
    );
    let info: Value = d.get("/v1/info").json();
    assert_eq!(info["unenforced"], json!([]), "{info}");
}

#[test]
fn the_default_memory_limit_bounds_tmpfs_too() {
    require_e2e!();
    // Without a disk cap, /tmp is a tmpfs (512 MiB): its pages count against the memory limit.
    let d = Daemon::start_with(
        Mode::Privileged,
        &["--default-memory", "64M", "--default-disk", "0"],
    );
    let resp = d.post(
        "/v1/sandboxes?wait=true",
        &json!({"command": ["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=200; echo done"]}),
    );
    assert_eq!(resp.status, 201, "{}", resp.body);
    let s: Sandbox = resp.parse();
    assert_eq!(s.spec.limits.memory_bytes, Some(64 * MIB), "{s:?}");
    assert_eq!(s.spec.limits.disk_bytes, None, "{s:?}");
    assert_eq!(s.reason, Some(EndReason::Oom), "{s:?}");
    // Turned off, the daemon says so.
    let info: Value = d.get("/v1/info").json();
    let unenforced = info["unenforced"].as_array().unwrap();
    assert_eq!(unenforced.len(), 1, "{info}");
    assert_eq!(unenforced[0]["limit"], "disk");
    assert!(
        unenforced[0]["reason"]
            .as_str()
            .unwrap()
            .contains("--default-disk 0"),
        "{info}"
    );
}

#[test]
fn the_default_disk_cap_gives_enospc_inside() {
    require_e2e!();
    let d = Daemon::start_with(Mode::Privileged, &["--default-disk", "32M"]);
    let (s, out) = d.run_spec(json!({"command": ["sh", "-c",
        "dd if=/dev/zero of=/work/big bs=1M count=64 2>&1; echo status=$?"]}));
    assert_eq!(s.spec.limits.disk_bytes, Some(32 * MIB), "{s:?}");
    assert!(out.contains("No space left on device"), "{out}");
    assert!(!out.contains("status=0"), "{out}");
    // An explicit request still wins over the default.
    let (s, _) = d.run_spec(json!({"command": ["true"], "limits": {"disk_bytes": 64 * MIB}}));
    assert_eq!(s.spec.limits.disk_bytes, Some(64 * MIB), "{s:?}");
}

#[test]
fn rootless_info_lists_what_it_cannot_enforce() {
    require_e2e!();
    let d = Daemon::start(Mode::Rootless);
    let info: Value = d.get("/v1/info").json();
    let limits: Vec<&str> = info["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let unenforced = info["unenforced"].as_array().unwrap();
    let named = |name: &str| {
        unenforced
            .iter()
            .find(|u| u["limit"] == name)
            .map(|u| u["reason"].as_str().unwrap().to_owned())
    };
    // No loop device mount without privileges: the disk cap is never enforced rootless.
    let disk = named("disk").expect("disk is listed");
    assert!(disk.contains("rootless"), "{disk}");
    // Memory and pids are listed exactly when the host cannot enforce them.
    for name in ["memory", "pids"] {
        assert_eq!(
            named(name).is_some(),
            !limits.contains(&name),
            "{name}: {info}"
        );
    }
    // Sandboxes still run, without the limits the host cannot give them.
    let (s, _) = d.run(&["true"]);
    assert_eq!(s.spec.limits.disk_bytes, None, "{s:?}");
    if !limits.contains(&"memory") {
        assert_eq!(s.spec.limits.memory_bytes, None, "{s:?}");
    }
}
