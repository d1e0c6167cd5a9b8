//! `sbx run`: create a sandbox, stream its output live, exit with its exit code.

use clap::Args;
use sandboxd_api::{CreateSandbox, EndReason, Limits, RootfsSpec, SandboxState};
use sandboxd_client::Client;

use super::args::{parse_cpus, parse_env, parse_env_file, parse_label, parse_size};
use super::output::{copy_events, exit_status, println_checked};
use super::{CliError, EXIT_DAEMON_ERROR};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Unique name of the sandbox.
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Read environment variables from FILE (repeatable), as Docker does: `KEY=VALUE` lines,
    /// `#` comments, and `KEY` alone for the value of KEY in sbx's own environment (left out
    /// when unset). `-e` wins over a file.
    #[arg(long = "env-file", value_name = "FILE", value_parser = parse_env_file)]
    env_files: Vec<Vec<(String, String)>>,
    /// Attach a label (repeatable).
    #[arg(short = 'l', long = "label", value_name = "K=V", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Run the command as this user: UID, UID:GID, NAME or NAME:GROUP (names from the image's
    /// /etc/passwd and /etc/group). Default: the image's USER, else root.
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// Replace the image's ENTRYPOINT with this program (its CMD is then not used); `""`
    /// clears it, so the command runs alone.
    #[arg(long, value_name = "PROGRAM")]
    entrypoint: Option<String>,
    /// Working directory inside the sandbox (default: the image's WORKDIR, else /work).
    #[arg(short = 'w', long, value_name = "DIR")]
    cwd: Option<String>,
    /// Host name inside the sandbox.
    #[arg(long)]
    hostname: Option<String>,
    /// Kill the sandbox after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// Memory limit (e.g. 256M, 1.5G, 512Mi; binary units); the sandbox is killed above it.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory: Option<u64>,
    /// CPU limit in cores, fractional (0.5 is half a core).
    #[arg(long, value_name = "CORES", value_parser = parse_cpus)]
    cpus: Option<f64>,
    /// Most processes and threads alive at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pids: Option<u64>,
    /// Cap on stored output (stdout and stderr together); the daemon's default when absent.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    output_limit: Option<u64>,
    /// Root filesystem from this image (`sbx image import`) instead of the host's; changes go
    /// to the sandbox's own copy-on-write layer.
    #[arg(long, value_name = "NAME")]
    image: Option<String>,
    /// With --image: mount the image root read-only.
    #[arg(long, requires = "image")]
    readonly_root: bool,
    /// Cap what the sandbox may write (upper layer, /work, /tmp), e.g. 1G; ENOSPC past it.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    disk: Option<u64>,
    /// Delete the sandbox this many seconds after its creation, running or not.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    ttl: Option<u64>,
    /// Delete the sandbox once it exited and its output was streamed (the daemon also removes it
    /// 60 seconds after the exit, should sbx not get to it). With -d the daemon removes it one
    /// second after it exits.
    #[arg(long)]
    pub(super) rm: bool,
    /// Network: `none` (only loopback; the default) or `bridge` (an address, reachable by its
    /// group; implied by --group and -p).
    #[arg(long = "net", value_name = "MODE", value_parser = super::network::parse_mode)]
    net: Option<sandboxd_api::NetworkMode>,
    /// Network group: sandboxes of one group reach each other by name.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Publish a port on the host's 127.0.0.1 (repeatable): HOST_PORT:SANDBOX_PORT as in Docker,
    /// or SANDBOX_PORT alone; host port 0 (or none) picks a free one (`sbx inspect` shows it).
    /// Before this release sbx read it the other way round (SANDBOX:HOST): `-p 8080:0` is now
    /// refused, write `-p 0:8080` or `-p 8080`.
    #[arg(short = 'p', long = "publish", value_name = "HOST:SANDBOX", value_parser = super::network::parse_port)]
    publish: Vec<sandboxd_api::PortSpec>,
    /// Let the sandbox reach a destination outside its group (repeatable; implies --net
    /// bridge): a name (pypi.org), a wildcard (*.pythonhosted.org), an address or CIDR
    /// (203.0.113.7, 198.51.100.0/24), each with an optional :PORT, or '*' for every public
    /// destination. Without it a bridged sandbox reaches nothing beyond its group.
    #[arg(long = "egress", value_name = "RULE", value_parser = super::network::parse_rule)]
    egress: Vec<sandboxd_api::egress::EgressRule>,
    /// Deny a destination --egress would allow (repeatable; wins over --egress).
    #[arg(long = "egress-deny", value_name = "RULE", value_parser = super::network::parse_rule)]
    egress_deny: Vec<sandboxd_api::egress::EgressRule>,
    /// Print the sandbox id and return at once.
    #[arg(short, long)]
    pub(super) detach: bool,
    /// Pass stdin on to the command.
    #[arg(short = 'i', long, conflicts_with = "detach")]
    interactive: bool,
    /// Give the command a terminal (this one goes into raw mode and passes its size on).
    #[arg(short = 't', long, conflicts_with = "detach")]
    tty: bool,
    /// The command and its arguments. Options of sbx come before it (or before `--`); an
    /// unknown option there is an error, and everything from the command on is the command's.
    /// With --image it may be left out: the image's CMD (after its ENTRYPOINT) runs.
    #[arg(
        value_name = "CMD",
        required_unless_present = "image",
        num_args = 1..,
        trailing_var_arg = true
    )]
    command: Vec<String>,
}

impl RunArgs {
    pub(super) fn spec(&self) -> CreateSandbox {
        let size = self.tty.then(super::exec::terminal_size).flatten();
        self.spec_sized(size)
    }

