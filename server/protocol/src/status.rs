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

/// One line on the status pipe from a sandbox's init or an exec's shim to the monitor (private
/// to the helper's processes, but a format all the same: parsed in one place, written in one).
///
/// `started`, `exec_failed <message>`, `setup_failed <message>`, `exit <code>`, `signal <signo>`,
/// each ended by a newline. The message of a failure is one line: newlines become spaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusLine {
    /// The command was executed.
    Started,
    /// The command could not be executed (the process exits 126 or 127).
    ExecFailed(String),
    /// Setting the process up failed before its command could be started.
    SetupFailed(String),
    /// The command exited with this code.
    Exit(i32),
    /// A signal ended the command.
    Signal(i32),
}

/// Why a status line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusLineError {
    #[error("unknown status line {0:?}")]
    Unknown(String),
    #[error("invalid number in status line {0:?}")]
    Number(String),
}

impl StatusLine {
    /// Longest line a reader must accept: past it, the writer is not one of ours.
    pub const MAX_LEN: usize = 64 * 1024;

    /// Parse one line, without its newline.
    pub fn parse(line: &str) -> Result<StatusLine, StatusLineError> {
        let (word, rest) = match line.split_once(' ') {
            Some((word, rest)) => (word, Some(rest)),
            None => (line, None),
        };
        let number = || {
            rest.and_then(|r| r.parse::<i32>().ok())
                .ok_or_else(|| StatusLineError::Number(line.to_owned()))
        };
        match (word, rest) {
            ("started", None) => Ok(StatusLine::Started),
            ("exec_failed", Some(m)) => Ok(StatusLine::ExecFailed(m.to_owned())),
            ("setup_failed", Some(m)) => Ok(StatusLine::SetupFailed(m.to_owned())),
            ("exit", _) => number().map(StatusLine::Exit),
            ("signal", _) => number().map(StatusLine::Signal),
            _ => Err(StatusLineError::Unknown(line.to_owned())),
        }
    }
}

impl std::fmt::Display for StatusLine {
    /// The line without its newline (messages are kept on one line).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let one_line = |m: &str| m.replace(['\n', '\r'], " ");
        match self {
            StatusLine::Started => f.write_str("started"),
            StatusLine::ExecFailed(m) => write!(f, "exec_failed {}", one_line(m)),
            StatusLine::SetupFailed(m) => write!(f, "setup_failed {}", one_line(m)),
            StatusLine::Exit(code) => write!(f, "exit {code}"),
            StatusLine::Signal(signo) => write!(f, "signal {signo}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_round_trip() {
        let lines = [
            StatusLine::Started,
            StatusLine::ExecFailed("/bin/nope: No such file or directory".into()),
            StatusLine::SetupFailed("mounting /proc: EPERM".into()),
            StatusLine::Exit(0),
            StatusLine::Exit(255),
            StatusLine::Signal(9),
        ];
        for line in lines {
            let text = line.to_string();
            assert!(!text.contains('\n'), "{text:?}");
            assert_eq!(StatusLine::parse(&text), Ok(line));
        }
    }

    #[test]
    fn status_lines_are_exactly_the_wire_strings() {
        assert_eq!(StatusLine::Started.to_string(), "started");
        assert_eq!(StatusLine::Exit(3).to_string(), "exit 3");
        assert_eq!(StatusLine::Signal(15).to_string(), "signal 15");
        assert_eq!(
            StatusLine::ExecFailed("sh: Permission denied".into()).to_string(),
            "exec_failed sh: Permission denied"
        );
        assert_eq!(
            StatusLine::SetupFailed("a\nb".into()).to_string(),
            "setup_failed a b"
        );
    }

    #[test]
    fn malformed_status_lines_are_refused() {
        for bad in [
            "",
            "start",
            "started now",
            "exit",
            "exit x",
            "exit 1 2",
            "signal",
            "signal -",
            "exec_failed",
            "EXIT 1",
            "kill 9",
        ] {
            assert!(StatusLine::parse(bad).is_err(), "{bad:?}");
        }
    }
}
