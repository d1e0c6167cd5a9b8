//! The operations of a file worker, once it runs inside the sandbox's root as the sandbox's
//! root uid without capabilities (see the module above).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use sandboxd_protocol::files::{FileKind, FileOp, ListingEntry};
use sandboxd_protocol::wire::{FileReady, HelperError, HelperErrorCode, Response};

use super::chunks::{ChunkReader, ChunkWriter};
use super::resolve::{self, check_readable, errno, is_dir, is_reg, refused, Root, OUT_MODE_BITS};
use super::{send, ValidFiles};

/// How long the worker waits for the daemon to send or take the next bytes.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Default permission bits of an uploaded file.
const DEFAULT_MODE: u32 = 0o644;

/// Serve the transfer and answer its final frame. Returns the worker's exit code.
pub fn serve(files: &ValidFiles, conn: &UnixStream) -> i32 {
    // Directories a transfer makes get the sandbox's conventional modes, not the helper's.
    crate::sys::set_umask(crate::sys::SANDBOX_UMASK);
    let mut session = Session {
        conn,
        downloading: false,
    };
    let result = Root::new().and_then(|root| match files.op {
        FileOp::Get => get(&root, files, &mut session),
        FileOp::Put => put(&root, files, &mut session),
        FileOp::Delete => delete(&root, files, &mut session),
        FileOp::GetArchive => get_archive(&root, files, &mut session),
        FileOp::PutArchive => put_archive(&root, files, &mut session),
    });
    match result {
        Ok(()) => {
            send(conn, &Response::FileDone);
            0
        }
        Err(e) => {
            if session.downloading {
                // End the data so that the daemon reads the error as the final frame.
                let mut conn = conn;
                let _ = conn.write_all(&sandboxd_protocol::files::chunk_header(0));
            }
            send(conn, &Response::Error(e));
            1
        }
    }
}

/// Where the exchange stands.
pub struct Session<'a> {
    pub conn: &'a UnixStream,
    /// FileReady was sent for a download: content chunks may have followed.
    pub downloading: bool,
}

impl Session<'_> {
    pub fn ready(&mut self, kind: FileKind, st: Option<&nix::sys::stat::FileStat>) {
        send(
            self.conn,
            &Response::FileReady(FileReady {
                kind,
                size: st.map(|s| s.st_size as u64),
                mode: st.map(|s| s.st_mode & OUT_MODE_BITS),
            }),
        );
        self.downloading = !matches!(kind, FileKind::None);
    }
}

pub fn io_error(what: &str, e: io::Error) -> HelperError {
    match e.raw_os_error() {
        Some(n) => errno(what, Errno::from_raw(n)),
        None => HelperError::new(HelperErrorCode::Invalid, format!("{what}: {e}")),
    }
}

fn get(root: &Root, files: &ValidFiles, s: &mut Session) -> Result<(), HelperError> {
    let path = files.path.as_str();
    let fd = root
        .open(files.path.relative(), OFlag::O_RDONLY | OFlag::O_NONBLOCK)
        .map_err(|e| errno(path, e))?;
    let st = check_readable(&fd, path)?;
    if is_dir(&st) {
        s.ready(FileKind::Directory, None);
        let mut out = ChunkWriter::new(s.conn);
        write_listing(&fd, path, &mut out).map_err(|e| io_error(path, e))?;
        return out.finish().map_err(|e| io_error("sending", e));
    }
    if !is_reg(&st) {
        return Err(refused(format!(
            "{path}: not a regular file or directory (FIFOs, sockets and device nodes are not transferred)"
        )));
    }
    s.ready(FileKind::File, Some(&st));
    let mut out = ChunkWriter::new(s.conn);
    copy_exactly(&mut File::from(fd), &mut out, st.st_size as u64, path)?;
    out.finish().map_err(|e| io_error("sending", e))
}

/// Copy `size` bytes of a file: if it shrinks meanwhile, the rest is zeros, if it grows the
/// excess is left (the size announced and a tar header's size must hold).
pub fn copy_exactly(
    file: &mut File,
    out: &mut impl Write,
    size: u64,
    what: &str,
) -> Result<(), HelperError> {
    let mut left = size;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = match file.read(&mut buf[..want]) {
            Ok(0) => {
                buf[..want].fill(0);
                want
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(what, e)),
        };
        out.write_all(&buf[..n])
            .map_err(|e| io_error("sending", e))?;
        left -= n as u64;
    }
    Ok(())
}

/// The JSON listing, written entry by entry (a huge directory is never held whole).
fn write_listing(dir: &OwnedFd, path: &str, out: &mut impl Write) -> io::Result<()> {
    let mut listing = crate::fdfs::open_listing(dir.as_raw_fd())?;
    write!(
        out,
        "{{\"path\":{},\"entries\":[",
        serde_json::to_string(path)?
    )?;
    let mut first = true;
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let Ok(st) = fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => "file",
            libc::S_IFDIR => "directory",
            libc::S_IFLNK => "symlink",
            _ => "other",
        };
        let link_target = (kind == "symlink")
            .then(|| nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name).ok())
            .flatten()
            .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned());
        let item = ListingEntry {
            name: String::from_utf8_lossy(name.to_bytes()).into_owned(),
            kind: kind.to_owned(),
            size: st.st_size as u64,
            mode: st.st_mode & 0o7777,
            mtime: st.st_mtime,
            link_target,
        };
        if !first {
            out.write_all(b",")?;
        }
        first = false;
        serde_json::to_writer(&mut *out, &item)?;
    }
    out.write_all(b"]}")
}

