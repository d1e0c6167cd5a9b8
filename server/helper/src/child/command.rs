//! The forked command's last steps, for the main command and for execs alike, and the report of
//! their outcome on the status pipe.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::unistd::{pipe2, setsid, ForkResult, Pid};
use sandboxd_protocol::status::StatusLine;

use super::stdio::{wire_stdio, Stdio};
use super::ChildError;
use crate::sys;
use crate::validate::RunAs;

/// What to execute, where, and as whom.
pub struct Command<'a> {
    pub argv: &'a [CString],
    pub env: &'a [CString],
    pub cwd: &'a CStr,
    /// Switch to this identity before entering `cwd` (`None`: stay root of the namespace).
    pub user: Option<&'a RunAs>,
}

/// Fork the command's process, which runs [`exec_command`]; report on `status` whether it was
/// executed (`started` or `exec_failed`, see [`report_exec`]) and return its pid. The caller's
/// copy of `stdio` is closed before the report: only the command may hold its stdio, so the end
/// of file of the output marks the command's end. When the fork itself fails, report
/// `setup_failed` and exit: the caller (init or an exec's shim) has nothing else to do.
pub fn start_command(
    command: &Command<'_>,
    stdio: Stdio,
    last_step: &dyn Fn() -> Result<(), Errno>,
    status: &mut File,
) -> Pid {
    match fork_command(command, stdio, last_step, status) {
        Ok(pid) => pid,
        Err(e) => {
            super::report(status, &StatusLine::SetupFailed(super::chain(&e)));
            sys::exit_now(1)
        }
    }
}

fn fork_command(
    command: &Command<'_>,
    stdio: Stdio,
    last_step: &dyn Fn() -> Result<(), Errno>,
    status: &mut File,
) -> Result<Pid, ChildError> {
    let (exec_r, exec_w) = pipe2(OFlag::O_CLOEXEC).map_err(|source| ChildError::Start {
        step: "exec pipe",
        source,
    })?;
    match sys::fork().map_err(ChildError::Fork)? {
        ForkResult::Child => {
            drop(exec_r);
            exec_command(command, last_step, stdio, exec_w)
        }
        ForkResult::Parent { child } => {
            drop((stdio, exec_w));
            report_exec(exec_r, &command.argv[0], status);
            Ok(child)
        }
    }
}

/// Say on the status pipe whether the forked command was executed: its exec pipe is
/// close-on-exec, so it closes empty when `execve` succeeded and carries the errno otherwise.
fn report_exec(exec_r: OwnedFd, program: &CString, status: &mut File) {
    let mut errno = [0u8; 4];
    let line = match File::from(exec_r).read(&mut errno) {
        Ok(4) => {
            let e = Errno::from_raw(i32::from_ne_bytes(errno));
            StatusLine::ExecFailed(format!("{}: {}", program.to_string_lossy(), e.desc()))
        }
        _ => StatusLine::Started,
    };
    super::report(status, &line);
}

/// In the command's process: a session of its own, default signals, its stdio, no other
/// descriptor, its working directory, `last_step` (the seccomp filter), exec. A failure goes to
/// `exec_w` as an errno (see [`report_exec`]) and to stderr; the process exits 127 (not found)
/// or 126.
pub fn exec_command(
    command: &Command<'_>,
    last_step: &dyn Fn() -> Result<(), Errno>,
    stdio: Stdio,
    exec_w: OwnedFd,
) -> ! {
    // Move the report descriptor above 10 first, so the dup2s below cannot clobber it.
    let report = match sys::dup_at_least(exec_w.as_fd(), 10) {
        Ok(high) => high,
        Err(_) => exec_w,
    };
    let program = command.argv[0].to_string_lossy();
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
    // The conventional umask, not the helper's private one.
    sys::set_umask(sys::SANDBOX_UMASK);
    // stdin is the sandbox's own /dev/null unless the spec asked for stdin (a pipe from the
    // monitor) or a terminal (the sandbox's own pty, which becomes the controlling terminal):
    // no host descriptor crosses into the sandbox.
    if let Err(e) = wire_stdio(stdio) {
        fail(e, "set up stdio for");
    }
    if let Err(e) = crate::fds::close_all_except(&[report.as_raw_fd()]) {
        fail(e, "close descriptors for");
    }
    // The spec's user, as runc does it: groups, then gid, then uid (which drops every
    // capability of a non-root user), before the working directory is entered as that user.
    if let Some(user) = command.user {
        if let Err(e) = switch_user(user) {
            fail(e, "switch to the user for");
        }
    }
    if let Err(e) = nix::unistd::chdir(command.cwd) {
        fail(e, "enter the working directory for");
    }
    // The working directory must be inside the sandbox's root (it always is after pivot_root;
    // checked anyway, as runc learned with CVE-2024-21626).
    match std::env::current_dir() {
        Ok(dir) if dir.is_absolute() => {}
        _ => fail(Errno::ENOENT, "resolve the working directory for"),
    }
    // Last: from here on only the allowlist (execve, write and exit_group included) is reachable.
    if let Err(e) = last_step() {
        fail(e, "apply the seccomp filter for");
    }
    let e = exec_search(command.argv, command.env);
    fail(e, "execute")
}

/// Become `user` (ids of the sandbox's user namespace). A uid change clears the parent-death
/// signal and dumpability; both are set again as `become_root` left them.
fn switch_user(user: &RunAs) -> Result<(), Errno> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    match setgroups(&groups) {
        Ok(()) => {}
        // A rootless namespace has setgroups denied; there only root exists anyway.
        Err(Errno::EPERM) if user.uid == 0 && user.gid == 0 => {}
        Err(e) => return Err(e),
    }
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    setresgid(gid, gid, gid)?;
    setresuid(uid, uid, uid)?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    nix::sys::prctl::set_dumpable(false)
}

/// execve `argv[0]`, searching the PATH of the *sandbox's* environment (execvp would use init's).
fn exec_search(argv: &[CString], env: &[CString]) -> Errno {
    let program = argv[0].as_bytes();
    if program.contains(&b'/') {
        return nix::unistd::execve(&argv[0], argv, env)
            .err()
            .unwrap_or(Errno::ENOEXEC);
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
        match nix::unistd::execve(full.as_c_str(), argv, env)
            .err()
            .unwrap_or(Errno::ENOEXEC)
        {
            Errno::ENOENT | Errno::ENOTDIR => {}
            // Remember permission problems but keep looking, as execvp does.
            Errno::EACCES => result = Errno::EACCES,
            other => return other,
        }
    }
    result
}
