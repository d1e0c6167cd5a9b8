//! The things being compared: sandboxd through its API, bwrap, and a bare fork+exec of `true`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sandboxd_api::{CreateSandbox, SandboxState};
use sandboxd_client::{Client, ClientError};

/// Why one run of a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("sandboxd request failed")]
    Api(#[from] ClientError),
    #[error("sandbox {id} ended {state} with exit code {code:?}: {error}")]
    SandboxFailed {
        id: String,
        state: &'static str,
        code: Option<i32>,
        error: String,
    },
    #[error("spawning {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} exited with {status}")]
    Status { program: String, status: String },
    #[error("worker thread failed")]
    Join(#[from] tokio::task::JoinError),
}

/// One contender of the benchmark.
#[derive(Debug, Clone)]
pub enum Peer {
    Sandboxd(Client),
    /// The same request with memory, cpus and pids limits.
    SandboxdLimited(Client),
    /// The same request with the root filesystem from an image (see `image.rs`).
    SandboxdImage(Client),
    /// The same request with a bridged network (`{"network": {"mode": "bridge"}}`).
    SandboxdBridge(Client),
    Bwrap(PathBuf),
    ForkExec,
    /// `true` as an exec in a running sandbox (the sandbox's id).
    SandboxdExec(Client, String),
}

impl Peer {
    pub fn name(&self) -> &'static str {
        match self {
            Peer::Sandboxd(_) => "sandboxd",
            Peer::SandboxdLimited(_) => "sandboxd+limits",
            Peer::SandboxdImage(_) => "sandboxd+image",
            Peer::SandboxdBridge(_) => "sandboxd+bridge",
            Peer::Bwrap(_) => "bwrap",
            Peer::ForkExec => "fork+exec",
            Peer::SandboxdExec(..) => "sandboxd exec",
        }
    }

    /// What one run does, for the report.
    pub fn describe(&self) -> String {
        match self {
            Peer::Sandboxd(client) => format!(
                "POST {}v1/sandboxes?wait=true {{\"command\":[\"true\"]}}",
                client.base_url()
            ),
            Peer::SandboxdLimited(client) => format!(
                "POST {}v1/sandboxes?wait=true {{\"command\":[\"true\"],\"limits\":{{\"memory_bytes\":268435456,\"cpus\":1,\"pids\":256}}}}",
                client.base_url()
            ),
            Peer::SandboxdImage(client) => format!(
                "POST {}v1/sandboxes?wait=true {{\"command\":[\"true\"],\"rootfs\":{{\"image\":\"{}\"}}}}",
                client.base_url(),
                crate::image::IMAGE
            ),
            Peer::SandboxdBridge(client) => format!(
                "POST {}v1/sandboxes?wait=true {{\"command\":[\"true\"],\"network\":{{\"mode\":\"bridge\"}}}}",
                client.base_url()
            ),
            Peer::Bwrap(path) => format!("{} --unshare-all --ro-bind / / true", path.display()),
            Peer::ForkExec => "std::process::Command::new(\"/bin/true\").status()".to_owned(),
            Peer::SandboxdExec(client, id) => format!(
                "POST {}v1/sandboxes/{id}/execs {{\"command\":[\"true\"]}}, then its logs with follow=true until the end",
                client.base_url()
            ),
        }
    }

    /// Runs `true` once and returns how long it took from request (or fork) to exit. For sandboxd
    /// the sandbox is deleted afterwards, outside the measured latency, so nothing accumulates.
    pub async fn run_once(&self) -> Result<Duration, PeerError> {
        match self {
            Peer::Sandboxd(client)
            | Peer::SandboxdLimited(client)
            | Peer::SandboxdImage(client)
            | Peer::SandboxdBridge(client) => {
                let limits = match self {
                    Peer::SandboxdLimited(_) => sandboxd_api::Limits {
                        memory_bytes: Some(256 << 20),
                        cpus: Some(1.0),
                        pids: Some(256),
                        ..Default::default()
                    },
                    _ => Default::default(),
                };
                let spec = CreateSandbox {
                    labels: [("sandboxd-bench".to_owned(), "true".to_owned())].into(),
                    limits,
                    rootfs: matches!(self, Peer::SandboxdImage(_)).then(|| {
                        sandboxd_api::RootfsSpec {
                            image: crate::image::IMAGE.to_owned(),
                            readonly: false,
                        }
                    }),
                    network: matches!(self, Peer::SandboxdBridge(_)).then(|| {
                        sandboxd_api::NetworkSpec {
                            mode: sandboxd_api::NetworkMode::Bridge,
                            ..Default::default()
                        }
                    }),
                    ..CreateSandbox::new(vec!["true".to_owned()])
                };
                let start = Instant::now();
                let sandbox = client.create_and_wait(&spec).await?;
                let latency = start.elapsed();
                let id = sandbox.id.to_string();
                let deleted = delete(client, &id).await;
                if sandbox.state != SandboxState::Exited || sandbox.exit_code != Some(0) {
                    return Err(PeerError::SandboxFailed {
                        id,
                        state: sandbox.state.as_str(),
                        code: sandbox.exit_code,
                        error: sandbox.error.unwrap_or_default(),
                    });
                }
                deleted?;
                Ok(latency)
            }
            Peer::Bwrap(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let mut command = Command::new(&path);
                    command.args(["--unshare-all", "--ro-bind", "/", "/", "true"]);
                    time_command(command, &path)
                })
                .await?
            }
            Peer::SandboxdExec(client, sandbox) => {
                let spec = sandboxd_api::CreateExec {
                    command: vec!["true".to_owned()],
                    env: Default::default(),
                    cwd: None,
                    tty: false,
                    stdin: false,
                    cols: None,
                    rows: None,
                };
                let start = Instant::now();
                let exec = client.create_exec(sandbox, &spec).await?;
                let exec = client.wait_exec(sandbox, &exec.id.to_string()).await?;
                let latency = start.elapsed();
                if exec.state != SandboxState::Exited || exec.exit_code != Some(0) {
                    return Err(PeerError::SandboxFailed {
                        id: exec.id.to_string(),
                        state: exec.state.as_str(),
                        code: exec.exit_code,
                        error: exec.error.unwrap_or_default(),
                    });
                }
                Ok(latency)
            }
            Peer::ForkExec => {
                tokio::task::spawn_blocking(|| {
                    let path = Path::new("/bin/true");
                    time_command(Command::new(path), path)
                })
                .await?
            }
        }
    }
}

/// Deletes a sandbox, retrying while the daemon answers 409 (it may still be tearing the sandbox
/// down just after `wait=true` answered).
async fn delete(client: &Client, id: &str) -> Result<(), ClientError> {
    let mut attempts = 0;
    loop {
        match client.delete(id).await {
            Err(e) if e.status() == Some(409) && attempts < DELETE_RETRIES => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => return other,
        }
    }
}

/// About a second of retries at 5 ms.
const DELETE_RETRIES: u32 = 200;

/// Times a fork+exec+wait of `command`, which must exit 0.
fn time_command(mut command: Command, program: &Path) -> Result<Duration, PeerError> {
    let start = Instant::now();
    let status = command.status().map_err(|source| PeerError::Spawn {
        program: program.display().to_string(),
        source,
    })?;
    let latency = start.elapsed();
    if !status.success() {
        return Err(PeerError::Status {
            program: program.display().to_string(),
            status: status.to_string(),
        });
    }
    Ok(latency)
}

/// Finds `name` in `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
