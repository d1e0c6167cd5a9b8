//! `sbx wait`: block until a sandbox ends, print its exit code and exit with it.

use clap::Args;
use sandboxd_api::SandboxState;
use sandboxd_client::Client;

use super::output::{exit_status, println_checked};
use super::{resolve, CliError};

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Id, unique id prefix or name of the sandbox.
    id: String,
}

pub async fn run(client: &Client, args: WaitArgs) -> Result<u8, CliError> {
    let id = resolve(client, &args.id).await?.id.to_string();
    let sandbox = client.wait(&id).await?;
    if sandbox.state == SandboxState::Failed {
        return Err(CliError::failed(&sandbox));
    }
    super::output::note_error(&sandbox);
    let code = sandbox
        .exit_code
        .map_or_else(|| "-".into(), |c| c.to_string());
    println_checked(&code)?;
    Ok(exit_status(sandbox.exit_code))
}
