//! `sbx logs`: a sandbox's output so far, or followed live with `-f`; `--tail N` starts N lines
//! from the end, `--since` keeps what is certainly newer than a moment.
//!
//! The log stores output without timestamps, so `--since` can only judge by when the sandbox
//! started and ended: it prints everything of a sandbox started after the moment, nothing of one
//! that ended before it, and refuses the rest (there is no honest way to cut inside the log);
//! for the same reason there is no `--timestamps`.

use std::collections::VecDeque;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use sandboxd_api::Sandbox;
use sandboxd_client::{Channel, Client, LogStream};
use time::OffsetDateTime;
use tokio::io::AsyncWrite;

use super::args::{parse_duration, StreamArg};
use super::output::{copy_events, write};
use super::{resolve, CliError};

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep streaming until the sandbox ends.
    #[arg(short, long)]
    follow: bool,
    /// Only this stream (both by default, each to our own stdout or stderr).
    #[arg(long, value_enum)]
    stream: Option<StreamArg>,
    /// Start N lines from the end of the output (lines of stdout and stderr together, in the
    /// order they were written); with -f, then go on live.
    #[arg(short = 'n', long, value_name = "N")]
    tail: Option<u64>,
    /// Only output newer than DURATION ago (45s, 10m, 1h30m, 2d). The log has no timestamps per
    /// line: this prints all of a sandbox that started since, nothing of one that ended before,
    /// and is an error for one that was running across that moment.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    since: Option<Duration>,
    /// Id, unique id prefix or name of the sandbox.
    id: String,
}

pub async fn run(client: &Client, args: LogsArgs) -> Result<u8, CliError> {
    let sandbox = resolve(client, &args.id).await?;
    let id = sandbox.id.to_string();
    if let Some(since) = args.since {
        if !since_covers(&sandbox, since, OffsetDateTime::now_utc())? {
            return Ok(0);
        }
    }
    let offset = match args.tail {
        Some(lines) => tail_offset(client, &id, lines).await?,
        None => 0,
    };
    let only = args.stream.map(|s| match s {
        StreamArg::Stdout => Channel::Stdout,
        StreamArg::Stderr => Channel::Stderr,
    });
    // The websocket keeps stdout and stderr apart and in order, and for a sandbox that has ended
    // it simply stops; plain HTTP is used only to dump a running sandbox's output so far.
    if args.follow || sandbox.state.is_final() {
        copy_events(client.follow_logs(&id, offset), only).await?;
        return Ok(0);
    }
    match args.stream {
        Some(stream) => dump(client, &id, stream.into(), offset).await?,
        None => {
            dump(client, &id, LogStream::Stdout, offset).await?;
            dump(client, &id, LogStream::Stderr, offset).await?;
        }
    }
    Ok(0)
}

/// Whether all of the sandbox's output is newer than `since` ago (`true`) or none is
/// (`false`); an error when the log cannot tell.
fn since_covers(sandbox: &Sandbox, since: Duration, now: OffsetDateTime) -> Result<bool, CliError> {
    let cutoff = now - since;
    match (sandbox.started_at, sandbox.finished_at) {
        (None, _) => Ok(true),
        (Some(started), _) if started >= cutoff => Ok(true),
        (_, Some(finished)) if finished < cutoff => Ok(false),
        (Some(_), _) => Err(CliError::Usage(format!(
            "--since: sandbox {} was running {}s ago and its log has no timestamps per line, so \
             sbx cannot tell which output is newer; use --tail N instead",
            sandbox.id,
            since.as_secs()
        ))),
    }
}

/// The offset (in the combined output) where the last `lines` lines start, found by reading the
/// output so far once.
async fn tail_offset(client: &Client, id: &str, lines: u64) -> Result<u64, CliError> {
    let mut finder = TailFinder::new(lines);
    let mut body = std::pin::pin!(client.logs(id, None, 0, false).await?);
    while let Some(chunk) = body.next().await {
        finder.feed(&chunk?);
    }
    Ok(finder.start())
}

/// Finds where the last N lines of a byte stream start, keeping only N+1 newline positions.
#[derive(Debug)]
struct TailFinder {
    lines: u64,
    newlines: VecDeque<u64>,
    length: u64,
    last: Option<u8>,
}

