//! `sbx stats`: a sandbox's resource use (live while it runs, final after it ended).

use clap::Args;
use sandboxd_api::Stats;
use sandboxd_client::Client;

use super::output::{print_json, println_checked};
use super::{resolve, CliError};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Id, unique id prefix or name of the sandbox.
    id: String,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(client: &Client, args: StatsArgs) -> Result<u8, CliError> {
    let id = resolve(client, &args.id).await?.id.to_string();
    let stats = client.stats(&id).await?;
    if args.json {
        print_json(&stats)?;
    } else {
        println_checked(&format_stats(&stats))?;
    }
    Ok(0)
}

/// `1.5 MiB (1572864)`-style sizes; `-` for what the host cannot measure.
fn size(bytes: Option<u64>) -> String {
    let Some(b) = bytes else { return "-".into() };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = b as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn count(n: Option<u64>) -> String {
    n.map_or_else(|| "-".into(), |n| n.to_string())
}

fn format_stats(s: &Stats) -> String {
    let cpu = s
        .cpu_usec
        .map_or_else(|| "-".into(), |u| format!("{:.3}s", u as f64 / 1e6));
    let output = format!(
        "{}{}",
        size(Some(s.output_bytes)),
        if s.output_truncated {
            " (truncated)"
        } else {
            ""
        }
    );
    let mut rows = vec![
        ("memory", size(s.memory_bytes)),
        ("memory peak", size(s.memory_peak_bytes)),
        ("cpu time", cpu),
        ("pids", count(s.pids)),
        ("pids peak", count(s.pids_peak)),
        ("disk", size(s.disk_bytes)),
        ("output", output),
    ];
    if let Some(e) = &s.egress {
        rows.push((
            "egress",
            format!(
                "{} allowed, {} denied, {} out, {} in",
                e.connections_allowed,
                e.connections_denied,
                size(Some(e.bytes_out)),
                size(Some(e.bytes_in))
            ),
        ));
    }
    rows.iter()
        .map(|(k, v)| format!("{:<13}{v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let s = Stats {
            memory_bytes: Some(3 << 20),
            memory_peak_bytes: None,
            cpu_usec: Some(1_500_000),
            pids: Some(2),
            pids_peak: None,
            disk_bytes: Some(512),
            output_bytes: 10,
            output_truncated: true,
            egress: None,
        };
        assert_eq!(
            format_stats(&s),
            "memory:      3.0 MiB\nmemory peak: -\ncpu time:    1.500s\npids:        2\n\
             pids peak:   -\ndisk:        512 B\noutput:      10 B (truncated)"
        );
        let e = Stats {
            egress: Some(sandboxd_api::egress::EgressCounters {
                connections_allowed: 3,
                connections_denied: 1,
                bytes_out: 2048,
                bytes_in: 10,
            }),
            ..s
        };
        assert!(
            format_stats(&e).ends_with("\negress:      3 allowed, 1 denied, 2.0 KiB out, 10 B in")
        );
    }
}
