//! The quickest end-to-end proof: a first sandbox runs in both modes.

use sandboxd_tests::{both_modes, Daemon, Mode};

fn a_first_sandbox_runs(mode: Mode) {
    let daemon = Daemon::start(mode);
    let out = daemon.sh("echo hello from $(hostname); id -u");
    assert!(out.starts_with("hello from sbx-"), "{mode:?}: {out}");
    assert!(out.ends_with("0\n"), "{mode:?}: {out}");
}
both_modes!(a_first_sandbox_runs);
