//! The `sbx` command line: argument definitions, dispatch to one module per verb, and the shared
//! pieces (errors, id resolution, copying output).

mod args;
mod completion;
mod cp;
mod create;
mod doctor;
mod exec;
mod extend;
mod format;
mod image;
mod info;
mod inspect;
mod kill;
mod logs;
mod ls;
mod network;
mod output;
mod progress;
mod rm;
mod run;
mod start;
mod stats;
mod token;
mod wait;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use sandboxd_api::Sandbox;
use sandboxd_client::{Client, ClientError, ListQuery, DEFAULT_URL};

/// Exit status for errors of the daemon, the API or sbx itself (as `docker run` uses it).
pub const EXIT_DAEMON_ERROR: u8 = 125;

/// Exit status when stdout or stderr was closed under us (as if killed by SIGPIPE).
const EXIT_BROKEN_PIPE: u8 = 141;

/// Command line of sandboxd.
#[derive(Debug, Parser)]
#[command(
    name = "sbx",
    version,
    about = "Run and manage sandboxes of a sandboxd daemon"
)]
pub struct Cli {
    /// Base URL of the daemon. Without it sbx uses the local unix socket `<state-dir>/api.sock`
    /// when it exists, else http://127.0.0.1:4280.
    #[arg(long, global = true, env = "SANDBOXD_URL")]
    url: Option<String>,

    /// API token (sent as a bearer token). Without it sbx uses the local unix socket, which needs
    /// none; it never sends `<state-dir>/admin.token` to a --url.
    #[arg(long, global = true, env = "SANDBOXD_TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// The daemon's state directory (default /var/lib/sandboxd as root, else
    /// $XDG_STATE_HOME/sandboxd or ~/.local/state/sandboxd).
    #[arg(long, global = true, env = "SANDBOXD_STATE_DIR")]
    state_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the largest verb's arguments does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Create a sandbox running CMD and stream its output until it exits.
    Run(Box<run::RunArgs>),
    /// List sandboxes (also `sbx ps`).
    #[command(visible_alias = "ps")]
    Ls(ls::LsArgs),
    /// Show one sandbox as JSON.
    Inspect(inspect::InspectArgs),
    /// Print the output of a sandbox.
    Logs(logs::LogsArgs),
    /// Wait for a sandbox to end, print its exit code and exit with it.
    Wait(wait::WaitArgs),
    /// Send a signal to a sandbox (SIGKILL by default).
    Kill(kill::KillArgs),
    /// Remove sandboxes.
    Rm(rm::RmArgs),
    /// Show what the daemon's host can enforce.
    Info(info::InfoArgs),
    /// Check what the daemon's host provides for its mode, and how to fix what is missing.
    Doctor(doctor::DoctorArgs),
    /// Show a sandbox's resource use (live while it runs, final after).
    Stats(stats::StatsArgs),
    /// Delete a sandbox SECS seconds from now (sets or moves its TTL).
    Extend(extend::ExtendArgs),
    /// Manage API tokens (admin).
    Token(token::TokenArgs),
    /// Run another command in a running sandbox (-i: pass stdin on, -t: with a terminal).
    Exec(exec::ExecArgs),
    /// Create a sandbox without starting it and print its id (then `sbx cp`, `sbx start`).
    Create(create::CreateArgs),
    /// Start a sandbox made by `sbx create`.
    Start(start::StartArgs),
    /// Copy files or directories: `sbx cp LOCAL ID:/path` or `sbx cp ID:/path LOCAL`.
    Cp(cp::CpArgs),
    /// Import, list and remove images (root filesystems for `sbx run --image`).
    Image(image::ImageArgs),
    /// A sandbox's egress: `sbx network set ID --egress RULE...`, `sbx network denials ID`.
    Network(network::NetworkArgs),
    /// Print a shell completion script: `source <(sbx completion bash)`, or save the output of
    /// `sbx completion zsh` as `_sbx` in a directory of `$fpath`, or of `sbx completion fish` as
    /// `~/.config/fish/completions/sbx.fish`.
    Completion(completion::CompletionArgs),
}

