//! Copying sandbox output to our own stdout and stderr.

use futures_util::{Stream, StreamExt};
use sandboxd_api::LogEnd;
use sandboxd_client::{Channel, LogEvent, Result as ClientResult};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::CliError;

/// Writes each output event to stdout or stderr by channel (dropping the channel not in `only`)
/// and returns the final `LogEnd`, or `None` if the stream stopped without one.
pub async fn copy_events(
    events: impl Stream<Item = ClientResult<LogEvent>>,
    only: Option<Channel>,
) -> Result<Option<LogEnd>, CliError> {
    let mut events = std::pin::pin!(events);
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(event) = events.next().await {
        match event? {
            LogEvent::Output { channel, data } => {
                if only.is_some_and(|only| only != channel) {
                    continue;
                }
                match channel {
                    Channel::Stdout => write(&mut stdout, &data).await?,
                    Channel::Stderr => write(&mut stderr, &data).await?,
                }
            }
            LogEvent::End(end) => return Ok(Some(end)),
        }
    }
    Ok(None)
}

/// Writes and flushes at once so that output shows up live, line by line or prompt by prompt.
pub async fn write(out: &mut (impl AsyncWrite + Unpin), data: &[u8]) -> Result<(), CliError> {
    out.write_all(data).await.map_err(CliError::Output)?;
    out.flush().await.map_err(CliError::Output)
}

/// Prints a value as pretty JSON followed by a newline.
pub fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value).map_err(CliError::Json)?;
    println_checked(&text)
}

/// `println!` that reports a closed stdout instead of panicking.
pub fn println_checked(text: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(CliError::Output)
}

/// The exit status `sbx` reports for a sandbox exit code (125 when there is none to report).
pub fn exit_status(code: Option<i32>) -> u8 {
    code.and_then(|c| u8::try_from(c).ok())
        .unwrap_or(super::EXIT_DAEMON_ERROR)
}

/// Say on stderr why a sandbox ended badly when the daemon recorded it (`error`: its command
/// could not be executed, or it failed): the exit code alone (127) does not tell.
pub fn note_error(sandbox: &sandboxd_api::Sandbox) {
    if let Some(error) = &sandbox.error {
        eprintln!("sbx: sandbox {}: {error}", sandbox.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(exit_status(Some(0)), 0);
        assert_eq!(exit_status(Some(137)), 137);
        assert_eq!(exit_status(Some(255)), 255);
        assert_eq!(exit_status(Some(256)), 125);
        assert_eq!(exit_status(Some(-1)), 125);
        assert_eq!(exit_status(None), 125);
    }
}
