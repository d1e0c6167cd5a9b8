//! `sbx ls` (or `sbx ps`): list sandboxes as a table, as JSON, as ids only (`-q`) or in a
//! `--format` of the caller's.

use clap::Args;
use sandboxd_api::{Sandbox, SandboxList};
use sandboxd_client::{Client, ListQuery};
use time::OffsetDateTime;

use super::args::{parse_label, StateArg};
use super::format::Format;
use super::output::{print_json, println_checked};
use super::CliError;

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only sandboxes in this state.
    #[arg(long, value_enum)]
    state: Option<StateArg>,
    /// Only sandboxes with this label (repeatable; all must match).
    #[arg(short = 'l', long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Page size asked of the daemon.
    #[arg(long)]
    limit: Option<u32>,
    /// Follow `next_cursor` to list every page, not only the first.
    #[arg(short = 'a', long)]
    all_pages: bool,
    /// Print the API's JSON instead of a table.
    #[arg(long, conflicts_with_all = ["quiet", "format"])]
    json: bool,
    /// Print only the sandboxes' ids, one a line.
    #[arg(short, long, conflicts_with = "format")]
    quiet: bool,
    /// One line per sandbox in this format: a field list (`id,name,state`, tab-separated) or a
    /// template (`{{.id}} {{.state}}`). Fields are the keys of `--json`, case-insensitive,
    /// dotted for nested ones (`spec.command`); `\t` and `\n` in a template are a tab and a
    /// newline.
    #[arg(long, value_name = "FORMAT", value_parser = Format::parse)]
    format: Option<Format>,
}

pub async fn run(client: &Client, args: LsArgs) -> Result<u8, CliError> {
    let query = ListQuery {
        state: args.state.map(Into::into),
        labels: args.labels,
        limit: args.limit,
        cursor: None,
    };
    let list = if args.all_pages {
        SandboxList {
            items: client.list_all(&query).await?,
            next_cursor: None,
        }
    } else {
        client.list(&query).await?
    };
    if args.json {
        print_json(&list)?;
    } else if args.quiet {
        for s in &list.items {
            println_checked(&s.id.to_string())?;
        }
    } else if let Some(format) = &args.format {
        for s in &list.items {
            let value = serde_json::to_value(s).map_err(CliError::Json)?;
            println_checked(&format.render(&value).map_err(CliError::Usage)?)?;
        }
    } else {
        println_checked(table(&list.items, OffsetDateTime::now_utc()).trim_end())?;
        if list.next_cursor.is_some() {
            eprintln!("sbx: more sandboxes on further pages; use --all-pages to see them");
        }
    }
    Ok(0)
}

const HEADERS: [&str; 6] = ["ID", "NAME", "STATE", "EXIT", "CREATED", "COMMAND"];
const COMMAND_WIDTH: usize = 40;

/// Formats sandboxes as aligned columns; the last column is not padded.
fn table(sandboxes: &[Sandbox], now: OffsetDateTime) -> String {
    let rows: Vec<[String; 6]> = sandboxes
        .iter()
        .map(|s| {
            [
                s.id.simple().to_string()[..12].to_owned(),
                s.name.clone().unwrap_or_else(|| "-".into()),
                s.state.as_str().to_owned(),
                s.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
                ago(now - s.created_at),
                truncate(&s.spec.command.join(" "), COMMAND_WIDTH),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headers = HEADERS.map(str::to_owned);
    for row in std::iter::once(&headers).chain(&rows) {
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

/// A short human age: `12s ago`, `5m ago`, `3h ago`, `2d ago`.
fn ago(age: time::Duration) -> String {
    let secs = age.whole_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(width - 1).collect();
    short.push('…');
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// Built from JSON so that fields added to the API later do not break the test.
    fn sandbox(id: &str, name: Option<&str>, exit: Option<i32>, command: &[&str]) -> Sandbox {
        serde_json::from_value(serde_json::json!({
            "id": id,
            "name": name,
            "state": if exit.is_some() { "exited" } else { "running" },
            "exit_code": exit,
            "signal": null,
            "reason": null,
            "error": null,
            "hostname": "h",
            "created_at": "2024-01-01T00:00:00Z",
            "started_at": null,
            "finished_at": null,
            "labels": {},
            "spec": { "command": command },
        }))
        .expect("valid sandbox json")
    }

    #[test]
    fn table_is_aligned() {
        let now = datetime!(2024-01-01 00:01:30 UTC);
        let rows = [
            sandbox(
                "0123456789ab4def8123456789abcdef",
                Some("web"),
                None,
                &["sleep", "60"],
            ),
            sandbox(
                "fedcba98-7654-4321-8fed-cba987654321",
                None,
                Some(0),
                &["true"],
            ),
        ];
        let expect = "\
ID             NAME   STATE     EXIT   CREATED   COMMAND
0123456789ab   web    running   -      1m ago    sleep 60
fedcba987654   -      exited    0      1m ago    true
";
        assert_eq!(table(&rows, now), expect);
    }

    #[test]
    fn ages_and_truncation() {
        assert_eq!(ago(time::Duration::seconds(-3)), "0s ago");
        assert_eq!(ago(time::Duration::seconds(59)), "59s ago");
        assert_eq!(ago(time::Duration::seconds(7200)), "2h ago");
        assert_eq!(ago(time::Duration::days(3)), "3d ago");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abcd", 4), "abcd");
    }
}
