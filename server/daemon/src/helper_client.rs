//! Talking to `sandboxd-helper`: the [`Helper`] trait, the real client over `helper.sock`, and a
//! [`FakeHelper`] that lets the rest of the daemon be tested without root or the real helper.
//!
//! The helper answers requests strictly in order, one response per request, so the real client
//! keeps one connection and serialises requests through a mutex.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use futures_util::future::BoxFuture;
use sandboxd_protocol::wire::{
    self, FileReady, FilesRequest, FrameError, HelperError, HelperInfo, Mode, Request, Response,
    SandboxStats, SpawnRequest, Spawned, PROTOCOL_VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum HelperClientError {
    #[error("connecting to the helper socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("helper connection failed")]
    Io(#[from] std::io::Error),
    #[error("helper frame")]
    Frame(#[from] FrameError),
    #[error("helper refused: {0}")]
    Refused(#[from] HelperError),
    #[error("helper speaks protocol version {0}, the daemon {PROTOCOL_VERSION}")]
    Version(u32),
    #[error("unexpected helper response to {request}: {response}")]
    Unexpected {
        request: &'static str,
        response: String,
    },
}

/// The requests the daemon makes of the helper. Implementations must be cheap to share.
pub trait Helper: Send + Sync + 'static {
    /// Whether sandboxes get their own uid range (and so need a uid slot).
    fn mode(&self) -> Mode;
    /// Send one request and wait for its response.
    fn call(&self, request: Request) -> BoxFuture<'_, Result<Response, HelperClientError>>;
    /// Start a file transfer on a connection of its own (see `sandboxd_protocol::files`):
    /// the connection and the worker's `FileReady` once the path is resolved.
    fn transfer(
        &self,
        request: FilesRequest,
    ) -> BoxFuture<'_, Result<(UnixStream, FileReady), HelperClientError>> {
        let _ = request;
        Box::pin(async {
            Err(HelperClientError::Refused(HelperError::new(
                wire::HelperErrorCode::Internal,
                "this helper does not transfer files",
            )))
        })
    }

    /// Send a request that may take long (an image import) on a connection of its own, so that
    /// it holds up no other request.
    fn call_long(&self, request: Request) -> BoxFuture<'_, Result<Response, HelperClientError>> {
        self.call(request)
    }
}

fn unexpected(request: &'static str, response: Response) -> HelperClientError {
    match response {
        Response::Error(e) => HelperClientError::Refused(e),
        other => HelperClientError::Unexpected {
            request,
            response: format!("{other:?}"),
        },
    }
}

/// Typed wrappers over [`Helper::call`].
pub async fn spawn(h: &dyn Helper, req: SpawnRequest) -> Result<Spawned, HelperClientError> {
    match h.call(Request::Spawn(req)).await? {
        Response::Spawned(s) => Ok(s),
        other => Err(unexpected("spawn", other)),
    }
}

pub async fn prepare(h: &dyn Helper, req: SpawnRequest) -> Result<(), HelperClientError> {
    match h.call(Request::Prepare(req)).await? {
        Response::Prepared => Ok(()),
        other => Err(unexpected("prepare", other)),
    }
}

pub async fn destroy(h: &dyn Helper, id: Uuid) -> Result<(), HelperClientError> {
    match h.call(Request::Destroy { id }).await? {
        Response::Destroyed => Ok(()),
        other => Err(unexpected("destroy", other)),
    }
}

pub async fn list(h: &dyn Helper) -> Result<Vec<Uuid>, HelperClientError> {
    match h.call(Request::List).await? {
        Response::List { ids } => Ok(ids),
        other => Err(unexpected("list", other)),
    }
}

pub async fn stats(h: &dyn Helper, id: Uuid) -> Result<SandboxStats, HelperClientError> {
    match h.call(Request::Stats { id }).await? {
        Response::Stats(s) => Ok(s),
        other => Err(unexpected("stats", other)),
    }
}

pub async fn import_image(
    h: &dyn Helper,
    upload: Uuid,
    digest: String,
) -> Result<wire::ImportedImage, HelperClientError> {
    match h.call_long(Request::ImportImage { upload, digest }).await? {
        Response::ImageImported(i) => Ok(i),
        other => Err(unexpected("import_image", other)),
    }
}

pub async fn delete_image(h: &dyn Helper, digest: String) -> Result<(), HelperClientError> {
    match h.call(Request::DeleteImage { digest }).await? {
        Response::ImageDeleted => Ok(()),
        other => Err(unexpected("delete_image", other)),
    }
}

pub async fn list_images(h: &dyn Helper) -> Result<Vec<String>, HelperClientError> {
    match h.call(Request::ListImages).await? {
        Response::ImageList { digests } => Ok(digests),
        other => Err(unexpected("list_images", other)),
    }
}

pub async fn info(h: &dyn Helper) -> Result<HelperInfo, HelperClientError> {
    match h.call(Request::Info).await? {
        Response::Info(i) => Ok(i),
        other => Err(unexpected("info", other)),
    }
}

/// The real client: one connection to `<state>/helper/helper.sock`, re-established (with a new
/// hello) after an I/O error, so one broken exchange does not break every later one. A request
/// whose exchange failed is not retried: a spawn may or may not have happened, and the caller
/// decides.
pub struct SocketHelper {
    path: PathBuf,
    stream: Arc<Mutex<Option<UnixStream>>>,
    mode: Mode,
}

/// Connect and say hello; the helper's answer tells the mode it runs in.
async fn open(path: &Path) -> Result<(UnixStream, Mode), HelperClientError> {
    let mut stream =
        UnixStream::connect(path)
            .await
            .map_err(|source| HelperClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
    };
    match round_trip(&mut stream, &hello).await? {
        Response::Hello { version, mode } if version == PROTOCOL_VERSION => Ok((stream, mode)),
        Response::Hello { version, .. } => Err(HelperClientError::Version(version)),
        other => Err(unexpected("hello", other)),
    }
}

impl SocketHelper {
    pub async fn connect(path: &Path) -> Result<Self, HelperClientError> {
        let (stream, mode) = open(path).await?;
        Ok(SocketHelper {
            path: path.to_owned(),
            stream: Arc::new(Mutex::new(Some(stream))),
            mode,
        })
    }
}

async fn round_trip(stream: &mut UnixStream, req: &Request) -> Result<Response, HelperClientError> {
    let frame = wire::encode(req)?;
    stream.write_all(&frame).await?;
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = wire::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(wire::decode(&body)?)
}

impl Helper for SocketHelper {
    fn mode(&self) -> Mode {
        self.mode
    }

    fn call_long(&self, request: Request) -> BoxFuture<'_, Result<Response, HelperClientError>> {
        let path = self.path.clone();
        Box::pin(async move {
            // Its own task: a client hanging up must not cut the exchange short (the helper's
            // worker would then unpack for nobody, and the upload would be removed under it).
            tokio::spawn(async move {
                let (mut conn, _) = open(&path).await?;
                round_trip(&mut conn, &request).await
            })
            .await
            .map_err(|e| HelperClientError::Io(std::io::Error::other(e)))?
        })
    }

    fn call(&self, request: Request) -> BoxFuture<'_, Result<Response, HelperClientError>> {
        // Holding the lock across the whole exchange keeps responses paired with requests. If a
        // caller were cancelled mid-exchange the stream would be out of step, so the exchange runs
        // in its own task that always completes.
        let stream = Arc::clone(&self.stream);
        let path = self.path.clone();
        Box::pin(async move {
            let task = tokio::spawn(async move {
                let mut guard = stream.lock().await;
                let conn = match guard.as_mut() {
                    Some(conn) => conn,
                    None => {
                        let (conn, _) = open(&path).await?;
                        tracing::info!("reconnected to the helper");
                        guard.insert(conn)
                    }
                };
                let result = round_trip(conn, &request).await;
                if matches!(
                    result,
                    Err(HelperClientError::Io(_) | HelperClientError::Frame(_))
                ) {
                    *guard = None;
                }
                result
            });
            task.await
                .map_err(|e| HelperClientError::Io(std::io::Error::other(e)))?
        })
    }

    fn transfer(
        &self,
        request: FilesRequest,
    ) -> BoxFuture<'_, Result<(UnixStream, FileReady), HelperClientError>> {
        Box::pin(async move {
            let (mut stream, _) = open(&self.path).await?;
            match round_trip(&mut stream, &Request::Files(request)).await? {
                Response::FileReady(ready) => Ok((stream, ready)),
                other => Err(unexpected("files", other)),
            }
        })
    }
}

