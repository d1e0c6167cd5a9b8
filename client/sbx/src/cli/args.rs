//! Parsers for argument values shared by several verbs (`K=V` pairs, states, streams).

use clap::ValueEnum;
use sandboxd_api::SandboxState;
use sandboxd_client::LogStream;

/// Parses `KEY=VALUE` for `--env`: the key is everything before the first `=`.
pub fn parse_env(arg: &str) -> Result<(String, String), String> {
    let (key, value) = split_pair(arg)?;
    if key.contains('\0') || value.contains('\0') {
        return Err("environment variables cannot contain NUL bytes".into());
    }
    Ok((key, value))
}

/// Reads `--env-file FILE` in Docker's format (see [`parse_env_lines`]), with `KEY` alone taken
/// from sbx's own environment.
pub fn parse_env_file(path: &str) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    parse_env_lines(&text, |key| std::env::var(key).ok()).map_err(|e| format!("{path}: {e}"))
}

/// Docker's env-file format: one `KEY=VALUE` per line (the value taken as written, quotes and
/// spaces included), leading whitespace ignored, blank lines and lines starting with `#`
/// skipped, and `KEY` alone meaning the caller's value of KEY (left out when it has none).
pub fn parse_env_lines(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, String> {
    let mut vars = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once('=') {
            Some((key, value)) => (key, Some(value.to_owned())),
            None => (line.trim_end(), None),
        };
        if key.is_empty() {
            return Err(format!("line {}: empty variable name", n + 1));
        }
        if key.chars().any(char::is_whitespace) {
            return Err(format!(
                "line {}: variable {key:?} contains whitespace",
                n + 1
            ));
        }
        if let Some(value) = value.or_else(|| lookup(key)) {
            let (key, value) =
                parse_env(&format!("{key}={value}")).map_err(|e| format!("line {}: {e}", n + 1))?;
            vars.push((key, value));
        }
    }
    Ok(vars)
}

/// Parses `KEY=VALUE` for `--label`.
pub fn parse_label(arg: &str) -> Result<(String, String), String> {
    split_pair(arg)
}

fn split_pair(arg: &str) -> Result<(String, String), String> {
    let Some((key, value)) = arg.split_once('=') else {
        return Err(format!("expected KEY=VALUE, got {arg:?}"));
    };
    if key.is_empty() {
        return Err(format!("empty key in {arg:?}"));
    }
    if key.trim() != key {
        return Err(format!("key {key:?} has surrounding spaces"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Parses a byte size for `--memory` and `--output-limit`: a number of bytes, or a number
/// (fractions allowed) with `K`, `M`, `G` or `T`, optionally followed by `i` and/or `B`,
/// case-insensitive. All suffixes are binary (`256M` = `256Mi` = 268435456), as `docker run
/// --memory` reads them. The daemon's `--max-memory` etc. parse the same way.
pub fn parse_size(arg: &str) -> Result<u64, String> {
    const KIB: u64 = 1024;
    let t = arg.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let bad = || format!("invalid size {arg:?}: expected bytes or e.g. 256M, 1.5G, 512Ki");
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(bad());
    }
    let unit = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kb" | "kib" => KIB,
        "m" | "mi" | "mb" | "mib" => KIB * KIB,
        "g" | "gi" | "gb" | "gib" => KIB * KIB * KIB,
        "t" | "ti" | "tb" | "tib" => KIB * KIB * KIB * KIB,
        _ => return Err(bad()),
    };
    if let Ok(n) = number.parse::<u64>() {
        return n
            .checked_mul(unit)
            .ok_or_else(|| format!("size {arg:?} is too large"));
    }
    let f: f64 = number.parse().map_err(|_| bad())?;
    let bytes = (f * unit as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size {arg:?} is too large"));
    }
    Ok(bytes as u64)
}

/// Parses a duration for `--since`: seconds, or numbers with `s`, `m`, `h`, `d` run together
/// (`90`, `45s`, `10m`, `1h30m`, `2d`).
pub fn parse_duration(arg: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {arg:?}: expected e.g. 45s, 10m, 1h30m, 2d");
    let t = arg.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<u64>() {
        return Ok(std::time::Duration::from_secs(secs));
    }
    let mut secs: u64 = 0;
    let mut number = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        secs = n
            .checked_mul(unit)
            .and_then(|v| secs.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// Parses `--cpus`: a positive, finite number of cores.
pub fn parse_cpus(arg: &str) -> Result<f64, String> {
    match arg.trim().parse::<f64>() {
        Ok(c) if c.is_finite() && c > 0.0 => Ok(c),
        _ => Err(format!(
            "invalid cpus {arg:?}: expected a positive number of cores such as 0.5 or 2"
        )),
    }
}

/// `--state` of `sbx ls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Created,
    Creating,
    Running,
    Exited,
    Failed,
}

impl From<StateArg> for SandboxState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Created => SandboxState::Created,
            StateArg::Creating => SandboxState::Creating,
            StateArg::Running => SandboxState::Running,
            StateArg::Exited => SandboxState::Exited,
            StateArg::Failed => SandboxState::Failed,
        }
    }
}

