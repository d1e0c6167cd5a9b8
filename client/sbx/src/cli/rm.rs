//! `sbx rm`: remove sandboxes; `-f` also removes running ones (the daemon kills them).

use clap::Args;
use sandboxd_api::SandboxState;
use sandboxd_client::Client;

use super::output::println_checked;
use super::{report, resolve, CliError, EXIT_DAEMON_ERROR};

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Remove sandboxes that are still running.
    #[arg(short, long)]
    force: bool,
    /// Ids, unique id prefixes or names of the sandboxes.
    #[arg(required = true)]
    ids: Vec<String>,
}

/// Removes each sandbox in turn; a failure is reported and the others are still removed.
pub async fn run(client: &Client, args: RmArgs) -> Result<u8, CliError> {
    let mut status = 0;
    for arg in &args.ids {
        match remove(client, arg, args.force).await {
            Ok(()) => println_checked(arg)?,
            Err(e @ CliError::Output(_)) => return Err(e),
            Err(e) => {
                report(&e);
                status = EXIT_DAEMON_ERROR;
            }
        }
    }
    Ok(status)
}

async fn remove(client: &Client, arg: &str, force: bool) -> Result<(), CliError> {
    let sandbox = resolve(client, arg).await?;
    // A created sandbox runs nothing: it is removed like an ended one.
    if !force && !sandbox.state.is_final() && sandbox.state != SandboxState::Created {
        return Err(CliError::StillRunning {
            id: arg.to_owned(),
            state: sandbox.state.as_str(),
        });
    }
    client.delete(&sandbox.id.to_string()).await?;
    Ok(())
}
