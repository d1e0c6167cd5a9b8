//! `sbx cp`: copy files and directories into and out of a sandbox.
//!
//! `sbx cp LOCAL ID:/path` uploads a file to `/path` (to `/path/NAME` when `/path` ends with
//! `/`), with its permission bits; a directory is sent as a tar stream whose contents land in
//! `/path` (created if missing). `sbx cp ID:/path LOCAL` downloads a file to `LOCAL` (into it
//! when it is a directory), or the contents of a directory into `LOCAL` (created if missing).
//! Content streams both ways; nothing is held whole in memory.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use sandboxd_client::{Client, Download};
use tokio::io::AsyncReadExt;

use super::progress::Progress;
use super::{resolve, CliError};

/// Bytes per piece of an upload or of a tar stream.
const PIECE: usize = 256 * 1024;

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a local path, or ID:/path inside a sandbox.
    src: String,
    /// Where to: ID:/path inside a sandbox, or a local path.
    dest: String,
}

/// A side of the copy.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    Local(PathBuf),
    Sandbox { id: String, path: String },
}

/// `ID:/abs/path` is a sandbox path; anything else (`./a:b`, `/x`, `file`) is local.
fn place(arg: &str) -> Place {
    match arg.split_once(':') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') && path.starts_with('/') => {
            Place::Sandbox {
                id: id.to_owned(),
                path: path.to_owned(),
            }
        }
        _ => Place::Local(PathBuf::from(arg)),
    }
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> CliError {
    let what = format!("{what} {}", path.display());
    move |e| CliError::Local(what, e)
}

pub async fn run(client: &Client, args: CpArgs) -> Result<u8, CliError> {
    match (place(&args.src), place(&args.dest)) {
        (Place::Local(local), Place::Sandbox { id, path }) => {
            let id = resolve(client, &id).await?.id.to_string();
            upload(client, &id, &local, &path).await?;
        }
        (Place::Sandbox { id, path }, Place::Local(local)) => {
            let id = resolve(client, &id).await?.id.to_string();
            download(client, &id, &path, &local).await?;
        }
        _ => {
            return Err(CliError::Usage(
                "one side of `sbx cp` must be ID:/path in a sandbox and the other a local path"
                    .into(),
            ))
        }
    }
    Ok(0)
}

async fn upload(client: &Client, id: &str, local: &Path, remote: &str) -> Result<(), CliError> {
    let meta = tokio::fs::metadata(local)
        .await
        .map_err(io("reading", local))?;
    if meta.is_dir() {
        let dir = local.to_owned();
        let total = tokio::task::spawn_blocking(move || tar_size(&dir))
            .await
            .ok();
        let progress = Progress::bytes(&format!("copying {}", local.display()), total);
        let counted = progress.clone();
        let pieces = tar_stream(local.to_owned()).inspect(move |piece| {
            if let Ok(piece) = piece {
                counted.add(piece.len() as u64);
            }
        });
        let sent = client
            .put_archive(id, remote, reqwest::Body::wrap_stream(pieces))
            .await;
        progress.finish();
        sent?;
        return Ok(());
    }
    let mut remote = remote.to_owned();
    if remote.ends_with('/') {
        let name = local
            .file_name()
            .ok_or_else(|| CliError::Usage(format!("{} has no file name", local.display())))?;
        remote.push_str(&name.to_string_lossy());
    }
    let file = tokio::fs::File::open(local)
        .await
        .map_err(io("opening", local))?;
    let content = futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; PIECE];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    let mode = meta.permissions().mode() & 0o1777;
    let progress = Progress::bytes(&format!("copying {}", local.display()), Some(meta.len()));
    let counted = progress.clone();
    let content = content.inspect(move |piece| {
        if let Ok(piece) = piece {
            counted.add(piece.len() as u64);
        }
    });
    let sent = client
        .put_file(id, &remote, Some(mode), reqwest::Body::wrap_stream(content))
        .await;
    progress.finish();
    sent?;
    Ok(())
}

/// About the size of the tar stream of `dir`: a header per entry, file data in 512-byte blocks,
/// and the two closing blocks. For the progress bar only.
fn tar_size(dir: &Path) -> u64 {
    let mut total = 1024;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            total += 512;
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total += meta.len().div_ceil(512) * 512;
            }
        }
    }
    total
}

