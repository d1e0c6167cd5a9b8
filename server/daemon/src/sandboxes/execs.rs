//! Execs: processes started in a running sandbox by its monitor (the daemon never forks).
//!
//! Create: insert a `creating` row (only while the sandbox is `running`), send `exec` on a fresh
//! connection to the monitor and wait for its answer; then one watcher task per exec sends
//! `exec-wait` and, when the monitor answers (or goes away), records the exit from the exec's
//! `status.json` and notifies followers through a `watch` channel, exactly like a sandbox's
//! watcher. Attach: a connection on which the monitor accepted `attach` carries stdin and resize
//! frames; output is read from the exec's log by the caller, so a reattach resumes anywhere.

use std::sync::Arc;
use std::time::Duration;

use sandboxd_api::{CreateExec, Exec, Sandbox, SandboxState};
use sandboxd_protocol::exec::{self as proto, ExecRequest, ExecStarted, ExecStatus};
use sandboxd_protocol::layout::SandboxDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use uuid::Uuid;

use super::monitor::{self, MonitorError};
use super::{SandboxError, Scope, Service};
use crate::store::{ExecEnding, StoreError};

/// Why an exec operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Finding its sandbox failed (not found, not running...).
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("no such exec")]
    NotFound,
    #[error("another connection owns the exec's stdin")]
    StdinBusy,
    #[error("the exec was created without stdin")]
    NoStdin,
    /// The exec could not join the sandbox; the detail is in its row's `error`.
    #[error("starting exec {0} failed; its error field has the detail")]
    Failed(Uuid),
    #[error("store")]
    Store(#[from] StoreError),
    #[error("monitor")]
    Monitor(#[from] MonitorError),
    #[error("internal task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// A connection on which a monitor accepted `attach`: stdin (when granted), terminal size and
/// the end of stdin go in as `sandboxd_protocol::exec::Frame`s. Output is not here: it is read
/// from the log. Dropping the session releases stdin; the process goes on.
pub struct AttachSession {
    stream: UnixStream,
}

impl AttachSession {
    async fn send(&mut self, frame: proto::Frame) -> Result<(), MonitorError> {
        self.stream.write_all(&frame.encode()).await?;
        Ok(())
    }

    /// Bytes for the process's stdin, in frames of at most `MAX_FRAME`. An error means the
    /// process has ended (its end arrives through the log).
    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<(), MonitorError> {
        for piece in data.chunks(proto::MAX_FRAME) {
            self.send(proto::Frame::Stdin(piece.to_vec())).await?;
        }
        Ok(())
    }

    /// A new terminal size (ignored without a terminal).
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<(), MonitorError> {
        self.send(proto::Frame::Resize { cols, rows }).await
    }

    /// End of input (for a terminal: its end-of-file character).
    pub async fn close_stdin(&mut self) -> Result<(), MonitorError> {
        self.send(proto::Frame::CloseStdin).await
    }
}

/// How long a monitor may take to start an exec (joining, and executing the command).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an exec that failed to start waits for its sandbox to be seen ending (see
/// `ended_meanwhile`) before the failure counts as the exec's own.
const ENDING_GRACE: Duration = Duration::from_secs(2);
/// How long a monitor may take to answer an attach.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest answer line read from a monitor.
const MAX_ANSWER: u64 = 64 * 1024;

/// Send one line on a fresh connection and read one answer line; the stream is returned for
/// requests that keep it (attach, exec-wait). `None` when the monitor closed without answering.
async fn request(
    socket: &std::path::Path,
    line: &str,
) -> Result<(Option<String>, UnixStream), MonitorError> {
    let stream = monitor::connect(socket).await?;
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    let n = (&mut reader)
        .take(MAX_ANSWER)
        .read_line(&mut answer)
        .await?;
    // The monitor sends nothing after its answer line, so nothing is left in the buffer.
    let stream = reader.into_inner();
    if n == 0 || !answer.ends_with('\n') {
        return Ok((None, stream));
    }
    answer.pop();
    Ok((Some(answer), stream))
}

impl Service {
    fn exec_registry(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, watch::Sender<bool>>> {
        // Every operation is a single insert or remove: a poisoned lock is still consistent.
        self.live_execs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that turns `true` when the exec is final; `None` if it already is.
    pub fn subscribe_exec(&self, exec: Uuid) -> Option<watch::Receiver<bool>> {
        self.exec_registry()
            .get(&exec)
            .map(watch::Sender::subscribe)
    }

    fn notify_exec_final(&self, exec: Uuid) {
        if let Some(tx) = self.exec_registry().remove(&exec) {
            tx.send_replace(true);
        }
    }

    /// The directory holding an exec's `output.log`, `output.idx` and `status.json`.
    pub fn exec_dir(&self, sandbox: Uuid, exec: Uuid) -> SandboxDir {
        self.dir(sandbox).exec(exec)
    }

    /// Start `spec` (validated) in a running sandbox.
    pub async fn create_exec(
        self: &Arc<Self>,
        scope: &Scope,
        sandbox: &str,
        spec: CreateExec,
    ) -> Result<Exec, ExecError> {
        let sandbox = self.find(scope, sandbox).await?;
        if sandbox.state != SandboxState::Running {
            return Err(ExecError::Sandbox(SandboxError::NotRunning));
        }
        // In its own task, so that a client hanging up cannot leave a row without a watcher.
        let svc = Arc::clone(self);
        tokio::spawn(async move { svc.start_exec(sandbox, spec).await }).await?
    }

    async fn start_exec(
        self: Arc<Self>,
        sandbox: Sandbox,
        spec: CreateExec,
    ) -> Result<Exec, ExecError> {
        let id = Uuid::new_v4();
        self.exec_registry().insert(id, watch::channel(false).0);
        if !self
            .store
            .insert_exec(id, sandbox.id, self.clock.now_unix_ms(), &spec)
            .await?
        {
            self.exec_registry().remove(&id);
            return Err(ExecError::Sandbox(SandboxError::NotRunning));
        }
        let req = ExecRequest {
            id,
            command: spec.command.clone(),
            env: spec.env.clone().into_iter().collect(),
            cwd: spec.cwd.clone(),
            tty: spec.tty,
            stdin: spec.stdin,
            cols: spec.cols.unwrap_or(80),
            rows: spec.rows.unwrap_or(24),
        };
        let socket = self.dir(sandbox.id).monitor_socket();
        let answer =
            tokio::time::timeout(START_TIMEOUT, request(&socket, &proto::exec_line(&req))).await;
        let answer = match answer {
            Ok(Ok((answer, _))) => answer,
            Ok(Err(MonitorError::Gone(_))) => Some(format!("err {}", proto::NOT_RUNNING)),
            Ok(Err(e)) => {
                // A monitor that closes under us is most often a sandbox ending right now: that
                // is the caller's race (409), not our failure.
                if self.ended_meanwhile(sandbox.id).await {
                    return Err(self.withdraw_exec(id).await);
                }
                // We cannot know whether the monitor started it: the watcher finds out.
                tracing::error!(%id, error = %e, "sending an exec to a monitor failed");
                tokio::spawn(watch_exec(Arc::clone(&self), sandbox.id, id));
                return Err(e.into());
            }
            Err(_) => {
                tokio::spawn(watch_exec(Arc::clone(&self), sandbox.id, id));
                return Err(MonitorError::Timeout.into());
            }
        };
        match answer
            .as_deref()
            .map(|a| a.split_once(' ').unwrap_or((a, "")))
        {
            Some(("ok", json)) => {
                let started: ExecStarted = serde_json::from_str(json)
                    .map_err(|e| MonitorError::Refused(format!("unreadable exec answer: {e}")))?;
                self.store
                    .set_exec_running(id, started.started_at_unix_ms)
                    .await?;
                if let Some(e) = &started.exec_error {
                    tracing::info!(%id, error = %e, "exec command could not be executed");
                }
                tokio::spawn(watch_exec(Arc::clone(&self), sandbox.id, id));
            }
            Some(("err", why)) if why == proto::NOT_RUNNING => {
                // The sandbox ended in between: as if it had been asked a moment later.
                return Err(self.withdraw_exec(id).await);
            }
            other => {
                // The sandbox's init died a moment before its monitor noticed (joining it fails,
                // or the monitor closes without answering): the exec raced the sandbox's end.
                if self.ended_meanwhile(sandbox.id).await {
                    return Err(self.withdraw_exec(id).await);
                }
                let why = match other {
                    Some(("err", why)) => why.to_owned(),
                    _ => "the monitor closed the connection without an answer".to_owned(),
                };
                tracing::warn!(%id, error = %why, "starting an exec failed");
                let end = ExecEnding {
                    state: SandboxState::Failed,
                    exit_code: None,
                    signal: None,
                    error: Some(why),
                    finished_at_ms: self.clock.now_unix_ms(),
                };
                self.store.finish_exec(id, &end).await?;
                self.notify_exec_final(id);
                return Err(ExecError::Failed(id));
            }
        }
        self.store
            .exec(sandbox.id, id)
            .await?
            .ok_or(ExecError::NotFound)
    }

    /// Whether the sandbox has ended, or ends within [`ENDING_GRACE`]: a monitor whose sandbox's
    /// init is gone closes within milliseconds, and its watcher then marks the sandbox final.
    async fn ended_meanwhile(&self, sandbox: Uuid) -> bool {
        if let Some(mut rx) = self.subscribe(sandbox) {
            let _ = tokio::time::timeout(ENDING_GRACE, rx.wait_for(|done| *done)).await;
        }
        matches!(self.store.get(sandbox).await, Ok(Some(s)) if s.state.is_final())
    }

    /// Forget an exec that never ran because its sandbox ended first: the answer is 409
    /// `not_running`, as if it had been asked a moment later.
    async fn withdraw_exec(&self, id: Uuid) -> ExecError {
        if let Err(e) = self.store.delete_exec(id).await {
            return e.into();
        }
        self.notify_exec_final(id);
        ExecError::Sandbox(SandboxError::NotRunning)
    }

    /// The execs of a sandbox, oldest first.
    pub async fn execs(&self, scope: &Scope, sandbox: &str) -> Result<Vec<Exec>, ExecError> {
        let sandbox = self.find(scope, sandbox).await?;
        Ok(self.store.execs(sandbox.id).await?)
    }

    /// One exec of a sandbox (an exec id of another sandbox is not found).
    pub async fn exec(&self, scope: &Scope, sandbox: &str, exec: &str) -> Result<Exec, ExecError> {
        let sandbox = self.find(scope, sandbox).await?;
        let exec = Uuid::parse_str(exec).map_err(|_| ExecError::NotFound)?;
        self.store
            .exec(sandbox.id, exec)
            .await?
            .ok_or(ExecError::NotFound)
    }

    /// An exec by its sandbox's id and its own (for a caller that found it within its scope).
    pub async fn exec_row(&self, sandbox: Uuid, exec: Uuid) -> Result<Option<Exec>, ExecError> {
        Ok(self.store.exec(sandbox, exec).await?)
    }

    /// Attach to a running exec: a connection that carries `sandboxd_protocol::exec::Frame`s
    /// (stdin only when `stdin` was granted). `None` when the exec has ended already.
    pub async fn attach_exec(
        &self,
        exec: &Exec,
        stdin: bool,
    ) -> Result<Option<AttachSession>, ExecError> {
        if exec.state.is_final() {
            return Ok(None);
        }
        self.attach_monitor(exec.sandbox_id, exec.id, stdin).await
    }

    /// Attach to a running sandbox's main command (created with `stdin` or `tty`).
    pub async fn attach_main(
        &self,
        sandbox: &Sandbox,
        stdin: bool,
    ) -> Result<Option<AttachSession>, ExecError> {
        if sandbox.state.is_final() {
            return Ok(None);
        }
        if stdin && !sandbox.spec.stdin {
            return Err(ExecError::NoStdin);
        }
        if !stdin && !sandbox.spec.tty {
            // A reader of a command without a terminal needs nothing from the monitor.
            return Ok(None);
        }
        // The nil id names the main command on the monitor's socket.
        self.attach_monitor(sandbox.id, Uuid::nil(), stdin).await
    }

    async fn attach_monitor(
        &self,
        sandbox: Uuid,
        target: Uuid,
        stdin: bool,
    ) -> Result<Option<AttachSession>, ExecError> {
        let socket = self.dir(sandbox).monitor_socket();
        let line = proto::attach_line(target, stdin);
        let (answer, stream) = match tokio::time::timeout(ATTACH_TIMEOUT, request(&socket, &line))
            .await
            .map_err(|_| MonitorError::Timeout)?
        {
            Ok(x) => x,
            Err(MonitorError::Gone(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        match answer.as_deref() {
            Some("ok") => Ok(Some(AttachSession { stream })),
            Some(a) if a == format!("err {}", proto::STDIN_BUSY) => Err(ExecError::StdinBusy),
            Some("err no_stdin") => Err(ExecError::NoStdin),
            // Ended in between (or the monitor is exiting): the log has everything.
            _ => Ok(None),
        }
    }

    /// After a restart: every exec that was not final gets a watcher again, which records how
    /// it ended if it did while the daemon was away.
    pub(super) async fn reconcile_execs(self: &Arc<Self>) -> Result<(), StoreError> {
        for exec in self.store.live_execs().await? {
            self.exec_registry()
                .entry(exec.id)
                .or_insert_with(|| watch::channel(false).0);
            tokio::spawn(watch_exec(Arc::clone(self), exec.sandbox_id, exec.id));
        }
        Ok(())
    }
}

/// Wait for an exec to end (through its monitor), then record how it ended.
async fn watch_exec(svc: Arc<Service>, sandbox: Uuid, exec: Uuid) {
    let socket = svc.dir(sandbox).monitor_socket();
    match monitor::connect(&socket).await {
        Ok(stream) => {
            let mut reader = BufReader::new(stream);
            if reader
                .get_mut()
                .write_all(proto::wait_line(exec).as_bytes())
                .await
                .is_ok()
            {
                // `ended`, an error (unknown exec), or the monitor's exit: all mean "look now".
                let mut line = String::new();
                let _ = (&mut reader).take(MAX_ANSWER).read_line(&mut line).await;
            }
        }
        Err(MonitorError::Gone(_)) => {}
        Err(e) => tracing::warn!(%exec, error = %e, "connecting to a monitor failed"),
    }
    let dir = svc.exec_dir(sandbox, exec);
    let ending = match tokio::fs::read(dir.status()).await {
        Ok(bytes) => match serde_json::from_slice::<ExecStatus>(&bytes) {
            Ok(status) => ending_of(&status),
            Err(e) => {
                tracing::warn!(%exec, error = %e, "unreadable exec status.json");
                lost(svc.clock.now_unix_ms())
            }
        },
        Err(_) => lost(svc.clock.now_unix_ms()),
    };
    match svc.store.finish_exec(exec, &ending).await {
        Ok(_) => {}
        Err(e) => tracing::error!(%exec, error = %e, "recording an exec's exit failed"),
    }
    svc.notify_exec_final(exec);
}

fn ending_of(status: &ExecStatus) -> ExecEnding {
    ExecEnding {
        state: if status.setup_failed {
            SandboxState::Failed
        } else {
            SandboxState::Exited
        },
        exit_code: status.exit_code,
        signal: status.signal.map(sandboxd_protocol::rules::Signal::name_of),
        error: status.error.clone(),
        finished_at_ms: status.finished_at_unix_ms,
    }
}

fn lost(now_unix_ms: i64) -> ExecEnding {
    ExecEnding {
        state: SandboxState::Failed,
        exit_code: None,
        signal: None,
        error: Some("the exec's monitor ended without recording an exit status".into()),
        finished_at_ms: now_unix_ms,
    }
}
