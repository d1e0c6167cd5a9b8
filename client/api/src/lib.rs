//! The JSON shapes of the sandboxd HTTP API, version 1.
//!
//! This crate is the single place where the public wire format is written down in Rust. The daemon
//! serialises these types and the client library deserialises them; `openapi.yaml` describes the
//! same shapes for everyone else. Request types reject unknown fields so that a misspelt option is a
//! 400 instead of being silently ignored.

pub mod egress;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// Channel byte of standard output in log records and websocket messages.
pub const CHANNEL_STDOUT: u8 = 1;
/// Channel byte of standard error in log records and websocket messages.
pub const CHANNEL_STDERR: u8 = 2;

/// Body of `POST /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The program and its arguments; the program is looked up in `PATH` inside the sandbox.
    /// With an image it replaces the image's `Cmd` (and follows its `Entrypoint`); absent or
    /// empty, the image's `Cmd` is used. Required without an image.
    #[serde(default)]
    pub command: Vec<String>,
    /// Replaces the image's `Entrypoint` (and then its `Cmd` is not used, as with Docker's
    /// `--entrypoint`); `[]` runs `command` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Who the command runs as: `UID`, `UID:GID`, `NAME` or `NAME:GROUP` (ids of the sandbox,
    /// below 65536; names looked up in the image's `/etc/passwd` and `/etc/group`, 422 when
    /// missing). Replaces the image's `User`; root when neither says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox; `/work` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Host name inside the sandbox; derived from the name or the id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Optional unique, human-friendly name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Limits,
    /// Delete the sandbox (and everything it used) this long after it was created, running or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Delete the sandbox this long after it exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_after_exit_secs: Option<u64>,
    /// Changes to the default capability bounding set (Docker's default set; inheritable and
    /// ambient sets are always empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<CapabilityChanges>,
    /// Let the sandbox create user namespaces of its own (refused by its seccomp filter
    /// otherwise). Only where the operator allows it (`--allow-nested-userns`), else 422.
    #[serde(default, skip_serializing_if = "is_false")]
    pub nested_user_namespaces: bool,
    /// Keep the command's stdin open for the attach websocket (otherwise it is /dev/null).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin: bool,
    /// Give the command a terminal (a pty from the sandbox's own devpts) as stdin, stdout and
    /// stderr; its output is then all on channel 1.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    /// Initial terminal size (with `tty`; 80x24 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// Start the command at once (the default). With `false` the sandbox stays `created`, files
    /// can be put in, and `POST /v1/sandboxes/{id}/start` starts it.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub start: bool,
    /// The root filesystem: absent for the host's (read-only), or an image's under a private
    /// copy-on-write layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsSpec>,
    /// The sandbox's network: `{"mode": "none"}` (the default: only `lo`) or
    /// `{"mode": "bridge", "group": "NAME", "ports": [{"sandbox": 8080, "host": 0}]}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
}

impl CreateSandbox {
    /// A request for `command` with every other field at its default (what `{"command": [...]}`
    /// means), to be completed with struct update syntax: `CreateSandbox { tty: true,
    /// ..CreateSandbox::new(cmd) }`.
    pub fn new(command: Vec<String>) -> CreateSandbox {
        CreateSandbox {
            command,
            entrypoint: None,
            user: None,
            env: BTreeMap::new(),
            cwd: None,
            hostname: None,
            name: None,
            labels: BTreeMap::new(),
            limits: Limits::default(),
            ttl_secs: None,
            remove_after_exit_secs: None,
            capabilities: None,
            nested_user_namespaces: false,
            stdin: false,
            tty: false,
            cols: None,
            rows: None,
            start: true,
            rootfs: None,
            network: None,
        }
    }
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// `rootfs` of a create request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsSpec {
    /// Name of an image of the caller's tenant (`POST /v1/images`).
    pub image: String,
    /// Mount the root read-only (changes are refused instead of kept in the upper layer).
    #[serde(default)]
    pub readonly: bool,
}

