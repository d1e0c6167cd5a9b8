//! `sbx exec [-i] [-t] ID -- CMD`: run another command in a running sandbox, attached to this
//! terminal, and exit with its exit code.
//!
//! With `-t` the command gets a terminal of this terminal's size, the local terminal is put in
//! raw mode (every key, ^C and ^Z included, goes to the sandbox's terminal) and resized on
//! SIGWINCH. With `-i` stdin is passed on; its end of file closes the command's stdin. A dropped
//! websocket is reattached at the output offset reached, so no output is lost or repeated.

use std::io::{Read, Write};
use std::time::Duration;

use clap::Args;
use rustix::termios::{self, OptionalActions, Termios};
use sandboxd_api::{CreateExec, SandboxState};
use sandboxd_client::{AttachEvent, Channel, Client, ClientError};
use tokio::sync::mpsc;

use super::args::parse_env;
use super::output::exit_status;
use super::{resolve, CliError};

/// Consecutive failed reattaches before giving up.
const MAX_REATTACH: u32 = 5;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Pass stdin on to the command.
    #[arg(short, long)]
    interactive: bool,
    /// Give the command a terminal (put this one in raw mode).
    #[arg(short, long)]
    tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory inside the sandbox (default: the sandbox's).
    #[arg(short = 'w', long, value_name = "DIR")]
    cwd: Option<String>,
    /// The sandbox (id, unique id prefix, or name).
    id: String,
    /// The command and its arguments. Options of sbx come before it (or before `--`); an
    /// unknown option there is an error, and everything from the command on is the command's.
    #[arg(value_name = "CMD", required = true, num_args = 1.., trailing_var_arg = true)]
    command: Vec<String>,
}

/// What goes to the exec.
enum Input {
    Stdin(Vec<u8>),
    Eof,
    Resize(u16, u16),
}

/// The local terminal in raw mode until dropped.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        termios::tcsetattr(&stdin, OptionalActions::Flush, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Flush, &self.saved);
    }
}

pub(super) fn terminal_size() -> Option<(u16, u16)> {
    let size = termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (size.ws_col > 0 && size.ws_row > 0).then_some((size.ws_col, size.ws_row))
}

pub async fn run(client: &Client, args: ExecArgs) -> Result<u8, CliError> {
    let sandbox = resolve(client, &args.id).await?;
    let sid = sandbox.id.to_string();
    let size = if args.tty { terminal_size() } else { None };
    let spec = CreateExec {
        command: args.command.clone(),
        env: args.env.iter().cloned().collect(),
        cwd: args.cwd.clone(),
        tty: args.tty,
        stdin: args.interactive,
        cols: size.map(|s| s.0),
        rows: size.map(|s| s.1),
    };
    let exec = client.create_exec(&sid, &spec).await?;
    if exec.state == SandboxState::Failed {
        return Err(CliError::SandboxFailed {
            id: exec.id.to_string(),
            error: exec.error.unwrap_or_else(|| "unknown error".into()),
        });
    }
    let target = Target::Exec {
        sandbox: sid,
        exec: exec.id.to_string(),
    };
    interactive(client, target, args.interactive, args.tty).await
}

/// What to attach to.
pub(super) enum Target {
    Exec {
        sandbox: String,
        exec: String,
    },
    /// A sandbox's main command.
    Main {
        sandbox: String,
    },
}

/// Attach this terminal (raw with `tty`), stdin (with `stdin`) and SIGWINCH to `target` until
/// it ends; its exit code.
pub(super) async fn interactive(
    client: &Client,
    target: Target,
    stdin: bool,
    tty: bool,
) -> Result<u8, CliError> {
    let raw = (tty && stdin && termios::isatty(std::io::stdin()))
        .then(RawMode::enter)
        .flatten();
    let (tx, rx) = mpsc::channel::<Input>(16);
    if stdin {
        spawn_stdin_reader(tx.clone());
    }
    if tty {
        tokio::spawn(forward_resizes(tx.clone()));
    }
    drop(tx);
    let result = attach(client, &target, stdin, rx).await;
    drop(raw);
    result
}

/// Read stdin on a thread of its own (a blocking read must not hold up the runtime's exit).
fn spawn_stdin_reader(tx: mpsc::Sender<Input>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(Input::Eof);
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Input::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

async fn forward_resizes(tx: mpsc::Sender<Input>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut winch) = signal(SignalKind::window_change()) else {
        return;
    };
    while winch.recv().await.is_some() {
        if let Some((cols, rows)) = terminal_size() {
            if tx.send(Input::Resize(cols, rows)).await.is_err() {
                return;
            }
        }
    }
}

/// Attach (again after a drop, from the offset reached) until the exec's end.
async fn attach(
    client: &Client,
    target: &Target,
    stdin: bool,
    mut input: mpsc::Receiver<Input>,
) -> Result<u8, CliError> {
    let mut offset = 0u64;
    let mut failures = 0u32;
    let mut input_open = stdin;
    // Input taken from the channel but not delivered before a drop: sent again after it.
    let mut unsent: Option<Input> = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let attached = match target {
            Target::Exec { sandbox, exec } => {
                client.attach_exec(sandbox, exec, offset, stdin).await
            }
            Target::Main { sandbox } => client.attach_sandbox(sandbox, offset, stdin).await,
        };
        let (mut writer, mut reader) = match attached {
            Ok(halves) => halves,
            // The previous connection's stdin may not be released yet; try again shortly.
            Err(e) if failures < MAX_REATTACH && is_transient(&e) => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100 << failures)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        loop {
            if let Some(item) = unsent.take() {
                if send(&mut writer, &item).await.is_err() {
                    unsent = Some(item);
                    break;
                }
            }
            tokio::select! {
                event = reader.next() => match event {
                    Some(Ok(AttachEvent::Output { channel, data })) => {
                        offset += data.len() as u64;
                        failures = 0;
                        let out: &mut dyn Write = match channel {
                            Channel::Stdout => &mut stdout,
                            Channel::Stderr => &mut stderr,
                        };
                        out.write_all(&data).and_then(|()| out.flush()).map_err(CliError::Output)?;
                    }
                    Some(Ok(AttachEvent::End(end))) => return Ok(exit_status(end.exit_code)),
                    Some(Err(ClientError::LogProtocol(m))) => {
                        return Err(ClientError::LogProtocol(m).into())
                    }
                    // A drop: reattach where we are.
                    Some(Err(_)) | None => break,
                },
                item = input.recv(), if input_open => match item {
                    Some(item) => {
                        if send(&mut writer, &item).await.is_err() {
                            unsent = Some(item);
                            break;
                        }
                    }
                    None => input_open = false,
                },
            }
        }
        failures += 1;
        if failures > MAX_REATTACH {
            return Err(ClientError::LogsInterrupted {
                attempts: failures,
                offset,
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50 << failures)).await;
    }
}

async fn send(writer: &mut sandboxd_client::AttachWriter, item: &Input) -> Result<(), ClientError> {
    match item {
        Input::Stdin(data) => writer.stdin(data).await,
        Input::Eof => writer.close_stdin().await,
        Input::Resize(cols, rows) => writer.resize(*cols, *rows).await,
    }
}

fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Api { status, .. } => *status == 409 || *status >= 500,
        ClientError::WebSocket(_) | ClientError::WebSocketConnect { .. } => true,
        _ => false,
    }
}
