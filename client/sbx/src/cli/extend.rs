//! `sbx extend`: move a sandbox's TTL deadline to SECS from now.

use clap::Args;
use sandboxd_client::Client;

use super::output::println_checked;
use super::{resolve, CliError};

#[derive(Debug, Args)]
pub struct ExtendArgs {
    /// Id, unique id prefix or name of the sandbox.
    id: String,
    /// The sandbox is deleted this many seconds from now (unless extended again).
    #[arg(value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    secs: u64,
}

pub async fn run(client: &Client, args: ExtendArgs) -> Result<u8, CliError> {
    let id = resolve(client, &args.id).await?.id.to_string();
    client.extend(&id, args.secs).await?;
    println_checked(&id)?;
    Ok(0)
}
