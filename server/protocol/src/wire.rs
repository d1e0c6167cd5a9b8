//! Messages on the helper socket.
//!
//! Framing: every message is a little-endian `u32` length followed by that many bytes of JSON.
//! A frame longer than [`MAX_FRAME`] is a protocol error and closes the connection. The first
//! request on a connection must be [`Request::Hello`] with [`PROTOCOL_VERSION`]; the helper answers
//! every request with exactly one [`Response`], in order, and never exits because one request failed.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Bumped whenever a message changes shape. The helper refuses other versions.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// A request from the daemon. The helper validates every field; see `server/helper/src/validate.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
// One request lives at a time per connection; boxing the spawn request would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Request {
    Hello {
        version: u32,
    },
    /// What the helper can do on this host.
    Info,
    /// Create the sandbox directory and start the sandbox under a new monitor.
    Spawn(SpawnRequest),
    /// Remove every trace of a sandbox that is no longer running.
    Destroy {
        id: Uuid,
    },
    /// Ids of all sandbox directories that exist, so the daemon can reconcile after a crash.
    List,
    /// Live resource figures of a running sandbox (from its cgroup and its directory).
    Stats {
        id: Uuid,
    },
    /// Create a sandbox's directory without starting it (`"start": false`); a later `Spawn` with
    /// `prepared: true` starts it.
    Prepare(SpawnRequest),
    /// Move files in or out of a sandbox (see [`crate::files`]). Sent on a connection of its
    /// own, which the helper hands to a file worker: the rest of the exchange is the worker's.
    Files(FilesRequest),
    /// Unpack the upload `<state>/uploads/<upload>` (a file of the daemon's, named by a UUID)
    /// into the image store under `digest` (64 hex digits, the sha256 of the upload), unless an
    /// image with that digest is stored already. Answered by a forked worker on the same
    /// connection, so the helper keeps serving other connections meanwhile.
    ImportImage {
        upload: Uuid,
        digest: String,
        /// A lower cap than the helper's `--max-image-bytes` for this import's unpacked bytes
        /// (what the tenant's quota and the free-space reserve leave); it can only lower it.
        #[serde(default)]
        max_bytes: Option<u64>,
    },
    /// Remove a stored image (the daemon checks first that no sandbox uses it).
    DeleteImage {
        digest: String,
    },
    /// Digests of every stored image, so the daemon can remove those it has no record of.
    ListImages,
}

/// One file transfer. `spawn` is the sandbox's spawn request, so that the worker builds the
/// sandbox's root exactly as its init does (the helper validates it like a `Spawn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesRequest {
    pub spawn: SpawnRequest,
    /// (`file_op` on the wire: `op` is the request's tag.)
    #[serde(rename = "file_op")]
    pub op: crate::files::FileOp,
    /// An absolute path inside the sandbox; see [`crate::files::SandboxPath`].
    pub path: String,
    /// Permission bits of an uploaded file (`Put`).
    #[serde(default)]
    pub mode: Option<u32>,
}

/// The worker's answer once the path is resolved, before any content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileReady {
    pub kind: crate::files::FileKind,
    /// Size of a regular file when it was opened.
    pub size: Option<u64>,
    /// Permission bits of a regular file.
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    pub id: Uuid,
    /// Which uid/gid range the sandbox gets in privileged mode; must be `None` in rootless mode.
    pub uid_slot: Option<u32>,
    pub command: Vec<String>,
    /// `KEY=VALUE` pairs, in order.
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub hostname: String,
    pub timeout_secs: Option<u64>,
    pub limits: SpawnLimits,
    /// The bounding set the sandbox keeps (canonical names); `None` for the default set.
    #[serde(default)]
    pub capabilities: Option<Vec<String>>,
    /// Let the sandbox create nested user namespaces (the seccomp filter refuses them otherwise).
    #[serde(default)]
    pub nested_user_namespaces: bool,
    /// Keep the command's stdin open for attach connections (otherwise the sandbox's /dev/null).
    #[serde(default)]
    pub stdin: bool,
    /// Give the command a terminal of this size (cols, rows) from the sandbox's own devpts.
    #[serde(default)]
    pub tty: Option<(u16, u16)>,
    /// The directory was created by `Prepare`: start the sandbox in it instead of creating one.
    #[serde(default)]
    pub prepared: bool,
    /// Digest of a stored image: the sandbox's root is an overlay with the image as its
    /// read-only lower layer. `None` for the host root filesystem.
    #[serde(default)]
    pub rootfs_image: Option<String>,
    /// Make the image root read-only (the host root is always read-only).
    #[serde(default)]
    pub rootfs_readonly: bool,
    /// Bridged networking (privileged mode only); `None` is mode `none`: only `lo`.
    #[serde(default)]
    pub network: Option<SpawnNetwork>,
    /// Who the command runs as: `UID[:GID]` or `NAME[:GROUP]` (see `rules::UserSpec`), names
    /// looked up by the helper in the root filesystem's `/etc/passwd` and `/etc/group`; root
    /// when absent.
    #[serde(default)]
    pub user: Option<String>,
}

