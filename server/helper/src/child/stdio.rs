//! A command's stdio: pipes to the monitor, or a pseudo-terminal from the sandbox's own devpts.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::stat::{fstat, Mode, SFlag};
use nix::unistd::dup2;

use crate::sys;

/// The master side of a devpts instance's multiplexer: character device 5:2.
const PTMX_MAJOR: u64 = 5;
const PTMX_MINOR: u64 = 2;

/// A process's stdio (an exec's, or the main command's).
pub enum Stdio {
    Tty(OwnedFd),
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
}

/// Open a pseudo-terminal in the sandbox's own devpts (the caller is in its mount namespace),
/// check that it is one, size it, send the master to the monitor and return the slave.
pub fn open_pty(cols: u16, rows: u16, socket: BorrowedFd<'_>) -> Result<OwnedFd, String> {
    fn err(what: &'static str) -> impl Fn(Errno) -> String {
        move |e| format!("{what}: {e}")
    }
    // O_NOFOLLOW and O_NONBLOCK: whatever the sandbox put in its /dev, this neither follows a
    // link nor blocks on a fifo; the checks below refuse anything but a devpts multiplexer.
    let master = sys::open(
        "/dev/pts/ptmx",
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(err("opening /dev/pts/ptmx"))?;
    let st = fstat(master.as_raw_fd()).map_err(err("fstat of the pty master"))?;
    let is_ptmx = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFCHR
        && libc::major(st.st_rdev) as u64 == PTMX_MAJOR
        && libc::minor(st.st_rdev) as u64 == PTMX_MINOR;
    if !is_ptmx {
        return Err("/dev/pts/ptmx is not a pty multiplexer".into());
    }
    sys::pty_unlock(master.as_fd()).map_err(err("unlocking the pty"))?;
    sys::set_window_size(master.as_fd(), cols, rows).map_err(err("sizing the pty"))?;
    let slave = sys::pty_peer(master.as_fd()).map_err(err("opening the pty's slave"))?;
    let fds = [master.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(b"m")],
        &cmsg,
        MsgFlags::empty(),
        None,
    )
    .map_err(err("handing the pty to the monitor"))?;
    Ok(slave)
}

/// Make `stdio` descriptors 0, 1 and 2 of a session leader (a terminal also becomes its
/// controlling terminal).
pub(super) fn wire_stdio(stdio: Stdio) -> Result<(), Errno> {
    // Move the descriptors above 10 first, so the dup2s cannot clobber one another (the
    // originals close as they are replaced; the high copies close on return, once 0, 1 and 2
    // are set).
    let high = |fd: OwnedFd| sys::dup_at_least(fd.as_fd(), 10);
    match stdio {
        Stdio::Tty(slave) => {
            let slave = high(slave)?;
            sys::set_controlling_tty(slave.as_fd())?;
            for target in 0..=2 {
                dup2(slave.as_raw_fd(), target)?;
            }
            Ok(())
        }
        Stdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => {
            let (out, err) = (high(stdout)?, high(stderr)?);
            // Without stdin: the sandbox's own /dev/null (no host descriptor crosses over).
            let input = match stdin {
                Some(fd) => high(fd)?,
                None => sys::open(
                    "/dev/null",
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?,
            };
            dup2(input.as_raw_fd(), 0)?;
            dup2(out.as_raw_fd(), 1)?;
            dup2(err.as_raw_fd(), 2)?;
            Ok(())
        }
    }
}
