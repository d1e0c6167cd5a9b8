//! `sbx logs`: a sandbox's output so far, or followed live with `-f`.

use clap::Args;
use futures_util::StreamExt;
use sandboxd_client::{Channel, Client, LogStream};
use tokio::io::AsyncWrite;

use super::args::StreamArg;
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
    /// Id, unique id prefix or name of the sandbox.
    id: String,
}

pub async fn run(client: &Client, args: LogsArgs) -> Result<u8, CliError> {
    let sandbox = resolve(client, &args.id).await?;
    let id = sandbox.id.to_string();
    let only = args.stream.map(|s| match s {
        StreamArg::Stdout => Channel::Stdout,
        StreamArg::Stderr => Channel::Stderr,
    });
    // The websocket keeps stdout and stderr apart and in order, and for a sandbox that has ended
    // it simply stops; plain HTTP is used only to dump a running sandbox's output so far.
    if args.follow || sandbox.state.is_final() {
        copy_events(client.follow_logs(&id, 0), only).await?;
        return Ok(0);
    }
    match args.stream {
        Some(stream) => dump(client, &id, stream.into()).await?,
        None => {
            dump(client, &id, LogStream::Stdout).await?;
            dump(client, &id, LogStream::Stderr).await?;
        }
    }
    Ok(0)
}

/// Copies one stream's output so far to our stream of the same name.
async fn dump(client: &Client, id: &str, stream: LogStream) -> Result<(), CliError> {
    match stream {
        LogStream::Stdout => copy_raw(client, id, stream, &mut tokio::io::stdout()).await,
        LogStream::Stderr => copy_raw(client, id, stream, &mut tokio::io::stderr()).await,
    }
}

async fn copy_raw(
    client: &Client,
    id: &str,
    stream: LogStream,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<(), CliError> {
    let mut body = std::pin::pin!(client.logs(id, Some(stream), 0, false).await?);
    while let Some(chunk) = body.next().await {
        write(out, &chunk?).await?;
    }
    Ok(())
}
