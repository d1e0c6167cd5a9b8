//! [`FakeHelper`]: a helper that works on a temporary directory instead of the kernel, for tests.
//!
//! Sandboxes are directories with an empty log; with [`FakeSpawn::Run`] a fake monitor (a task on
//! `monitor.sock`) keeps one running and runs fake execs: a process with stdin echoes it to its
//! stdout until stdin is closed, one without prints its command line and ends. File transfers
//! work on files kept in memory (an archive is kept as the bytes uploaded).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use sandboxd_protocol::exec::{self as proto, ExecCommand, ExecStarted, ExecStatus, Frame};
use sandboxd_protocol::files::{FileKind, FileOp, MAX_CHUNK};
use sandboxd_protocol::layout::SandboxDir;
use sandboxd_protocol::logindex::Record;
use sandboxd_protocol::wire::{
    self, FileReady, FilesRequest, HelperError, HelperErrorCode, HelperInfo, Mode, Request,
    Response, SandboxStats, Spawned,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use uuid::Uuid;

use super::{FileTransfer, Helper, HelperClientError, TransferError};

/// Largest file the fake accepts; a bigger upload is refused part-way (`invalid`).
pub const FAKE_MAX_FILE: usize = 1 << 20;

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
    /// What `Info` reports about egress (unavailable unless a test says otherwise).
    pub egress: StdMutex<sandboxd_protocol::egress::EgressStatus>,
    /// Files by sandbox and path: content and permission bits.
    files: Files,
}

/// The fake's files by sandbox and path.
type Files = Arc<StdMutex<HashMap<(Uuid, String), FakeFile>>>;

#[derive(Debug, Clone)]
struct FakeFile {
    data: Vec<u8>,
    mode: u32,
    /// Uploaded with `PUT /archive` (and so read back by `GET /archive` only).
    archive: bool,
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
            egress: StdMutex::new(sandboxd_protocol::egress::EgressStatus {
                available: false,
                reason: Some("the fake helper has no egress filter".into()),
                ..Default::default()
            }),
            files: Arc::new(StdMutex::new(HashMap::new())),
        })
    }

    /// The content of a file put into sandbox `id`.
    pub fn file(&self, id: Uuid, path: &str) -> Option<Vec<u8>> {
        self.lock_files()
            .get(&(id, path.to_owned()))
            .map(|f| f.data.clone())
    }

    fn lock_files(&self) -> std::sync::MutexGuard<'_, HashMap<(Uuid, String), FakeFile>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start_transfer(&self, req: &FilesRequest) -> Result<FakeTransfer, HelperError> {
        let key = (req.spawn.id, req.path.clone());
        let not_found = || HelperError::new(HelperErrorCode::NotFound, "no such file or directory");
        let (ready, download) = match req.op {
            FileOp::Get | FileOp::GetArchive => {
                let archive = req.op == FileOp::GetArchive;
                let file = self
                    .lock_files()
                    .get(&key)
                    .filter(|f| f.archive == archive)
                    .cloned()
                    .ok_or_else(not_found)?;
                let ready = FileReady {
                    kind: if archive {
                        FileKind::Archive
                    } else {
                        FileKind::File
                    },
                    size: (!archive).then_some(file.data.len() as u64),
                    mode: (!archive).then_some(file.mode),
                };
                (ready, file.data)
            }
            FileOp::Delete => {
                self.lock_files().remove(&key).ok_or_else(not_found)?;
                (upload_ready(), Vec::new())
            }
            FileOp::Put | FileOp::PutArchive => (upload_ready(), Vec::new()),
        };
        Ok(FakeTransfer {
            ready,
            download: download
                .chunks(MAX_CHUNK)
                .map(Bytes::copy_from_slice)
                .collect::<Vec<_>>()
                .into_iter(),
            upload: Vec::new(),
            stopped: false,
            target: req.op.uploads().then(|| {
                (
                    Arc::clone(&self.files),
                    key,
                    FakeFile {
                        data: Vec::new(),
                        mode: req.mode.unwrap_or(0o644),
                        archive: req.op == FileOp::PutArchive,
                    },
                )
            }),
        })
    }

    fn answer(&self, request: &Request) -> Response {
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
                egress: self
                    .egress
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
                limits_note: None,
                preflight: Vec::new(),
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
                        FakeSpawn::Run => fake_monitor(dir.clone(), status, req.stdin),
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
            Request::ImportImage {
                upload,
                digest,
                max_bytes,
            } => {
                let path = self
                    .state_dir
                    .join(sandboxd_protocol::layout::UPLOADS_DIR)
                    .join(upload.to_string());
                match std::fs::metadata(path) {
                    // As the real unpacker stops at its cap.
                    Ok(m) if max_bytes.is_some_and(|max| m.len() > max) => {
                        Response::Error(HelperError::new(
                            wire::HelperErrorCode::ImageTooLarge,
                            format!(
                                "the image unpacks to more than {} bytes",
                                max_bytes.unwrap_or(0)
                            ),
                        ))
                    }
                    Ok(m) => Response::ImageImported(wire::ImportedImage {
                        digest: digest.clone(),
                        size_bytes: m.len(),
                        entries: 1,
                        format: "rootfs".into(),
                        layers: 1,
                        skipped: 0,
                        unpacked: true,
                        config: Default::default(),
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

fn upload_ready() -> FileReady {
    FileReady {
        kind: FileKind::None,
        size: None,
        mode: None,
    }
}

/// A transfer on the fake's in-memory files.
struct FakeTransfer {
    ready: FileReady,
    download: std::vec::IntoIter<Bytes>,
    upload: Vec<u8>,
    /// The upload went over [`FAKE_MAX_FILE`]: the "worker" no longer reads.
    stopped: bool,
    /// Where an upload lands once it ends.
    target: Option<(Files, (Uuid, String), FakeFile)>,
}

impl FileTransfer for FakeTransfer {
    fn ready(&self) -> &FileReady {
        &self.ready
    }

    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, TransferError>> {
        let next = self.download.next();
        Box::pin(async move { Ok(next) })
    }

    fn send<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), TransferError>> {
        let result = if self.stopped || self.upload.len() + data.len() > FAKE_MAX_FILE {
            self.stopped = true;
            Err(TransferError::Stopped)
        } else {
            self.upload.extend_from_slice(data);
            Ok(())
        };
        Box::pin(async move { result })
    }

    fn end_upload(self: Box<Self>) -> BoxFuture<'static, Result<(), TransferError>> {
        let mut this = *self;
        let result = match this.target.take() {
            _ if this.stopped => Err(too_large()),
            Some((files, key, mut file)) => {
                file.data = std::mem::take(&mut this.upload);
                files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, file);
                Ok(())
            }
            None => Ok(()),
        };
        Box::pin(async move { result })
    }

    fn outcome(self: Box<Self>) -> BoxFuture<'static, Result<(), TransferError>> {
        let result = if self.stopped {
            Err(too_large())
        } else {
            Ok(())
        };
        Box::pin(async move { result })
    }
}

fn too_large() -> TransferError {
    TransferError::Refused(HelperError::new(
        HelperErrorCode::Invalid,
        format!("the fake keeps files of at most {FAKE_MAX_FILE} bytes"),
    ))
}

/// A fake process of a fake monitor: the main command (nil id) or an exec.
struct FakeProcess {
    dir: SandboxDir,
    stdin: bool,
    /// Whether a connection owns stdin now.
    stdin_owned: bool,
    /// Turns `true` when the process has ended and its status is written.
    ended: watch::Sender<bool>,
}

/// Append `data` to a process's output as the monitor does: bytes first, then the record.
fn write_output(dir: &SandboxDir, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let open = |p: PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    };
    open(dir.output_log())?.write_all(data)?;
    let rec = Record {
        channel: 1,
        len: data.len() as u32,
    };
    open(dir.output_index())?.write_all(&rec.encode())
}