/// Read one frame (a response) from a connection.
pub async fn read_response(stream: &mut UnixStream) -> Result<Response, HelperClientError> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = wire::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(wire::decode(&body)?)
}

/// How the [`FakeHelper`] answers `Spawn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeSpawn {
    /// Create the sandbox directory with an exit status of 0 and no monitor, as if the command
    /// ended at once.
    ExitAtOnce,
    /// Refuse with a setup error.
    Fail,
    /// Start a fake monitor (a task listening on `monitor.sock`) that keeps the sandbox running
    /// until it is sent a kill; it then writes `status.json` (reason `killed`) and closes.
    Run,
}

/// A helper that works on a temp directory instead of the kernel, for tests.
pub struct FakeHelper {
    pub state_dir: PathBuf,
    pub mode: Mode,
    pub spawn: FakeSpawn,
    /// What `Info` reports in `enforceable_limits`.
    pub enforceable: Vec<String>,
    /// The figures `Stats` answers while a sandbox runs and `status.json` records at its end.
    pub stats: SandboxStats,
    /// Every request received, in order.
    pub requests: StdMutex<Vec<Request>>,
}

impl FakeHelper {
    /// A fake that can enforce memory, cpus and pids.
    pub fn new(state_dir: &Path, mode: Mode, spawn: FakeSpawn) -> Arc<Self> {
        Self::with_limits(state_dir, mode, spawn, &["memory", "cpus", "pids"])
    }

