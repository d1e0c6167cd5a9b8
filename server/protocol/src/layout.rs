//! The per-sandbox directory: `<state-dir>/sandboxes/<uuid>/`.
//!
//! ```text
//! helper/                    helper-owned, 0711
//!   helper.sock              the helper's socket, owned by the daemon's uid, 0600
//! sandboxes/                 helper-owned, 0711: the daemon may traverse but not create
//!   <uuid>/                  helper-owned, 0711
//!     output.log             every byte of stdout and stderr, in the order read (daemon-readable)
//!     output.idx             one logindex record per write: which stream each run of bytes came from
//!     output.truncated       exists once output reached the cap
//!     status.json            written atomically by the monitor when the sandbox ends (daemon-readable)
//!     monitor.sock           the monitor's control socket, owned by the daemon's uid, 0600
//!     monitor.lock           flock-held by the monitor for as long as it lives
//!     execs/<exec id>/       one per exec: output.log, output.idx, status.json (same formats)
//!     private/               helper-owned, 0710 with the sandbox's root gid (0700 rootless): only
//!       work/                the sandbox's root may enter; its /work, owned by the sandbox's root
//! ```
//!
//! `private/` keeps every other host user out of the sandbox's files: a setuid binary the sandbox
//! leaves in /work must not be executable from the host.

use std::path::{Path, PathBuf};

use uuid::Uuid;

pub const SANDBOXES_DIR: &str = "sandboxes";
pub const OUTPUT_LOG: &str = "output.log";
pub const OUTPUT_INDEX: &str = "output.idx";
/// Created by the monitor when output reached the cap (`limits.output_bytes`).
pub const OUTPUT_TRUNCATED: &str = "output.truncated";
pub const STATUS_FILE: &str = "status.json";
pub const MONITOR_SOCKET: &str = "monitor.sock";
pub const MONITOR_LOCK: &str = "monitor.lock";
/// Directory that only the sandbox's root (and the helper) may traverse.
pub const PRIVATE_DIR: &str = "private";
/// The sandbox's work directory, inside [`PRIVATE_DIR`].
pub const WORK_DIR: &str = "work";
/// The overlay's upper layer of a sandbox started from an image, inside [`PRIVATE_DIR`].
pub const UPPER_DIR: &str = "upper";
/// The overlay's work directory (same filesystem as [`UPPER_DIR`]), inside [`PRIVATE_DIR`].
pub const OVERLAY_WORK_DIR: &str = "overlay-work";
/// The work directory of the overlay that shows [`WORK_DIR`] as the sandbox's `/work` (same
/// filesystem as [`WORK_DIR`]), inside [`PRIVATE_DIR`]: an overlay's mount root is its own, so
/// the sandbox's mount table does not show the host path of its work directory.
pub const WORK_OVERLAY_DIR: &str = "work-overlay";
/// The sandbox's /tmp when it has a disk limit, inside [`PRIVATE_DIR`].
pub const TMP_DIR: &str = "tmp";
/// The sparse file holding a disk-limited sandbox's filesystem (mounted on [`PRIVATE_DIR`]).
pub const DISK_IMAGE: &str = "disk.img";
/// In a sandbox's directory: the digest of the image its root filesystem comes from (if any).
pub const IMAGE_DIGEST_FILE: &str = "image.digest";
/// The image store: `images/<sha256 hex>/rootfs/`, the helper's.
pub const IMAGES_DIR: &str = "images";
/// The unpacked root filesystem of an image, inside `images/<digest>/`.
pub const IMAGE_ROOTFS: &str = "rootfs";
/// Uploads the daemon is receiving or the helper is unpacking: `uploads/<uuid>`, the daemon's.
pub const UPLOADS_DIR: &str = "uploads";
/// The helper's own directory under the state directory (root-owned in privileged mode).
pub const HELPER_DIR: &str = "helper";
/// The helper's socket, inside [`HELPER_DIR`].
pub const HELPER_SOCKET: &str = "helper.sock";

/// Paths of one sandbox's files, for the daemon (the helper works relative to directory fds).
#[derive(Debug, Clone)]
pub struct SandboxDir {
    root: PathBuf,
}

impl SandboxDir {
    pub fn new(state_dir: &Path, id: Uuid) -> Self {
        SandboxDir {
            root: state_dir.join(SANDBOXES_DIR).join(id.to_string()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn output_log(&self) -> PathBuf {
        self.root.join(OUTPUT_LOG)
    }
    pub fn output_index(&self) -> PathBuf {
        self.root.join(OUTPUT_INDEX)
    }
    pub fn status(&self) -> PathBuf {
        self.root.join(STATUS_FILE)
    }
    pub fn monitor_socket(&self) -> PathBuf {
        self.root.join(MONITOR_SOCKET)
    }
    pub fn work(&self) -> PathBuf {
        self.root.join(PRIVATE_DIR).join(WORK_DIR)
    }
    /// The directory of one exec (`execs/<exec id>/`), which holds its own `output.log`,
    /// `output.idx` and `status.json`: the same names and formats as the sandbox's.
    pub fn exec(&self, exec: Uuid) -> SandboxDir {
        SandboxDir {
            root: self
                .root
                .join(crate::exec::EXECS_DIR)
                .join(exec.to_string()),
        }
    }
}

/// Path of the helper's socket under a state directory.
pub fn helper_socket(state_dir: &Path) -> PathBuf {
    state_dir.join(HELPER_DIR).join(HELPER_SOCKET)
}
