//! `status.json`: how a sandbox ended, written once by its monitor (temp file + rename).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The command's exit code, or `128 + signal` when a signal ended it.
    pub exit_code: i32,
    /// Number of the signal that ended the command, if any.
    pub signal: Option<i32>,
    pub reason: ExitReason,
    pub started_at_unix_ms: i64,
    pub finished_at_unix_ms: i64,
    /// Detail for `exec_failed`.
    pub error: Option<String>,
    /// Final resource figures, read just before the sandbox's cgroup was removed.
    #[serde(default)]
    pub stats: crate::wire::SandboxStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    Exited,
    Killed,
    Timeout,
    ExecFailed,
    /// The memory limit was hit and the sandbox was killed as a whole.
    Oom,
}
