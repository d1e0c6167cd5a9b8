//! The image store: `<state>/images/<sha256>/rootfs`, the helper's, reached only through the
//! descriptor opened at start.
//!
//! **Import** runs in a worker forked from the helper (so the helper keeps serving while a big
//! image unpacks), which answers the daemon on the connection it inherited. The worker opens the
//! daemon's upload (`uploads/<uuid>`: a regular file owned by the daemon's uid with one link,
//! nothing else), makes a scratch directory `images/.tmp-<digest>-<pid>` owned by the image
//! range's root, and clones the unpacker into a **new user namespace** whose ids 0..65536 are the
//! image range on the host (rootless: only root, mapped to the helper's own uid). The unpacker
//! therefore has no privilege on the host at all: what it writes is owned by the image range, a
//! chown can only pick an id of that range, and a hostile archive that got past the checks in
//! [`unpack`] could still touch nothing but the scratch directory. The worker renames the result
//! to `images/<digest>` (0700): a digest is stored once, and a concurrent import of the same
//! content simply finds it there.
//!
//! **Use** ([`idmapped_lower`]): an image's `rootfs` is cloned as a detached mount and idmapped
//! through a user namespace mapping the image range onto the sandbox's range, so the sandbox
//! sees the image's owners (root is its root) while the files on disk keep the image range's.

pub mod archive;
pub mod passwd;
pub mod unpack;

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{renameat, OFlag};
use nix::sys::stat::{fstat, mkdirat, Mode};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fchown, pipe2, Gid, Uid};
use sandboxd_protocol::layout::{IMAGES_DIR, IMAGE_ROOTFS, UPLOADS_DIR};
use sandboxd_protocol::wire::{HelperError, HelperErrorCode, ImportedImage, Mode as HelperMode};

use crate::config::{Config, UID_RANGE_SIZE};
use crate::sys::{self, CloneResult};
use crate::validate::IdMap;

const META_FILE: &str = "meta.json";
const TMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".del-";
/// Most entries an image may have.
const MAX_ENTRIES: u64 = 2_000_000;

