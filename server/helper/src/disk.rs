//! `limits.disk_bytes`: a sandbox's own size-limited filesystem.
//!
//! The host's filesystem has no project quotas, so a disk-limited sandbox gets a sparse file
//! `<sandbox>/disk.img` of exactly the limit, formatted ext4 (no journal: the contents are
//! throwaway) through a loop device and mounted (nosuid, nodev) on the sandbox's `private/`
//! directory. Its upper layer, `/work` and `/tmp` live there, so writing past the limit fails
//! with ENOSPC inside the sandbox while the host's filesystem only ever holds the blocks the
//! sandbox really wrote. The loop device is configured with LO_FLAGS_AUTOCLEAR: it disappears by
//! itself when the filesystem is unmounted, which [`detach`] does when the sandbox is destroyed
//! (and which a reboot does for free; the file goes with the sandbox's directory).
//!
//! The cost: about 15 ms to format at create, and a few percent of the limit taken by ext4's
//! own metadata.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::{fstat, fstatat, Mode};

use sandboxd_protocol::layout::{DISK_IMAGE, PRIVATE_DIR};

use crate::sys;

/// Where mkfs.ext4 may be.
const MKFS: &[&str] = &["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"];
/// Smallest limit (ext4 needs a little room of its own).
pub const MIN_DISK_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{step}: {source}")]
    Sys { step: &'static str, source: Errno },
    #[error("formatting the sandbox's filesystem: {0}")]
    Mkfs(String),
    #[error("limits.disk_bytes below {MIN_DISK_BYTES}")]
    TooSmall,
}

fn sys_err(step: &'static str) -> impl FnOnce(Errno) -> DiskError {
    move |source| DiskError::Sys { step, source }
}

fn mkfs() -> Option<&'static str> {
    MKFS.iter().copied().find(|p| Path::new(p).exists())
}

/// Why disk limits cannot be enforced here, or `None` when they can.
pub fn unavailable(privileged: bool) -> Option<String> {
    if !privileged {
        return Some("a rootless helper cannot mount a size-limited filesystem".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("the host has no loop devices (/dev/loop-control)".into());
    }
    if mkfs().is_none() {
        return Some("mkfs.ext4 is not installed".into());
    }
    None
}

/// Create the sandbox's filesystem of `bytes` and mount it on `<sandbox>/private`. The caller
/// sets the mounted root's owner and mode (it is what `private/` was).
pub fn attach(sandbox_dir: &OwnedFd, bytes: u64) -> Result<(), DiskError> {
    if bytes < MIN_DISK_BYTES {
        return Err(DiskError::TooSmall);
    }
    let image = crate::sys::openat(
        Some(sandbox_dir.as_raw_fd()),
        DISK_IMAGE,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(sys_err("creating disk.img"))?;
    nix::unistd::ftruncate(&image, bytes as i64).map_err(sys_err("sizing disk.img"))?;
    let control = crate::sys::open(
        "/dev/loop-control",
        OFlag::O_RDWR | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys_err("opening /dev/loop-control"))?;
    // Another process may take the device we were told is free: try a few.
    let mut attached = None;
    for _ in 0..8 {
        let n =
            sys::loop_get_free(control.as_fd()).map_err(sys_err("finding a free loop device"))?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = crate::sys::open(&path, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(sys_err("opening the loop device"))?;
        match sys::loop_configure(dev.as_fd(), image.as_fd()) {
            Ok(()) => {
                attached = Some((dev, path));
                break;
            }
            Err(Errno::EBUSY) => continue,
            Err(e) => return Err(sys_err("configuring the loop device")(e)),
        }
    }
    let Some((dev, path)) = attached else {
        return Err(sys_err("configuring the loop device")(Errno::EBUSY));
    };
    // Until mounted, our descriptor keeps the (auto-clearing) loop device alive.
    let mkfs = mkfs().ok_or_else(|| DiskError::Mkfs("mkfs.ext4 is not installed".into()))?;
    #[allow(
        clippy::disallowed_methods,
        reason = "mkfs.ext4 is the one tool the helper runs, with a cleared environment"
    )]
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E"])
        .arg("lazy_itable_init=1,nodiscard")
        .arg(&path)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| DiskError::Mkfs(e.to_string()))?;
    if !out.status.success() {
        return Err(DiskError::Mkfs(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let target = format!("/proc/self/fd/{}/{PRIVATE_DIR}", sandbox_dir.as_raw_fd());
    #[allow(
        clippy::disallowed_methods,
        reason = "the size-limited filesystem is mounted on the sandbox's private/ here"
    )]
    mount(
        Some(path.as_path()),
        target.as_str(),
        Some("ext4"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(sys_err("mounting the sandbox's filesystem"))?;
    drop(dev);
    Ok(())
}

/// Unmount the sandbox's filesystem if it is mounted (the loop device then clears itself).
pub fn detach(sandbox_dir: &OwnedFd) -> Result<(), DiskError> {
    let outer = fstat(sandbox_dir.as_raw_fd()).map_err(sys_err("checking the directory"))?;
    let name = CString::new(PRIVATE_DIR).unwrap_or_default();
    // Unmount until `private/` is on the sandbox directory's own filesystem again.
    for _ in 0..4 {
        let st = match fstatat(
            Some(sandbox_dir.as_raw_fd()),
            name.as_c_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(sys_err("checking private/")(e)),
        };
        if st.st_dev == outer.st_dev {
            return Ok(());
        }
        let target = format!("/proc/self/fd/{}/{PRIVATE_DIR}", sandbox_dir.as_raw_fd());
        nix::mount::umount2(
            target.as_str(),
            nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
        )
        .map_err(sys_err("unmounting the sandbox's filesystem"))?;
    }
    Err(sys_err("unmounting the sandbox's filesystem")(Errno::EBUSY))
}
