//! The results as a plain-text table or as Markdown for BENCHMARKS.md.

use std::fmt::Write as _;
use std::time::Duration;

use crate::stats::Stats;

/// One peer at one concurrency.
#[derive(Debug, Clone)]
pub struct Row {
    pub peer: &'static str,
    pub concurrency: usize,
    /// The numbers, or why there are none (skipped, failed).
    pub outcome: Result<Stats, String>,
}

/// `sandboxd / peer` for one peer at one concurrency.
#[derive(Debug, Clone, PartialEq)]
pub struct Ratio {
    pub peer: &'static str,
    pub concurrency: usize,
    pub p50: f64,
    pub p99: f64,
    pub throughput: f64,
}

/// Ratios of `baseline` (sandboxd) over every other peer that has numbers at the same concurrency.
pub fn ratios(rows: &[Row], baseline: &str) -> Vec<Ratio> {
    let mut out = Vec::new();
    for base in rows.iter().filter(|r| r.peer == baseline) {
        let Ok(b) = &base.outcome else { continue };
        for other in rows
            .iter()
            .filter(|r| r.peer != baseline && r.concurrency == base.concurrency)
        {
            let Ok(o) = &other.outcome else { continue };
            out.push(Ratio {
                peer: other.peer,
                concurrency: base.concurrency,
                p50: b.p50.as_secs_f64() / o.p50.as_secs_f64(),
                p99: b.p99.as_secs_f64() / o.p99.as_secs_f64(),
                throughput: b.throughput / o.throughput,
            });
        }
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn cells(row: &Row) -> [String; 6] {
    let (iterations, p50, p99, throughput) = match &row.outcome {
        Ok(s) => (
            s.iterations.to_string(),
            ms(s.p50),
            ms(s.p99),
            format!("{:.1}/s", s.throughput),
        ),
        Err(why) => (why.clone(), "-".into(), "-".into(), "-".into()),
    };
    [
        row.peer.to_owned(),
        row.concurrency.to_string(),
        iterations,
        p50,
        p99,
        throughput,
    ]
}

fn ratio_cells(r: &Ratio, baseline: &str) -> [String; 5] {
    [
        format!("{baseline}/{}", r.peer),
        r.concurrency.to_string(),
        format!("{:.2}x", r.p50),
        format!("{:.2}x", r.p99),
        format!("{:.2}x", r.throughput),
    ]
}

const HEADERS: [&str; 6] = [
    "peer",
    "concurrency",
    "iterations",
    "p50",
    "p99",
    "throughput",
];
const RATIO_HEADERS: [&str; 5] = ["ratio", "concurrency", "p50", "p99", "throughput"];

/// Aligned plain-text tables: the measurements, then the ratios.
pub fn text(rows: &[Row], baseline: &str) -> String {
    let mut out = aligned(&HEADERS, rows.iter().map(cells).collect());
    let ratios = ratios(rows, baseline);
    if !ratios.is_empty() {
        out.push('\n');
        let body = ratios.iter().map(|r| ratio_cells(r, baseline)).collect();
        out.push_str(&aligned(&RATIO_HEADERS, body));
    }
    out
}

fn aligned<const N: usize>(headers: &[&str; N], rows: Vec<[String; N]>) -> String {
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let headers = headers.map(str::to_owned);
    for row in std::iter::once(&headers).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// The same tables in Markdown.
pub fn markdown(rows: &[Row], baseline: &str) -> String {
    let mut out = md_table(&HEADERS, rows.iter().map(cells).collect());
    let ratios = ratios(rows, baseline);
    if !ratios.is_empty() {
        out.push('\n');
        let body = ratios.iter().map(|r| ratio_cells(r, baseline)).collect();
        out.push_str(&md_table(&RATIO_HEADERS, body));
    }
    out
}

fn md_table<const N: usize>(headers: &[&str; N], rows: Vec<[String; N]>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", headers.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(N));
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(p50_ms: u64, p99_ms: u64, throughput: f64) -> Result<Stats, String> {
        Ok(Stats {
            iterations: 10,
            p50: Duration::from_millis(p50_ms),
            p99: Duration::from_millis(p99_ms),
            throughput,
        })
    }

    fn rows() -> Vec<Row> {
        vec![
            Row {
                peer: "sandboxd",
                concurrency: 1,
                outcome: stats(10, 20, 100.0),
            },
            Row {
                peer: "bwrap",
                concurrency: 1,
                outcome: Err("skipped: not installed".into()),
            },
            Row {
                peer: "fork+exec",
                concurrency: 1,
                outcome: stats(1, 4, 1000.0),
            },
        ]
    }

    #[test]
    fn ratios_skip_peers_without_numbers() {
        assert_eq!(
            ratios(&rows(), "sandboxd"),
            [Ratio {
                peer: "fork+exec",
                concurrency: 1,
                p50: 10.0,
                p99: 5.0,
                throughput: 0.1
            }]
        );
    }

    #[test]
    fn markdown_tables() {
        let expect = "\
| peer | concurrency | iterations | p50 | p99 | throughput |
|---|---|---|---|---|---|
| sandboxd | 1 | 10 | 10.00 ms | 20.00 ms | 100.0/s |
| bwrap | 1 | skipped: not installed | - | - | - |
| fork+exec | 1 | 10 | 1.00 ms | 4.00 ms | 1000.0/s |

| ratio | concurrency | p50 | p99 | throughput |
|---|---|---|---|---|
| sandboxd/fork+exec | 1 | 10.00x | 5.00x | 0.10x |
";
        assert_eq!(markdown(&rows(), "sandboxd"), expect);
    }

    #[test]
    fn text_tables_are_aligned() {
        let text = text(&rows(), "sandboxd");
        let first: Vec<&str> = text.lines().take(2).collect();
        assert_eq!(
            first,
            [
                "peer       concurrency  iterations              p50       p99       throughput",
                "sandboxd   1            10                      10.00 ms  20.00 ms  100.0/s",
            ]
        );
    }
}
