//! `sbx kill`: send a signal to a sandbox.

use clap::Args;
use sandboxd_client::Client;

use super::output::println_checked;
use super::{resolve, CliError};

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Signal name (SIGTERM, TERM) or number; SIGKILL by default.
    #[arg(short, long)]
    signal: Option<String>,
    /// Id, unique id prefix or name of the sandbox.
    id: String,
}

pub async fn run(client: &Client, args: KillArgs) -> Result<u8, CliError> {
    let id = resolve(client, &args.id).await?.id.to_string();
    client.kill(&id, args.signal.as_deref()).await?;
    println_checked(&args.id)?;
    Ok(0)
}
