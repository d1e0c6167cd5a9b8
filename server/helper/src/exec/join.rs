//! The two processes of an exec, forked by the monitor:
//!
//! * **the shim** joins the running sandbox, in this fixed order: close every inherited
//!   descriptor but its own; die with the monitor (PR_SET_PDEATHSIG); stay non-dumpable (it
//!   inherits that from the monitor, and sets it again after every identity change); enter the
//!   sandbox's cgroup (born in it on v2, written into `cgroup.procs` on v1); `setns` into all seven
//!   namespaces, through descriptors the monitor opened while init was its unreaped, not yet
//!   running child (so they name this sandbox and no other; see `exec::Namespaces`); become root of the
//!   sandbox's user namespace like init; apply the same capability bounding set and
//!   no_new_privs ([`crate::sandbox::harden`]); with a terminal, open a pty master from the
//!   *sandbox's* devpts and hand it to the monitor; then fork, so that the child is in the
//!   sandbox's PID namespace. It stays outside that namespace itself (invisible to the sandbox),
//!   waits for the child and reports `started`/`exec_failed`/`exit N`/`signal N` on its status
//!   pipe, like init does for the main command.
//! * **the process** takes the same last steps as the main command ([`crate::child::command`]):
//!   a session of its own (with the pty as controlling terminal, so job control works), its
//!   stdio, its working directory, the same seccomp filter, exec.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use sandboxd_protocol::status::StatusLine;

use crate::child::{self, Command, Stdio};
use crate::sandbox::seccomp::Filters;
use crate::sandbox::{harden, seccomp};
use crate::sys;
use crate::validate::IdMap;

/// Everything the shim needs, prepared (and validated) by the monitor before the fork.
pub struct Plan {
    pub monitor: Pid,
    /// cgroup v1 `cgroup.procs` files to enter (on v2 the shim is born in its cgroup).
    pub cgroup_procs: Vec<PathBuf>,
    /// Join the cgroup namespace through init's pidfd (cgroup v1, see `exec::Namespaces`).
    pub late_cgroup_ns: bool,
    pub ids: IdMap,
    pub capabilities: Vec<&'static str>,
    pub nested_user_namespaces: bool,
    pub command: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: CString,
    /// A terminal of this size (cols, rows).
    pub tty: Option<(u16, u16)>,
}

/// The shim's descriptors (everything else is closed at once).
pub struct ShimFds {
    /// Init's pidfd.
    pub sandbox: OwnedFd,
    /// The sandbox's user namespace and its other namespaces (inherited from the monitor,
    /// which keeps them open; see `exec::Namespaces`).
    pub user_ns: OwnedFd,
    pub other_ns: Vec<OwnedFd>,
    /// Write end of the status pipe to the monitor.
    pub status: OwnedFd,
    /// Without a terminal: stdin (read end, or `None` for the sandbox's /dev/null), stdout and
    /// stderr (write ends).
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// With a terminal: the socket the pty master is sent over.
    pub pty_socket: Option<OwnedFd>,
}