/// Why a verb failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),

    #[error("writing output")]
    Output(#[source] std::io::Error),

    #[error("encoding json")]
    Json(#[source] serde_json::Error),

    #[error("sandbox {id} failed: {error}")]
    SandboxFailed { id: String, error: String },

    #[error("id prefix {prefix:?} matches {count} sandboxes")]
    AmbiguousId { prefix: String, count: usize },

    #[error("sandbox {id} is {state}; kill it first or use -f")]
    StillRunning { id: String, state: &'static str },

    #[error("log stream of {id} ended before the sandbox did")]
    NoLogEnd { id: String },

    #[error("{0}")]
    Unauthorized(String),

    #[error("{0}")]
    Usage(String),

    #[error("{0}")]
    Local(String, #[source] std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => EXIT_BROKEN_PIPE,
            _ => EXIT_DAEMON_ERROR,
        }
    }

    fn failed(sandbox: &Sandbox) -> Self {
        CliError::SandboxFailed {
            id: sandbox.id.to_string(),
            error: sandbox
                .error
                .clone()
                .or_else(|| sandbox.reason.map(|r| r.as_str().to_owned()))
                .unwrap_or_else(|| "unknown error".to_owned()),
        }
    }
}

/// Prints an error as one line `sbx: message: cause: cause` on stderr; a daemon's error ends
/// with its code and HTTP status (`sbx: no sandbox named x (not_found, HTTP 404)`). A closed
/// stdout is not worth a message: the reader went away on purpose (`sbx logs x | head`).
pub fn report(error: &CliError) {
    if error.exit_code() == EXIT_BROKEN_PIPE {
        return;
    }
    eprintln!("sbx: {}", describe(error));
}

/// The one-line text of an error, as `report` prints it without the `sbx: ` prefix.
pub fn describe(error: &CliError) -> String {
    match error {
        CliError::Client(e) => client_error(e),
        CliError::Unauthorized(message) => format!("{message} (unauthorized, HTTP 401)"),
        e => error_chain(e),
    }
}

/// A client error with the daemon's code and status when it is one of the daemon's answers.
pub fn client_error(error: &ClientError) -> String {
    match error {
        ClientError::Api {
            status,
            code,
            message,
        } => format!("{message} ({code}, HTTP {status})"),
        e => error_chain(e),
    }
}

/// The error and its causes joined by `: `, skipping a cause whose text the previous one already
/// contains (reqwest repeats itself).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut last = line.clone();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !last.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        last = text;
        source = cause.source();
    }
    line
}

/// Runs the verb and returns the process's exit status.
pub async fn run(cli: Cli) -> Result<u8, CliError> {
    if let Command::Completion(args) = &cli.command {
        return completion::run(args);
    }
    let (client, hint) = connect(&cli)?;
    dispatch(&client, cli.command).await.map_err(|e| match e {
        CliError::Client(ClientError::Api {
            status: 401,
            message,
            ..
        }) => CliError::Unauthorized(format!("{message} ({hint})")),
        e => e,
    })
}

/// The state directory sbx looks in for `api.sock`.
fn state_dir(explicit: Option<&Path>) -> PathBuf {
    if let Some(dir) = explicit {
        return dir.to_path_buf();
    }
    // The effective uid, read from /proc (no libc dependency for one number).
    let is_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false);
    if is_root {
        return PathBuf::from("/var/lib/sandboxd");
    }
    match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("sandboxd"),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".local/state/sandboxd")
        }
    }
}

