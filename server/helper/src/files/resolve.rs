//! Path resolution inside the sandbox's root, by descriptor only.
//!
//! Every client path is opened with `openat2(root, path, RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)`: the kernel resolves each component itself, so `..` and absolute
//! symlinks stay inside the root, magic links (`/proc/self/root`, `/proc/<pid>/fd/N`) are refused,
//! and a component swapped for a symlink between two steps is resolved exactly like one that was
//! always a symlink, never against the host. Writes must land on the `/work` mount, checked by
//! mount id (statx) on the opened descriptor, not by path. Reads refuse pseudo filesystems (`/proc`,
//! `/dev/pts`, `/dev/mqueue`) and anything but regular files and directories; files are opened
//! with `O_NONBLOCK` so that a FIFO cannot make the worker wait.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstat, FileStat, Mode};
use sandboxd_protocol::wire::{HelperError, HelperErrorCode};

use crate::sys;

/// Filesystems the API never reads from: their files are views of kernel state.
const PSEUDO_FS: &[i64] = &[
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x1cd1,      // devpts
    0x1980_0202, // mqueue
    0x0027_e0eb, // cgroup
    0x6367_7270, // cgroup2
    0x6462_6720, // debugfs
    0x7363_6673, // securityfs
    0xcafe_4a11, // bpf
    0x7472_6163, // tracefs
];

/// The permission bits that leave a sandbox (a download's mode, an archive's headers): never
/// setuid, setgid or sticky, whatever the sandbox set, so that nothing it made can become a
/// privileged program on the machine that receives it.
pub const OUT_MODE_BITS: u32 = 0o777;

/// The worker's view: its root (the sandbox's) and the mount id of `/work`.
pub struct Root {
    root: OwnedFd,
    work_mnt: u64,
}

/// An errno as a typed error for the client, with what was being done.
pub fn errno(what: &str, e: Errno) -> HelperError {
    let code = match e {
        Errno::ENOENT => HelperErrorCode::NotFound,
        Errno::EACCES | Errno::EPERM => HelperErrorCode::Denied,
        Errno::EBUSY | Errno::ETXTBSY => HelperErrorCode::Busy,
        Errno::EIO | Errno::ENOMEM | Errno::EMFILE | Errno::ENFILE => HelperErrorCode::Internal,
        _ => HelperErrorCode::Invalid,
    };
    let why = match e {
        Errno::ELOOP => {
            "a symbolic link leads out of the sandbox's root or there are too many links".to_owned()
        }
        Errno::EXDEV => "it crosses into a location the operation may not reach".to_owned(),
        Errno::EROFS => "read-only location".to_owned(),
        other => other.desc().to_lowercase(),
    };
    HelperError::new(code, format!("{what}: {why}"))
}

pub fn refused(message: impl Into<String>) -> HelperError {
    HelperError::new(HelperErrorCode::Invalid, message)
}

fn how(flags: OFlag, resolve: ResolveFlag) -> OpenHow {
    // openat2 refuses O_PATH combined with anything but O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW.
    let extra = if flags.contains(OFlag::O_PATH) {
        OFlag::O_CLOEXEC
    } else {
        OFlag::O_CLOEXEC | OFlag::O_NOCTTY
    };
    OpenHow::new().flags(flags | extra).resolve(resolve)
}

/// The resolution every client path gets.
pub fn in_root() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// The resolution of paths inside an archive, relative to the extraction directory: never above
/// it, never through a symlink (one the archive made, or one the sandbox planted or swapped in),
/// never onto another mount.
pub fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_NO_XDEV
}

pub fn open2<P: ?Sized + nix::NixPath>(
    dir: RawFd,
    path: &P,
    flags: OFlag,
    resolve: ResolveFlag,
) -> Result<OwnedFd, Errno> {
    if path.is_empty() {
        return crate::sys::openat2(dir, ".", how(flags, resolve));
    }
    crate::sys::openat2(dir, path, how(flags, resolve))
}

/// Mount id of an open descriptor.
pub fn mount_id(fd: &OwnedFd) -> Result<u64, Errno> {
    sys::mount_id(std::os::fd::AsFd::as_fd(fd))
}

pub fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub fn is_reg(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

impl Root {
    /// Open `/` (the sandbox's root, after pivot_root) and `/work`.
    pub fn new() -> Result<Root, HelperError> {
        let root = crate::sys::open(
            "/",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno("opening the sandbox's root", e))?;
        let work = open2(
            root.as_raw_fd(),
            "work",
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_SYMLINKS,
        )
        .map_err(|e| errno("opening /work", e))?;
        let work_mnt = mount_id(&work).map_err(|e| errno("reading /work's mount", e))?;
        Ok(Root { root, work_mnt })
    }

    /// Open a client path inside the root.
    pub fn open(&self, path: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
        open2(self.root.as_raw_fd(), path, flags, in_root())
    }

    /// Refuse a descriptor that is not on the `/work` mount (a symlink in /work may point
    /// elsewhere; writes never follow it there).
    pub fn check_writable(&self, fd: &OwnedFd, what: &str) -> Result<(), HelperError> {
        let mnt = mount_id(fd).map_err(|e| errno(what, e))?;
        if mnt != self.work_mnt {
            return Err(refused(format!(
                "{what}: resolves outside the writable location /work"
            )));
        }
        Ok(())
    }

    /// Open the directory `path` for changes: it must resolve to a directory on `/work`.
    pub fn writable_dir(&self, path: &str) -> Result<OwnedFd, HelperError> {
        let dir = self
            .open(path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            .map_err(|e| errno(&format!("/{path}"), e))?;
        self.check_writable(&dir, &format!("/{path}"))?;
        Ok(dir)
    }
}

/// Refuse descriptors on pseudo filesystems.
pub fn check_readable(fd: &OwnedFd, what: &str) -> Result<FileStat, HelperError> {
    let fs = nix::sys::statfs::fstatfs(fd).map_err(|e| errno(what, e))?;
    #[allow(clippy::unnecessary_cast)]
    let magic = fs.filesystem_type().0 as i64;
    if PSEUDO_FS.contains(&magic) {
        return Err(refused(format!(
            "{what}: kernel pseudo files (/proc, /sys, /dev/pts...) are not transferred"
        )));
    }
    fstat(fd.as_raw_fd()).map_err(|e| errno(what, e))
}