/// The bridged network of a sandbox: an address the daemon allocated from the helper's subnet,
/// the group whose members share a segment, and the ports to publish on the host's 127.0.0.1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnNetwork {
    /// Sandboxes of one group share a bridge; `None` gives the sandbox a segment of its own.
    pub group: Option<String>,
    pub address: std::net::Ipv4Addr,
    /// Host names of the group's other members, for the sandbox's /etc/hosts.
    #[serde(default)]
    pub peers: Vec<NetworkPeer>,
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPeer {
    pub hostname: String,
    pub address: std::net::Ipv4Addr,
}

/// A published port: connections to `127.0.0.1:host` reach the sandbox's port `sandbox`. In a
/// request `host` 0 means "pick a free one"; in an answer it is the port that was bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    pub sandbox: u16,
    pub host: u16,
}

/// Resource limits of a sandbox, already checked by the daemon against what the host enforces.
/// Largest `pids` limit: the kernel's `PID_MAX_LIMIT` on 64-bit (`pids.max` refuses more).
pub const MAX_PIDS: u64 = 4_194_304;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnLimits {
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in thousandths of a core (500 = half a core).
    pub cpu_millis: Option<u32>,
    pub pids: Option<u64>,
    /// Output cap in bytes (stdout and stderr together).
    pub output_bytes: u64,
    /// Size of the sandbox's own filesystem (upper layer, /work, /tmp); `None` for no cap.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

/// Resource figures of a sandbox; `None` where the host cannot measure one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStats {
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_usec: Option<u64>,
    pub pids: Option<u64>,
    pub pids_peak: Option<u64>,
    pub disk_bytes: Option<u64>,
    pub output_bytes: u64,
    pub output_truncated: bool,
}

/// The helper's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Hello {
        version: u32,
        mode: Mode,
    },
    Info(HelperInfo),
    Spawned(Spawned),
    Destroyed,
    List {
        ids: Vec<Uuid>,
    },
    Stats(SandboxStats),
    ImageImported(ImportedImage),
    ImageDeleted,
    ImageList {
        digests: Vec<String>,
    },
    Error(HelperError),
    Prepared,
    FileReady(FileReady),
    /// The transfer is complete.
    FileDone,
}

/// A stored image, as the helper unpacked it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedImage {
    pub digest: String,
    /// Bytes of regular files in the unpacked root filesystem.
    pub size_bytes: u64,
    /// Entries (files, directories, links) in it.
    pub entries: u64,
    /// `rootfs`, `docker-archive` or `oci-layout`.
    pub format: String,
    pub layers: u32,
    /// Entries left out because they are not allowed in an image (device nodes, sockets).
    pub skipped: u64,
    /// False when the digest was stored already and nothing was unpacked.
    pub unpacked: bool,
    /// The image's configuration (docker-archive and OCI images; empty for a root filesystem
    /// tarball and for images stored before configurations were kept).
    #[serde(default)]
    pub config: ImageConfig,
}