/// Run as the monitor's forked child. Never returns.
pub fn run_shim(plan: &Plan, fds: ShimFds) -> ! {
    let keep: Vec<RawFd> = [
        Some(fds.user_ns.as_raw_fd()),
        Some(fds.sandbox.as_raw_fd()),
        Some(fds.status.as_raw_fd()),
        fds.stdin.as_ref().map(|f| f.as_raw_fd()),
        fds.stdout.as_ref().map(|f| f.as_raw_fd()),
        fds.stderr.as_ref().map(|f| f.as_raw_fd()),
        fds.pty_socket.as_ref().map(|f| f.as_raw_fd()),
    ]
    .into_iter()
    .flatten()
    .chain(fds.other_ns.iter().map(|f| f.as_raw_fd()))
    .collect();
    if crate::fds::close_all_except(&keep).is_err() {
        sys::exit_now(1);
    }
    let mut status = File::from(fds.status);
    let joined = join(plan, fds.sandbox, fds.user_ns, fds.other_ns);
    let stdio = joined.and_then(|filters| {
        let stdio = match plan.tty {
            Some((cols, rows)) => {
                let socket = fds.pty_socket.ok_or("missing pty socket".to_string())?;
                Stdio::Tty(child::open_pty(cols, rows, socket.as_fd())?)
            }
            None => Stdio::Pipes {
                stdin: fds.stdin,
                stdout: fds.stdout.ok_or("missing stdout".to_string())?,
                stderr: fds.stderr.ok_or("missing stderr".to_string())?,
            },
        };
        Ok((filters, stdio))
    });
    let (filters, stdio) = match stdio {
        Ok(x) => x,
        Err(e) => {
            child::report(&mut status, &StatusLine::SetupFailed(e));
            sys::exit_now(1);
        }
    };
    // The fork puts the child into the sandbox's PID namespace (setns(CLONE_NEWPID) applies to
    // children only).
    let command = Command {
        argv: &plan.command,
        env: &plan.env,
        cwd: &plan.cwd,
        user: None,
    };
    let child = child::start_command(&command, stdio, &|| filters.apply(), &mut status);
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => {
                child::report(&mut status, &StatusLine::Exit(code));
                sys::exit_now(0);
            }
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                child::report(&mut status, &StatusLine::Signal(sig as i32));
                sys::exit_now(0);
            }
            Err(Errno::EINTR) | Ok(_) => continue,
            Err(_) => sys::exit_now(1),
        }
    }
}

/// Enter the sandbox and take on its identity and restrictions (see the module docs).
fn join(
    plan: &Plan,
    sandbox: OwnedFd,
    user_ns: OwnedFd,
    other_ns: Vec<OwnedFd>,
) -> Result<&'static Filters, String> {
    fn err(what: &'static str) -> impl Fn(Errno) -> String {
        move |e| format!("{what}: {e}")
    }
    // If the monitor dies, nothing would record this exec: go with it. (Checked after setting,
    // so a monitor that died just before is noticed too.)
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(err("prctl(PR_SET_PDEATHSIG)"))?;
    if nix::unistd::getppid() != plan.monitor {
        return Err("the monitor is gone".into());
    }
    // Inherited from the monitor already; made explicit because nothing of the sandbox may
    // ptrace or read this process before it has executed the command.
    nix::sys::prctl::set_dumpable(false).map_err(err("prctl(PR_SET_DUMPABLE)"))?;
    let me = nix::unistd::getpid().to_string();
    for procs in &plan.cgroup_procs {
        std::fs::write(procs, &me).map_err(|e| format!("joining {}: {e}", procs.display()))?;
    }
    if plan.late_cgroup_ns {
        // Still host root here (cgroup v1 means privileged mode): allowed through the pidfd.
        nix::sched::setns(sandbox.as_fd(), CloneFlags::CLONE_NEWCGROUP)
            .map_err(err("joining the cgroup namespace"))?;
    }
    drop(sandbox);
    // In privileged mode the sandbox's network namespace belongs to the host's user namespace
    // (the sandbox has no CAP_NET_ADMIN over it), so only host root may join it: now, before
    // the user namespace. (`CLONE_NEWNET` makes setns refuse every other kind with EINVAL; in
    // rootless mode the network namespace is the sandbox's own and is joined below.)
    let (_early, late): (Vec<OwnedFd>, Vec<OwnedFd>) = other_ns
        .into_iter()
        .partition(|fd| nix::sched::setns(fd, CloneFlags::CLONE_NEWNET).is_ok());
    // The user namespace next: it grants the capabilities that joining the others needs.
    nix::sched::setns(&user_ns, CloneFlags::CLONE_NEWUSER)
        .map_err(err("joining the user namespace"))?;
    for fd in &late {
        nix::sched::setns(fd, CloneFlags::empty()).map_err(err("joining a namespace"))?;
    }
    // The descriptors close here (`_early`, `late` and `user_ns` drop): joined, not needed.
    drop((late, user_ns));
    child::become_root(plan.ids).map_err(|e| child::chain(&e))?;
    harden::apply(&plan.capabilities).map_err(|e| e.to_string())?;
    seccomp::precompiled(plan.nested_user_namespaces).map_err(|e| e.to_string())
}
