//! Descriptor hygiene for forked processes: close everything that was not explicitly kept.

use std::os::fd::RawFd;

use nix::errno::Errno;

/// Close every open descriptor except 0, 1, 2 and those in `keep`.
pub fn close_all_except(keep: &[RawFd]) -> Result<(), Errno> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    // Close the gaps between kept descriptors with close_range, which never misses one.
    let mut next = 3;
    for fd in keep {
        if fd > next {
            close_range(next, fd - 1)?;
        }
        next = fd + 1;
    }
    crate::sys::close_fds_from(next)
}

fn close_range(first: RawFd, last: RawFd) -> Result<(), Errno> {
    for fd in first..=last {
        match nix::unistd::close(fd) {
            Ok(()) | Err(Errno::EBADF) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Point 0, 1 and 2 at /dev/null (forked helpers must not write into the helper's stdout).
pub fn stdio_to_devnull() -> Result<(), Errno> {
    let null = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    )?;
    for target in 0..=2 {
        if null != target {
            nix::unistd::dup2(null, target)?;
        }
    }
    if null > 2 {
        nix::unistd::close(null)?;
    }
    Ok(())
}