/// What went wrong with the image store, an import or an image's lower layer; the request loop
/// (and the import worker, which answers the daemon itself) turns it into the wire's error with
/// [`ImageError::into_wire`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("malformed image digest")]
    MalformedDigest,
    #[error("no such image digest")]
    NoSuchDigest,
    #[error("the image is not stored")]
    NotStored,
    /// The daemon's upload is not one the helper reads (missing, a link, another owner's...).
    #[error("upload {upload}: {why}")]
    Upload { upload: uuid::Uuid, why: String },
    /// A system call of the step named failed.
    #[error("{step}")]
    Step {
        step: String,
        #[source]
        source: Errno,
    },
    #[error("{step}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding")]
    Encode(#[source] serde_json::Error),
    #[error("clone")]
    Clone(#[source] sys::ForkError),
    #[error("writing the unpacker's id maps")]
    IdMaps(#[source] crate::child::ChildError),
    /// The unpacker ended without reporting success.
    #[error("unpacking: {0}")]
    Unpacker(String),
    /// The archive itself: too large, hostile or unreadable.
    #[error(transparent)]
    Unpack(unpack::UnpackError),
    #[error("idmapping an image: needs a uid range")]
    NeedsRange,
    #[error("idmapping the image (does this filesystem support idmapped mounts?)")]
    Idmap(#[source] Errno),
    /// An error already in the wire's shape: the unpacker's report, or the id maps.
    #[error("{}", .0.message)]
    Reported(HelperError),
}

impl ImageError {
    /// This error on the wire: its code, and its message with every cause.
    pub fn into_wire(self) -> HelperError {
        use unpack::UnpackError as U;
        if let ImageError::Reported(e) = self {
            return e;
        }
        let code = match &self {
            ImageError::MalformedDigest | ImageError::Upload { .. } => HelperErrorCode::Invalid,
            ImageError::NoSuchDigest | ImageError::NotStored => HelperErrorCode::NotFound,
            ImageError::Idmap(_) => HelperErrorCode::SetupFailed,
            ImageError::Unpack(e) => match e {
                U::TooLarge(_) | U::TooManyEntries(_) => HelperErrorCode::ImageTooLarge,
                U::Read(io) if io.kind() == std::io::ErrorKind::FileTooLarge => {
                    HelperErrorCode::ImageTooLarge
                }
                U::Hostile { .. } | U::Read(_) => HelperErrorCode::BadImage,
                U::Write { source, .. } if *source == Errno::ENOSPC || *source == Errno::EDQUOT => {
                    HelperErrorCode::Internal
                }
                U::Write { .. } => HelperErrorCode::BadImage,
            },
            _ => HelperErrorCode::Internal,
        };
        match self {
            // The archive's own message, as the unpacker has always reported it.
            ImageError::Unpack(e) => HelperError::new(code, e.to_string()),
            other => crate::error::wire(code, &other),
        }
    }
}

fn step(step: impl Into<String>) -> impl FnOnce(Errno) -> ImageError {
    let step = step.into();
    move |source| ImageError::Step { step, source }
}

fn io_step(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let step = step.into();
    move |source| ImageError::Io { step, source }
}

/// `<state>/images`, held open.
pub struct ImageStore {
    fd: OwnedFd,
    /// The idmapping user namespace of each uid slot (image range onto the slot's range), made
    /// once per slot and kept: the mapping of a slot never changes.
    shift_userns: std::cell::RefCell<std::collections::HashMap<u32, OwnedFd>>,
}

impl ImageStore {
    /// Create (if needed) and open the store, and clear what a crash left: scratch directories of
    /// imports and images half removed.
    pub fn open(state_dir: &Path) -> Result<Self, String> {
        let path = state_dir.join(IMAGES_DIR);
        match nix::unistd::mkdir(&path, Mode::from_bits_truncate(0o711)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(format!("creating {}: {e}", path.display())),
        }
        let fd = crate::sys::open(
            &path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| format!("{}: {e}", path.display()))?;
        if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o022 != 0 {
            return Err(format!(
                "{} must be owned by the helper's user and not writable by others",
                path.display()
            ));
        }
        // mkdir honours the helper's umask: sandboxes' host uids must traverse (never list).
        nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o711))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let store = ImageStore {
            fd,
            shift_userns: Default::default(),
        };
        for name in store.names().unwrap_or_default() {
            if name.starts_with(TMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
                // A worker of the previous helper may still be at work (it holds a lock on its
                // scratch directory): leave that one alone.
                let busy = crate::sys::openat(
                    Some(store.raw_fd()),
                    name.as_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .is_ok_and(|fd| {
                    crate::fdfs::flock(fd.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock)
                        .is_err()
                });
                if busy {
                    continue;
                }
                if let Ok(c) = CString::new(name) {
                    let _ = crate::fdfs::remove_tree(store.fd.as_raw_fd(), &c);
                }
            }
        }
        Ok(store)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn names(&self) -> Result<Vec<String>, Errno> {
        let mut dir = crate::fdfs::open_listing(self.raw_fd())?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry?;
            if let Ok(name) = entry.file_name().to_str() {
                if name != "." && name != ".." {
                    out.push(name.to_owned());
                }
            }
        }
        Ok(out)
    }

    /// Digests of every stored image.
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut digests: Vec<String> = self
            .names()
            .map_err(step("listing images"))?
            .into_iter()
            .filter(|n| is_digest(n))
            .collect();
        digests.sort();
        Ok(digests)
    }

    /// The stored description of an image, if it is stored.
    fn meta(&self, digest: &str) -> Option<ImportedImage> {
        let fd = sys::openat(
            Some(self.raw_fd()),
            format!("{digest}/{META_FILE}").as_str(),
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut bytes = Vec::new();
        File::from(fd)
            .take(64 * 1024)
            .read_to_end(&mut bytes)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn exists(&self, digest: &str) -> bool {
        is_digest(digest) && self.meta(digest).is_some()
    }

    /// Remove an image: renamed away at once (so a new import of it starts clean), then deleted
    /// by a detached process, so a big tree does not hold up the helper.
    pub fn delete(&self, digest: &str) -> Result<(), ImageError> {
        if !is_digest(digest) {
            return Err(ImageError::MalformedDigest);
        }
        let trash = format!("{TRASH_PREFIX}{digest}-{}", std::process::id());
        match renameat(
            Some(self.raw_fd()),
            digest,
            Some(self.raw_fd()),
            trash.as_str(),
        ) {
            Ok(()) => {}
            Err(Errno::ENOENT) => return Err(ImageError::NoSuchDigest),
            Err(e) => return Err(step("removing the image")(e)),
        }
        let dir = self.raw_fd();
        detached(move || {
            if let Ok(c) = CString::new(trash) {
                let _ = crate::fdfs::remove_tree(dir, &c);
            }
        });
        Ok(())
    }
}

/// Run `work` in a double-forked process that nobody waits for (the helper reaps only the
/// intermediate one, at once).
pub fn detached(work: impl FnOnce()) {
    match sys::fork() {
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let _ = waitpid(child, None);
        }
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            if let Ok(nix::unistd::ForkResult::Child) = sys::fork() {
                let _ = crate::fds::stdio_to_devnull();
                work();
            }
            sys::exit_now(0);
        }
        Err(_) => {}
    }
}

/// The image range as the unpacker's user namespace maps it.
fn image_ids(config: &Config) -> IdMap {
    match config.mode {
        HelperMode::Privileged => IdMap::Range {
            slot: u32::MAX,
            base: config.image_base(),
            size: UID_RANGE_SIZE,
        },
        HelperMode::Rootless => IdMap::Single {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        },
    }
}

/// Open the daemon's upload: a regular file of the daemon's uid with a single link (so it cannot
/// be a hard link to a file the daemon could not read itself).
fn open_upload(config: &Config, upload: uuid::Uuid) -> Result<File, ImageError> {
    let refuse = |why: &str| ImageError::Upload {
        upload,
        why: why.to_owned(),
    };
    let dir = crate::sys::open(
        &config.state_dir.join(UPLOADS_DIR),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| refuse(&format!("opening the uploads directory: {e}")))?;
    let fd = crate::sys::openat(
        Some(dir.as_raw_fd()),
        upload.to_string().as_str(),
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(|e| refuse(&format!("{e}")))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|e| refuse(&format!("{e}")))?;
    if !meta.file_type().is_file() || meta.uid() != config.allow_uid || meta.nlink() != 1 {
        return Err(refuse(
            "must be a regular file of the daemon's with a single link",
        ));
    }
    Ok(file)
}

/// Import an upload (runs in the forked worker; may take long).
pub fn import(
    config: &Config,
    store: &ImageStore,
    upload: uuid::Uuid,
    digest: &str,
) -> Result<ImportedImage, ImageError> {
    if !is_digest(digest) {
        return Err(ImageError::MalformedDigest);
    }
    if let Some(meta) = store.meta(digest) {
        return Ok(ImportedImage {
            unpacked: false,
            ..meta
        });
    }
    let upload_file = open_upload(config, upload)?;
    let ids = image_ids(config);
    let scratch_name = format!("{TMP_PREFIX}{digest}-{}", std::process::id());
    mkdirat(
        Some(store.raw_fd()),
        scratch_name.as_str(),
        Mode::from_bits_truncate(0o700),
    )
    .map_err(step("creating a scratch directory"))?;
    // Held until this worker exits: a restarted helper must not clear the directory under us.
    let _lock = crate::sys::openat(
        Some(store.raw_fd()),
        scratch_name.as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .and_then(|fd| {
        crate::fdfs::flock(fd.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock)?;
        Ok(fd)
    })
    .map_err(step("locking the scratch directory"))?;
    let result =
        unpack_into(config, store, &scratch_name, upload_file, ids).and_then(|mut meta| {
            meta.digest = digest.to_owned();
            let bytes = serde_json::to_vec(&meta).map_err(ImageError::Encode)?;
            let fd = crate::sys::openat(
                Some(store.raw_fd()),
                format!("{scratch_name}/{META_FILE}").as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )
            .map_err(step("writing meta.json"))?;
            File::from(fd)
                .write_all(&bytes)
                .map_err(io_step("writing meta.json"))?;
            Ok(meta)
        });
    let scratch_c = CString::new(scratch_name.clone()).unwrap_or_default();
    let meta = match result {
        Ok(meta) => meta,
        Err(e) => {
            let _ = crate::fdfs::remove_tree(store.raw_fd(), &scratch_c);
            return Err(e);
        }
    };
    match renameat(
        Some(store.raw_fd()),
        scratch_name.as_str(),
        Some(store.raw_fd()),
        digest,
    ) {
        Ok(()) => Ok(meta),
        // Another import of the same content finished first: keep that one.
        Err(Errno::EEXIST) | Err(Errno::ENOTEMPTY) => {
            let _ = crate::fdfs::remove_tree(store.raw_fd(), &scratch_c);
            Ok(ImportedImage {
                unpacked: false,
                ..meta
            })
        }
        Err(e) => {
            let _ = crate::fdfs::remove_tree(store.raw_fd(), &scratch_c);
            Err(step("storing the image")(e))
        }
    }
}

/// Clone the unpacker into its user namespace, map it onto the image range, and collect its
/// report.
fn unpack_into(
    config: &Config,
    store: &ImageStore,
    scratch_name: &str,
    upload: File,
    ids: IdMap,
) -> Result<ImportedImage, ImageError> {
    let scratch = crate::sys::openat(
        Some(store.raw_fd()),
        scratch_name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(step("opening the scratch directory"))?;
    // The scratch directory and the root filesystem in it belong to the image range's root.
    mkdirat(
        Some(scratch.as_raw_fd()),
        IMAGE_ROOTFS,
        Mode::from_bits_truncate(0o755),
    )
    .map_err(step("creating rootfs/"))?;
    let rootfs = crate::sys::openat(
        Some(scratch.as_raw_fd()),
        IMAGE_ROOTFS,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(step("opening rootfs/"))?;
    // The image's `/`: its mode is the image's, whatever the helper's umask.
    nix::sys::stat::fchmod(rootfs.as_raw_fd(), Mode::from_bits_truncate(0o755))
        .map_err(step("setting the mode of rootfs/"))?;
    for fd in [&scratch, &rootfs] {
        fchown(
            fd.as_raw_fd(),
            Some(Uid::from_raw(ids.host_root_uid())),
            Some(Gid::from_raw(ids.host_root_gid())),
        )
        .map_err(step("handing the scratch directory to the image range"))?;
    }
    let (report_r, report_w) = pipe2(OFlag::O_CLOEXEC).map_err(step("pipe"))?;
    let (sync_r, sync_w) = pipe2(OFlag::O_CLOEXEC).map_err(step("pipe"))?;
    // As in the monitor: the child's /proc files must be ours for a rootless helper to write its
    // maps, so it starts dumpable; the worker is not dumpable again afterwards.
    nix::sys::prctl::set_dumpable(true).map_err(step("prctl"))?;
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC;
    match sys::clone_into_namespaces(flags, None).map_err(ImageError::Clone)? {
        CloneResult::Child => {
            drop((report_r, sync_w));
            let code = unpacker(config, upload, rootfs, scratch, sync_r, report_w);
            sys::exit_now(code)
        }
        CloneResult::Parent { child, pidfd } => {
            drop((report_w, sync_r, upload, rootfs, scratch));
            let mapped = crate::child::write_id_maps(child, ids).map_err(ImageError::IdMaps);
            let _ = nix::sys::prctl::set_dumpable(false);
            if let Err(e) = mapped {
                let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
                let _ = waitpid(child, None);
                return Err(e);
            }
            let _ = File::from(sync_w).write_all(b"1");
            let mut report = Vec::new();
            let _ = File::from(report_r)
                .take(64 * 1024)
                .read_to_end(&mut report);
            let status = waitpid(child, None);
            let outcome: Result<ImportedImage, HelperError> = serde_json::from_slice(&report)
                .map_err(|_| {
                    ImageError::Unpacker(format!(
                        "the unpacker ended without a report ({status:?})"
                    ))
                })?;
            match (outcome, status) {
                (Ok(meta), Ok(WaitStatus::Exited(_, 0))) => Ok(meta),
                (Err(e), _) => Err(ImageError::Reported(e)),
                (Ok(_), status) => Err(ImageError::Unpacker(format!(
                    "the unpacker failed ({status:?})"
                ))),
            }
        }
    }
}

/// The unpacker: root of its own user namespace (and nothing on the host), it unpacks and
/// writes one JSON report.
fn unpacker(
    config: &Config,
    upload: File,
    rootfs: OwnedFd,
    scratch: OwnedFd,
    sync: OwnedFd,
    report: OwnedFd,
) -> i32 {
    let keep = [
        upload.as_raw_fd(),
        rootfs.as_raw_fd(),
        scratch.as_raw_fd(),
        sync.as_raw_fd(),
        report.as_raw_fd(),
    ];
    if crate::fds::close_all_except(&keep).is_err() {
        return 1;
    }
    // The image's files get the archive's modes, not the helper's umask.
    crate::sys::set_umask(crate::sys::SANDBOX_UMASK);
    let mut byte = [0u8; 1];
    if !matches!(nix::unistd::read(sync.as_raw_fd(), &mut byte), Ok(1)) {
        return 1;
    }
    drop(sync);
    let root = (Uid::from_raw(0), Gid::from_raw(0));
    let became = nix::unistd::setresgid(root.1, root.1, root.1)
        .and_then(|()| nix::unistd::setresuid(root.0, root.0, root.0))
        .and_then(|()| nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL))
        .and_then(|()| nix::sys::prctl::set_no_new_privs());
    let outcome: Result<ImportedImage, ImageError> = match became {
        Err(e) => Err(step("entering the unpacker's user namespace")(e)),
        Ok(()) => {
            let mut budget = unpack::Budget::new(config.max_image_bytes, MAX_ENTRIES);
            match archive::unpack_upload(upload, &rootfs, &scratch, &mut budget) {
                Ok(done) => {
                    // The decompressed copy of a compressed image archive is not part of it.
                    let _ = nix::unistd::unlinkat(
                        Some(scratch.as_raw_fd()),
                        "archive.tar",
                        nix::unistd::UnlinkatFlags::NoRemoveDir,
                    );
                    Ok(ImportedImage {
                        digest: String::new(),
                        size_bytes: budget.bytes,
                        entries: budget.entries,
                        format: done.format.as_str().to_owned(),
                        layers: done.layers,
                        skipped: budget.skipped,
                        unpacked: true,
                        config: done.config,
                    })
                }
                Err(e) => Err(ImageError::Unpack(e)),
            }
        }
    };
    // The report crosses to the worker as the wire's error: this process's edge.
    let outcome = outcome.map_err(ImageError::into_wire);
    let ok = outcome.is_ok();
    let written = serde_json::to_vec(&outcome)
        .map(|bytes| File::from(report).write_all(&bytes).is_ok())
        .unwrap_or(false);
    if ok && written {
        0
    } else {
        1
    }
}

/// A user namespace that maps the image range onto `sandbox` (privileged mode): the idmapping of
/// the sandbox's view of an image. Held by a descriptor; the short-lived process that created it
/// is gone when this returns.
fn shift_userns(image_base: u32, sandbox: IdMap) -> Result<OwnedFd, ImageError> {
    let IdMap::Range { base, size, .. } = sandbox else {
        return Err(ImageError::NeedsRange);
    };
    let (hold_r, hold_w) = pipe2(OFlag::O_CLOEXEC).map_err(step("pipe"))?;
    match sys::clone_into_namespaces(libc::CLONE_NEWUSER, None).map_err(ImageError::Clone)? {
        CloneResult::Child => {
            drop(hold_w);
            // Wait until the parent has what it needs, then go.
            let mut byte = [0u8; 1];
            let _ = nix::unistd::read(hold_r.as_raw_fd(), &mut byte);
            sys::exit_now(0)
        }
        CloneResult::Parent { child, pidfd } => {
            drop(hold_r);
            let result = (|| {
                let map = format!("{image_base} {base} {size}\n");
                for file in ["uid_map", "gid_map"] {
                    std::fs::write(format!("/proc/{child}/{file}"), &map).map_err(|e| {
                        ImageError::Step {
                            step: format!("writing {file}"),
                            source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                        }
                    })?;
                }
                crate::sys::open(
                    format!("/proc/{child}/ns/user").as_str(),
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(step("opening the user namespace"))
            })();
            if result.is_err() {
                let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
            }
            drop(hold_w);
            let _ = waitpid(child, None);
            result
        }
    }
}

/// The read-only lower layer of a sandbox started from `digest`, as a detached mount idmapped
/// from the image range onto the sandbox's range (privileged mode). Init attaches it inside its
/// own mount namespace and stacks the overlay on it.
pub fn idmapped_lower(
    store: &ImageStore,
    config: &Config,
    digest: &str,
    sandbox: IdMap,
) -> Result<OwnedFd, ImageError> {
    if !store.exists(digest) {
        return Err(ImageError::NotStored);
    }
    // A valid digest (checked by `exists`) has no NUL byte.
    let path = CString::new(format!("{digest}/{IMAGE_ROOTFS}"))
        .map_err(|_| ImageError::MalformedDigest)?;
    let tree =
        sys::open_tree_clone(store.fd.as_fd(), &path).map_err(step("cloning the image's mount"))?;
    let IdMap::Range { slot, .. } = sandbox else {
        return Err(ImageError::NeedsRange);
    };
    let mut cache = store.shift_userns.borrow_mut();
    let userns = match cache.entry(slot) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(shift_userns(config.image_base(), sandbox)?)
        }
    };
    sys::idmap_detached_mount(
        tree.as_fd(),
        userns.as_fd(),
        sys::MOUNT_ATTR_RDONLY | sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV,
    )
    .map_err(ImageError::Idmap)?;
    Ok(tree)
}

/// An image's root filesystem as a path (rootless mode, where the files are the helper's own
/// and the sandbox's root is the helper's uid: no idmapping needed).
pub fn lower_path(config: &Config, digest: &str) -> std::path::PathBuf {
    config
        .state_dir
        .join(IMAGES_DIR)
        .join(digest)
        .join(IMAGE_ROOTFS)
}

/// Write `image.digest` into a new sandbox's directory.
pub fn record_digest(sandbox_dir: &OwnedFd, digest: &str) -> Result<(), ImageError> {
    let fd = crate::sys::openat(
        Some(sandbox_dir.as_raw_fd()),
        sandboxd_protocol::layout::IMAGE_DIGEST_FILE,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(step("recording the image"))?;
    File::from(fd)
        .write_all(digest.as_bytes())
        .map_err(io_step("recording the image"))
}

/// A digest as the store names its directories: the shared rule (`protocol::rules::Digest`).
fn is_digest(name: &str) -> bool {
    sandboxd_protocol::rules::Digest::parse(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_reach_the_wire_with_their_code_and_every_cause() {
        let cases = [
            (ImageError::MalformedDigest, HelperErrorCode::Invalid, "malformed image digest"),
            (ImageError::NotStored, HelperErrorCode::NotFound, "the image is not stored"),
            (
                step("creating rootfs/")(Errno::ENOSPC),
                HelperErrorCode::Internal,
                "creating rootfs/: ENOSPC: No space left on device",
            ),
            (
                ImageError::Idmap(Errno::EINVAL),
                HelperErrorCode::SetupFailed,
                "idmapping the image (does this filesystem support idmapped mounts?): EINVAL: Invalid argument",
            ),
            (
                ImageError::Unpack(unpack::UnpackError::TooManyEntries(7)),
                HelperErrorCode::ImageTooLarge,
                "the image has more than 7 entries",
            ),
            (
                ImageError::Unpack(unpack::UnpackError::Hostile {
                    path: "../x".into(),
                    why: "escapes the root",
                }),
                HelperErrorCode::BadImage,
                "entry \"../x\": escapes the root",
            ),
            (
                ImageError::Reported(HelperError::new(HelperErrorCode::SlotBusy, "as reported")),
                HelperErrorCode::SlotBusy,
                "as reported",
            ),
        ];
        for (error, code, message) in cases {
            let wire = error.into_wire();
            assert_eq!((wire.code, wire.message.as_str()), (code, message));
        }
    }
}