/// `--stream` of `sbx logs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StreamArg {
    Stdout,
    Stderr,
}

impl From<StreamArg> for LogStream {
    fn from(stream: StreamArg) -> Self {
        match stream {
            StreamArg::Stdout => LogStream::Stdout,
            StreamArg::Stderr => LogStream::Stderr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(arg: &str, expect: Result<(&str, &str), &str>) {
        let got = parse_env(arg);
        let expect = expect
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .map_err(str::to_owned);
        assert_eq!(got, expect, "{arg:?}");
    }

    #[test]
    fn env_pairs() {
        check("A=1", Ok(("A", "1")));
        check("A=", Ok(("A", "")));
        check("A=b=c", Ok(("A", "b=c")));
        check("PATH=/bin:/usr/bin", Ok(("PATH", "/bin:/usr/bin")));
        check("A", Err("expected KEY=VALUE, got \"A\""));
        check("=x", Err("empty key in \"=x\""));
        check(" A=x", Err("key \" A\" has surrounding spaces"));
        check(
            "A=x\0y",
            Err("environment variables cannot contain NUL bytes"),
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("512Ki"), Ok(512 << 10));
        assert_eq!(parse_size("512kib"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        for bad in ["", "G", "1.2.3M", "-5M", "5X", ".5M", "1e3"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_cpus("0.5"), Ok(0.5));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("inf").is_err());
        assert!(parse_cpus("NaN").is_err());
    }

    #[test]
    fn env_files_read_like_docker() {
        let text = "# a comment\n\nA=1\n  B=two words \nC=\"quoted\"\nFROM_ENV\nUNSET\nD=x=y\n";
        let got = parse_env_lines(text, |k| (k == "FROM_ENV").then(|| "env value".to_owned()));
        let want: Vec<(String, String)> = [
            ("A", "1"),
            ("B", "two words "),
            ("C", "\"quoted\""),
            ("FROM_ENV", "env value"),
            ("D", "x=y"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, Ok(want));
        assert!(parse_env_lines("=x\n", |_| None).is_err());
        assert!(parse_env_lines("A B=x\n", |_| None).is_err());
        assert!(parse_env_file("/nonexistent/env").is_err());
    }

    #[test]
    fn durations() {
        let secs = |s| parse_duration(s).map(|d| d.as_secs());
        assert_eq!(secs("90"), Ok(90));
        assert_eq!(secs("45s"), Ok(45));
        assert_eq!(secs("10m"), Ok(600));
        assert_eq!(secs("1h30m"), Ok(5400));
        assert_eq!(secs("2d"), Ok(172_800));
        for bad in ["", "m", "10x", "1h30", "-5s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn label_pairs() {
        assert_eq!(parse_label("team=core"), Ok(("team".into(), "core".into())));
        assert!(parse_label("team").is_err());
    }
}
