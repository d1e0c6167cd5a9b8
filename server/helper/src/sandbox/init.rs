//! PID 1 of the sandbox: starts the command, forwards signals to it, reaps every zombie, and
//! exits with the command's status (`128 + N` when signal N ended it).
//!
//! Signals are blocked in init and taken synchronously with sigwait, so there are no handlers and
//! no races; the command gets an unblocked mask and default dispositions.

use std::fs::File;

use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use sandboxd_protocol::status::StatusLine;

use super::seccomp::Filters;
use crate::child::{self, Command, Stdio};
use crate::sys;
use crate::validate::ValidSpawn;

/// Signals init passes on to the command.
const FORWARDED: &[Signal] = &[
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGCONT,
    Signal::SIGTSTP,
    Signal::SIGWINCH,
];

pub fn run(spawn: &ValidSpawn, filters: &Filters, mut status: File, stdio: Stdio) -> ! {
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGCHLD);
    for s in FORWARDED {
        waited.add(*s);
    }
    if waited.thread_block().is_err() {
        let line = StatusLine::SetupFailed("blocking signals".into());
        child::report(&mut status, &line);
        sys::exit_now(1);
    }
    let command = Command {
        argv: &spawn.command,
        env: &spawn.env,
        cwd: &spawn.cwd,
        user: spawn.run_as.as_ref(),
    };
    let command = child::start_command(&command, stdio, &|| filters.apply(), &mut status);
    loop {
        let Ok(signal) = waited.wait() else { continue };
        if signal != Signal::SIGCHLD {
            let _ = kill(command, signal);
            continue;
        }
        // Reap everything that has exited: orphans reparented to us as well as the command.
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == command => {
                    child::report(&mut status, &StatusLine::Exit(code));
                    sys::exit_now(code);
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == command => {
                    child::report(&mut status, &StatusLine::Signal(sig as i32));
                    sys::exit_now(128 + sig as i32);
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}