/// A stored image (`GET /v1/images/{name}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    /// `sha256:` and the hex digest of the imported archive; the same content is stored once.
    pub digest: String,
    /// Bytes of regular files once unpacked.
    pub size_bytes: u64,
    /// Bytes of the archive as uploaded.
    pub archive_bytes: u64,
    /// Files, directories and links in the unpacked image.
    pub entries: u64,
    /// `rootfs`, `docker-archive` or `oci-layout`.
    pub format: String,
    pub layers: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Sandboxes (in any state, until deleted) whose root filesystem is this image.
    pub in_use_by: u64,
    /// What the image's configuration says about running it (empty for a root filesystem
    /// tarball).
    #[serde(default)]
    pub config: ImageConfig,
}

/// The run configuration of an image (the `config` of its Docker or OCI image configuration),
/// applied to every sandbox created from it: `env` under the request's `env`, `working_dir`
/// when the request has no `cwd`, `entrypoint` + `cmd` as the default command, `user` when the
/// request has none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `NAME=value` entries.
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<Image>,
}

/// `network` of a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    #[serde(default)]
    pub mode: NetworkMode,
    /// Sandboxes of one group reach each other (by name, through /etc/hosts); nothing else
    /// does. Without a group the sandbox reaches no other sandbox. Bridge mode only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Ports to publish on the host's 127.0.0.1. Bridge mode only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Destinations outside the group the sandbox may reach (see [`egress`]); none when
    /// absent. Bridge mode only, and only where the daemon offers egress (`GET /v1/info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<egress::EgressPolicy>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// Only a loopback interface of its own.
    #[default]
    None,
    /// A veth on the group's bridge, with an address and a default route.
    Bridge,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Bridge => "bridge",
        }
    }
}

/// A published port: `127.0.0.1:host` on the host reaches `sandbox` in the sandbox. `host` 0
/// (or absent) in a request picks a free port; the sandbox object shows the one picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub sandbox: u16,
    #[serde(default)]
    pub host: u16,
}

/// `network` of a sandbox: what was set up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub mode: NetworkMode,
    pub group: Option<String>,
    /// The sandbox's IPv4 address (bridge mode).
    pub address: Option<String>,
    /// Its default gateway (bridge mode).
    pub gateway: Option<String>,
    /// Published ports as bound on the host's 127.0.0.1.
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    /// The egress policy in force (the one of the request, or of the last
    /// `PATCH /v1/sandboxes/{id}/network`); absent when the sandbox has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<egress::EgressPolicy>,
}

/// Body of `PATCH /v1/sandboxes/{id}/network`: the new egress policy, replacing the old one
/// whole (`{"allow": []}` leaves nothing beyond the group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkUpdate {
    pub egress: egress::EgressPolicy,
}

/// Body of `GET /v1/sandboxes/{id}/network/denials`: the most recent first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressDenialList {
    pub items: Vec<egress::EgressDenial>,
}

/// `egress` of `GET /v1/info`: whether bridged sandboxes can be given an egress policy here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressInfo {
    pub available: bool,
    /// Why not (and what would make it available), when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The daemon is connected to the egress filter right now.
    #[serde(default)]
    pub connected: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `capabilities` of a create request: names like `NET_RAW` or `CAP_NET_RAW`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapabilityChanges {
    /// Capabilities to remove from the default set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
    /// Capabilities to add; only those the operator allows (`--allow-cap`), else 422.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<String>,
}

