//! The per-sandbox directory: `<state-dir>/sandboxes/<uuid>/`.
//!
//! ```text
//! sandboxes/                 helper-owned, 0711: the daemon may traverse but not create
//!   <uuid>/                  helper-owned, 0711
//!     output.log             every byte of stdout and stderr, in the order read (daemon-readable)
//!     output.idx             one logindex record per write: which stream each run of bytes came from
//!     status.json            written atomically by the monitor when the sandbox ends (daemon-readable)
//!     monitor.sock           the monitor's control socket, owned by the daemon's uid, 0600
//!     monitor.lock           flock-held by the monitor for as long as it lives
//!     work/                  the sandbox's /work, owned by the sandbox's root uid
//!     rootfs/                empty mount point for the sandbox's root tmpfs (only inside its mount namespace)
//! ```

use std::path::{Path, PathBuf};

use uuid::Uuid;

pub const SANDBOXES_DIR: &str = "sandboxes";
pub const OUTPUT_LOG: &str = "output.log";
pub const OUTPUT_INDEX: &str = "output.idx";
pub const STATUS_FILE: &str = "status.json";
pub const MONITOR_SOCKET: &str = "monitor.sock";
pub const MONITOR_LOCK: &str = "monitor.lock";
pub const WORK_DIR: &str = "work";
pub const ROOTFS_DIR: &str = "rootfs";
/// The helper's socket, directly under the state directory.
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
        self.root.join(WORK_DIR)
    }
}