type Processes = Arc<StdMutex<HashMap<Uuid, FakeProcess>>>;

fn lock(p: &Processes) -> std::sync::MutexGuard<'_, HashMap<Uuid, FakeProcess>> {
    p.lock().unwrap_or_else(|p| p.into_inner())
}

/// End a fake exec: write its `status.json` and wake its waiters.
fn end_exec(processes: &Processes, id: Uuid, exit_code: i32, signal: Option<i32>) {
    let mut map = lock(processes);
    let Some(p) = map.get_mut(&id) else { return };
    if *p.ended.borrow() {
        return;
    }
    let status = ExecStatus {
        exit_code: Some(exit_code),
        signal,
        started_at_unix_ms: Some(crate::now_unix_ms()),
        finished_at_unix_ms: crate::now_unix_ms(),
        error: None,
        setup_failed: false,
    };
    let _ = std::fs::write(
        p.dir.status(),
        serde_json::to_vec(&status).unwrap_or_default(),
    );
    p.ended.send_replace(true);
}

/// The [`FakeSpawn::Run`] monitor: holds every connection open (as a watcher expects) until a
/// `kill N` line arrives, then writes `status.json`, answers `ok` and closes everything. It
/// starts, waits for and attaches to fake execs (see the module's documentation).
fn fake_monitor(
    dir: SandboxDir,
    mut status: sandboxd_protocol::status::ExitStatus,
    stdin: bool,
) -> std::io::Result<()> {
    let listener = std::os::unix::net::UnixListener::bind(dir.monitor_socket())?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let processes: Processes = Arc::new(StdMutex::new(HashMap::new()));
    lock(&processes).insert(
        Uuid::nil(),
        FakeProcess {
            dir: dir.clone(),
            stdin,
            stdin_owned: false,
            ended: watch::channel(false).0,
        },
    );
    tokio::spawn(async move {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (kill_tx, mut kill_rx) = tokio::sync::mpsc::channel::<(i32, UnixStream)>(1);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { break };
                    let mut stop = stop_rx.clone();
                    let conn = connection(stream, dir.clone(), Arc::clone(&processes), kill_tx.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = conn => {}
                            _ = async { stop.wait_for(|s| *s).await.is_ok() } => {}
                        }
                    });
                }
                Some((signo, mut stream)) = kill_rx.recv() => {
                    let ids: Vec<Uuid> = lock(&processes).keys().copied().filter(|id| !id.is_nil()).collect();
                    for id in ids {
                        end_exec(&processes, id, 128 + signo, Some(signo));
                    }
                    status.exit_code = 128 + signo;
                    status.signal = Some(signo);
                    status.reason = sandboxd_protocol::status::ExitReason::Killed;
                    status.finished_at_unix_ms = crate::now_unix_ms();
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

/// One connection to the fake monitor: one request line, then what it asks for.
async fn connection(
    stream: UnixStream,
    dir: SandboxDir,
    processes: Processes,
    kill_tx: tokio::sync::mpsc::Sender<(i32, UnixStream)>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    match reader.read_line(&mut line).await {
        Ok(n) if n > 0 => {}
        // A watcher: it sends nothing and waits for the close.
        _ => return std::future::pending().await,
    }
    let line = line.trim_end_matches('\n');
    if let Some(signo) = sandboxd_protocol::control::parse_kill(line) {
        let _ = kill_tx.send((signo, reader.into_inner())).await;
        return std::future::pending().await;
    }
    let mut stream = reader.into_inner();
    match proto::parse(line) {
        Some(Ok(ExecCommand::Start(req))) => {
            let exec_dir = dir.exec(req.id);
            let made = std::fs::create_dir_all(exec_dir.root())
                .and_then(|()| std::fs::write(exec_dir.output_log(), b""))
                .and_then(|()| std::fs::write(exec_dir.output_index(), b""));
            if let Err(e) = made {
                let _ = stream.write_all(format!("err {e}\n").as_bytes()).await;
                return;
            }
            lock(&processes).insert(
                req.id,
                FakeProcess {
                    dir: exec_dir.clone(),
                    stdin: req.stdin,
                    stdin_owned: false,
                    ended: watch::channel(false).0,
                },
            );
            if !req.stdin {
                let _ = write_output(&exec_dir, format!("{}\n", req.command.join(" ")).as_bytes());
                end_exec(&processes, req.id, 0, None);
            }
            let started = ExecStarted {
                started_at_unix_ms: crate::now_unix_ms(),
                exec_error: None,
            };
            let answer = serde_json::to_string(&started).unwrap_or_default();
            let _ = stream.write_all(format!("ok {answer}\n").as_bytes()).await;
        }
        Some(Ok(ExecCommand::Wait(id))) => {
            let ended = lock(&processes).get(&id).map(|p| p.ended.subscribe());
            let Some(mut ended) = ended else {
                let _ = stream.write_all(b"err unknown exec\n").await;
                return;
            };
            let _ = ended.wait_for(|e| *e).await;
            let _ = stream.write_all(b"ended\n").await;
        }
        Some(Ok(ExecCommand::Attach { id, stdin })) => {
            let granted = {
                let mut map = lock(&processes);
                match map.get_mut(&id) {
                    None => Err("err unknown exec\n".to_owned()),
                    Some(p) if *p.ended.borrow() => Err("err ended\n".to_owned()),
                    Some(p) if stdin && !p.stdin => Err("err no_stdin\n".to_owned()),
                    Some(p) if stdin && p.stdin_owned => {
                        Err(format!("err {}\n", proto::STDIN_BUSY))
                    }
                    Some(p) => {
                        p.stdin_owned |= stdin;
                        Ok((p.dir.clone(), p.ended.subscribe()))
                    }
                }
            };
            let (out_dir, mut ended) = match granted {
                Ok(g) => g,
                Err(answer) => {
                    let _ = stream.write_all(answer.as_bytes()).await;
                    return;
                }
            };
            if stream.write_all(b"ok\n").await.is_err() {
                return;
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                tokio::select! {
                    read = stream.read(&mut chunk) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            while let Ok(Some(frame)) = Frame::decode(&mut buf) {
                                match frame {
                                    Frame::Stdin(data) if stdin => {
                                        let _ = write_output(&out_dir, &data);
                                    }
                                    Frame::CloseStdin if stdin && !id.is_nil() => {
                                        end_exec(&processes, id, 0, None);
                                    }
                                    _ => {}
                                }
                            }
                        }
                    },
                    _ = ended.wait_for(|e| *e) => break,
                }
            }
            if stdin {
                if let Some(p) = lock(&processes).get_mut(&id) {
                    p.stdin_owned = false;
                }
            }
        }
        _ => {
            let _ = stream.write_all(b"err unknown request\n").await;
        }
    }
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

    fn transfer(
        &self,
        request: FilesRequest,
    ) -> BoxFuture<'_, Result<Box<dyn FileTransfer>, HelperClientError>> {
        let started = self.start_transfer(&request);
        if let Ok(mut log) = self.requests.lock() {
            log.push(Request::Files(request));
        }
        Box::pin(async move {
            match started {
                Ok(t) => Ok(Box::new(t) as Box<dyn FileTransfer>),
                Err(e) => Err(HelperClientError::Refused(e)),
            }
        })
    }
}
