//! `sbx image`: import, list and remove images.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use sandboxd_client::Client;

use super::output::{print_json, println_checked};
use super::progress::Progress;
use super::CliError;

#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import a root filesystem tarball (plain, gzip, zstd), a docker-archive (`docker save`) or
    /// an OCI image layout archive.
    Import(ImportArgs),
    /// List images.
    Ls(LsArgs),
    /// Remove images (refused while a sandbox uses one).
    Rm(RmArgs),
}

#[derive(Debug, Args)]
struct ImportArgs {
    /// The archive.
    file: PathBuf,
    /// Name of the image.
    #[arg(long)]
    name: String,
    /// Print the image as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct LsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RmArgs {
    /// Names of the images.
    #[arg(required = true)]
    names: Vec<String>,
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub async fn run(client: &Client, args: ImageArgs) -> Result<u8, CliError> {
    match args.command {
        ImageCommand::Import(args) => {
            let total = std::fs::metadata(&args.file).ok().map(|m| m.len());
            let progress = Progress::bytes(&format!("importing {}", args.name), total);
            let imported = client
                .import_image_with_progress(&args.name, &args.file, |n| progress.add(n))
                .await;
            progress.finish();
            let image = imported?;
            if args.json {
                print_json(&image)?;
            } else {
                println_checked(&format!(
                    "{} {} ({}, {} layer(s), {})",
                    image.name,
                    image.digest,
                    image.format,
                    image.layers,
                    human(image.size_bytes)
                ))?;
            }
            Ok(0)
        }
        ImageCommand::Ls(args) => {
            let images = client.images().await?;
            if args.json {
                return print_json(&images).map(|()| 0);
            }
            println_checked(&format!(
                "{:<32} {:<19} {:>10} {:>6}  CREATED",
                "NAME", "DIGEST", "SIZE", "IN USE"
            ))?;
            for i in images {
                let digest: String = i.digest.chars().take(19).collect();
                let created = i
                    .created_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                println_checked(&format!(
                    "{:<32} {:<19} {:>10} {:>6}  {created}",
                    i.name,
                    digest,
                    human(i.size_bytes),
                    i.in_use_by
                ))?;
            }
            Ok(0)
        }
        ImageCommand::Rm(args) => {
            let mut failed = false;
            for name in &args.names {
                match client.delete_image(name).await {
                    Ok(()) => println_checked(name)?,
                    Err(e) => {
                        eprintln!("sbx: {name}: {}", super::client_error(&e));
                        failed = true;
                    }
                }
            }
            Ok(u8::from(failed))
        }
    }
}
