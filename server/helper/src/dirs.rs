//! The sandboxes directory, handled only through file descriptors.
//!
//! The state directory belongs to the daemon's uid, so every path below it could be swapped for a
//! symlink by a compromised daemon. The helper therefore opens `<state>/sandboxes` once at start
//! (refusing a symlink or a directory it does not own) and does all later work relative to that
//! descriptor with `O_NOFOLLOW`, so no request can make it create, chown or delete anything else.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{FlockArg, OFlag};
use nix::sys::stat::{fchmodat, fstat, mkdirat, FchmodatFlags, Mode};
use nix::unistd::{fchownat, Gid, Uid};
use uuid::Uuid;

use sandboxd_protocol::layout::{
    MONITOR_LOCK, OUTPUT_INDEX, OUTPUT_LOG, OVERLAY_WORK_DIR, PRIVATE_DIR, SANDBOXES_DIR, TMP_DIR,
    UPPER_DIR, WORK_DIR, WORK_OVERLAY_DIR,
};

use sandboxd_protocol::wire::{HelperError, HelperErrorCode};

use crate::fdfs::{self, flock, open_fd, remove_tree};
use crate::validate::IdMap;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("opening the sandboxes directory {path}")]
    OpenRoot { path: String, source: Errno },
    #[error("the sandboxes directory must be owned by uid {expected} and not writable by others")]
    RootUnsafe { expected: u32 },
    #[error("sandbox {0} already exists")]
    Exists(Uuid),
    #[error("sandbox {0} does not exist")]
    NotFound(Uuid),
    #[error("sandbox {0} is still running")]
    Busy(Uuid),
    #[error("uid slot {0} is in use by a running sandbox")]
    SlotBusy(u32),
    #[error("setting up the disk limit of sandbox {id}")]
    Disk {
        id: Uuid,
        source: crate::disk::DiskError,
    },
    #[error("{step} for sandbox {id}")]
    Io {
        step: &'static str,
        id: Uuid,
        source: Errno,
    },
}

impl DirError {
    /// This error on the wire: the codes the daemon tells apart, else internal.
    pub fn into_wire(self) -> HelperError {
        let code = match &self {
            DirError::Exists(_) | DirError::Busy(_) => HelperErrorCode::Busy,
            DirError::SlotBusy(_) => HelperErrorCode::SlotBusy,
            DirError::NotFound(_) => HelperErrorCode::NotFound,
            _ => HelperErrorCode::Internal,
        };
        crate::error::wire(code, &self)
    }
}

/// `<state>/sandboxes`, held open.
pub struct SandboxesDir {
    fd: OwnedFd,
}

/// What the monitor of a new sandbox inherits.
pub struct SandboxFiles {
    /// The sandbox's directory.
    pub dir: OwnedFd,
    /// `work/`, opened `O_PATH`: the source of the sandbox's `/work` bind mount.
    pub work: OwnedFd,
    pub log: File,
    pub index: File,
    /// `monitor.lock`, flock-held for the monitor's whole life.
    pub lock: File,
    /// The uid slot's lock, flock-held likewise (privileged mode only).
    pub slot_lock: Option<File>,
    /// The image's idmapped lower layer (a detached mount), for a sandbox started from an image
    /// in privileged mode.
    pub image_lower: Option<OwnedFd>,
}

/// What a sandbox's directory holds beyond the basics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layout {
    /// `private/upper` and `private/overlay-work` for an image root filesystem.
    pub image: bool,
    /// A filesystem of this size mounted on `private/` (see `disk.rs`), with `private/tmp`.
    pub disk_bytes: Option<u64>,
}