/// Resource limits of a sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock limit: the sandbox is killed (reason `timeout`) when it runs longer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Memory (cgroup memory limit, tmpfs included); the whole sandbox is killed (reason `oom`)
    /// when it needs more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU time as a number of cores, fractional (`0.5` is half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Most processes and threads alive at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// What the sandbox may write (its upper layer, /work and /tmp together): a filesystem of
    /// this size of its own; writing past it fails with ENOSPC inside. At least 16 MiB. 422 where
    /// the host cannot enforce it (rootless mode, no loop devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// Stored output (stdout and stderr together); the log stops at the cap with a marker and
    /// `output_truncated` becomes true. The daemon's default applies when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Accepted and being set up; lasts milliseconds.
    Creating,
    Running,
    /// The command ended (on its own, killed or timed out); `exit_code` is set.
    Exited,
    /// The sandbox could not be started or was lost; `reason` and `error` say why.
    Failed,
    /// Created with `"start": false`: files can be put in; `POST /start` runs the command.
    Created,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Exited => "exited",
            SandboxState::Failed => "failed",
            SandboxState::Created => "created",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "exited" => SandboxState::Exited,
            "failed" => SandboxState::Failed,
            "created" => SandboxState::Created,
            _ => return None,
        })
    }

    /// True once the sandbox can no longer change state by itself.
    pub fn is_final(self) -> bool {
        matches!(self, SandboxState::Exited | SandboxState::Failed)
    }
}

/// Why a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The command exited (or died of a signal it did not get from the API).
    Exited,
    /// Killed through `POST /kill` or `DELETE`.
    Killed,
    /// `limits.timeout_secs` ran out.
    Timeout,
    /// The command could not be executed (not found, not executable...).
    ExecFailed,
    /// The sandbox needed more memory than `limits.memory_bytes` and was killed as a whole.
    Oom,
    /// `ttl_secs` ran out while it was running.
    Ttl,
    /// Setting up the sandbox failed.
    SpawnFailed,
    /// Its monitor disappeared without recording an exit status (for instance after a host crash).
    Lost,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Exited => "exited",
            EndReason::Killed => "killed",
            EndReason::Timeout => "timeout",
            EndReason::ExecFailed => "exec_failed",
            EndReason::Oom => "oom",
            EndReason::Ttl => "ttl",
            EndReason::SpawnFailed => "spawn_failed",
            EndReason::Lost => "lost",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "exited" => EndReason::Exited,
            "killed" => EndReason::Killed,
            "timeout" => EndReason::Timeout,
            "exec_failed" => EndReason::ExecFailed,
            "oom" => EndReason::Oom,
            "ttl" => EndReason::Ttl,
            "spawn_failed" => EndReason::SpawnFailed,
            "lost" => EndReason::Lost,
            _ => return None,
        })
    }
}

/// A sandbox as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub id: Uuid,
    pub name: Option<String>,
    pub state: SandboxState,
    /// Exit code of the command, `128 + N` when it died of signal N; null until it ends.
    pub exit_code: Option<i32>,
    /// Name of the signal that ended the command (`"SIGKILL"`), if one did.
    pub signal: Option<String>,
    pub reason: Option<EndReason>,
    /// Human-readable detail when the sandbox failed.
    pub error: Option<String>,
    pub hostname: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    pub labels: BTreeMap<String, String>,
    /// The request the sandbox was created from.
    pub spec: CreateSandbox,
    /// True once output was cut at `limits.output_bytes` (the log ends with a marker).
    #[serde(default)]
    pub output_truncated: bool,
    /// Host pid of the sandbox's init while it runs (for host-side inspection only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_pid: Option<i32>,
    /// Host uid that root inside the sandbox maps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_uid: Option<u32>,
    /// The network that was set up (null for sandboxes created before networking existed).
    #[serde(default)]
    pub network: Option<NetworkInfo>,
    /// When the TTL (`ttl_secs`, moved by `extend`) deletes the sandbox; null without one.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// Body of `GET /v1/sandboxes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxList {
    pub items: Vec<Sandbox>,
    /// Pass as `cursor=` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Body of `POST /v1/sandboxes/{id}/kill`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    /// Signal name (`"SIGTERM"`, `"TERM"`) or number; SIGKILL when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

/// The last text message of a log websocket, sent after the last byte of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub reason: Option<EndReason>,
    /// Offset just past the last byte of output (in the combined stdout+stderr stream).
    pub offset: u64,
}

