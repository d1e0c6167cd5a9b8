//! `sbx inspect`: one sandbox as pretty JSON.

use clap::Args;
use sandboxd_client::Client;

use super::output::print_json;
use super::{resolve, CliError};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Id, unique id prefix or name of the sandbox.
    id: String,
}

pub async fn run(client: &Client, args: InspectArgs) -> Result<u8, CliError> {
    let sandbox = resolve(client, &args.id).await?;
    print_json(&sandbox)?;
    Ok(0)
}