/// Token discovery: `--token`/`SANDBOXD_TOKEN`; else, without `--url`, the local unix socket
/// (no token needed). A token found in a state directory (`admin.token`) is never sent anywhere:
/// it belongs to the daemon whose socket is beside it, and that socket needs no token, while a
/// `--url` may name any server (issue 12: the CLI must not leak the admin token to it). Returns
/// the client and a hint for a 401 answer.
fn connect(cli: &Cli) -> Result<(Client, String), CliError> {
    let dir = state_dir(cli.state_dir.as_deref());
    let socket = dir.join("api.sock");
    if let Some(token) = cli.token.as_deref().filter(|t| !t.is_empty()) {
        let url = cli.url.as_deref().unwrap_or(DEFAULT_URL);
        let client = Client::new(url)?.with_token(token.trim());
        return Ok((
            client,
            "the token given with --token/SANDBOXD_TOKEN was refused".into(),
        ));
    }
    if cli.url.is_none() && socket.exists() {
        return Ok((
            Client::unix(&socket)?,
            format!("the local socket {} refused sbx", socket.display()),
        ));
    }
    let url = cli.url.as_deref().unwrap_or(DEFAULT_URL);
    let hint = if cli.url.is_some() {
        format!(
            "no token: pass --token or set SANDBOXD_TOKEN (sbx never sends a state directory's \
             admin.token to a --url; without --url it uses the local socket {})",
            socket.display()
        )
    } else {
        format!(
            "no token: pass --token or set SANDBOXD_TOKEN; no local socket {}",
            socket.display()
        )
    };
    Ok((Client::new(url)?, hint))
}

async fn dispatch(client: &Client, command: Command) -> Result<u8, CliError> {
    match command {
        Command::Run(args) => run::run(client, *args).await,
        Command::Ls(args) => ls::run(client, args).await,
        Command::Inspect(args) => inspect::run(client, args).await,
        Command::Logs(args) => logs::run(client, args).await,
        Command::Wait(args) => wait::run(client, args).await,
        Command::Kill(args) => kill::run(client, args).await,
        Command::Rm(args) => rm::run(client, args).await,
        Command::Info(args) => info::run(client, args).await,
        Command::Doctor(args) => doctor::run(client, args).await,
        Command::Stats(args) => stats::run(client, args).await,
        Command::Extend(args) => extend::run(client, args).await,
        Command::Token(args) => token::run(client, args).await,
        Command::Exec(args) => exec::run(client, args).await,
        Command::Create(args) => create::run(client, args).await,
        Command::Start(args) => start::run(client, args).await,
        Command::Cp(args) => cp::run(client, args).await,
        Command::Image(args) => image::run(client, args).await,
        Command::Network(args) => network::run(client, args).await,
        Command::Completion(args) => completion::run(&args),
    }
}

/// Finds a sandbox by id, name, or a unique prefix of its id as `sbx ls` shows it (12 hex digits).
/// The daemon is asked first; the prefix search lists sandboxes only when it does not know `arg`.
async fn resolve(client: &Client, arg: &str) -> Result<Sandbox, CliError> {
    let not_found = match client.get(arg).await {
        Ok(sandbox) => return Ok(sandbox),
        Err(e) if e.is_not_found() && is_id_prefix(arg) => e,
        Err(e) => return Err(e.into()),
    };
    let prefix = arg.replace('-', "").to_ascii_lowercase();
    let mut matches: Vec<Sandbox> = client
        .list_all(&ListQuery::default())
        .await?
        .into_iter()
        .filter(|s| s.id.simple().to_string().starts_with(&prefix))
        .collect();
    match matches.len() {
        0 => Err(not_found.into()),
        1 => Ok(matches.remove(0)),
        count => Err(CliError::AmbiguousId {
            prefix: arg.to_owned(),
            count,
        }),
    }
}

