//! Execs: extra processes started in a running sandbox, and the monitor-socket requests that
//! start, watch and attach to them (an extension of [`crate::control`]).
//!
//! Lines (on a fresh connection to `monitor.sock`, daemon's uid only):
//!
//! * `exec <ExecRequest as JSON>\n`: the monitor starts the process and answers once it has been
//!   executed (or failed to be): `ok <ExecStarted as JSON>\n` or `err <message>\n`
//!   (`err not running` when the sandbox has ended).
//! * `exec-wait <exec id>\n`: answered `ended\n` once the exec has ended and its `status.json` is
//!   written (at once if it already was), or `err <message>\n` for an unknown exec. The monitor
//!   closes every connection when it exits, which means the same.
//! * `attach <exec id> <0|1>\n`: with `1`, ask to own the exec's stdin (one owner at a time; the
//!   answer is `err stdin_busy` while another connection owns it). Answered `ok\n`, after which the
//!   connection carries [`Frame`]s from the daemon to the monitor; the monitor sends nothing more
//!   and closes the connection when the exec has ended. Closing it releases stdin but never ends
//!   the process. Output is not sent here: it is in the exec's `output.log`, read like a
//!   sandbox's, so a reader resumes from any offset.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The directory of a sandbox that holds one directory per exec.
pub const EXECS_DIR: &str = "execs";
/// Longest `exec` line (the JSON holds the command and the environment).
pub const MAX_EXEC_LINE: usize = 600 * 1024;
/// Largest payload of one [`Frame`].
pub const MAX_FRAME: usize = 64 * 1024;
/// Answer to `attach` when another connection owns stdin.
pub const STDIN_BUSY: &str = "stdin_busy";
/// Answer to `exec` when the sandbox's init has exited.
pub const NOT_RUNNING: &str = "not running";
/// Most execs one sandbox may have running at once.
pub const MAX_RUNNING_EXECS: usize = 64;

/// What the daemon asks a monitor to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub id: Uuid,
    pub command: Vec<String>,
    /// Added to (and overriding) the sandbox's own environment.
    pub env: Vec<(String, String)>,
    /// `None`: the sandbox's working directory.
    pub cwd: Option<String>,
    /// A pseudo-terminal from the sandbox's devpts as stdin, stdout and stderr.
    pub tty: bool,
    /// Keep stdin open for attach connections (otherwise the sandbox's /dev/null).
    pub stdin: bool,
    /// The terminal's initial size (with `tty`).
    pub cols: u16,
    pub rows: u16,
}

/// The monitor's answer to a successful `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStarted {
    pub started_at_unix_ms: i64,
    /// Set when the command could not be executed: the exec ends at once (exit code 126/127).
    pub exec_error: Option<String>,
}

/// `execs/<id>/status.json`, written once by the monitor (temp file + rename) when the exec ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStatus {
    /// Exit code, or `128 + signal` when a signal ended it; `None` when it never ran.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub started_at_unix_ms: Option<i64>,
    pub finished_at_unix_ms: i64,
    /// Why the command could not be executed (`exec_error`) or the process not set up.
    pub error: Option<String>,
    /// True when the process was never started (joining the sandbox failed).
    #[serde(default)]
    pub setup_failed: bool,
}

pub fn exec_line(req: &ExecRequest) -> String {
    format!("{}\n", ExecCommand::Start(Box::new(req.clone())))
}

pub fn wait_line(id: Uuid) -> String {
    format!("{}\n", ExecCommand::Wait(id))
}

pub fn attach_line(id: Uuid, stdin: bool) -> String {
    format!("{}\n", ExecCommand::Attach { id, stdin })
}

impl std::fmt::Display for ExecCommand {
    /// The line without its newline (the inverse of [`parse`]).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // serde_json never writes a raw newline: strings escape it.
            ExecCommand::Start(req) => write!(
                f,
                "exec {}",
                serde_json::to_string(req).unwrap_or_else(|_| "{}".into())
            ),
            ExecCommand::Wait(id) => write!(f, "exec-wait {id}"),
            ExecCommand::Attach { id, stdin } => write!(f, "attach {id} {}", u8::from(*stdin)),
        }
    }
}

/// A parsed exec request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecCommand {
    Start(Box<ExecRequest>),
    Wait(Uuid),
    Attach { id: Uuid, stdin: bool },
}

/// Whether a (partial) line is an exec line and so may be as long as [`MAX_EXEC_LINE`].
pub fn is_long_line(buf: &[u8]) -> bool {
    buf.starts_with(b"exec ")
}

