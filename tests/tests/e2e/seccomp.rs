//! The default seccomp filter: a probe program inside a sandbox tries the denied syscalls, and
//! ordinary tools keep working.

use std::path::Path;
use std::process::Command;

use sandboxd_tests::{both_modes, require_e2e, Daemon, Mode};
use serde_json::json;

const PROBE_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/seccomp/probe.c");

/// Compile the probe with the host's gcc (static when the static libc is there; the host's
/// /usr is visible inside a sandbox anyway).
fn compile_probe(out: &Path) {
    for static_flag in [Some("-static"), None] {
        let mut gcc = Command::new("gcc");
        gcc.args(static_flag)
            .args(["-O1", "-pthread", "-o"])
            .arg(out)
            .arg(PROBE_SOURCE);
        let status = gcc.status().expect("gcc runs");
        if status.success() {
            return;
        }
    }
    panic!("gcc could not compile {PROBE_SOURCE}");
}

#[test]
fn denied_syscalls_fail_inside_a_sandbox() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let sandbox = d.create(json!({ "command": [
        "sh", "-c", "while [ ! -x /work/probe ]; do sleep 0.05; done; exec /work/probe"
    ]}));
    let id = sandbox.id.to_string();
    // Compiled on the host, then sent through the API (which writes beside the name and renames,
    // so the sandbox never runs a half-written file): the sandbox's /work is an overlay of its
    // work directory, which does not see files written into that directory behind its back.
    let scratch =
        std::env::temp_dir().join(format!("sandboxd-probe-{}", uuid::Uuid::new_v4().simple()));
    compile_probe(&scratch);
    let probe = std::fs::read(&scratch).expect("read the probe");
    std::fs::remove_file(&scratch).expect("remove the probe");
    let put = d
        .request(
            "PUT",
            &format!("/v1/sandboxes/{id}/files?path=/work/probe&mode=0755"),
        )
        .body(probe)
        .send();
    assert_eq!(put.status, 204, "upload the probe: {}", put.body);

    let done = d.wait(&id);
    let out = String::from_utf8_lossy(&d.logs(&id, "")).into_owned();
    assert_eq!(done.exit_code, Some(0), "probe failed: {out}");
    let results: Vec<(&str, &str)> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    let result = |name: &str| {
        results
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
            .unwrap_or_else(|| panic!("no result for {name}: {out}"))
    };
    for denied in [
        "keyctl",
        "add_key",
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "io_uring_setup",
        "kexec_load",
        "init_module",
        "mount",
        "setns",
        "unshare_newuser",
        "clone_newuser",
        "personality_no_aslr",
    ] {
        assert_eq!(result(denied), "EPERM", "{denied}: {out}");
    }
    // libc falls back from clone3 to clone on ENOSYS (pthread_create below proves it).
    assert_eq!(result("clone3"), "ENOSYS", "{out}");
    if std::env::consts::ARCH == "x86_64" {
        // An x32 number is in no allowlist (without the filter it would be ENOSYS or succeed).
        assert_eq!(result("x32_getpid"), "EPERM", "{out}");
        // A foreign architecture fails the filter's arch check: the process is killed.
        assert_eq!(
            result("i386_getpid"),
            format!("signal {}", libc_sigsys()),
            "{out}"
        );
    }
    for allowed in ["getpid", "personality_query", "fork", "pthread_create"] {
        assert_eq!(result(allowed), "ok", "{allowed}: {out}");
    }
}

/// SIGSYS on Linux (x86_64 and aarch64).
fn libc_sigsys() -> i32 {
    nix::sys::signal::Signal::SIGSYS as i32
}

fn shell_sees_the_filter_and_cannot_nest_user_namespaces(mode: Mode) {
    let d = Daemon::start(mode);
    let out = d.sh("grep Seccomp: /proc/self/status; \
         if unshare -U true 2>/dev/null; then echo unshare-worked; else echo unshare-failed; fi");
    assert!(out.contains("Seccomp:\t2"), "{mode:?}: {out}");
    assert!(out.contains("unshare-failed"), "{mode:?}: {out}");
    // The filter is inherited by everything the command starts.
    let out = d.sh("sh -c 'grep Seccomp: /proc/self/status' | cat");
    assert!(out.contains("Seccomp:\t2"), "{mode:?}: {out}");
}
both_modes!(shell_sees_the_filter_and_cannot_nest_user_namespaces);

#[test]
fn ordinary_tools_still_work() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let out = d.sh(
        "set -e; echo a b | awk '{print $2}'; perl -e 'print \"perl\\n\"'; ps -o pid= | head -1 >/dev/null; \
         ip -o link show lo | grep -q LOOPBACK; sleep 0.1 & wait; sleep 5 & kill $!; wait $! || true; \
         seq 3 | sort -r | tr '\\n' ' '; echo; date +%Y >/dev/null; echo done",
    );
    for expected in ["b\n", "perl\n", "3 2 1 \n", "done\n"] {
        assert!(out.contains(expected), "{expected:?} missing: {out}");
    }
}

#[test]
fn nested_user_namespaces_only_when_asked_and_allowed() {
    sandboxd_tests::require_e2e!();
    let script = "unshare -U true && echo nested-ok";
    // Not allowed by the operator: asking is 422.
    let d = sandboxd_tests::Daemon::start(sandboxd_tests::Mode::Privileged);
    let resp = d.post(
        "/v1/sandboxes",
        &serde_json::json!({"command": ["sh", "-c", script], "nested_user_namespaces": true}),
    );
    assert_eq!(resp.status, 422);
    // Allowed: only the sandboxes that ask get them.
    let d = sandboxd_tests::Daemon::start_with(
        sandboxd_tests::Mode::Privileged,
        &["--allow-nested-userns"],
    );
    let (asked, out) = d.run_spec(
        serde_json::json!({"command": ["sh", "-c", script], "nested_user_namespaces": true}),
    );
    assert_eq!(asked.exit_code, Some(0), "{out}");
    assert!(out.contains("nested-ok"), "{out}");
    let (default, out) = d.run_spec(serde_json::json!({"command": ["sh", "-c", script]}));
    assert_ne!(default.exit_code, Some(0), "{out}");
}