fn is_id_prefix(arg: &str) -> bool {
    let hex = arg.replace('-', "");
    (1..32).contains(&hex.len()) && hex.chars().all(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sbx").chain(args.iter().copied()))
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_options() {
        let cli = parse(&[
            "run",
            "--name",
            "n",
            "-e",
            "A=1",
            "--env",
            "B=2",
            "--label",
            "k=v",
            "--cwd",
            "/tmp",
            "--timeout",
            "5",
            "-d",
            "--",
            "sh",
            "-c",
            "echo hi",
        ])
        .expect("valid");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let spec = args.spec();
        assert_eq!(spec.command, ["sh", "-c", "echo hi"]);
        assert_eq!(spec.name.as_deref(), Some("n"));
        assert_eq!(spec.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(spec.env.get("B").map(String::as_str), Some("2"));
        assert_eq!(spec.labels.get("k").map(String::as_str), Some("v"));
        assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(spec.limits.timeout_secs, Some(5));
        assert!(args.detach);
    }

    #[test]
    fn run_takes_limits_and_lifetimes() {
        let cli = parse(&[
            "run",
            "--memory",
            "256M",
            "--cpus",
            "0.5",
            "--pids",
            "64",
            "--timeout",
            "60",
            "--ttl",
            "3600",
            "--output-limit",
            "1.5G",
            "--rm",
            "--",
            "true",
        ])
        .expect("valid");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let spec = args.spec();
        assert_eq!(spec.limits.memory_bytes, Some(256 << 20));
        assert_eq!(spec.limits.cpus, Some(0.5));
        assert_eq!(spec.limits.pids, Some(64));
        assert_eq!(spec.limits.timeout_secs, Some(60));
        assert_eq!(spec.limits.output_bytes, Some(3 << 29));
        assert_eq!(spec.ttl_secs, Some(3600));
        assert_eq!(spec.remove_after_exit_secs, Some(60));
        let cli = parse(&["run", "true"]).expect("valid");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.spec().limits, sandboxd_api::Limits::default());
        assert_eq!(args.spec().remove_after_exit_secs, None);
        assert!(parse(&["stats", "x", "--json"]).is_ok());
        assert!(parse(&["extend", "x", "30"]).is_ok());
    }

    #[test]
    fn run_command_flags_are_not_sbx_flags() {
        let cli = parse(&["run", "ls", "-l", "--name", "x"]).expect("valid");
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.spec().command, ["ls", "-l", "--name", "x"]);
        assert_eq!(args.spec().name, None);
    }

    #[test]
    fn usage_errors_are_clap_errors_with_status_2() {
        for bad in [
            &["run"][..],
            &["run", "--env", "NOEQUALS", "--", "true"],
            &["run", "--label", "=v", "--", "true"],
            &["run", "--timeout", "0", "--", "true"],
            &["run", "--timeout", "soon", "--", "true"],
            &["run", "--memory", "lots", "--", "true"],
            &["run", "--cpus", "0", "--", "true"],
            &["run", "--pids", "0", "--", "true"],
            &["run", "-Z", "1000", "--", "id"],
            &["run", "--usr", "1000", "id"],
            &["run", "--entry-point", "sh", "--", "id"],
            &["run", "-p", "8080:0", "--", "true"],
            &["run", "--env-file", "/nonexistent/sbx.env", "--", "true"],
            &["exec", "x", "-u", "1000", "id"],
            &["ls", "-q", "--json"],
            &["ls", "--format", "{{.id"],
            &["logs", "--since", "soon", "x"],
            &["completion", "powershell"],
            &["extend", "x", "0"],
            &["extend", "x"],
            &["stats"],
            &["ls", "--state", "sleeping"],
            &["logs", "--stream", "stdin", "x"],
            &["rm"],
            &["frobnicate"],
        ] {
            let err = parse(bad).expect_err(&format!("{bad:?} should not parse"));
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    fn run_args(args: &[&str]) -> Box<run::RunArgs> {
        match parse(args).expect("valid").command {
            Command::Run(args) => args,
            other => panic!("not run: {other:?}"),
        }
    }

    #[test]
    fn unknown_flags_before_the_command_are_errors() {
        let err = parse(&["run", "-Z", "1000", "--", "id"]).expect_err("-Z is no sbx flag");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        let args = run_args(&[
            "run",
            "-u",
            "app:staff",
            "--entrypoint",
            "/bin/sh",
            "--",
            "-c",
            "id",
        ]);
        let spec = args.spec();
        assert_eq!(spec.user.as_deref(), Some("app:staff"));
        assert_eq!(spec.entrypoint, Some(vec!["/bin/sh".to_owned()]));
        assert_eq!(spec.command, ["-c", "id"]);
        // `--entrypoint ""` clears the image's; an image may supply the whole command.
        let spec = run_args(&["run", "--image", "i", "--entrypoint", ""]).spec();
        assert_eq!((spec.entrypoint, spec.command), (Some(vec![]), vec![]));
        assert!(
            parse(&["run", "--user", "1000"]).is_err(),
            "no image, no command"
        );
        // After the command, everything is the command's, and `--` still ends sbx's options.
        assert_eq!(run_args(&["run", "id", "-u"]).spec().command, ["id", "-u"]);
        assert_eq!(
            run_args(&["run", "--", "-weird", "-u"]).spec().command,
            ["-weird", "-u"]
        );
    }

    #[test]
    fn publish_is_host_then_sandbox() {
        let ports = |args: &[&str]| {
            run_args(args)
                .spec()
                .network
                .expect("network")
                .ports
                .iter()
                .map(|p| (p.host, p.sandbox))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ports(&["run", "-p", "3000:8080", "-p", "9000", "--", "true"]),
            [(3000, 8080), (0, 9000)]
        );
        assert_eq!(ports(&["run", "--publish", "0:80", "true"]), [(0, 80)]);
    }

    #[test]
    fn detached_rm_is_removed_by_the_daemon_at_once() {
        let args = run_args(&["run", "-d", "--rm", "--", "true"]);
        assert!(args.detach);
        assert_eq!(args.spec().remove_after_exit_secs, Some(1));
        let args = run_args(&["run", "--rm", "--", "true"]);
        assert_eq!(args.spec().remove_after_exit_secs, Some(60));
    }

    #[test]
    fn env_files_come_before_env_flags() {
        let path = std::env::temp_dir().join(format!("sbx-env-test-{}", std::process::id()));
        std::fs::write(&path, "# comment\nA=from file\nB=file\n").expect("write env file");
        let file = path.to_str().expect("utf-8 path");
        let env = run_args(&["run", "--env-file", file, "-e", "B=flag", "--", "env"])
            .spec()
            .env;
        std::fs::remove_file(&path).expect("remove env file");
        assert_eq!(env.get("A").map(String::as_str), Some("from file"));
        assert_eq!(env.get("B").map(String::as_str), Some("flag"));
    }

    #[test]
    fn listing_and_logs_habits_parse() {
        for args in [
            &["ps"][..],
            &["ps", "-q"],
            &["ls", "--quiet", "--state", "running"],
            &["ls", "--format", "id,name,state"],
            &["ps", "--format", "{{.id}} {{.state}}"],
            &["inspect", "-f", "{{.state}}", "x"],
            &["inspect", "--format", "id,network.ports", "x"],
            &["logs", "--tail", "5", "x"],
            &["logs", "-n", "5", "-f", "--since", "10m", "x"],
            &["completion", "bash"],
            &["completion", "zsh"],
            &["completion", "fish"],
        ] {
            parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        assert!(matches!(
            parse(&["ps"]).expect("valid").command,
            Command::Ls(_)
        ));
    }

    #[test]
    fn api_errors_show_code_and_status() {
        let e = CliError::Client(ClientError::Api {
            status: 409,
            code: sandboxd_api::ErrorCode::ImageExists,
            message: "an image named x exists".into(),
        });
        assert_eq!(
            describe(&e),
            "an image named x exists (image_exists, HTTP 409)"
        );
    }

    #[test]
    fn url_is_global() {
        let cli = parse(&["ls", "--url", "http://h:1"]).expect("valid");
        assert_eq!(cli.url.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn id_prefixes() {
        assert!(is_id_prefix("0123456789ab"));
        assert!(is_id_prefix("0123abcd-ef"));
        assert!(!is_id_prefix("web-server"));
        assert!(!is_id_prefix(""));
        assert!(!is_id_prefix("0123456789abcdef0123456789abcdef"));
    }

    #[test]
    fn error_chain_skips_repeats() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
