//! PID 1 of the sandbox: starts the command, forwards signals to it, reaps every zombie, and
//! exits with the command's status (`128 + N` when signal N ended it).
//!
//! Signals are blocked in init and taken synchronously with sigwait, so there are no handlers and
//! no races; the command gets an unblocked mask and default dispositions.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{pipe2, setsid, ForkResult, Pid};

use super::seccomp::Filters;
use crate::exec::join::Stdio;
use crate::sys::fork;

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

/// Say on the status pipe whether the forked command was executed: its exec pipe is
/// close-on-exec, so it closes empty when `execve` succeeded and carries the errno otherwise.
/// (Init and the exec shims report alike; the monitor reads it with `monitor::read_status`.)
pub(crate) fn report_exec(exec_r: OwnedFd, program: &CString, status: &mut File) {
    let mut errno = [0u8; 4];
    match File::from(exec_r).read(&mut errno) {
        Ok(4) => {
            let e = Errno::from_raw(i32::from_ne_bytes(errno));
            let program = program.to_string_lossy();
            let _ = writeln!(status, "exec_failed {program}: {}", e.desc());
        }
        _ => {
            let _ = writeln!(status, "started");
        }
    }
}

pub fn run(spawn: &ValidSpawn, filters: &Filters, mut status: File, stdio: Stdio) -> ! {
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGCHLD);
    for s in FORWARDED {
        waited.add(*s);
    }
    if waited.thread_block().is_err() {
        let _ = writeln!(status, "setup_failed blocking signals");
        sys::exit_now(1);
    }
    let (exec_r, exec_w) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            let _ = writeln!(status, "setup_failed exec pipe: {e}");
            sys::exit_now(1);
        }
    };
    let command = match fork() {
        Ok(ForkResult::Child) => {
            drop(exec_r);
            exec_command(
                &spawn.command,
                &spawn.env,
                &spawn.cwd,
                filters,
                stdio,
                exec_w,
            )
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            let _ = writeln!(status, "setup_failed fork: {e}");
            sys::exit_now(1);
        }
    };
    // Only the command may hold its stdio: the end of file of the output marks its end.
    drop((stdio, exec_w));
    report_exec(exec_r, &spawn.command[0], &mut status);
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
                    let _ = writeln!(status, "exit {code}");
                    sys::exit_now(code);
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == command => {
                    let _ = writeln!(status, "signal {}", sig as i32);
                    sys::exit_now(128 + sig as i32);
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}

/// In the command's process: wire up stdio, restore a clean signal state, enter the working
/// directory, install the seccomp filter and exec. On failure, report errno through `exec_w` and exit 127 (not found) or 126.
/// The forked command's last steps, for the main command and for execs alike: a session of its
/// own, default signals, its stdio, no other descriptor, its working directory, the seccomp
/// filter, exec. A failure goes to `exec_w` as an errno (see [`report_exec`]) and to stderr.
pub(crate) fn exec_command(
    argv: &[CString],
    env: &[CString],
    cwd: &CStr,
    filters: &Filters,
    stdio: Stdio,
    exec_w: OwnedFd,
) -> ! {
    // Move the report descriptor above 10 first, so the dup2s below cannot clobber it.
    let report = match sys::dup_at_least(exec_w.as_fd(), 10) {
        Ok(high) => high,
        Err(_) => exec_w,
    };
    let program = argv[0].to_string_lossy();
    let fail = |e: Errno, what: &str| -> ! {
        let _ = nix::unistd::write(&report, &(e as i32).to_ne_bytes());
        let msg = format!("sandboxd: cannot {what} {program}: {}\n", e.desc());
        let _ = nix::unistd::write(std::io::stderr(), msg.as_bytes());
        sys::exit_now(if e == Errno::ENOENT { 127 } else { 126 })
    };
    // A session of its own: with a terminal, that terminal controls it (job control works and
    // the shell gets SIGHUP/SIGWINCH from it); without, it has no controlling terminal.
    let _ = setsid();
    let _ =
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for s in Signal::iterator() {
        if s != Signal::SIGKILL && s != Signal::SIGSTOP {
            let _ = sys::reset_signal(s);
        }
    }
    // stdin is the sandbox's own /dev/null unless the spec asked for stdin (a pipe from the
    // monitor) or a terminal (the sandbox's own pty, which becomes the controlling terminal):
    // no host descriptor crosses into the sandbox.
    if let Err(e) = crate::exec::join::wire_stdio(stdio) {
        fail(e, "set up stdio for");
    }
    if let Err(e) = crate::fds::close_all_except(&[report.as_raw_fd()]) {
        fail(e, "close descriptors for");
    }
    if let Err(e) = nix::unistd::chdir(cwd) {
        fail(e, "enter the working directory for");
    }
    // The working directory must be inside the sandbox's root (it always is after pivot_root;
    // checked anyway, as runc learned with CVE-2024-21626).
    match std::env::current_dir() {
        Ok(dir) if dir.is_absolute() => {}
        _ => fail(Errno::ENOENT, "resolve the working directory for"),
    }
    // Last: from here on only the allowlist (execve, write and exit_group included) is reachable.
    if let Err(e) = filters.apply() {
        fail(e, "apply the seccomp filter for");
    }
    let e = exec_search(argv, env);
    fail(e, "execute")
}

/// execve `argv[0]`, searching the PATH of the *sandbox's* environment (execvp would use init's).
pub(crate) fn exec_search(argv: &[CString], env: &[CString]) -> Errno {
    let program = argv[0].as_bytes();
    if program.contains(&b'/') {
        return nix::unistd::execve(&argv[0], argv, env).unwrap_err_or(Errno::ENOEXEC);
    }
    let path = env
        .iter()
        .find_map(|kv| kv.as_bytes().strip_prefix(b"PATH="))
        .unwrap_or(b"/usr/local/bin:/usr/bin:/bin");
    let mut result = Errno::ENOENT;
    for dir in path.split(|b| *b == b':') {
        let dir = if dir.is_empty() { b".".as_slice() } else { dir };
        let mut full = dir.to_vec();
        full.push(b'/');
        full.extend_from_slice(program);
        let Ok(full) = CString::new(full) else {
            continue;
        };
        match nix::unistd::execve(full.as_c_str(), argv, env).unwrap_err_or(Errno::ENOEXEC) {
            Errno::ENOENT | Errno::ENOTDIR => {}
            // Remember permission problems but keep looking, as execvp does.
            Errno::EACCES => result = Errno::EACCES,
            other => return other,
        }
    }
    result
}

trait UnwrapErrOr {
    fn unwrap_err_or(self, default: Errno) -> Errno;
}

impl<T> UnwrapErrOr for Result<T, Errno> {
    fn unwrap_err_or(self, default: Errno) -> Errno {
        self.err().unwrap_or(default)
    }
}
