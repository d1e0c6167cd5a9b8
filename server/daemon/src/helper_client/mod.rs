//! Talking to `sandboxd-helper`: the [`Helper`] trait, the real client over `helper.sock`, and a
//! [`FakeHelper`] (see [`fake`]) that lets the rest of the daemon be tested without root or the
//! real helper.
//!
//! The helper answers requests strictly in order, one response per request, so the real client
//! keeps one connection and serialises requests through a mutex. A file transfer gets a
//! connection of its own and is handed out as a [`FileTransfer`]: the chunk protocol of
//! `sandboxd_protocol::files` is spoken here and nowhere else.

mod fake;

pub use fake::{FakeHelper, FakeSpawn, FAKE_MAX_FILE};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use sandboxd_protocol::files;
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
    /// Start a file transfer on a connection of its own (see `sandboxd_protocol::files`); it is
    /// returned once the worker has resolved the path.
    fn transfer(
        &self,
        request: FilesRequest,
    ) -> BoxFuture<'_, Result<Box<dyn FileTransfer>, HelperClientError>>;

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
    max_bytes: Option<u64>,
) -> Result<wire::ImportedImage, HelperClientError> {
    match h
        .call_long(Request::ImportImage {
            upload,
            digest,
            max_bytes,
        })
        .await?
    {
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
    read_response(stream).await
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
    ) -> BoxFuture<'_, Result<Box<dyn FileTransfer>, HelperClientError>> {
        Box::pin(async move {
            let (mut stream, _) = open(&self.path).await?;
            match round_trip(&mut stream, &Request::Files(request)).await? {
                Response::FileReady(ready) => Ok(Box::new(SocketTransfer { stream, ready }) as _),
                other => Err(unexpected("files", other)),
            }
        })
    }
}

/// Read one frame (a response) from a connection.
async fn read_response(stream: &mut UnixStream) -> Result<Response, HelperClientError> {
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await?;
    let len = wire::frame_len(prefix)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(wire::decode(&body)?)
}

/// Why a transfer ended before its worker said `FileDone`.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The worker refused or failed, and said why.
    #[error("{}", .0.message)]
    Refused(HelperError),
    /// The worker stopped reading an upload; [`FileTransfer::outcome`] tells why.
    #[error("the file worker stopped reading")]
    Stopped,
    #[error("the file worker's connection broke off")]
    Helper(#[source] HelperClientError),
    #[error("unexpected answer from the file worker: {0}")]
    Unexpected(String),
}

/// A file transfer whose path the worker has resolved. Dropping it without
/// [`FileTransfer::end_upload`] makes the worker discard an upload.
pub trait FileTransfer: Send {
    /// What the worker found at the path.
    fn ready(&self) -> &FileReady;
    /// The next piece of a download; `None` once the worker has sent everything and said done.
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, TransferError>>;
    /// Send one piece of an upload (of any size); `Stopped` when the worker no longer reads.
    fn send<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), TransferError>>;
    /// End an upload and wait for the worker's verdict.
    fn end_upload(self: Box<Self>) -> BoxFuture<'static, Result<(), TransferError>>;
    /// The worker's verdict without sending anything more (a deletion, a stopped upload).
    fn outcome(self: Box<Self>) -> BoxFuture<'static, Result<(), TransferError>>;
}

/// A transfer on its own connection to the helper.
struct SocketTransfer {
    stream: UnixStream,
    ready: FileReady,
}

