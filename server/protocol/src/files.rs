//! Moving files in and out of a sandbox: the paths a client may name, and how content streams
//! between the daemon and a file worker.
//!
//! A transfer uses a connection of its own to the helper: after `hello`, the daemon sends one
//! [`Request::Files`](crate::wire::Request::Files) frame; the helper hands the connection to a
//! file worker, which answers [`Response::FileReady`](crate::wire::Response::FileReady) (or an
//! error) once the path is resolved. Then content flows as *chunks* — a little-endian `u32`
//! length and that many bytes, at most [`MAX_CHUNK`], a zero length ending the data — from the
//! worker for a download, from the daemon for an upload; the worker ends the exchange with one
//! final frame, `FileDone` or `Error`. Nothing holds a whole file: each side moves one chunk at a
//! time, and the socket's buffers give backpressure in both directions.

use serde::{Deserialize, Serialize};

/// Largest chunk either side sends or accepts.
pub const MAX_CHUNK: usize = 256 * 1024;

/// Longest path a client may name (the kernel's PATH_MAX, terminating NUL included).
pub const MAX_PATH: usize = 4095;
/// Longest single component (NAME_MAX).
pub const MAX_NAME: usize = 255;

/// Where a client may create, replace or delete files. Everything else is read-only through the
/// API: in host-rootfs mode the root, `/etc` and `/usr` are read-only, and the tmpfs mounts
/// (`/tmp`, `/run`, `/root`) live only in a running sandbox's own mount namespace.
pub const WRITABLE_ROOTS: &[&str] = &["/work"];

/// What a transfer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileOp {
    /// A regular file's content, or a JSON listing of a directory.
    Get,
    /// Create or replace a regular file with the uploaded content.
    Put,
    /// Remove a file, a link, or a directory with everything below it.
    Delete,
    /// A tar stream of a file or of a directory's contents.
    GetArchive,
    /// Extract an uploaded tar stream into a directory (created if missing).
    PutArchive,
}

impl FileOp {
    /// Whether the operation changes the sandbox's files (and so needs a writable location).
    pub fn writes(self) -> bool {
        matches!(self, FileOp::Put | FileOp::Delete | FileOp::PutArchive)
    }

    /// Whether the daemon streams content to the worker.
    pub fn uploads(self) -> bool {
        matches!(self, FileOp::Put | FileOp::PutArchive)
    }

    /// Whether the worker streams content to the daemon.
    pub fn downloads(self) -> bool {
        matches!(self, FileOp::Get | FileOp::GetArchive)
    }
}

/// What the worker found at the path, sent before any content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file: its content follows.
    File,
    /// A directory: a JSON [`Listing`] follows.
    Directory,
    /// A tar stream follows.
    Archive,
    /// An upload target or a deletion: nothing follows from the worker.
    None,
}

/// A directory listing (`GET /files` of a directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<ListingEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListingEntry {
    /// The entry's name (non-UTF-8 bytes replaced with U+FFFD).
    pub name: String,
    /// `file`, `directory`, `symlink` or `other` (FIFOs, sockets, device nodes).
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
    /// Last modification, Unix seconds.
    pub mtime: i64,
    /// The target of a symbolic link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must be absolute")]
    Relative,
    #[error("path must not contain a NUL byte")]
    Nul,
    #[error("path is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("path has a component longer than {MAX_NAME} bytes")]
    NameTooLong,
    #[error("path must not contain '..' components")]
    DotDot,
    #[error("path must not contain empty or '.' components")]
    Unnormalised,
    #[error("{0} is not under a writable location (/work/...)")]
    NotWritable(String),
    #[error("{0} itself cannot be replaced or removed")]
    WritableRoot(String),
}

/// A path inside a sandbox, checked once: absolute, normalised (no empty, `.` or `..`
/// components; one trailing slash is dropped), no NUL, within PATH_MAX and NAME_MAX. It is
/// resolved by the worker inside the sandbox's root only, never on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPath {
    path: String,
}

