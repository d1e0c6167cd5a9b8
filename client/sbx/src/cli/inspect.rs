//! `sbx inspect`: one sandbox as pretty JSON, or in a `--format` of the caller's; the `error` of
//! a sandbox that failed (or whose command could not be executed) also goes to stderr.

use clap::Args;
use sandboxd_client::Client;

use super::format::Format;
use super::output::{print_json, println_checked};
use super::{resolve, CliError};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Id, unique id prefix or name of the sandbox.
    id: String,
    /// Print this instead of the JSON: a field list (`id,name,state`, tab-separated) or a
    /// template (`{{.id}} {{.network.ports}}`), as `sbx ls --format` takes it.
    #[arg(short, long, value_name = "FORMAT", value_parser = Format::parse)]
    format: Option<Format>,
}

pub async fn run(client: &Client, args: InspectArgs) -> Result<u8, CliError> {
    let sandbox = resolve(client, &args.id).await?;
    match &args.format {
        Some(format) => {
            let value = serde_json::to_value(&sandbox).map_err(CliError::Json)?;
            println_checked(&format.render(&value).map_err(CliError::Usage)?)?;
        }
        None => print_json(&sandbox)?,
    }
    // On stderr as well, so that a failure is seen without reading the JSON (stdout stays the
    // document or the format asked for).
    super::output::note_error(&sandbox);
    Ok(0)
}
