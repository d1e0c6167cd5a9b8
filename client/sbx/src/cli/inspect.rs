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

/// Recent egress denials `inspect` adds (as `recent_egress_denials`) to a sandbox with a policy.
const RECENT_DENIALS: u32 = 10;

pub async fn run(client: &Client, args: InspectArgs) -> Result<u8, CliError> {
    let sandbox = resolve(client, &args.id).await?;
    let mut value = serde_json::to_value(&sandbox).map_err(CliError::Json)?;
    let has_egress = sandbox.network.as_ref().is_some_and(|n| n.egress.is_some());
    if has_egress {
        let denials = client
            .egress_denials(&sandbox.id.to_string(), RECENT_DENIALS)
            .await?;
        if let Some(object) = value.as_object_mut() {
            object.insert(
                "recent_egress_denials".into(),
                serde_json::to_value(denials).map_err(CliError::Json)?,
            );
        }
    }
    match &args.format {
        Some(format) => println_checked(&format.render(&value).map_err(CliError::Usage)?)?,
        None => print_json(&value)?,
    }
    // On stderr as well, so that a failure is seen without reading the JSON (stdout stays the
    // document or the format asked for).
    super::output::note_error(&sandbox);
    Ok(0)
}
