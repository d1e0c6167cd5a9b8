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

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

use crate::sys;
use crate::validate::{IdMap, ValidSpawn};

/// Descriptors the sandbox's init inherits from its monitor.
pub struct InitFds {
    /// The sandbox's work directory (`O_PATH`), bind-mounted at `/work`.
    pub work: OwnedFd,
    /// Its path, to reopen it inside the new mount namespace.
    pub work_path: std::path::PathBuf,
    /// Read end of the "maps are written" pipe.
    pub sync: OwnedFd,
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

pub(crate) fn step(step: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> SetupError {
    let step = step.into();
    move |source| SetupError { step, source }
}

/// Run as the cloned child. Never returns.
pub fn run_init(spawn: &ValidSpawn, mut fds: InitFds) -> ! {
    let keep: Vec<_> = [
        match &fds.image {
            Some(ImageLower::Idmapped(fd)) => fd.as_raw_fd(),
            _ => fds.work.as_raw_fd(),
        },
        fds.work.as_raw_fd(),
        fds.sync.as_raw_fd(),
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
    // Until the monitor has written our maps we are nobody; a closed pipe means it gave up.
    let mut byte = [0u8; 1];
    if !matches!(nix::unistd::read(fds.sync.as_raw_fd(), &mut byte), Ok(1)) {
        sys::exit_now(1);
    }
    drop(fds.sync);
    if fds.unshare_cgroupns && nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP).is_err()
    {
        let _ = writeln!(status, "setup_failed unsharing the cgroup namespace");
        sys::exit_now(1);
    }
    let prepared = become_root(spawn.ids)
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
        let _ = writeln!(status, "setup_failed {e}");
        sys::exit_now(1);
    }
    let filters = match seccomp::precompiled(spawn.nested_user_namespaces) {
        Ok(filters) => filters,
        Err(e) => {
            let _ = writeln!(status, "setup_failed {e}");
            sys::exit_now(1);
        }
    };
    let stdio = match (spawn.tty, fds.pty_socket) {
        // The terminal comes from the sandbox's own devpts: we are inside its root now.
        (Some((cols, rows)), Some(socket)) => {
            match crate::exec::join::open_pty(cols, rows, std::os::fd::AsFd::as_fd(&socket)) {
                Ok(slave) => crate::exec::join::Stdio::Tty(slave),
                Err(e) => {
                    let _ = writeln!(status, "setup_failed {e}");
                    sys::exit_now(1);
                }
            }
        }
        _ => crate::exec::join::Stdio::Pipes {
            stdin: fds.stdin,
            stdout: fds.stdout,
            stderr: fds.stderr,
        },
    };
    init::run(spawn, filters, status, stdio)
}

/// Switch every id to root of the new user namespace, so that the host sees the mapped ids and
/// the process keeps no trace of the monitor's identity.
pub(crate) fn become_root(ids: IdMap) -> Result<(), SetupError> {
    let root_g = Gid::from_raw(0);
    let root_u = Uid::from_raw(0);
    setresgid(root_g, root_g, root_g).map_err(step("setresgid"))?;
    if matches!(ids, IdMap::Range { .. }) {
        // Rootless namespaces have setgroups denied; there the group list is already empty.
        setgroups(&[]).map_err(step("setgroups"))?;
    }
    setresuid(root_u, root_u, root_u).map_err(step("setresuid"))?;
    // If the monitor dies, nothing would enforce the timeout, record the exit or answer a kill:
    // the sandbox dies with it. (Set after the uid change, which clears the setting.)
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(step("prctl(PR_SET_PDEATHSIG)"))?;
    // A uid change resets dumpability; keep init out of reach of ptrace and /proc/1/mem.
    nix::sys::prctl::set_dumpable(false).map_err(step("prctl(PR_SET_DUMPABLE)"))
}