/// Body of `GET /v1/info`: what this host can enforce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    pub version: String,
    /// `"privileged"` (a root helper, one uid range per sandbox) or `"rootless"`.
    pub mode: String,
    pub user_namespaces: bool,
    pub namespaces: Vec<String>,
    pub cgroup: CgroupInfo,
    pub overlayfs: bool,
    pub network_modes: Vec<String>,
    /// Host uids of the sandboxes: in privileged mode each sandbox gets `size` ids from its own slot.
    pub uid_ranges: UidRanges,
    /// Resource limits this host enforces (`memory`, `cpus`, `pids`); others are answered 422.
    #[serde(default)]
    pub limits: Vec<String>,
    /// What the host provides for this mode, each missing piece with its fix (`sbx doctor`).
    #[serde(default)]
    pub preflight: Vec<PreflightCheck>,
    /// Limits a sandbox created without asking does not get, and why (a rootless host without a
    /// delegated cgroup, no loop devices, an operator's `--default-memory 0`...): there, one
    /// sandbox can use that resource of the host's until it runs out.
    #[serde(default)]
    pub unenforced: Vec<UnenforcedLimit>,
    /// Whether `network.egress` can be used, or why not.
    #[serde(default)]
    pub egress: EgressInfo,
}

/// One thing the daemon's mode needs from the host (`GET /v1/info` `preflight`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreflightCheck {
    /// A stable name: `user_namespaces`, `apparmor_userns`, `overlayfs_userns`,
    /// `cgroup_limits`, `uid_isolation`, `subordinate_ids`, `newuidmap`, `pasta`.
    pub name: String,
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about it, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// One entry of `Info::unenforced`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnenforcedLimit {
    /// `memory`, `pids` or `disk`.
    pub limit: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupInfo {
    /// `"v1"`, `"hybrid"`, `"v2"` or `"none"`.
    pub version: String,
    /// Controllers mounted on this host (not yet enforced by sandboxd).
    pub controllers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRanges {
    pub base: u32,
    pub size: u32,
    pub slots: u32,
}

/// The one error shape of the API: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code such as `invalid_request`, `not_found`, `conflict`.
    pub code: ErrorCode,
    pub message: String,
    /// The request's `X-Request-Id` (the client's own, or one the daemon made up), as in the
    /// answer's header and the daemon's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Declares [`ErrorCode`]: each variant with the code it is on the wire.
macro_rules! error_codes {
    ($($(#[$doc:meta])* $variant:ident = $code:literal,)*) => {
        /// Every error code the daemon answers with (the `code` of an [`ErrorBody`]). A code this
        /// version does not know (from a newer daemon) is kept as [`ErrorCode::Other`].
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $variant,)*
            /// A code this version of the API does not know.
            Other(String),
        }

        impl ErrorCode {
            /// Every known code, in declaration order.
            pub const KNOWN: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as it is on the wire (`not_found`).
            pub fn as_str(&self) -> &str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                    ErrorCode::Other(code) => code,
                }
            }

            /// The code for a wire string; never fails (unknown codes are [`ErrorCode::Other`]).
            pub fn parse(code: &str) -> Self {
                match code {
                    $($code => ErrorCode::$variant,)*
                    other => ErrorCode::Other(other.to_owned()),
                }
            }
        }
    };
}

