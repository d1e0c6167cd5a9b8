//! Host-wide uid reservation: two privileged daemons never hand out the same host uids, and a
//! range that holds a real user is refused.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sandboxd_tests::{binaries, ensure_user, require_e2e, Daemon, Mode, DAEMON_USER};

/// Start a privileged sandboxd that is expected to refuse to start; its exit status and stderr.
fn refused_start(uid_base: u32, slots: u32) -> (std::process::ExitStatus, String, String) {
    ensure_user(DAEMON_USER);
    let state_dir =
        std::env::temp_dir().join(format!("sandboxd-e2e-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&state_dir).unwrap();
    let mut child = Command::new(binaries().join("sandboxd"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state_dir)
        .args(["--uid-base", &uid_base.to_string()])
        .args(["--uid-slots", &slots.to_string(), "--user", DAEMON_USER])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sandboxd with uid base {uid_base} did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let _ = std::fs::remove_dir_all(&state_dir);
    (status, stderr, state_dir.display().to_string())
}

#[test]
fn a_second_daemon_on_the_same_range_refuses_naming_the_first() {
    require_e2e!();
    let first = Daemon::start(Mode::Privileged);
    // Overlapping, not equal: one slot into the first daemon's ranges.
    let (status, stderr, _) = refused_start(first.uid_base() + 65536, 2);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&first.state_dir.display().to_string()) && stderr.contains("--uid-base"),
        "{stderr}"
    );
    // The first daemon is unaffected.
    assert_eq!(first.sh("echo fine"), "fine\n");
}

#[test]
fn a_range_holding_a_user_is_refused_naming_it() {
    require_e2e!();
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("the nobody user");
    let uid = nobody.uid.as_raw();
    let (status, stderr, _) = refused_start(uid - 10, 1);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains(&format!("user nobody ({uid})")), "{stderr}");
}
