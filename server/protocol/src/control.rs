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
//! Lines longer than [`MAX_LINE`] bytes close the connection.

pub const MAX_LINE: usize = 64;

/// The request for init's namespaces (without its newline).
pub const NAMESPACES: &str = "ns";

/// Signals the monitor agrees to deliver. Not SIGSTOP: it cannot be forwarded and would stop the
/// sandbox's init instead of its command (SIGTSTP, which init forwards, is the way to pause).
pub const ALLOWED_SIGNALS: &[i32] = &[1, 2, 3, 9, 10, 12, 14, 15, 18, 20, 28];

pub fn kill_line(signo: i32) -> String {
    format!("kill {signo}\n")
}

/// Parse a control line (without its newline). Returns the signal number of a valid kill request.
pub fn parse_kill(line: &str) -> Option<i32> {
    let n: i32 = line.strip_prefix("kill ")?.parse().ok()?;
    ALLOWED_SIGNALS.contains(&n).then_some(n)
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
}