impl TailFinder {
    fn new(lines: u64) -> Self {
        TailFinder {
            lines,
            newlines: VecDeque::new(),
            length: 0,
            last: None,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        let keep = usize::try_from(self.lines.saturating_add(1)).unwrap_or(usize::MAX);
        for (i, b) in data.iter().enumerate() {
            if *b == b'\n' {
                if self.newlines.len() == keep {
                    self.newlines.pop_front();
                }
                self.newlines.push_back(self.length + i as u64);
            }
        }
        self.length += data.len() as u64;
        if let Some(b) = data.last() {
            self.last = Some(*b);
        }
    }

    /// Just after the newline that ends the line before the last N (0 when there are fewer).
    fn start(&self) -> u64 {
        if self.lines == 0 {
            return self.length;
        }
        // A last line without its newline counts as a line.
        let before = if self.last == Some(b'\n') {
            self.lines + 1
        } else {
            self.lines
        };
        let count = self.newlines.len() as u64;
        if count < before {
            return 0;
        }
        let index = usize::try_from(count - before).unwrap_or(0);
        self.newlines.get(index).map_or(0, |p| p + 1)
    }
}

/// Copies one stream's output from `offset` on to our stream of the same name.
async fn dump(client: &Client, id: &str, stream: LogStream, offset: u64) -> Result<(), CliError> {
    match stream {
        LogStream::Stdout => copy_raw(client, id, stream, offset, &mut tokio::io::stdout()).await,
        LogStream::Stderr => copy_raw(client, id, stream, offset, &mut tokio::io::stderr()).await,
    }
}

async fn copy_raw(
    client: &Client,
    id: &str,
    stream: LogStream,
    offset: u64,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<(), CliError> {
    let mut body = std::pin::pin!(client.logs(id, Some(stream), offset, false).await?);
    while let Some(chunk) = body.next().await {
        write(out, &chunk?).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(lines: u64, pieces: &[&str]) -> u64 {
        let mut f = TailFinder::new(lines);
        for p in pieces {
            f.feed(p.as_bytes());
        }
        f.start()
    }

    #[test]
    fn tail_starts_n_lines_from_the_end() {
        assert_eq!(start(2, &["a\nb\nc\n"]), 2);
        assert_eq!(start(2, &["a\nb", "\nc\n"]), 2);
        assert_eq!(start(1, &["a\nb\nc"]), 4);
        assert_eq!(start(3, &["a\nb\nc\n"]), 0);
        assert_eq!(start(10, &["a\nb\n"]), 0);
        assert_eq!(start(0, &["a\nb\n"]), 4);
        assert_eq!(start(2, &[]), 0);
        assert_eq!(start(1, &["\n\n"]), 1);
    }

    fn sandbox(started: Option<OffsetDateTime>, finished: Option<OffsetDateTime>) -> Sandbox {
        let fmt = |t: Option<OffsetDateTime>| {
            t.map(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .expect("formats")
            })
        };
        serde_json::from_value(serde_json::json!({
            "id": "0123456789ab4def8123456789abcdef", "name": null, "state": "running",
            "exit_code": null, "signal": null, "reason": null, "error": null, "hostname": "h",
            "created_at": "2024-01-01T00:00:00Z", "started_at": fmt(started),
            "finished_at": fmt(finished), "labels": {}, "spec": { "command": ["true"] },
        }))
        .expect("valid sandbox json")
    }

    #[test]
    fn since_judges_by_start_and_end() {
        let now = time::macros::datetime!(2024-01-01 01:00:00 UTC);
        let min = |m: i64| Some(now - time::Duration::minutes(m));
        let ten = Duration::from_secs(600);
        assert!(since_covers(&sandbox(min(5), None), ten, now).unwrap());
        assert!(!since_covers(&sandbox(min(30), min(20)), ten, now).unwrap());
        assert!(since_covers(&sandbox(None, None), ten, now).unwrap());
        assert!(since_covers(&sandbox(min(30), None), ten, now).is_err());
        assert!(since_covers(&sandbox(min(30), min(5)), ten, now).is_err());
    }
}