error_codes! {
    /// The request is malformed (a field, a query parameter, a path).
    InvalidRequest = "invalid_request",
    /// No, an unknown, an expired or a revoked token.
    Unauthorized = "unauthorized",
    /// The token may not do this.
    Forbidden = "forbidden",
    /// The `Host` header names another site.
    ForbiddenHost = "forbidden_host",
    /// The `Origin` header names a site that may not use the daemon.
    ForbiddenOrigin = "forbidden_origin",
    NotFound = "not_found",
    MethodNotAllowed = "method_not_allowed",
    Conflict = "conflict",
    /// An admin named a sandbox by a name several tenants use: address it by id.
    AmbiguousName = "ambiguous_name",
    PayloadTooLarge = "payload_too_large",
    UnsupportedMediaType = "unsupported_media_type",
    Unprocessable = "unprocessable",
    RequestTimeout = "request_timeout",
    /// A failure on the daemon's side; the detail is in its log.
    Internal = "internal",
    /// No uid range or sandbox address is free.
    NoCapacity = "no_capacity",
    NotRunning = "not_running",
    NotCreated = "not_created",
    QuotaExceeded = "quota_exceeded",
    MemoryLimitRequired = "memory_limit_required",
    SpawnFailed = "spawn_failed",
    StdinBusy = "stdin_busy",
    NoStdin = "no_stdin",
    ExecFailed = "exec_failed",
    UnknownImage = "unknown_image",
    /// `user` names a user or group the root filesystem does not have.
    UnknownUser = "unknown_user",
    /// Neither the request nor its image says what to run.
    NoCommand = "no_command",
    ImageInUse = "image_in_use",
    ImageExists = "image_exists",
    BadImage = "bad_image",
    ImageTooLarge = "image_too_large",
    NetworkUnavailable = "network_unavailable",
    PortInUse = "port_in_use",
    TooManyTransfers = "too_many_transfers",
    LimitExceeded = "limit_exceeded",
    LimitUnenforceable = "limit_unenforceable",
    CapabilityNotAllowed = "capability_not_allowed",
    NestedUsernsNotAllowed = "nested_userns_not_allowed",
    RateLimited = "rate_limited",
    /// A published host port outside the operator's range (`--publish-ports`).
    PortNotAllowed = "port_not_allowed",
    /// The daemon's state filesystem is down to its free-space reserve (507).
    InsufficientStorage = "insufficient_storage",
    /// `network.egress` on a daemon without egress, or outside bridge mode.
    EgressUnavailable = "egress_unavailable",
    /// The operator does not let this tenant use egress (`--egress-tenants`).
    EgressNotAllowed = "egress_not_allowed",
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(ErrorCode::parse(&code))
    }
}

/// Body of `GET /v1/sandboxes/{id}/stats`: live figures while running, the final ones after exit.
/// A figure the host cannot measure (for instance `pids_peak` on cgroup v1) is null.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub memory_bytes: Option<u64>,
    pub memory_peak_bytes: Option<u64>,
    pub cpu_usec: Option<u64>,
    pub pids: Option<u64>,
    pub pids_peak: Option<u64>,
    /// Bytes the sandbox stored in /work, its image root's upper layer, and a disk-backed /tmp.
    pub disk_bytes: Option<u64>,
    /// Bytes of output stored (at most the output cap).
    pub output_bytes: u64,
    /// True once output was cut at `limits.output_bytes`.
    pub output_truncated: bool,
    /// Egress counters (totals since the policy was first set); null without a policy.
    #[serde(default)]
    pub egress: Option<egress::EgressCounters>,
}

/// Body of `POST /v1/sandboxes/{id}/extend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    /// The new deadline, in seconds from now.
    pub ttl_secs: u64,
}

/// Role of a token: `admin` manages tokens and quotas and sees every tenant; `user` sees only its
/// tenant's sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

/// Body of `POST /v1/tokens` (admin only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub tenant: String,
    pub role: Role,
    /// The token expires this long after its creation; never when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// Answer of `POST /v1/tokens`: the secret (`token`) is shown only here, once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub id: String,
    /// `sbx_` and 64 hex digits; send it as `Authorization: Bearer <token>`.
    pub token: String,
    pub tenant: String,
    pub role: Role,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// A token as listed by `GET /v1/tokens` (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub tenant: String,
    pub role: Role,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// Body of `GET /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    pub items: Vec<TokenInfo>,
}

/// Body of `PUT /v1/tenants/{tenant}/quota` and its answer. A missing or null figure is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Answers only: the tenant the quota belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Live (creating or running) sandboxes at most.
    #[serde(default)]
    pub max_sandboxes: Option<u64>,
    /// Sum of `limits.memory_bytes` over live sandboxes at most.
    #[serde(default)]
    pub max_memory_bytes: Option<u64>,
    /// Image names at most.
    #[serde(default)]
    pub max_images: Option<u64>,
    /// Sum of the images' stored (unpacked) `size_bytes` at most; an import that would cross it
    /// is stopped while it unpacks.
    #[serde(default)]
    pub max_image_bytes: Option<u64>,
}