    /// A fake reporting `enforceable` as the limits it can enforce.
    pub fn with_limits(
        state_dir: &Path,
        mode: Mode,
        spawn: FakeSpawn,
        enforceable: &[&str],
    ) -> Arc<Self> {
        Arc::new(FakeHelper {
            state_dir: state_dir.to_owned(),
            mode,
            spawn,
            enforceable: enforceable.iter().map(|l| (*l).to_owned()).collect(),
            stats: SandboxStats {
                memory_bytes: Some(1 << 20),
                memory_peak_bytes: Some(2 << 20),
                cpu_usec: Some(1234),
                pids: Some(1),
                pids_peak: Some(3),
                disk_bytes: Some(4096),
                output_bytes: 0,
                output_truncated: false,
            },
            requests: StdMutex::new(Vec::new()),
        })
    }

    fn answer(&self, request: &Request) -> Response {
        use sandboxd_protocol::layout::SandboxDir;
        use sandboxd_protocol::status::{ExitReason, ExitStatus};
        match request {
            Request::Hello { version } => Response::Hello {
                version: *version,
                mode: self.mode,
            },
            Request::Info => Response::Info(HelperInfo {
                mode: self.mode,
                user_namespaces: true,
                cgroup_version: "v2".into(),
                cgroup_controllers: vec!["cpu".into(), "memory".into(), "pids".into()],
                overlayfs: false,
                uid_base: 100_000_000,
                uid_range_size: 65536,
                uid_slots: 1024,
                enforceable_limits: self.enforceable.clone(),
                network_modes: match self.mode {
                    Mode::Privileged => vec!["none".into(), "bridge".into()],
                    Mode::Rootless => vec!["none".into()],
                },
                network_subnet: (self.mode == Mode::Privileged)
                    .then(|| sandboxd_protocol::net::DEFAULT_SUBNET.into()),
            }),
            Request::Spawn(req) => {
                if self.spawn == FakeSpawn::Fail {
                    return Response::Error(HelperError::new(
                        wire::HelperErrorCode::SetupFailed,
                        "fake setup failure",
                    ));
                }
                let dir = SandboxDir::new(&self.state_dir, req.id);
                let now = crate::now_unix_ms();
                let status = ExitStatus {
                    exit_code: 0,
                    signal: None,
                    reason: ExitReason::Exited,
                    started_at_unix_ms: now,
                    finished_at_unix_ms: now,
                    error: None,
                    stats: self.stats,
                };
                let made = std::fs::create_dir_all(dir.root())
                    .and_then(|()| std::fs::write(dir.output_log(), b""))
                    .and_then(|()| std::fs::write(dir.output_index(), b""))
                    .and_then(|()| match self.spawn {
                        FakeSpawn::Run => fake_monitor(dir.clone(), status),
                        _ => std::fs::write(
                            dir.status(),
                            serde_json::to_vec(&status).unwrap_or_default(),
                        ),
                    });
                match made {
                    Ok(()) => Response::Spawned(Spawned {
                        init_pid: 4242,
                        host_uid: 100_000_000 + req.uid_slot.unwrap_or(0) * 65536,
                        started_at_unix_ms: now,
                        exec_error: None,
                        // A fake "bind": port 0 becomes 40000 + its position.
                        ports: req
                            .network
                            .iter()
                            .flat_map(|n| n.ports.iter().enumerate())
                            .map(|(i, p)| wire::PortMapping {
                                sandbox: p.sandbox,
                                host: if p.host == 0 {
                                    40000 + i as u16
                                } else {
                                    p.host
                                },
                            })
                            .collect(),
                    }),
                    Err(e) => Response::Error(HelperError::new(
                        wire::HelperErrorCode::Internal,
                        e.to_string(),
                    )),
                }
            }
            Request::Prepare(req) => {
                let dir = SandboxDir::new(&self.state_dir, req.id);
                let made = std::fs::create_dir_all(dir.root())
                    .and_then(|()| std::fs::write(dir.output_log(), b""))
                    .and_then(|()| std::fs::write(dir.output_index(), b""));
                match made {
                    Ok(()) => Response::Prepared,
                    Err(e) => Response::Error(HelperError::new(
                        wire::HelperErrorCode::Internal,
                        e.to_string(),
                    )),
                }
            }
            Request::Files(_) => Response::Error(HelperError::new(
                wire::HelperErrorCode::Internal,
                "a transfer needs a connection of its own",
            )),
            Request::Destroy { id } => {
                let dir = SandboxDir::new(&self.state_dir, *id);
                match std::fs::remove_dir_all(dir.root()) {
                    Ok(()) => Response::Destroyed,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Response::Destroyed,
                    Err(e) => Response::Error(HelperError::new(
                        wire::HelperErrorCode::Internal,
                        e.to_string(),
                    )),
                }
            }
            Request::List => {
                let dir = self
                    .state_dir
                    .join(sandboxd_protocol::layout::SANDBOXES_DIR);
                let ids = std::fs::read_dir(dir)
                    .map(|rd| {
                        rd.filter_map(|e| e.ok())
                            .filter_map(|e| e.file_name().to_str()?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                Response::List { ids }
            }
            Request::Stats { id } => {
                let dir = SandboxDir::new(&self.state_dir, *id);
                if dir.root().exists() && !dir.status().exists() {
                    Response::Stats(self.stats)
                } else {
                    Response::Error(HelperError::new(
                        wire::HelperErrorCode::NotFound,
                        "no running sandbox",
                    ))
                }
            }
            // Images: the fake stores nothing and reports the upload's size as the image's.
            Request::ImportImage { upload, digest } => {
                let path = self
                    .state_dir
                    .join(sandboxd_protocol::layout::UPLOADS_DIR)
                    .join(upload.to_string());
                match std::fs::metadata(path) {
                    Ok(m) => Response::ImageImported(wire::ImportedImage {
                        digest: digest.clone(),
                        size_bytes: m.len(),
                        entries: 1,
                        format: "rootfs".into(),
                        layers: 1,
                        skipped: 0,
                        unpacked: true,
                    }),
                    Err(e) => Response::Error(HelperError::new(
                        wire::HelperErrorCode::Invalid,
                        e.to_string(),
                    )),
                }
            }
            Request::DeleteImage { .. } => Response::ImageDeleted,
            Request::ListImages => Response::ImageList {
                digests: Vec::new(),
            },
        }
    }
}

/// The [`FakeSpawn::Run`] monitor: holds every connection open (as a watcher expects) until a
/// `kill N` line arrives, then writes `status.json`, answers `ok` and closes everything.
fn fake_monitor(
    dir: sandboxd_protocol::layout::SandboxDir,
    mut status: sandboxd_protocol::status::ExitStatus,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let listener = std::os::unix::net::UnixListener::bind(dir.monitor_socket())?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tokio::spawn(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (kill_tx, mut kill_rx) = tokio::sync::mpsc::channel::<(i32, UnixStream)>(1);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { break };
                    let mut stop = stop_rx.clone();
                    let kill_tx = kill_tx.clone();
                    tokio::spawn(async move {
                        let mut reader = BufReader::new(stream);
                        let mut line = String::new();
                        tokio::select! {
                            read = reader.read_line(&mut line) => {
                                let signo = line.trim().strip_prefix("kill ").and_then(|n| n.parse().ok());
                                if let (Ok(n), Some(signo)) = (read, signo) {
                                    if n > 0 {
                                        let _ = kill_tx.send((signo, reader.into_inner())).await;
                                    }
                                }
                            }
                            _ = async { stop.wait_for(|s| *s).await.is_ok() } => {}
                        }
                    });
                }
                Some((signo, mut stream)) = kill_rx.recv() => {
                    let now = crate::now_unix_ms();
                    status.exit_code = 128 + signo;
                    status.signal = Some(signo);
                    status.reason = sandboxd_protocol::status::ExitReason::Killed;
                    status.finished_at_unix_ms = now;
                    let _ = std::fs::write(dir.status(), serde_json::to_vec(&status).unwrap_or_default());
                    let _ = stream.write_all(b"ok\n").await;
                    let _ = std::fs::remove_file(dir.monitor_socket());
                    stop_tx.send_replace(true);
                    break;
                }
            }
        }
    });
    Ok(())
}

impl Helper for FakeHelper {
    fn mode(&self) -> Mode {
        self.mode
    }

    fn call(&self, request: Request) -> BoxFuture<'_, Result<Response, HelperClientError>> {
        let response = self.answer(&request);
        if let Ok(mut log) = self.requests.lock() {
            log.push(request);
        }
        Box::pin(async move { Ok(response) })
    }
}