fn put(root: &Root, files: &ValidFiles, s: &mut Session) -> Result<(), HelperError> {
    let path = files.path.as_str();
    let Some((parent, name)) = files.path.split_last() else {
        return Err(refused("/ cannot be written"));
    };
    let dir = root.writable_dir(&parent[1..])?;
    let mode = files.mode.unwrap_or(DEFAULT_MODE);
    // Write a new file beside the target and rename it over: a reader never sees half a file,
    // and whatever is at the name (a link, a FIFO) is replaced, never followed or opened.
    let (tmp_name, tmp) = create_temp(&dir, name).map_err(|e| errno(path, e))?;
    s.ready(FileKind::None, None);
    let result = (|| {
        let mut file = File::from(tmp);
        let mut input = ChunkReader::new(s.conn);
        io::copy(&mut input, &mut file).map_err(|e| io_error(path, e))?;
        fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(|e| errno(path, e))?;
        nix::fcntl::renameat(
            Some(dir.as_raw_fd()),
            tmp_name.as_str(),
            Some(dir.as_raw_fd()),
            name,
        )
        .map_err(|e| errno(path, e))
    })();
    if result.is_err() {
        let _ = unlinkat(
            Some(dir.as_raw_fd()),
            tmp_name.as_str(),
            UnlinkatFlags::NoRemoveDir,
        );
    }
    result
}

/// A new, empty file in `dir` with an unused name derived from `name`.
pub fn create_temp(dir: &OwnedFd, name: &str) -> Result<(String, OwnedFd), Errno> {
    let stem: String = name.chars().take(32).collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let tmp = format!(".{stem}.sbx-upload-{nanos:x}-{attempt}");
        match crate::sys::openat(
            Some(dir.as_raw_fd()),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok((tmp, fd)),
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::EEXIST)
}

fn delete(root: &Root, files: &ValidFiles, s: &mut Session) -> Result<(), HelperError> {
    let path = files.path.as_str();
    let Some((parent, name)) = files.path.split_last() else {
        return Err(refused("/ cannot be removed"));
    };
    let dir = root.writable_dir(&parent[1..])?;
    let st = fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| errno(path, e))?;
    if is_dir(&st) {
        // Iterative, one directory descriptor at a time, never following a link.
        let cname = std::ffi::CString::new(name).map_err(|_| refused("NUL in path"))?;
        crate::fdfs::remove_tree(dir.as_raw_fd(), &cname).map_err(|e| errno(path, e))?;
    } else {
        unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)
            .map_err(|e| errno(path, e))?;
    }
    s.ready(FileKind::None, None);
    Ok(())
}

fn get_archive(root: &Root, files: &ValidFiles, s: &mut Session) -> Result<(), HelperError> {
    let path = files.path.as_str();
    let fd = root
        .open(files.path.relative(), OFlag::O_RDONLY | OFlag::O_NONBLOCK)
        .map_err(|e| errno(path, e))?;
    let st = check_readable(&fd, path)?;
    if !is_dir(&st) && !is_reg(&st) {
        return Err(refused(format!("{path}: not a regular file or directory")));
    }
    s.ready(FileKind::Archive, None);
    let mut out = ChunkWriter::new(s.conn);
    let name = files.path.split_last().map(|(_, n)| n).unwrap_or("root");
    super::archive::write(fd, &st, name, &mut out)?;
    out.finish().map_err(|e| io_error("sending", e))
}

fn put_archive(root: &Root, files: &ValidFiles, s: &mut Session) -> Result<(), HelperError> {
    let path = files.path.as_str();
    let target = match root.open(files.path.relative(), OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
        Ok(fd) => {
            root.check_writable(&fd, path)?;
            fd
        }
        Err(Errno::ENOENT) => {
            // Created (one level) when missing: its parent must exist on /work.
            let Some((parent, name)) = files.path.split_last() else {
                return Err(refused("/ cannot be written"));
            };
            let dir = root.writable_dir(&parent[1..])?;
            match nix::sys::stat::mkdirat(
                Some(dir.as_raw_fd()),
                name,
                Mode::from_bits_truncate(0o755),
            ) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(errno(path, e)),
            }
            let fd = resolve::open2(
                dir.as_raw_fd(),
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                resolve::beneath(),
            )
            .map_err(|e| errno(path, e))?;
            root.check_writable(&fd, path)?;
            fd
        }
        Err(e) => return Err(errno(path, e)),
    };
    if !is_dir(&fstat(target.as_raw_fd()).map_err(|e| errno(path, e))?) {
        return Err(refused(format!("{path}: not a directory")));
    }
    s.ready(FileKind::None, None);
    let mut input = ChunkReader::new(s.conn);
    super::archive::extract(&target, &mut input)?;
    input.drain().map_err(|e| io_error("receiving", e))
}
