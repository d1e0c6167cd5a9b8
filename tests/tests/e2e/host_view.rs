//! What a sandbox sees of the host (issue 12, finding 12): its mount table names no host path
//! (not the state directory, not the image store, not the checkout), init's command line and
//! environment say nothing of the helper, and the dangerous parts of `/proc` are masked or
//! read-only as in Docker's default.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sandboxd_tests::{both_modes, Daemon, Mode};
use serde_json::{json, Value};

/// Host strings a sandbox must not find in what it reads.
fn host_paths(d: &Daemon) -> Vec<String> {
    let mut paths = vec![
        d.state_dir.display().to_string(),
        d.state_dir.join("images").display().to_string(),
        // Any state directory of the test harness, and the checkout the tests run from.
        "sandboxd-e2e".to_owned(),
        env!("CARGO_MANIFEST_DIR").to_owned(),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .display()
            .to_string(),
    ];
    paths.dedup();
    paths
}

/// The lines of `seen` that show a host path, each with the path.
fn host_path_lines(d: &Daemon, what: &str, seen: &str) -> Vec<String> {
    let paths = host_paths(d);
    seen.lines()
        .filter_map(|line| {
            let path = paths.iter().find(|p| line.contains(p.as_str()))?;
            Some(format!("{what}: {path} in {line}"))
        })
        .collect()
}

fn assert_no_host_path(d: &Daemon, what: &str, seen: &str) {
    let found = host_path_lines(d, what, seen);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// A tiny image: `sh` and `cat` from the host with their libraries.
fn image_tar(dir: &Path) -> Vec<u8> {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    for bin in ["/usr/bin/dash", "/usr/bin/cat"] {
        std::fs::copy(
            bin,
            root.join("bin").join(Path::new(bin).file_name().unwrap()),
        )
        .unwrap();
        let out = Command::new("ldd").arg(bin).output().unwrap();
        for lib in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            let target = root.join(lib.trim_start_matches('/'));
            std::fs::create_dir_all(target.parent().unwrap()).unwrap();
            std::fs::copy(lib, &target).unwrap();
        }
    }
    std::os::unix::fs::symlink("dash", root.join("bin/sh")).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", &root).unwrap();
    b.into_inner().unwrap()
}

fn import(d: &Daemon, name: &str) {
    let scratch =
        std::env::temp_dir().join(format!("sandboxd-hv-{}", uuid::Uuid::new_v4().simple()));
    let body = image_tar(&scratch);
    std::fs::remove_dir_all(&scratch).unwrap();
    let reply = d
        .request("POST", "/v1/images")
        .query("name", name)
        .header("content-type", "application/x-tar")
        .body(body)
        .timeout(Duration::from_secs(120))
        .send();
    assert_eq!(reply.status, 201, "{}", reply.body);
}

fn output_of(d: &Daemon, spec: Value) -> String {
    let (sandbox, out) = d.run_spec(spec.clone());
    assert_eq!(sandbox.exit_code, Some(0), "{spec}: {out}");
    out
}

fn mount_table_names_no_host_path(mode: Mode) {
    let d = Daemon::start(mode);
    let script = "cat /proc/self/mountinfo /proc/mounts";
    let mut found = Vec::new();
    let host = output_of(&d, json!({"command": ["sh", "-c", script]}));
    assert!(host.contains(" /work "), "{host}");
    found.extend(host_path_lines(&d, "a host-root sandbox", &host));
    import(&d, "hv");
    let image = output_of(
        &d,
        json!({"command": ["sh", "-c", script], "rootfs": {"image": "hv"}}),
    );
    assert!(image.contains("overlay"), "{image}");
    found.extend(host_path_lines(&d, "an image sandbox", &image));
    if mode == Mode::Privileged {
        let limited = output_of(
            &d,
            json!({"command": ["sh", "-c", script], "limits": {"disk_bytes": 64 << 20}}),
        );
        found.extend(host_path_lines(&d, "a disk-limited sandbox", &limited));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
both_modes!(mount_table_names_no_host_path);

fn init_shows_nothing_of_the_helper(mode: Mode) {
    let d = Daemon::start(mode);
    let out = output_of(
        &d,
        json!({"command": ["sh", "-c",
            "tr '\\0' ' ' < /proc/1/cmdline; echo; cat /proc/1/comm; tr '\\0' ' ' < /proc/1/environ 2>&1; echo"]}),
    );
    let mut lines = out.lines();
    assert_eq!(
        lines.next().map(str::trim_end),
        Some("sandboxd-init"),
        "{out}"
    );
    assert_eq!(lines.next(), Some("sandboxd-init"), "{out}");
    assert_no_host_path(&d, "init", &out);
    for leaked in [
        "--state-dir",
        "--allow-uid",
        "SANDBOXD_LOG",
        "PATH=",
        "helper",
    ] {
        assert!(!out.contains(leaked), "init shows {leaked}: {out}");
    }
}
both_modes!(init_shows_nothing_of_the_helper);

/// Docker's (runc's) default masked and read-only paths.
const MASKED_FILES: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    // Beyond Docker's set: host kernel and hardware facts (see the helper's rootfs plan).
    "/proc/cmdline",
    "/proc/kallsyms",
    "/proc/modules",
    "/proc/iomem",
    "/proc/ioports",
    "/proc/vmallocinfo",
    "/proc/zoneinfo",
    "/proc/buddyinfo",
    "/proc/partitions",
    "/proc/diskstats",
    "/proc/swaps",
    "/proc/devices",
    "/proc/interrupts",
    "/proc/locks",
];
const MASKED_DIRS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
const READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn proc_hides_host_kernel_facts(mode: Mode) {
    let d = Daemon::start(mode);
    let mut script = String::from("set -u\n");
    for f in MASKED_FILES {
        // Absent, or a file that reads empty.
        script.push_str(&format!(
            "if [ -e {f} ]; then printf '{f} %s\\n' \"$(head -c 64 {f} 2>/dev/null | wc -c)\"; fi\n"
        ));
    }
    for dir in MASKED_DIRS {
        script.push_str(&format!(
            "if [ -e {dir} ]; then printf '{dir} %s\\n' \"$(ls -A {dir} | wc -l)\"; fi\n"
        ));
    }
    // The control: what ordinary tools read is still there, and the check above sees it.
    script.push_str("printf 'control %s\\n' \"$(head -c 64 /proc/meminfo | wc -c)\"\n");
    script.push_str("cat /proc/self/mountinfo\n");
    let out = output_of(&d, json!({"command": ["sh", "-c", script]}));
    assert!(
        out.lines().any(|l| l == "control 64"),
        "/proc/meminfo should stay readable:\n{out}"
    );
    for line in out.lines() {
        if let Some((path, count)) = line.split_once(' ') {
            if MASKED_FILES.contains(&path) || MASKED_DIRS.contains(&path) {
                assert_eq!(count, "0", "{path} is not masked:\n{out}");
            }
        }
    }
    // Read-only: each present path is a read-only mount point.
    for path in READONLY {
        let present = out.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 5 && f[4] == *path && f[5].split(',').any(|o| o == "ro")
        });
        let exists = Path::new(path).exists();
        assert!(
            present || !exists,
            "{path} is not mounted read-only inside:\n{out}"
        );
    }
    // No /sys at all (so nothing of /sys/firmware or powercap either).
    let sys = output_of(
        &d,
        json!({"command": ["sh", "-c", "ls -A /sys 2>/dev/null | wc -l"]}),
    );
    assert_eq!(sys.trim(), "0", "/sys inside: {sys}");
}
both_modes!(proc_hides_host_kernel_facts);
