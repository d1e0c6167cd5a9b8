//! The quickest end-to-end proof: a first sandbox runs in both modes.

use sandboxd_tests::{require_e2e, Daemon, Mode};

#[test]
fn first_sandbox_runs_privileged_and_rootless() {
    require_e2e!();
    for mode in [Mode::Privileged, Mode::Rootless] {
        let daemon = Daemon::start(mode);
        let out = daemon.sh("echo hello from $(hostname); id -u");
        assert!(out.starts_with("hello from sbx-"), "{mode:?}: {out}");
        assert!(out.ends_with("0\n"), "{mode:?}: {out}");
    }
}