/// How long a finished transfer waits for its worker to go (see [`worker_gone`]).
const WORKER_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Wait until the worker closed the connection, which it does by exiting. A worker that built a
/// stopped sandbox's root holds the sandbox's `monitor.lock` (and the root's mounts) until it
/// exits, so answering the client only then means a `start` right after a transfer finds the
/// lock free instead of answering 409. Bounded: a worker that lingers does not hold the answer.
async fn worker_gone(stream: &mut UnixStream) {
    let mut sink = [0u8; 64];
    let _ = tokio::time::timeout(WORKER_EXIT_WAIT, async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

impl SocketTransfer {
    async fn verdict(mut self) -> Result<(), TransferError> {
        match read_response(&mut self.stream).await {
            Ok(Response::FileDone) => {
                worker_gone(&mut self.stream).await;
                Ok(())
            }
            Ok(Response::Error(e)) => Err(TransferError::Refused(e)),
            Ok(other) => Err(TransferError::Unexpected(format!("{other:?}"))),
            Err(e) => Err(TransferError::Helper(e)),
        }
    }
}

impl FileTransfer for SocketTransfer {
    fn ready(&self) -> &FileReady {
        &self.ready
    }

    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, TransferError>> {
        Box::pin(async move {
            let io = |e: std::io::Error| TransferError::Helper(HelperClientError::Io(e));
            let mut prefix = [0u8; 4];
            self.stream.read_exact(&mut prefix).await.map_err(io)?;
            let len =
                files::chunk_len(prefix).map_err(|e| TransferError::Unexpected(e.to_string()))?;
            if len > 0 {
                let mut buf = vec![0u8; len];
                self.stream.read_exact(&mut buf).await.map_err(io)?;
                return Ok(Some(Bytes::from(buf)));
            }
            match read_response(&mut self.stream).await {
                Ok(Response::FileDone) => {
                    worker_gone(&mut self.stream).await;
                    Ok(None)
                }
                Ok(Response::Error(e)) => Err(TransferError::Refused(e)),
                Ok(other) => Err(TransferError::Unexpected(format!("{other:?}"))),
                Err(e) => Err(TransferError::Helper(e)),
            }
        })
    }

    fn send<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), TransferError>> {
        Box::pin(async move {
            for piece in data.chunks(files::MAX_CHUNK) {
                let header = files::chunk_header(piece.len());
                if self.stream.write_all(&header).await.is_err()
                    || self.stream.write_all(piece).await.is_err()
                {
                    return Err(TransferError::Stopped);
                }
            }
            Ok(())
        })
    }

    fn end_upload(mut self: Box<Self>) -> BoxFuture<'static, Result<(), TransferError>> {
        Box::pin(async move {
            // A worker that stopped reading has its verdict waiting anyway.
            let _ = self.stream.write_all(&files::chunk_header(0)).await;
            self.verdict().await
        })
    }

    fn outcome(self: Box<Self>) -> BoxFuture<'static, Result<(), TransferError>> {
        Box::pin(self.verdict())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandboxd_protocol::files::FileKind;

    fn transfer(stream: UnixStream) -> Box<dyn FileTransfer> {
        Box::new(SocketTransfer {
            stream,
            ready: FileReady {
                kind: FileKind::File,
                size: None,
                mode: None,
            },
        })
    }

    /// The worker's side of a download: chunks, the end, then the final frame.
    #[tokio::test]
    async fn a_download_is_chunks_then_the_workers_verdict() {
        for (verdict, ok) in [
            (Response::FileDone, true),
            (
                Response::Error(HelperError::new(wire::HelperErrorCode::Denied, "no")),
                false,
            ),
        ] {
            let (ours, mut worker) = UnixStream::pair().unwrap();
            tokio::spawn(async move {
                for piece in [&b"abc"[..], b"de"] {
                    worker
                        .write_all(&files::chunk_header(piece.len()))
                        .await
                        .unwrap();
                    worker.write_all(piece).await.unwrap();
                }
                worker.write_all(&files::chunk_header(0)).await.unwrap();
                worker
                    .write_all(&wire::encode(&verdict).unwrap())
                    .await
                    .unwrap();
            });
            let mut t = transfer(ours);
            assert_eq!(t.next_chunk().await.unwrap().as_deref(), Some(&b"abc"[..]));
            assert_eq!(t.next_chunk().await.unwrap().as_deref(), Some(&b"de"[..]));
            match t.next_chunk().await {
                Ok(None) => assert!(ok),
                Err(TransferError::Refused(e)) => assert!(!ok && e.message == "no"),
                other => panic!("{other:?}"),
            }
        }
    }

    /// The daemon's side of an upload: pieces cut to chunks, an empty chunk, then the verdict.
    #[tokio::test]
    async fn an_upload_is_cut_into_chunks_and_ended() {
        let (ours, mut worker) = UnixStream::pair().unwrap();
        let received = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut sizes = Vec::new();
            loop {
                let mut prefix = [0u8; 4];
                worker.read_exact(&mut prefix).await.unwrap();
                let len = files::chunk_len(prefix).unwrap();
                sizes.push(len);
                if len == 0 {
                    break;
                }
                let mut buf = vec![0u8; len];
                worker.read_exact(&mut buf).await.unwrap();
                got.extend_from_slice(&buf);
            }
            let done = wire::encode(&Response::FileDone).unwrap();
            worker.write_all(&done).await.unwrap();
            (got, sizes)
        });
        let mut t = transfer(ours);
        let data = vec![5u8; files::MAX_CHUNK + 10];
        t.send(&data).await.unwrap();
        t.send(b"tail").await.unwrap();
        t.end_upload().await.unwrap();
        let (got, sizes) = received.await.unwrap();
        assert_eq!(sizes, vec![files::MAX_CHUNK, 10, 4, 0]);
        assert_eq!(got.len(), data.len() + 4);
    }

    /// A worker that stops reading: `send` says so, and the verdict tells why.
    #[tokio::test]
    async fn a_worker_that_stops_reading_gives_its_reason() {
        let (ours, mut worker) = UnixStream::pair().unwrap();
        let refusal = Response::Error(HelperError::new(wire::HelperErrorCode::Invalid, "full"));
        worker
            .write_all(&wire::encode(&refusal).unwrap())
            .await
            .unwrap();
        drop(worker);
        let mut t = transfer(ours);
        let mut stopped = false;
        // The socket buffers take some data before the closed end shows.
        for _ in 0..64 {
            if let Err(e) = t.send(&vec![0u8; files::MAX_CHUNK]).await {
                assert!(matches!(e, TransferError::Stopped), "{e:?}");
                stopped = true;
                break;
            }
        }
        assert!(stopped, "the closed worker never stopped the upload");
        match t.outcome().await {
            Err(TransferError::Refused(e)) => assert_eq!(e.message, "full"),
            other => panic!("{other:?}"),
        }
    }
}
