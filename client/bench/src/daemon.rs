//! Starting a sandboxd for the benchmark and stopping it with SIGTERM afterwards.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandboxd_client::Client;

/// How long the daemon gets to answer `/healthz`, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the daemon url must have an explicit host and port to pass as --listen, got {0}")]
    NoListenAddress(String),
    #[error("creating the daemon's log file {path}")]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon exited with {status} before answering /healthz; see {log}")]
    ExitedEarly { status: String, log: PathBuf },
    #[error("the daemon did not answer /healthz within {secs}s; see {log}")]
    NotHealthy { secs: u64, log: PathBuf },
}

/// A daemon started by the benchmark; dropping it stops the daemon.
pub struct Daemon {
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `path --listen HOST:PORT --state-dir DIR EXTRA...` with output to `DIR/sandboxd.log`,
    /// and returns once `GET /healthz` answers.
    pub async fn start(
        path: &Path,
        client: &Client,
        state_dir: &Path,
        extra: &[String],
    ) -> Result<Self, DaemonError> {
        let url = client.base_url();
        let listen = match (url.host_str(), url.port_or_known_default()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            _ => return Err(DaemonError::NoListenAddress(url.to_string())),
        };
        let log = state_dir.join("sandboxd.log");
        let log_file = File::create(&log).map_err(|source| DaemonError::LogFile {
            path: log.clone(),
            source,
        })?;
        let log_err = log_file
            .try_clone()
            .map_err(|source| DaemonError::LogFile {
                path: log.clone(),
                source,
            })?;
        let child = Command::new(path)
            .arg("--listen")
            .arg(&listen)
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .map_err(|source| DaemonError::Spawn {
                path: path.to_owned(),
                source,
            })?;
        let mut daemon = Daemon { child, log };
        daemon.wait_healthy(client).await?;
        Ok(daemon)
    }

    async fn wait_healthy(&mut self, client: &Client) -> Result<(), DaemonError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if client.health().await.is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(DaemonError::ExitedEarly {
                    status: status.to_string(),
                    log: self.log.clone(),
                });
            }
            if Instant::now() > deadline {
                return Err(DaemonError::NotHealthy {
                    secs: START_TIMEOUT.as_secs(),
                    log: self.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM (through `kill(1)`, which keeps this crate free of unsafe code and of nix),
    /// waits for the exit, and falls back to SIGKILL.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while sent && Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        eprintln!("sandboxd-bench: the daemon did not stop after SIGTERM; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
