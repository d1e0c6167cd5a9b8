//! `sbx info`: what the daemon's host can enforce.

use clap::Args;
use sandboxd_api::Info;
use sandboxd_client::Client;

use super::output::{print_json, println_checked};
use super::CliError;

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: InfoArgs) -> Result<u8, CliError> {
    let info = client.info().await?;
    if args.json {
        print_json(&info)?;
    } else {
        println_checked(&format_info(&info, client.base_url().as_str()))?;
    }
    Ok(0)
}

fn format_info(info: &Info, url: &str) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    let lines = [
        ("daemon", url.to_owned()),
        ("version", info.version.clone()),
        ("mode", info.mode.clone()),
        ("user namespaces", yes_no(info.user_namespaces).to_owned()),
        ("namespaces", list(&info.namespaces)),
        (
            "cgroup",
            format!(
                "{} (controllers: {})",
                info.cgroup.version,
                list(&info.cgroup.controllers)
            ),
        ),
        ("limits", list(&info.limits)),
        ("overlayfs", yes_no(info.overlayfs).to_owned()),
        ("network modes", list(&info.network_modes)),
        (
            "uid ranges",
            format!(
                "base {}, size {}, slots {}",
                info.uid_ranges.base, info.uid_ranges.size, info.uid_ranges.slots
            ),
        ),
        (
            "egress",
            match (&info.egress.available, &info.egress.reason) {
                (true, _) if info.egress.connected => "available".to_owned(),
                (true, _) => "available (the filter is not connected right now)".to_owned(),
                (false, Some(why)) => format!("no: {why}"),
                (false, None) => "no".to_owned(),
            },
        ),
    ];
    lines
        .iter()
        .map(|(key, value)| format!("{:<17}{value}", format!("{key}:")))
        .collect::<Vec<_>>()
        .join("\n")
}
