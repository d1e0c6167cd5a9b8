//! `sbx create`: create a sandbox without starting it (state `created`) and print its id; put
//! files in with `sbx cp`, then `sbx start`.

use clap::Args;
use sandboxd_client::Client;

use super::output::println_checked;
use super::run::RunArgs;
use super::CliError;

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The options of `sbx run` (`--rm` and `--detach` do not apply).
    #[command(flatten)]
    run: RunArgs,
}

pub async fn run(client: &Client, args: CreateArgs) -> Result<u8, CliError> {
    if args.run.rm || args.run.detach {
        return Err(CliError::Usage(
            "--rm and --detach apply to `sbx run`, not to `sbx create`".into(),
        ));
    }
    let mut spec = args.run.spec();
    spec.start = false;
    let sandbox = client.create(&spec).await?;
    println_checked(&sandbox.id.to_string())?;
    Ok(0)
}