/// Parse a control line (without its newline); `None` when it is not an exec line.
pub fn parse(line: &str) -> Option<Result<ExecCommand, String>> {
    if let Some(json) = line.strip_prefix("exec ") {
        return Some(
            serde_json::from_str(json)
                .map(|r| ExecCommand::Start(Box::new(r)))
                .map_err(|e| format!("invalid exec request: {e}")),
        );
    }
    if let Some(id) = line.strip_prefix("exec-wait ") {
        return Some(
            Uuid::parse_str(id)
                .map(ExecCommand::Wait)
                .map_err(|_| "invalid exec id".into()),
        );
    }
    if let Some(rest) = line.strip_prefix("attach ") {
        let parsed = rest.split_once(' ').and_then(|(id, stdin)| {
            let id = Uuid::parse_str(id).ok()?;
            let stdin = match stdin {
                "0" => false,
                "1" => true,
                _ => return None,
            };
            Some(ExecCommand::Attach { id, stdin })
        });
        return Some(parsed.ok_or_else(|| "invalid attach request".into()));
    }
    None
}

/// What the daemon sends on an attached connection: `[kind][len: u32 LE][payload]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Bytes for the process's stdin.
    Stdin(Vec<u8>),
    /// New terminal size (ignored without a terminal).
    Resize { cols: u16, rows: u16 },
    /// Close stdin (for a terminal: send its end-of-file character).
    CloseStdin,
}

const KIND_STDIN: u8 = 0;
const KIND_RESIZE: u8 = 1;
const KIND_CLOSE: u8 = 2;
const HEADER: usize = 5;

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let (kind, payload): (u8, Vec<u8>) = match self {
            Frame::Stdin(data) => (KIND_STDIN, data.clone()),
            Frame::Resize { cols, rows } => {
                let mut p = cols.to_le_bytes().to_vec();
                p.extend_from_slice(&rows.to_le_bytes());
                (KIND_RESIZE, p)
            }
            Frame::CloseStdin => (KIND_CLOSE, Vec::new()),
        };
        let mut out = Vec::with_capacity(HEADER + payload.len());
        out.push(kind);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Take one frame off the front of `buf`: `Ok(None)` when it is incomplete, `Err` when it is
    /// malformed (unknown kind, oversized, bad resize payload).
    pub fn decode(buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let kind = buf[0];
        let len = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(format!("frame of {len} bytes is too large"));
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        let payload: Vec<u8> = buf.drain(..HEADER + len).skip(HEADER).collect();
        match kind {
            KIND_STDIN => Ok(Some(Frame::Stdin(payload))),
            KIND_RESIZE if payload.len() == 4 => Ok(Some(Frame::Resize {
                cols: u16::from_le_bytes([payload[0], payload[1]]),
                rows: u16::from_le_bytes([payload[2], payload[3]]),
            })),
            KIND_CLOSE if payload.is_empty() => Ok(Some(Frame::CloseStdin)),
            _ => Err(format!("malformed frame of kind {kind}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_reject_garbage() {
        let frames = [
            Frame::Stdin(b"hello\n".to_vec()),
            Frame::Resize { cols: 80, rows: 24 },
            Frame::CloseStdin,
            Frame::Stdin(Vec::new()),
        ];
        let mut buf: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        // Byte by byte: incomplete frames wait for more.
        let mut fed = Vec::new();
        let mut got = Vec::new();
        for b in buf.drain(..) {
            fed.push(b);
            while let Some(f) = Frame::decode(&mut fed).expect("valid") {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert!(Frame::decode(&mut vec![9, 0, 0, 0, 0]).is_err());
        assert!(Frame::decode(&mut vec![1, 1, 0, 0, 0, 0]).is_err());
        let mut huge = vec![0u8];
        huge.extend_from_slice(&(MAX_FRAME as u32 + 1).to_le_bytes());
        assert!(Frame::decode(&mut huge).is_err());
    }

    #[test]
    fn parses_exec_lines() {
        let id = Uuid::new_v4();
        let req = ExecRequest {
            id,
            command: vec!["sh".into(), "-c".into(), "echo a\nb".into()],
            env: vec![("A".into(), "1".into())],
            cwd: None,
            tty: true,
            stdin: true,
            cols: 80,
            rows: 24,
        };
        let line = exec_line(&req);
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(
            parse(line.trim_end_matches('\n')),
            Some(Ok(ExecCommand::Start(Box::new(req))))
        );
        assert_eq!(
            parse(wait_line(id).trim_end()),
            Some(Ok(ExecCommand::Wait(id)))
        );
        assert_eq!(
            parse(attach_line(id, true).trim_end()),
            Some(Ok(ExecCommand::Attach { id, stdin: true }))
        );
        assert!(matches!(parse("attach x 1"), Some(Err(_))));
        assert!(matches!(parse(&format!("attach {id} 2")), Some(Err(_))));
        assert!(matches!(parse("exec {"), Some(Err(_))));
        assert_eq!(parse("kill 9"), None);
        assert!(is_long_line(b"exec {"));
        assert!(!is_long_line(b"kill 9"));
    }
}