impl SandboxesDir {
    /// Create (if needed) and open `<state>/sandboxes`, owned by the helper and 0711.
    pub fn open(state_dir: &Path) -> Result<Self, DirError> {
        let path = state_dir.join(SANDBOXES_DIR);
        let err = |source| DirError::OpenRoot {
            path: path.display().to_string(),
            source,
        };
        match nix::unistd::mkdir(&path, Mode::from_bits_truncate(0o711)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(err(e)),
        }
        let fd = open_fd(
            None,
            path.to_str().ok_or(err(Errno::EINVAL))?,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(err)?;
        let st = fstat(fd.as_raw_fd()).map_err(err)?;
        let euid = nix::unistd::geteuid().as_raw();
        if st.st_uid != euid || st.st_mode & 0o022 != 0 {
            return Err(DirError::RootUnsafe { expected: euid });
        }
        // A restrictive umask may have left it 0700; the daemon must be able to traverse it.
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o711)).map_err(err)?;
        Ok(SandboxesDir { fd })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Create a new sandbox's directory and files. Nothing is left behind on failure.
    pub fn create(
        &self,
        id: Uuid,
        ids: IdMap,
        daemon_uid: u32,
        daemon_gid: u32,
        layout: Layout,
    ) -> Result<SandboxFiles, DirError> {
        let slot_lock = match ids {
            IdMap::Range { slot, .. } => Some(self.lock_slot(slot)?),
            IdMap::Single { .. } => None,
        };
        let name = id.to_string();
        match mkdirat(
            Some(self.raw_fd()),
            name.as_str(),
            Mode::from_bits_truncate(0o711),
        ) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Err(DirError::Exists(id)),
            Err(source) => {
                return Err(DirError::Io {
                    step: "creating the directory",
                    id,
                    source,
                })
            }
        }
        let result = self.populate(id, &name, ids, daemon_uid, daemon_gid, layout);
        match result {
            Ok((dir, work, log, index, lock)) => Ok(SandboxFiles {
                dir,
                work,
                log,
                index,
                lock,
                slot_lock,
                image_lower: None,
            }),
            Err(e) => {
                // Roll back; the creation error is the one worth reporting.
                if let Ok(dir) = self.open_sandbox(id) {
                    let _ = crate::disk::detach(&dir);
                }
                let _ = remove_tree(self.raw_fd(), &cname(&name));
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn populate(
        &self,
        id: Uuid,
        name: &str,
        ids: IdMap,
        daemon_uid: u32,
        daemon_gid: u32,
        layout: Layout,
    ) -> Result<(OwnedFd, OwnedFd, File, File, File), DirError> {
        let io = |step| move |source| DirError::Io { step, id, source };
        let dir = open_fd(
            Some(self.raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(io("opening the directory"))?;
        // mkdirat honours the umask; make the mode exact.
        nix::sys::stat::fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(0o711))
            .map_err(io("setting the directory mode"))?;
        // private/: only the sandbox's root may enter (by group in privileged mode, where the
        // directory stays root's so the sandbox cannot open it up; rootless, the sandbox's root
        // is the owner). No other host user can reach work/ or run what the sandbox left there.
        mkdirat(
            Some(dir.as_raw_fd()),
            PRIVATE_DIR,
            Mode::from_bits_truncate(0o700),
        )
        .map_err(io("creating private/"))?;
        if let Some(bytes) = layout.disk_bytes {
            crate::disk::attach(&dir, bytes).map_err(|e| DirError::Disk { id, source: e })?;
        }
        // (With a disk limit this opens the new filesystem's root, which gets private/'s
        // owner and mode below.)
        let private = open_fd(
            Some(dir.as_raw_fd()),
            PRIVATE_DIR,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(io("opening private/"))?;
        nix::sys::stat::fchmod(private.as_raw_fd(), Mode::from_bits_truncate(0o700))
            .map_err(io("setting the mode of private/"))?;
        if let IdMap::Range { .. } = ids {
            nix::unistd::fchown(
                private.as_raw_fd(),
                Some(Uid::from_raw(0)),
                Some(Gid::from_raw(ids.host_root_gid())),
            )
            .map_err(io("handing private/ to the sandbox's root group"))?;
            nix::sys::stat::fchmod(private.as_raw_fd(), Mode::from_bits_truncate(0o710))
                .map_err(io("setting the mode of private/"))?;
        }
        mkdirat(
            Some(private.as_raw_fd()),
            WORK_DIR,
            Mode::from_bits_truncate(0o755),
        )
        .map_err(io("creating work/"))?;
        fchownat(
            Some(private.as_raw_fd()),
            WORK_DIR,
            Some(Uid::from_raw(ids.host_root_uid())),
            Some(Gid::from_raw(ids.host_root_gid())),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(io("handing work/ to the sandbox's root"))?;
        // mkdirat honours the helper's umask; the sandbox's /work is 0755 as it always was.
        fchmodat(
            Some(private.as_raw_fd()),
            WORK_DIR,
            Mode::from_bits_truncate(0o755),
            FchmodatFlags::NoFollowSymlink,
        )
        .map_err(io("setting the mode of work/"))?;
        let mut owned_dirs: Vec<(&str, u32)> = vec![(WORK_OVERLAY_DIR, 0o700)];
        if layout.image {
            owned_dirs.push((UPPER_DIR, 0o755));
            owned_dirs.push((OVERLAY_WORK_DIR, 0o700));
        }
        if layout.disk_bytes.is_some() {
            owned_dirs.push((TMP_DIR, 0o1777));
        }
        for (name, mode) in owned_dirs {
            mkdirat(
                Some(private.as_raw_fd()),
                name,
                Mode::from_bits_truncate(0o700),
            )
            .map_err(io("creating a directory in private/"))?;
            fchownat(
                Some(private.as_raw_fd()),
                name,
                Some(Uid::from_raw(ids.host_root_uid())),
                Some(Gid::from_raw(ids.host_root_gid())),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(io("handing a directory to the sandbox's root"))?;
            fchmodat(
                Some(private.as_raw_fd()),
                name,
                Mode::from_bits_truncate(mode),
                FchmodatFlags::NoFollowSymlink,
            )
            .map_err(io("setting a directory's mode"))?;
        }
        let work = open_fd(
            Some(private.as_raw_fd()),
            WORK_DIR,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(io("opening work/"))?;
        let daemon_file = |file: &'static str| -> Result<File, DirError> {
            let fd = open_fd(
                Some(dir.as_raw_fd()),
                file,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_APPEND,
                Mode::from_bits_truncate(0o640),
            )
            .map_err(io("creating an output file"))?;
            nix::unistd::fchown(
                fd.as_raw_fd(),
                Some(Uid::from_raw(daemon_uid)),
                Some(Gid::from_raw(daemon_gid)),
            )
            .map_err(io("handing an output file to the daemon"))?;
            Ok(File::from(fd))
        };
        let log = daemon_file(OUTPUT_LOG)?;
        let index = daemon_file(OUTPUT_INDEX)?;
        let lock = open_fd(
            Some(dir.as_raw_fd()),
            MONITOR_LOCK,
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(io("creating monitor.lock"))?;
        flock(lock.as_raw_fd(), FlockArg::LockExclusiveNonblock)
            .map_err(io("locking monitor.lock"))?;
        Ok((dir, work, log, index, File::from(lock)))
    }

    fn lock_slot(&self, slot: u32) -> Result<File, DirError> {
        let name = format!(".slot-{slot}.lock");
        let fd = open_fd(
            Some(self.raw_fd()),
            name.as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|source| DirError::Io {
            step: "opening a slot lock",
            id: Uuid::nil(),
            source,
        })?;
        match flock(fd.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
            Ok(()) => Ok(File::from(fd)),
            Err(Errno::EWOULDBLOCK) => Err(DirError::SlotBusy(slot)),
            Err(source) => Err(DirError::Io {
                step: "locking a slot",
                id: Uuid::nil(),
                source,
            }),
        }
    }

    /// Ids of every sandbox directory present.
    pub fn list(&self) -> Result<Vec<Uuid>, DirError> {
        let io = |source| DirError::Io {
            step: "listing",
            id: Uuid::nil(),
            source,
        };
        let mut dir = fdfs::open_listing(self.raw_fd()).map_err(io)?;
        let mut ids = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(io)?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .ok()
                .and_then(|n| Uuid::parse_str(n).ok())
            {
                // Only canonical names: "{...}" or upper-case spellings are not ours.
                if id.to_string().as_bytes() == entry.file_name().to_bytes() {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Open an existing sandbox's directory.
    fn open_sandbox(&self, id: Uuid) -> Result<OwnedFd, DirError> {
        let name = id.to_string();
        match open_fd(
            Some(self.raw_fd()),
            name.as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(fd),
            Err(Errno::ENOENT) => Err(DirError::NotFound(id)),
            Err(source) => Err(DirError::Io {
                step: "opening the directory",
                id,
                source,
            }),
        }
    }

    /// Output and disk figures of a sandbox (its cgroup figures come from `cgroup.rs`).
    pub fn stats(&self, id: Uuid) -> Result<sandboxd_protocol::wire::SandboxStats, DirError> {
        let dir = self.open_sandbox(id)?;
        let output_bytes = nix::sys::stat::fstatat(
            Some(dir.as_raw_fd()),
            OUTPUT_LOG,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map(|st| st.st_size as u64)
        .unwrap_or(0);
        let output_truncated = nix::sys::stat::fstatat(
            Some(dir.as_raw_fd()),
            sandboxd_protocol::layout::OUTPUT_TRUNCATED,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok();
        Ok(sandboxd_protocol::wire::SandboxStats {
            output_bytes,
            output_truncated,
            disk_bytes: work_usage(&dir),
            ..Default::default()
        })
    }

    /// Remove a sandbox's directory and everything in it, unless its monitor still lives.
    pub fn destroy(&self, id: Uuid) -> Result<(), DirError> {
        let name = id.to_string();
        let dir = self.open_sandbox(id)?;
        match open_fd(
            Some(dir.as_raw_fd()),
            MONITOR_LOCK,
            OFlag::O_RDONLY,
            Mode::empty(),
        ) {
            Ok(lock) => match flock(lock.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
                Ok(()) => {}
                Err(Errno::EWOULDBLOCK) => return Err(DirError::Busy(id)),
                Err(source) => {
                    return Err(DirError::Io {
                        step: "checking the monitor lock",
                        id,
                        source,
                    })
                }
            },
            Err(Errno::ENOENT) => {}
            Err(source) => {
                return Err(DirError::Io {
                    step: "opening monitor.lock",
                    id,
                    source,
                })
            }
        }
        crate::disk::detach(&dir).map_err(|e| DirError::Disk { id, source: e })?;
        drop(dir);
        remove_tree(self.raw_fd(), &cname(&name)).map_err(|source| DirError::Io {
            step: "removing",
            id,
            source,
        })
    }
}

/// Sandboxes created without being started (`Prepare`), and the work directory of an existing
/// sandbox for a file worker.
impl SandboxesDir {
    /// Reopen a directory made by `create` (and released) for the sandbox's start: the same
    /// files a fresh `create` gives, after checking that no monitor holds it, that it never ran
    /// (no `status.json`, empty log) and that its work directory belongs to `ids`.
    pub fn open_prepared(&self, id: Uuid, ids: IdMap) -> Result<SandboxFiles, DirError> {
        let io = |step| move |source| DirError::Io { step, id, source };
        let slot_lock = match ids {
            IdMap::Range { slot, .. } => Some(self.lock_slot(slot)?),
            IdMap::Single { .. } => None,
        };
        let dir = self.open_sandbox(id)?;
        let lock = open_fd(
            Some(dir.as_raw_fd()),
            MONITOR_LOCK,
            OFlag::O_RDWR,
            Mode::empty(),
        )
        .map_err(io("opening monitor.lock"))?;
        match flock(lock.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
            Ok(()) => {}
            Err(Errno::EWOULDBLOCK) => return Err(DirError::Busy(id)),
            Err(source) => return Err(io("locking monitor.lock")(source)),
        }
        match nix::sys::stat::fstatat(
            Some(dir.as_raw_fd()),
            sandboxd_protocol::layout::STATUS_FILE,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Err(Errno::ENOENT) => {}
            _ => return Err(DirError::Busy(id)),
        }
        let work = self.open_work_in(&dir, id, ids)?;
        let output = |file: &'static str| -> Result<File, DirError> {
            let fd = open_fd(
                Some(dir.as_raw_fd()),
                file,
                OFlag::O_WRONLY | OFlag::O_APPEND,
                Mode::empty(),
            )
            .map_err(io("opening an output file"))?;
            let st = fstat(fd.as_raw_fd()).map_err(io("checking an output file"))?;
            if st.st_size != 0 || st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(DirError::Busy(id));
            }
            Ok(File::from(fd))
        };
        let log = output(OUTPUT_LOG)?;
        let index = output(OUTPUT_INDEX)?;
        Ok(SandboxFiles {
            dir,
            work,
            log,
            index,
            lock: File::from(lock),
            slot_lock,
            image_lower: None,
        })
    }

    /// An existing sandbox's directory.
    pub fn open_dir(&self, id: Uuid) -> Result<OwnedFd, DirError> {
        self.open_sandbox(id)
    }

    /// The work directory of an existing sandbox (`O_PATH`), checked to belong to the root of
    /// `ids`: a request naming another uid range than the sandbox's is refused.
    pub fn open_work(&self, id: Uuid, ids: IdMap) -> Result<OwnedFd, DirError> {
        let dir = self.open_sandbox(id)?;
        self.open_work_in(&dir, id, ids)
    }

    fn open_work_in(&self, dir: &OwnedFd, id: Uuid, ids: IdMap) -> Result<OwnedFd, DirError> {
        let io = |step| move |source| DirError::Io { step, id, source };
        let private = open_fd(
            Some(dir.as_raw_fd()),
            PRIVATE_DIR,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(io("opening private/"))?;
        let work = open_fd(
            Some(private.as_raw_fd()),
            WORK_DIR,
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(io("opening work/"))?;
        let st = fstat(work.as_raw_fd()).map_err(io("checking work/"))?;
        if st.st_uid != ids.host_root_uid() {
            return Err(io("checking the owner of work/")(Errno::EPERM));
        }
        Ok(work)
    }
}

/// Bytes the sandbox stores under its work directory, its upper layer and its disk-backed /tmp
/// (allocated blocks), or None if it cannot be measured (see [`fdfs::tree_usage`] for the bounds).
pub fn work_usage(sandbox_dir: &OwnedFd) -> Option<u64> {
    let private = open_fd(
        Some(sandbox_dir.as_raw_fd()),
        PRIVATE_DIR,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .ok()?;
    // What counts against limits.disk_bytes: /work, an image root's upper layer, and /tmp when
    // it lives on the sandbox's own filesystem.
    let roots: Vec<OwnedFd> = [WORK_DIR, UPPER_DIR, TMP_DIR]
        .into_iter()
        .filter_map(|name| {
            open_fd(
                Some(private.as_raw_fd()),
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .ok()
        })
        .collect();
    if roots.is_empty() {
        return None;
    }
    Some(fdfs::tree_usage(roots))
}

fn cname(name: &str) -> CString {
    CString::new(name).unwrap_or_default()
}