    fn spec_sized(&self, size: Option<(u16, u16)>) -> CreateSandbox {
        CreateSandbox {
            command: self.command.clone(),
            // Docker's `--entrypoint ""` clears the image's entrypoint.
            entrypoint: self.entrypoint.as_ref().map(|e| {
                if e.is_empty() {
                    Vec::new()
                } else {
                    vec![e.clone()]
                }
            }),
            user: self.user.clone(),
            env: self
                .env_files
                .iter()
                .flatten()
                .chain(&self.env)
                .cloned()
                .collect(),
            cwd: self.cwd.clone(),
            hostname: self.hostname.clone(),
            name: self.name.clone(),
            labels: self.labels.iter().cloned().collect(),
            limits: Limits {
                timeout_secs: self.timeout,
                memory_bytes: self.memory,
                cpus: self.cpus,
                pids: self.pids,
                disk_bytes: self.disk,
                output_bytes: self.output_limit,
            },
            ttl_secs: self.ttl,
            remove_after_exit_secs: match (self.rm, self.detach) {
                (false, _) => None,
                // Nobody streams a detached sandbox's output: the daemon removes it at once.
                (true, true) => Some(DETACHED_RM_SECS),
                (true, false) => Some(RM_SAFETY_NET_SECS),
            },
            capabilities: None,
            nested_user_namespaces: false,
            stdin: self.interactive,
            tty: self.tty,
            cols: size.map(|s| s.0),
            rows: size.map(|s| s.1),
            start: true,
            rootfs: self.image.clone().map(|image| RootfsSpec {
                image,
                readonly: self.readonly_root,
            }),
            network: super::network::spec(
                self.net,
                &self.group,
                &self.publish,
                super::network::policy(&self.egress, &self.egress_deny),
            ),
        }
    }
}

/// With `--rm`, the daemon removes the sandbox this long after its exit if sbx could not.
const RM_SAFETY_NET_SECS: u64 = 60;

/// With `-d --rm`, the daemon removes the sandbox this long after its exit (the API's least).
const DETACHED_RM_SECS: u64 = 1;

pub async fn run(client: &Client, args: RunArgs) -> Result<u8, CliError> {
    let sandbox = client.create(&args.spec()).await?;
    let id = sandbox.id.to_string();
    if args.detach {
        println_checked(&id)?;
        return Ok(0);
    }
    if sandbox.state == SandboxState::Failed {
        return Err(CliError::failed(&sandbox));
    }

    if args.interactive || args.tty {
        let target = super::exec::Target::Main {
            sandbox: id.clone(),
        };
        // With a terminal, ^C is a byte for the sandbox's terminal; without, a signal for it.
        let interrupts =
            (!args.tty).then(|| tokio::spawn(forward_interrupts(client.clone(), id.clone())));
        let code = super::exec::interactive(client, target, args.interactive, args.tty).await;
        if let Some(i) = interrupts {
            i.abort();
        }
        if args.rm {
            if let Err(e) = client.delete(&id).await {
                if !e.is_not_found() {
                    eprintln!("sbx: removing {id}: {}", super::client_error(&e));
                }
            }
        }
        return code;
    }
    let interrupts = tokio::spawn(forward_interrupts(client.clone(), id.clone()));
    let copied = copy_events(client.follow_logs(&id, 0), None).await;
    interrupts.abort();
    let end = copied?.ok_or_else(|| CliError::NoLogEnd { id: id.clone() })?;

    // `LogEnd` has the exit status but not whether the sandbox failed, nor why.
    let result = match client.get(&id).await {
        Ok(sandbox) if sandbox.state == SandboxState::Failed => Err(CliError::failed(&sandbox)),
        Ok(sandbox) if sandbox.state.is_final() => {
            // Say why when the sandbox did not end on its own: the exit code alone (137) does
            // not tell a memory limit from a timeout.
            let why = match sandbox.reason {
                Some(EndReason::Oom) => Some("it ran out of memory (limits.memory_bytes)"),
                Some(EndReason::Timeout) => Some("it ran past its timeout"),
                Some(EndReason::Ttl) => Some("its ttl ran out"),
                _ => None,
            };
            if let Some(why) = why {
                eprintln!("sbx: sandbox {id} was killed: {why}");
            }
            super::output::note_error(&sandbox);
            if sandbox.output_truncated {
                eprintln!("sbx: output of {id} was truncated at limits.output_bytes");
            }
            Ok(exit_status(sandbox.exit_code.or(end.exit_code)))
        }
        _ => Ok(exit_status(end.exit_code)),
    };
    if args.rm {
        // The whole output has been streamed (LogEnd came after its last byte).
        match client.delete(&id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => eprintln!(
                "sbx: removing {id}: {} (the daemon removes it {RM_SAFETY_NET_SECS}s after its exit)",
                super::client_error(&e)
            ),
        }
    }
    result
}

/// The first Ctrl-C is passed on to the sandbox as SIGINT, the second kills it, and a third gives
/// up on the daemon and exits at once.
async fn forward_interrupts(client: Client, id: String) {
    let mut count = 0u32;
    while tokio::signal::ctrl_c().await.is_ok() {
        count += 1;
        let signal = match count {
            1 => "SIGINT",
            2 => "SIGKILL",
            _ => {
                eprintln!("sbx: interrupted; sandbox {id} may still be running");
                std::process::exit(i32::from(EXIT_DAEMON_ERROR));
            }
        };
        if let Err(e) = client.kill(&id, Some(signal)).await {
            eprintln!(
                "sbx: forwarding {signal} to {id}: {}",
                super::client_error(&e)
            );
        }
    }
}