/// Body of `POST /v1/tickets`: the sandbox (id or name) whose websocket routes the ticket opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTicket {
    pub sandbox: String,
}

/// Answer of `POST /v1/tickets`: a single-use websocket ticket, valid for 30 seconds, to pass as
/// `?ticket=` on a websocket upgrade instead of the `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub ticket: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Channel byte of standard input in attach websocket messages (client to server).
pub const CHANNEL_STDIN: u8 = 0;

/// Body of `POST /v1/sandboxes/{id}/execs`: another process in a running sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateExec {
    /// The program and its arguments, looked up in the `PATH` of the exec's environment.
    pub command: Vec<String>,
    /// Added to (and overriding) the sandbox's own environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory; the sandbox's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Give the process a terminal (a pty from the sandbox's own devpts) as stdin, stdout and
    /// stderr; its output is then all on channel 1.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tty: bool,
    /// Keep stdin open for an attach websocket (otherwise it is `/dev/null`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stdin: bool,
    /// Initial terminal size (with `tty`; 80x24 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
}

/// An exec: a process started in a running sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exec {
    pub id: Uuid,
    pub sandbox_id: Uuid,
    /// `creating`, `running`, `exited` or `failed` (it could not join the sandbox, or was lost).
    pub state: SandboxState,
    /// Exit code, `128 + N` when signal N ended it; null until it ends.
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    /// Why it failed, or why its command could not be executed.
    pub error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// The request the exec was created from.
    pub spec: CreateExec,
}

/// Body of `GET /v1/sandboxes/{id}/execs`, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecList {
    pub items: Vec<Exec>,
}

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalSize {
    pub cols: u16,
    pub rows: u16,
}

/// A text message from the client on an attach websocket: `{"resize": {"cols": C, "rows": R}}`
/// or `{"close_stdin": true}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachControl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<TerminalSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_stdin: Option<bool>,
}

/// The last message of an attach websocket (text): how the process ended and the offset just
/// past its last byte of output (reattach with `?offset=` to resume anywhere before it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub offset: u64,
}

/// One entry of a directory listing (`GET /v1/sandboxes/{id}/files` of a directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    /// `file`, `directory`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Last modification, Unix seconds.
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// A directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileListing {
    pub path: String,
    pub entries: Vec<FileEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `NotFound` -> `not_found`.
    fn snake_case(variant: &str) -> String {
        let mut out = String::new();
        for (i, c) in variant.chars().enumerate() {
            if c.is_ascii_uppercase() {
                if i > 0 {
                    out.push('_');
                }
                out.push(c.to_ascii_lowercase());
            } else {
                out.push(c);
            }
        }
        out
    }

    #[test]
    fn error_codes_are_the_snake_case_of_their_names_and_round_trip() {
        for code in ErrorCode::KNOWN {
            assert_eq!(code.as_str(), snake_case(&format!("{code:?}")));
            let json = serde_json::to_string(code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(&serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
            assert_eq!(&ErrorCode::parse(code.as_str()), code);
        }
        let mut seen = std::collections::HashSet::new();
        assert!(ErrorCode::KNOWN.iter().all(|c| seen.insert(c.as_str())));
    }

    #[test]
    fn an_unknown_code_from_a_newer_daemon_still_deserializes() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"brand_new","message":"m"}}"#).unwrap();
        assert_eq!(body.error.code, ErrorCode::Other("brand_new".into()));
        assert_eq!(
            serde_json::to_value(&body).unwrap()["error"]["code"],
            "brand_new"
        );
        let known: ErrorBody =
            serde_json::from_str(r#"{"error":{"code":"stdin_busy","message":"m"}}"#).unwrap();
        assert_eq!(known.error.code, ErrorCode::StdinBusy);
    }
}