impl SandboxPath {
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        if raw.as_bytes().contains(&0) {
            return Err(PathError::Nul);
        }
        if !raw.starts_with('/') {
            return Err(PathError::Relative);
        }
        if raw.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        let trimmed = if raw.len() > 1 {
            raw.strip_suffix('/').unwrap_or(raw)
        } else {
            raw
        };
        if trimmed != "/" {
            for component in trimmed[1..].split('/') {
                match component {
                    ".." => return Err(PathError::DotDot),
                    "" | "." => return Err(PathError::Unnormalised),
                    c if c.len() > MAX_NAME => return Err(PathError::NameTooLong),
                    _ => {}
                }
            }
        }
        Ok(SandboxPath {
            path: trimmed.to_owned(),
        })
    }

    /// Check that `op` may act here: writes only below [`WRITABLE_ROOTS`]; a file upload or a
    /// deletion never on such a root itself (an archive may be extracted into it).
    pub fn check_for(&self, op: FileOp) -> Result<(), PathError> {
        if !op.writes() {
            return Ok(());
        }
        for root in WRITABLE_ROOTS {
            if self.path == *root {
                return match op {
                    FileOp::PutArchive => Ok(()),
                    _ => Err(PathError::WritableRoot(self.path.clone())),
                };
            }
            if self
                .path
                .strip_prefix(root)
                .is_some_and(|rest| rest.starts_with('/'))
            {
                return Ok(());
            }
        }
        Err(PathError::NotWritable(self.path.clone()))
    }

    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The path without its leading slash ("" for the root), as `openat2` with
    /// `RESOLVE_IN_ROOT` takes it.
    pub fn relative(&self) -> &str {
        &self.path[1..]
    }

    /// The parent directory and the last component; `None` for `/`.
    pub fn split_last(&self) -> Option<(&str, &str)> {
        let i = self.path.rfind('/')?;
        let name = &self.path[i + 1..];
        if name.is_empty() {
            return None;
        }
        Some((if i == 0 { "/" } else { &self.path[..i] }, name))
    }
}

/// Permission bits a client may give an uploaded file: `0o777` and the sticky bit, never
/// setuid or setgid (which mean nothing on /work, mounted nosuid, but would on a host copy).
pub fn check_mode(mode: u32) -> Result<u32, String> {
    if mode & !0o1777 != 0 {
        return Err(format!(
            "mode {mode:o} is not allowed: only permission bits (at most 1777), no setuid or setgid"
        ));
    }
    Ok(mode)
}

/// Encode the header of one chunk of `len` bytes (zero ends the data).
pub fn chunk_header(len: usize) -> [u8; 4] {
    (len as u32).to_le_bytes()
}

/// Decode a chunk header, refusing lengths over [`MAX_CHUNK`].
pub fn chunk_len(prefix: [u8; 4]) -> Result<usize, ChunkError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_CHUNK {
        return Err(ChunkError::TooLarge(len));
    }
    Ok(len)
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk of {0} bytes exceeds the limit of {MAX_CHUNK}")]
    TooLarge(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expect: Result<&str, PathError>) {
        assert_eq!(
            SandboxPath::parse(raw).map(|p| p.as_str().to_owned()),
            expect.map(str::to_owned),
            "{raw:?}"
        );
    }

    #[test]
    fn paths_are_absolute_and_normalised() {
        check("/work/a.txt", Ok("/work/a.txt"));
        check("/work/", Ok("/work"));
        check("/", Ok("/"));
        check("work/a", Err(PathError::Relative));
        check("", Err(PathError::Relative));
        check("/work/../etc", Err(PathError::DotDot));
        check("/work/..", Err(PathError::DotDot));
        check("/work//a", Err(PathError::Unnormalised));
        check("/work/./a", Err(PathError::Unnormalised));
        check("/work/a\0b", Err(PathError::Nul));
        check(
            &format!("/work/{}", "a".repeat(256)),
            Err(PathError::NameTooLong),
        );
        check(
            &format!("/work/{}", "a/".repeat(2100)),
            Err(PathError::TooLong),
        );
    }

    #[test]
    fn writes_stay_below_work() {
        let p = |s: &str| SandboxPath::parse(s).unwrap();
        assert!(p("/work/a").check_for(FileOp::Put).is_ok());
        assert!(p("/work").check_for(FileOp::PutArchive).is_ok());
        assert!(p("/work").check_for(FileOp::Put).is_err());
        assert!(p("/work").check_for(FileOp::Delete).is_err());
        assert!(p("/workshop/a").check_for(FileOp::Put).is_err());
        assert!(p("/etc/passwd").check_for(FileOp::Put).is_err());
        assert!(p("/tmp/x").check_for(FileOp::PutArchive).is_err());
        assert!(p("/etc/passwd").check_for(FileOp::Get).is_ok());
        assert_eq!(p("/work/a/b").split_last(), Some(("/work/a", "b")));
        assert_eq!(p("/work").split_last(), Some(("/", "work")));
        assert_eq!(p("/").split_last(), None);
        assert_eq!(p("/work/a").relative(), "work/a");
    }

    #[test]
    fn modes_are_permission_bits_only() {
        assert_eq!(check_mode(0o755), Ok(0o755));
        assert_eq!(check_mode(0o1777), Ok(0o1777));
        assert!(check_mode(0o4755).is_err());
        assert!(check_mode(0o2755).is_err());
        assert!(check_mode(0o100644).is_err());
    }

    #[test]
    fn chunks_are_bounded() {
        assert_eq!(chunk_len(chunk_header(5)).unwrap(), 5);
        assert!(chunk_len(((MAX_CHUNK + 1) as u32).to_le_bytes()).is_err());
    }
}
