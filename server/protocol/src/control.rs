//! The control socket of a monitor (`monitor.sock`), a line protocol for the daemon's uid only.
//!
//! * The daemon keeps one connection open per running sandbox and sends nothing on it: the
//!   monitor closes every connection when it exits, after `status.json` is written, so end of file
//!   means "the sandbox has ended and its status and output are complete".
//! * `kill <signo>\n` asks the monitor to deliver a signal to the sandbox's init (which forwards it
//!   to the command; SIGKILL ends the whole sandbox). The monitor answers `ok\n` or `err <message>\n`.
//!
//! * `ns\n`, from the helper's uid only: the monitor answers `ok\n` with two descriptors
//!   (SCM_RIGHTS), init's user and mount namespaces, which a file worker joins to reach the running
//!   sandbox's root; or `err not running\n`.
//!
//! * `exec`, `exec-wait`, `attach`: execs, see [`crate::exec`].
//!
//! Lines longer than [`MAX_LINE`] bytes (an `exec` line: [`crate::exec::MAX_EXEC_LINE`]) close the
//! connection. [`ControlRequest`] is every request, parsed and written in one place.

pub const MAX_LINE: usize = 64;

/// The request for init's namespaces (without its newline).
pub const NAMESPACES: &str = "ns";

/// Signals the monitor agrees to deliver. Not SIGSTOP: it cannot be forwarded and would stop the
/// sandbox's init instead of its command (SIGTSTP, which init forwards, is the way to pause).
pub const ALLOWED_SIGNALS: &[i32] = &[1, 2, 3, 9, 10, 12, 14, 15, 18, 20, 28];

pub fn kill_line(signo: i32) -> String {
    format!("{}\n", ControlRequest::Kill(signo))
}

/// Parse a control line (without its newline). Returns the signal number of a valid kill request.
pub fn parse_kill(line: &str) -> Option<i32> {
    match ControlRequest::parse(line) {
        Ok(ControlRequest::Kill(signo)) => Some(signo),
        _ => None,
    }
}

/// Every request a monitor's control socket accepts, parsed once ([`ControlRequest::parse`]) and
/// written once ([`std::fmt::Display`], without the newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRequest {
    /// `kill <signo>`, one of [`ALLOWED_SIGNALS`].
    Kill(i32),
    /// `ns`: init's user and mount namespaces (for the helper).
    Namespaces,
    /// `exec ...`, `exec-wait ...`, `attach ...`: see [`crate::exec`].
    Exec(crate::exec::ExecCommand),
}

/// Why a control line was refused; the monitor answers `err <this>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("invalid request")]
    Invalid,
    /// A malformed exec line (its message says what is wrong).
    #[error("{0}")]
    Exec(String),
}

impl ControlRequest {
    /// Longest line this request may arrive on (an `exec` line carries JSON).
    pub fn max_line(partial: &[u8]) -> usize {
        if crate::exec::is_long_line(partial) {
            crate::exec::MAX_EXEC_LINE
        } else {
            MAX_LINE
        }
    }

    /// Parse one line, without its newline.
    pub fn parse(line: &str) -> Result<ControlRequest, ControlError> {
        if let Some(parsed) = crate::exec::parse(line) {
            return parsed.map(ControlRequest::Exec).map_err(ControlError::Exec);
        }
        if line == NAMESPACES {
            return Ok(ControlRequest::Namespaces);
        }
        let signo: i32 = line
            .strip_prefix("kill ")
            .and_then(|n| n.parse().ok())
            .ok_or(ControlError::Invalid)?;
        // `parse` accepts "+9" and "09": only the canonical form is a request.
        if !ALLOWED_SIGNALS.contains(&signo) || line != format!("kill {signo}") {
            return Err(ControlError::Invalid);
        }
        Ok(ControlRequest::Kill(signo))
    }
}

impl std::fmt::Display for ControlRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlRequest::Kill(signo) => write!(f, "kill {signo}"),
            ControlRequest::Namespaces => f.write_str(NAMESPACES),
            ControlRequest::Exec(cmd) => write!(f, "{cmd}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_allowed_kill_lines() {
        assert_eq!(parse_kill("kill 9"), Some(9));
        assert_eq!(parse_kill("kill 15"), Some(15));
        assert_eq!(parse_kill("kill 0"), None);
        assert_eq!(parse_kill("kill 19"), None);
        assert_eq!(parse_kill("kill -9"), None);
        assert_eq!(parse_kill("kill 9 "), None);
        assert_eq!(parse_kill("rm -rf"), None);
        assert_eq!(kill_line(9), "kill 9\n");
    }

    #[test]
    fn control_requests_round_trip() {
        use crate::exec::{ExecCommand, ExecRequest};
        let id = uuid::Uuid::new_v4();
        let requests = [
            ControlRequest::Kill(15),
            ControlRequest::Namespaces,
            ControlRequest::Exec(ExecCommand::Wait(id)),
            ControlRequest::Exec(ExecCommand::Attach { id, stdin: false }),
            ControlRequest::Exec(ExecCommand::Start(Box::new(ExecRequest {
                id,
                command: vec!["sh".into(), "-c".into(), "echo 'a\nb'".into()],
                env: vec![("A".into(), "1 2".into())],
                cwd: Some("/tmp".into()),
                tty: false,
                stdin: true,
                cols: 0,
                rows: 0,
            }))),
        ];
        for request in requests {
            let line = request.to_string();
            assert!(!line.contains('\n'), "{line:?}");
            assert_eq!(ControlRequest::parse(&line), Ok(request));
        }
    }

    #[test]
    fn control_requests_keep_the_wire_strings() {
        let id = uuid::Uuid::nil();
        assert_eq!(ControlRequest::Kill(9).to_string(), "kill 9");
        assert_eq!(ControlRequest::Namespaces.to_string(), "ns");
        let wait = ControlRequest::Exec(crate::exec::ExecCommand::Wait(id));
        assert_eq!(format!("{wait}\n"), crate::exec::wait_line(id));
        let attach = ControlRequest::Exec(crate::exec::ExecCommand::Attach { id, stdin: true });
        assert_eq!(format!("{attach}\n"), crate::exec::attach_line(id, true));
    }

    #[test]
    fn malformed_control_requests_are_refused() {
        for bad in [
            "", "kill", "kill 09", "kill +9", "kill 9 ", "kill 19", "ns ", "NS", "rm -rf",
        ] {
            assert_eq!(
                ControlRequest::parse(bad),
                Err(ControlError::Invalid),
                "{bad:?}"
            );
        }
        for bad in ["exec {", "exec-wait x", "attach x 1"] {
            assert!(
                matches!(ControlRequest::parse(bad), Err(ControlError::Exec(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            ControlRequest::max_line(b"exec {"),
            crate::exec::MAX_EXEC_LINE
        );
        assert_eq!(ControlRequest::max_line(b"kill"), MAX_LINE);
    }
}
