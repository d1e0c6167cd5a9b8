//! Creating a process in new or existing namespaces, below everything that does so (the monitor,
//! init, the exec shim, the file worker and the image unpacker): the parent's side (uid/gid maps,
//! the "maps are written" sync pipe, the rollback guard) and the child's last steps (its identity,
//! its stdio, its descriptors, its report on the status pipe, exec).
//!
//! `fork` and `clone3` themselves are in [`crate::sys`], which refuses them in a process with a
//! second thread.

pub mod command;
pub mod ids;
pub mod stdio;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::unistd::Pid;
use sandboxd_protocol::status::StatusLine;

pub use command::{start_command, Command};
pub use ids::{become_root, write_id_maps};
pub use stdio::{open_pty, Stdio};

/// Errors of the steps in this module.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("writing {file}")]
    WriteIdMap {
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}")]
    Identity {
        step: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{step}")]
    Start {
        step: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("forking the command")]
    Fork(#[source] crate::sys::ForkError),
}

/// An error and its causes on one line (`step: cause: cause`), for a status line or a report.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    message
}

/// Send one line on a status pipe (best effort: a monitor that is gone reads nothing anyway).
pub fn report(status: &mut File, line: &StatusLine) {
    let _ = writeln!(status, "{line}");
}

/// The pipe over which a parent tells its fresh child "your maps are written, go on": one byte,
/// or end of file when the parent gave up (the child then exits).
pub struct Gate {
    read: OwnedFd,
    write: OwnedFd,
}

impl Gate {
    pub fn new() -> Result<Gate, nix::errno::Errno> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(Gate { read, write })
    }

    /// The parent's end; the child's end closes.
    pub fn parent(self) -> GateOpener {
        GateOpener(self.write)
    }

    /// The child's end; the parent's end closes.
    pub fn child(self) -> GateWaiter {
        GateWaiter(self.read)
    }
}

pub struct GateOpener(OwnedFd);

impl GateOpener {
    pub fn open(self) {
        let _ = File::from(self.0).write_all(b"1");
    }
}

pub struct GateWaiter(OwnedFd);

impl GateWaiter {
    pub fn raw(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Block until the parent opens the gate; false when it closed its end without doing so.
    pub fn wait(self) -> bool {
        let mut byte = [0u8; 1];
        matches!(File::from(self.0).read(&mut byte), Ok(1))
    }
}

/// A process just created whose start is not complete: dropped, it is killed (SIGKILL through its
/// pidfd, never a pid that may be reused) and reaped. The one rollback of every half-done start.
pub struct SpawnGuard {
    pid: Pid,
    pidfd: Option<OwnedFd>,
}

impl SpawnGuard {
    pub fn new(pid: Pid, pidfd: OwnedFd) -> SpawnGuard {
        SpawnGuard {
            pid,
            pidfd: Some(pidfd),
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The start is complete: keep the process.
    pub fn keep(mut self) -> (Pid, OwnedFd) {
        let pidfd = self
            .pidfd
            .take()
            .expect("the pidfd is only taken here, once");
        (self.pid, pidfd)
    }
}

impl Drop for SpawnGuard {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            let _ = crate::sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
            let _ = nix::sys::wait::waitpid(self.pid, None);
        }
    }
}
