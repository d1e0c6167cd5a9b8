//! Everything that runs inside the new namespaces, in this fixed order:
//!
//! 1. close every inherited descriptor but the five it was given (`InitFds`);
//! 2. wait until the monitor has written the uid/gid maps, then become root of the user namespace;
//! 3. build the root filesystem and pivot into it ([`rootfs`]);
//! 4. set the host name and bring `lo` up;
//! 5. harden: capability bounding set, no_new_privs, non-dumpable ([`harden`]);
//! 6. compile the seccomp filter ([`seccomp`]), refusing an architecture it has no policy for;
//! 7. become PID 1: start the command, install the filter in it just before `execve`, and
//!    forward signals until it exits ([`init`]).
//!
//! A failure before the command runs is reported to the monitor as `setup_failed <step>: <error>`.

pub(crate) mod harden;
pub(crate) mod init;
pub mod rootfs;
pub mod seccomp;

use std::os::fd::{AsRawFd, OwnedFd};

use sandboxd_protocol::status::StatusLine;

use crate::child::{self, GateWaiter, Stdio};
use crate::sys;
use crate::validate::ValidSpawn;

/// Descriptors the sandbox's init inherits from its monitor.
pub struct InitFds {
    /// The sandbox's work directory (`O_PATH`), bind-mounted at `/work`.
    pub work: OwnedFd,
    /// Its path, to reopen it inside the new mount namespace.
    pub work_path: std::path::PathBuf,
    /// The child's end of the "maps are written" gate.
    pub sync: GateWaiter,
    /// Write end of init's status pipe to the monitor.
    pub status: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// Unshare the cgroup namespace once the monitor has moved us into our cgroup (cgroup v1,
    /// where a child cannot be born into its cgroup).
    pub unshare_cgroupns: bool,
    /// Read end of the command's stdin pipe (`stdin: true` without a terminal).
    pub stdin: Option<OwnedFd>,
    /// With a terminal: where to send the pty master to the monitor.
    pub pty_socket: Option<OwnedFd>,
    /// The image's lower layer, for a sandbox started from an image.
    pub image: Option<ImageLower>,
    /// The sandbox's network namespace is its own (rootless): init brings `lo` up itself.
    /// Otherwise the helper made it, owned by the host's user namespace, and did that already.
    pub own_network: bool,
}

/// An image's root filesystem as init gets it.
pub enum ImageLower {
    /// A detached mount, idmapped onto the sandbox's uid range (privileged mode).
    Idmapped(OwnedFd),
    /// A path (rootless mode: the files are the helper's own, which is the sandbox's root).
    Path(std::path::PathBuf),
}

/// The step that failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct SetupError {
    pub step: String,
    pub source: nix::errno::Errno,
}

impl From<child::ChildError> for SetupError {
    fn from(e: child::ChildError) -> SetupError {
        let (step, source) = match e {
            child::ChildError::Identity { step, source }
            | child::ChildError::Start { step, source } => (step.to_string(), source),
            child::ChildError::WriteIdMap { file, source } => (
                format!("writing {file}"),
                nix::errno::Errno::from_raw(source.raw_os_error().unwrap_or(libc::EIO)),
            ),
            child::ChildError::Fork(e) => ("fork".to_string(), e.into()),
        };
        SetupError { step, source }
    }
}

pub(crate) fn step(step: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> SetupError {
    let step = step.into();
    move |source| SetupError { step, source }
}

/// What the sandbox sees as init's command line and name.
pub const INIT_TITLE: &str = "sandboxd-init";

/// Run as the cloned child. Never returns.
pub fn run_init(spawn: &ValidSpawn, mut fds: InitFds) -> ! {
    let keep: Vec<_> = [
        match &fds.image {
            Some(ImageLower::Idmapped(fd)) => fd.as_raw_fd(),
            _ => fds.work.as_raw_fd(),
        },
        fds.work.as_raw_fd(),
        fds.sync.raw().as_raw_fd(),
        fds.status.as_raw_fd(),
        fds.stdout.as_raw_fd(),
        fds.stderr.as_raw_fd(),
    ]
    .into_iter()
    .chain(fds.stdin.as_ref().map(|f| f.as_raw_fd()))
    .chain(fds.pty_socket.as_ref().map(|f| f.as_raw_fd()))
    .collect();
    if crate::fds::close_all_except(&keep).is_err() {
        sys::exit_now(1);
    }
    let mut status = std::fs::File::from(fds.status);
    let mut fail = |why: String| -> ! {
        child::report(&mut status, &StatusLine::SetupFailed(why));
        sys::exit_now(1)
    };
    // The sandbox sees init as `/proc/1`: nothing of the helper's command line or environment.
    if let Err(e) = sys::retitle(INIT_TITLE) {
        fail(format!("renaming init: {e}"));
    }
    // Until the monitor has written our maps we are nobody; a closed pipe means it gave up.
    if !fds.sync.wait() {
        sys::exit_now(1);
    }
    if fds.unshare_cgroupns && nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP).is_err()
    {
        fail("unsharing the cgroup namespace".into());
    }
    let prepared = child::become_root(spawn.ids)
        .map_err(SetupError::from)
        .and_then(|()| {
            rootfs::build(
                spawn,
                &fds.work,
                &fds.work_path,
                spawn.ids,
                fds.image.take(),
            )
        })
        .and_then(|()| {
            nix::unistd::sethostname(&spawn.hostname).map_err(step("setting the hostname"))?;
            if fds.own_network {
                sys::loopback_up().map_err(step("bringing lo up"))?;
            }
            Ok(())
        })
        .and_then(|()| harden::apply(&spawn.capabilities));
    drop(fds.work);
    if let Err(e) = prepared {
        fail(e.to_string());
    }
    let filters = match seccomp::precompiled(spawn.nested_user_namespaces) {
        Ok(filters) => filters,
        Err(e) => fail(e.to_string()),
    };
    let stdio = match (spawn.tty, fds.pty_socket) {
        // The terminal comes from the sandbox's own devpts: we are inside its root now.
        (Some((cols, rows)), Some(socket)) => {
            match child::open_pty(cols, rows, std::os::fd::AsFd::as_fd(&socket)) {
                Ok(slave) => Stdio::Tty(slave),
                Err(e) => fail(e),
            }
        }
        _ => Stdio::Pipes {
            stdin: fds.stdin,
            stdout: fds.stdout,
            stderr: fds.stderr,
        },
    };
    init::run(spawn, filters, status, stdio)
}
