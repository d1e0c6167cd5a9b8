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

/// `--state` of `sbx ls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Creating,
    Running,
    Exited,
    Failed,
}

impl From<StateArg> for SandboxState {
    fn from(state: StateArg) -> Self {
        match state {
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
    fn label_pairs() {
        assert_eq!(parse_label("team=core"), Ok(("team".into(), "core".into())));
        assert!(parse_label("team").is_err());
    }
}
