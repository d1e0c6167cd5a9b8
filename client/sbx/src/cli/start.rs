//! `sbx start`: start a sandbox made by `sbx create`; prints its id (follow it with `sbx logs
//! -f` or `sbx wait`).

use clap::Args;
use sandboxd_api::SandboxState;
use sandboxd_client::Client;

use super::output::println_checked;
use super::{resolve, CliError};

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Id, unique id prefix or name of the sandbox.
    id: String,
}

pub async fn run(client: &Client, args: StartArgs) -> Result<u8, CliError> {
    let id = resolve(client, &args.id).await?.id.to_string();
    let sandbox = client.start(&id).await?;
    if sandbox.state == SandboxState::Failed {
        return Err(CliError::failed(&sandbox));
    }
    println_checked(&id)?;
    Ok(0)
}