/// A tar stream of `dir`'s contents, written by a blocking thread a piece at a time (symlinks
/// are stored as links, never followed).
fn tar_stream(
    dir: PathBuf,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    std::thread::spawn(move || {
        let mut writer = PieceWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(PIECE),
        };
        let result = (|| {
            let mut builder = tar::Builder::new(&mut writer);
            builder.follow_symlinks(false);
            builder.append_dir_all(".", &dir)?;
            builder.finish()
        })()
        .and_then(|()| writer.flush());
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// Sends what is written as pieces over a channel (blocking when the upload is behind).
struct PieceWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for PieceWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::other("the upload ended"))
    }
}

async fn download(client: &Client, id: &str, remote: &str, local: &Path) -> Result<(), CliError> {
    match client.get_file(id, remote).await? {
        Download::File { mode, mut content } => {
            let mut target = local.to_owned();
            if tokio::fs::metadata(local).await.is_ok_and(|m| m.is_dir()) {
                let name = Path::new(remote)
                    .file_name()
                    .ok_or_else(|| CliError::Usage(format!("{remote} has no file name")))?;
                target.push(name);
            }
            let mut file = tokio::fs::File::create(&target)
                .await
                .map_err(io("creating", &target))?;
            let progress = Progress::bytes(&format!("copying {remote}"), None);
            while let Some(piece) = content.next().await {
                let piece = piece?;
                progress.add(piece.len() as u64);
                tokio::io::AsyncWriteExt::write_all(&mut file, &piece)
                    .await
                    .map_err(io("writing", &target))?;
            }
            progress.finish();
            tokio::io::AsyncWriteExt::flush(&mut file)
                .await
                .map_err(io("writing", &target))?;
            if let Some(mode) = mode {
                // Permission bits only: no setuid, setgid or sticky bit comes out of a sandbox.
                let mode = mode & sandboxd_client::unpack::MODE_BITS;
                tokio::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                    .await
                    .map_err(io("setting the mode of", &target))?;
            }
            Ok(())
        }
        Download::Directory(_) => {
            tokio::fs::create_dir_all(local)
                .await
                .map_err(io("creating", local))?;
            let mut stream = Box::pin(client.get_archive(id, remote).await?);
            let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Bytes>>(4);
            let dest = local.to_owned();
            // Nothing but files, directories and links, only permission bits, nothing outside
            // `dest`: see `sandboxd_client::unpack`.
            let unpack = tokio::task::spawn_blocking(move || {
                sandboxd_client::unpack::unpack(
                    PieceReader {
                        rx,
                        piece: Bytes::new(),
                    },
                    &dest,
                )
            });
            let mut failed = None;
            let progress = Progress::bytes(&format!("copying {remote}"), None);
            while let Some(piece) = stream.next().await {
                if let Ok(piece) = &piece {
                    progress.add(piece.len() as u64);
                }
                let item = piece.map_err(|e| std::io::Error::other(e.to_string()));
                let stop = item.is_err();
                if let Err(e) = &item {
                    failed = Some(std::io::Error::other(e.to_string()));
                }
                if tx.send(item).is_err() || stop {
                    break;
                }
            }
            drop(tx);
            progress.finish();
            let unpacked = unpack
                .await
                .map_err(|e| CliError::Local("unpacking".into(), std::io::Error::other(e)))?;
            if let Some(e) = failed {
                return Err(CliError::Local(format!("downloading {remote}"), e));
            }
            unpacked.map_err(|e| io("unpacking into", local)(std::io::Error::other(e)))
        }
    }
}

/// Reads the pieces of a download as one byte stream.
struct PieceReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    piece: Bytes,
}

impl Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.piece.is_empty() {
            match self.rx.recv() {
                Ok(piece) => self.piece = piece?,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.piece.len());
        buf[..n].copy_from_slice(&self.piece.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_paths_are_id_colon_absolute_path() {
        assert_eq!(
            place("abc:/work/a"),
            Place::Sandbox {
                id: "abc".into(),
                path: "/work/a".into()
            }
        );
        assert_eq!(place("./a:/b"), Place::Local("./a:/b".into()));
        assert_eq!(place("a:b"), Place::Local("a:b".into()));
        assert_eq!(place("/tmp/x"), Place::Local("/tmp/x".into()));
        assert_eq!(place(":/x"), Place::Local(":/x".into()));
    }
}