/// What an image's configuration says about running it: the API's own type, checked by the
/// unpacker (environment entries are `NAME=value` with valid names, the working directory is
/// absolute, the user parses as a `rules::UserSpec`, and no string holds a NUL byte).
pub use sandboxd_api::ImageConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The helper runs as root and gives each sandbox its own uid/gid range.
    Privileged,
    /// The helper has only its user's rights; sandboxes map that single uid.
    Rootless,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Privileged => "privileged",
            Mode::Rootless => "rootless",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelperInfo {
    pub mode: Mode,
    pub user_namespaces: bool,
    pub cgroup_version: String,
    pub cgroup_controllers: Vec<String>,
    pub overlayfs: bool,
    pub uid_base: u32,
    pub uid_range_size: u32,
    pub uid_slots: u32,
    /// Limits the helper can enforce on this host (`memory`, `cpus`, `pids`); others get 422.
    pub enforceable_limits: Vec<String>,
    /// Network modes this helper sets up (`none`, and `bridge` in privileged mode).
    #[serde(default)]
    pub network_modes: Vec<String>,
    /// The subnet bridged sandboxes get their addresses from (`10.88.0.0/16`), when bridged.
    #[serde(default)]
    pub network_subnet: Option<String>,
    /// Whether bridged sandboxes can be given egress, or why not.
    #[serde(default)]
    pub egress: crate::egress::EgressStatus,
    /// Why the cgroup limits missing from `enforceable_limits` cannot be enforced, with the fix
    /// (a rootless helper without a delegated cgroup, a controller not available).
    #[serde(default)]
    pub limits_note: Option<String>,
    /// What the host provides for this mode, each missing piece with its fix.
    #[serde(default)]
    pub preflight: Vec<PreflightCheck>,
}

/// One thing a mode needs from the host, as the helper finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightCheck {
    /// A stable name: `user_namespaces`, `apparmor_userns`, `overlayfs_userns`,
    /// `cgroup_limits`, `uid_isolation`, `subordinate_ids`, `newuidmap`, `pasta`.
    pub name: String,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about it, when `ok` is false.
    #[serde(default)]
    pub fix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spawned {
    /// Host pid of the sandbox's init (for display and host-side checks only; never used to signal).
    pub init_pid: i32,
    /// Host uid that root inside the sandbox maps to.
    pub host_uid: u32,
    pub started_at_unix_ms: i64,
    /// Set when the command could not be executed: the sandbox has already ended and its
    /// `status.json` is written.
    pub exec_error: Option<String>,
    /// The published ports as bound (`host` 0 in the request resolved to the port picked).
    #[serde(default)]
    pub ports: Vec<PortMapping>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct HelperError {
    pub code: HelperErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HelperErrorCode {
    /// The request was malformed or failed validation.
    Invalid,
    /// The sandbox exists already or is still running.
    Busy,
    /// The uid slot is still held by a live monitor.
    SlotBusy,
    NotFound,
    /// The kernel refused a step of the setup.
    SetupFailed,
    Internal,
    /// The sandbox's own permissions refuse the file operation.
    Denied,
    /// An image archive is malformed or hostile (an entry escaping the tree, a bomb...).
    BadImage,
    /// An image archive unpacks to more than the configured cap.
    ImageTooLarge,
    /// A published host port is already in use.
    PortInUse,
    /// The spec's `user` names a user or group the root filesystem does not have (or one a
    /// rootless sandbox cannot be).
    UnknownUser,
}

impl HelperError {
    pub fn new(code: HelperErrorCode, message: impl Into<String>) -> Self {
        HelperError {
            code,
            message: message.into(),
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
}

/// Encode a message as one frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Read a frame's length prefix, refusing lengths over [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decode a frame body (without its length prefix).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_rejects_unknown_fields() {
        let req = Request::Destroy { id: Uuid::nil() };
        let frame = encode(&req).unwrap();
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode::<Request>(&frame[4..]).unwrap(), req);
        let bad = br#"{"op":"destroy","id":"00000000-0000-0000-0000-000000000000","path":"/etc"}"#;
        assert!(decode::<Request>(bad).is_err());
    }

    #[test]
    fn a_files_request_round_trips() {
        let spawn = SpawnRequest {
            id: Uuid::nil(),
            uid_slot: Some(1),
            command: vec!["true".into()],
            env: vec![],
            cwd: "/work".into(),
            hostname: "h".into(),
            timeout_secs: None,
            limits: SpawnLimits::default(),
            capabilities: None,
            nested_user_namespaces: false,
            stdin: false,
            tty: None,
            prepared: false,
            rootfs_image: Some("ab".repeat(32)),
            rootfs_readonly: false,
            network: None,
            user: Some("app:staff".into()),
        };
        let req = Request::Files(FilesRequest {
            spawn,
            op: crate::files::FileOp::PutArchive,
            path: "/work".into(),
            mode: None,
        });
        let frame = encode(&req).unwrap();
        assert_eq!(decode::<Request>(&frame[4..]).unwrap(), req);
    }

    #[test]
    fn oversized_frames_are_refused() {
        assert!(frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()).is_err());
    }
}
