//! Tar streams in and out of a sandbox, by descriptor.
//!
//! Out: a walk of the tree that holds one descriptor per level, opens every entry relative to its
//! directory with `O_NOFOLLOW` (and `O_NONBLOCK`, so a FIFO swapped in cannot block), checks that
//! what it opened is what it listed (device and inode), stores symlinks as symlinks, skips FIFOs,
//! sockets and device nodes (they are not content: the stream simply has no entry for them), and
//! does not cross into other mounts (as `tar --one-file-system`). Headers carry only the
//! permission bits (`OUT_MODE_BITS`): no setuid, setgid or sticky bit leaves a sandbox, and every
//! owner is 0.
//!
//! In: the `tar` crate only *parses* the stream; every entry is created here through the
//! extraction directory's descriptor. Entry names must be relative without `..`; the parent of
//! each entry is opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`, so neither
//! a symlink the archive created earlier nor one the sandbox planted or swaps in during the
//! transfer can lead an entry elsewhere; the entry itself is created with `O_CREAT | O_EXCL |
//! O_NOFOLLOW` after removing what was there. Device nodes and FIFOs are refused; setuid and
//! setgid bits are dropped; everything belongs to the worker, i.e. the sandbox's root.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, FileStat, Mode};
use nix::sys::time::TimeSpec;
use nix::unistd::{unlinkat, UnlinkatFlags};
use sandboxd_protocol::wire::HelperError;

use super::resolve::{beneath, errno, is_dir, is_reg, open2, refused, OUT_MODE_BITS};
use super::worker::io_error;

/// Deepest directory level an archive download descends to (one descriptor per level).
const MAX_DEPTH: usize = 512;

/// A reader that yields exactly `left` bytes of a file: zeros if it shrank meanwhile, nothing
/// past the size announced in the tar header if it grew.
struct Exact {
    file: File,
    left: u64,
}

impl Read for Exact {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = match self.file.read(&mut buf[..want])? {
            0 => {
                buf[..want].fill(0);
                want
            }
            n => n,
        };
        self.left -= n as u64;
        Ok(n)
    }
}

fn header(st: &FileStat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(st.st_mode & OUT_MODE_BITS);
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_uid(0);
    h.set_gid(0);
    h
}

/// One directory being walked.
struct Level {
    dir: OwnedFd,
    names: Vec<Vec<u8>>,
    next: usize,
    prefix: PathBuf,
}

impl Level {
    fn new(dir: OwnedFd, prefix: PathBuf) -> io::Result<Level> {
        let mut listing = crate::fdfs::open_listing(dir.as_raw_fd())?;
        let mut names = Vec::new();
        for entry in listing.iter() {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                names.push(name);
            }
        }
        names.sort();
        Ok(Level {
            dir,
            names,
            next: 0,
            prefix,
        })
    }
}

/// Write a tar stream of `top` (a regular file, stored under `name`, or a directory, whose
/// contents are stored relative to it).
pub fn write(
    top: OwnedFd,
    st: &FileStat,
    name: &str,
    out: &mut impl Write,
) -> Result<(), HelperError> {
    let mut builder = tar::Builder::new(out);
    let fail = |e: io::Error| io_error("writing the archive", e);
    if is_reg(st) {
        let mut h = header(st, tar::EntryType::Regular, st.st_size as u64);
        let data = Exact {
            file: File::from(top),
            left: st.st_size as u64,
        };
        builder.append_data(&mut h, name, data).map_err(fail)?;
        return builder.into_inner().map(drop).map_err(fail);
    }
    let dev = st.st_dev;
    let mut stack = vec![Level::new(top, PathBuf::new()).map_err(fail)?];
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.get(level.next).cloned() else {
            stack.pop();
            continue;
        };
        level.next += 1;
        let rel = level.prefix.join(OsStr::from_bytes(&name));
        let dirfd = level.dir.as_raw_fd();
        let name = OsStr::from_bytes(&name);
        // Gone meanwhile (the sandbox may be running): skip it.
        let Ok(est) = fstatat(Some(dirfd), name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
            continue;
        };
        match est.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                if est.st_dev != dev {
                    continue;
                }
                let Ok(fd) = open_same(dirfd, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY, &est)
                else {
                    continue;
                };
                let mut h = header(&est, tar::EntryType::Directory, 0);
                builder
                    .append_data(&mut h, &rel, io::empty())
                    .map_err(fail)?;
                if stack.len() >= MAX_DEPTH {
                    return Err(refused(format!(
                        "the tree is deeper than {MAX_DEPTH} levels"
                    )));
                }
                stack.push(Level::new(fd, rel).map_err(fail)?);
            }
            libc::S_IFREG => {
                let Ok(fd) = open_same(dirfd, name, OFlag::O_RDONLY | OFlag::O_NONBLOCK, &est)
                else {
                    continue;
                };
                // The size is taken from the descriptor actually read.
                let Ok(now) = fstat(fd.as_raw_fd()) else {
                    continue;
                };
                let mut h = header(&now, tar::EntryType::Regular, now.st_size as u64);
                let data = Exact {
                    file: File::from(fd),
                    left: now.st_size as u64,
                };
                builder.append_data(&mut h, &rel, data).map_err(fail)?;
            }
            libc::S_IFLNK => {
                let Ok(target) = nix::fcntl::readlinkat(Some(dirfd), name) else {
                    continue;
                };
                let mut h = header(&est, tar::EntryType::Symlink, 0);
                let target = target.as_bytes();
                let linkname = &mut h.as_old_mut().linkname;
                if target.len() <= linkname.len() {
                    // Stored byte for byte (the crate's path handling would rewrite "/" as "//").
                    linkname[..target.len()].copy_from_slice(target);
                    builder
                        .append_data(&mut h, &rel, io::empty())
                        .map_err(fail)?;
                } else {
                    builder
                        .append_link(&mut h, &rel, Path::new(OsStr::from_bytes(target)))
                        .map_err(fail)?;
                }
            }
            // FIFOs, sockets and device nodes are not content.
            _ => {}
        }
    }
    builder.into_inner().map(drop).map_err(fail)
}

/// Open `name` without following a link, and only if it is still the inode that was listed.
fn open_same(
    dir: std::os::fd::RawFd,
    name: &OsStr,
    flags: OFlag,
    listed: &FileStat,
) -> Result<OwnedFd, Errno> {
    let fd = crate::sys::openat(
        Some(dir),
        name,
        flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
        Mode::empty(),
    )?;
    let st = fstat(fd.as_raw_fd())?;
    if (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino)
        || st.st_mode & libc::S_IFMT != listed.st_mode & libc::S_IFMT
    {
        return Err(Errno::EAGAIN);
    }
    Ok(fd)
}

/// The components of an entry name: relative, no `..`, no NUL; `.` and empty ones dropped.
pub fn components(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    let shown = String::from_utf8_lossy(raw);
    if raw.starts_with(b"/") {
        return Err(format!("archive entry {shown:?} has an absolute path"));
    }
    if raw.contains(&0) {
        return Err(format!("archive entry {shown:?} contains a NUL byte"));
    }
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(format!("archive entry {shown:?} contains '..'")),
            c if c.len() > 255 => return Err(format!("archive entry {shown:?}: name too long")),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(&b'/')
}

/// Open (creating what is missing) the directory `parts` below `target`, never through a link,
/// never above `target`, never onto another mount.
fn parent_dir(target: &OwnedFd, parts: &[&[u8]], shown: &str) -> Result<OwnedFd, HelperError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
    let fail = |e: Errno| match e {
        Errno::ELOOP => refused(format!(
            "archive entry {shown:?} goes through a symbolic link"
        )),
        Errno::EXDEV => refused(format!(
            "archive entry {shown:?} leaves the target directory"
        )),
        other => errno(&format!("archive entry {shown:?}"), other),
    };
    let whole = join(parts);
    match open2(
        target.as_raw_fd(),
        OsStr::from_bytes(&whole),
        flags,
        beneath(),
    ) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(fail(e)),
    }
    let mut cur = open2(target.as_raw_fd(), OsStr::new("."), flags, beneath()).map_err(fail)?;
    for part in parts {
        let name = OsStr::from_bytes(part);
        let next = match open2(cur.as_raw_fd(), name, flags, beneath()) {
            Err(Errno::ENOENT) => {
                match mkdirat(Some(cur.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(fail(e)),
                }
                open2(cur.as_raw_fd(), name, flags, beneath())
            }
            other => other,
        }
        .map_err(fail)?;
        cur = next;
    }
    Ok(cur)
}

/// Make room for a new entry: remove a file or link of that name; a directory stays (and is an
/// error unless the new entry is a directory too).
fn clear_name(dir: &OwnedFd, name: &OsStr, shown: &str) -> Result<bool, HelperError> {
    match fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(errno(&format!("archive entry {shown:?}"), e)),
        Ok(st) if is_dir(&st) => Ok(true),
        Ok(_) => unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir)
            .map(|()| false)
            .map_err(|e| errno(&format!("archive entry {shown:?}"), e)),
    }
}

/// Extract the tar stream `input` into `target`.
pub fn extract(target: &OwnedFd, input: &mut impl Read) -> Result<(), HelperError> {
    let mut archive = tar::Archive::new(input);
    let bad = |e: io::Error| match e.raw_os_error() {
        Some(_) => io_error("receiving the archive", e),
        None => refused(format!("malformed archive: {e}")),
    };
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            continue;
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let parts = components(&raw).map_err(refused)?;
        let Some((last, parents)) = parts.split_last() else {
            continue; // "./": the target itself
        };
        let dir = parent_dir(target, parents, &shown)?;
        let name = OsStr::from_bytes(last);
        let mode = entry.header().mode().unwrap_or(0o644) & 0o1777;
        let at = |e: Errno| errno(&format!("archive entry {shown:?}"), e);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if clear_name(&dir, name, &shown)? {
                    return Err(refused(format!(
                        "archive entry {shown:?} is a directory here"
                    )));
                }
                let fd = crate::sys::openat(
                    Some(dir.as_raw_fd()),
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(at)?;
                let mut file = File::from(fd);
                io::copy(&mut entry, &mut file).map_err(bad)?;
                fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(at)?;
                if let Ok(mtime) = entry.header().mtime() {
                    let t = TimeSpec::new(i64::try_from(mtime).unwrap_or(0), 0);
                    let _ = nix::sys::stat::futimens(file.as_raw_fd(), &TimeSpec::UTIME_OMIT, &t);
                }
            }
            tar::EntryType::Directory => {
                match mkdirat(Some(dir.as_raw_fd()), name, Mode::from_bits_truncate(0o700)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(at(e)),
                }
                let fd = open2(
                    dir.as_raw_fd(),
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                    beneath(),
                )
                .map_err(|e| match e {
                    Errno::ELOOP | Errno::ENOTDIR => refused(format!(
                        "archive entry {shown:?}: a non-directory is in the way"
                    )),
                    e => at(e),
                })?;
                // The owner keeps full access, or later entries could not be created inside.
                fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode | 0o700)).map_err(at)?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(format!("archive entry {shown:?} has no link target")))?
                    .into_owned();
                if link.contains(&0) || link.is_empty() {
                    return Err(refused(format!("archive entry {shown:?}: bad link target")));
                }
                if clear_name(&dir, name, &shown)? {
                    return Err(refused(format!(
                        "archive entry {shown:?} is a directory here"
                    )));
                }
                // A link is created, never followed: later entries refuse to pass through it.
                nix::unistd::symlinkat(OsStr::from_bytes(&link), Some(dir.as_raw_fd()), name)
                    .map_err(at)?;
            }
            tar::EntryType::Link => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(format!("archive entry {shown:?} has no link target")))?
                    .into_owned();
                let src = components(&link).map_err(refused)?;
                let Some((src_last, src_parents)) = src.split_last() else {
                    return Err(refused(format!("archive entry {shown:?}: bad link target")));
                };
                let src_dir = open2(
                    target.as_raw_fd(),
                    OsStr::from_bytes(&join(src_parents)),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                    beneath(),
                )
                .map_err(at)?;
                if clear_name(&dir, name, &shown)? {
                    return Err(refused(format!(
                        "archive entry {shown:?} is a directory here"
                    )));
                }
                nix::unistd::linkat(
                    Some(src_dir.as_raw_fd()),
                    OsStr::from_bytes(src_last),
                    Some(dir.as_raw_fd()),
                    name,
                    AtFlags::empty(),
                )
                .map_err(at)?;
            }
            other => {
                return Err(refused(format!(
                "archive entry {shown:?} is a {}: only files, directories and links are extracted",
                match other {
                    tar::EntryType::Char | tar::EntryType::Block => "device node",
                    tar::EntryType::Fifo => "FIFO",
                    _ => "kind of entry this server does not extract",
                }
            )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_stay_relative() {
        let ok = |raw: &str| components(raw.as_bytes()).map(|v| v.len());
        assert_eq!(ok("a/b/c"), Ok(3));
        assert_eq!(ok("./a/./b/"), Ok(2));
        assert_eq!(ok("./"), Ok(0));
        assert!(ok("/etc/passwd").is_err());
        assert!(ok("a/../../etc").is_err());
        assert!(ok("..").is_err());
        assert!(components(b"a\0b").is_err());
    }

    #[test]
    fn no_setuid_setgid_or_sticky_bit_and_no_special_file_leaves() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let chmod = |name: &str, mode: u32| {
            std::fs::set_permissions(dir.path().join(name), std::fs::Permissions::from_mode(mode))
                .unwrap()
        };
        std::fs::write(dir.path().join("suid"), b"x").unwrap();
        chmod("suid", 0o4755);
        std::fs::write(dir.path().join("sgid"), b"x").unwrap();
        chmod("sgid", 0o2711);
        std::fs::create_dir(dir.path().join("sticky")).unwrap();
        chmod("sticky", 0o1777);
        nix::unistd::mkfifo(&dir.path().join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let top = crate::sys::open(
            dir.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        let st = fstat(top.as_raw_fd()).unwrap();
        let mut out = Vec::new();
        write(top, &st, ".", &mut out).unwrap();
        let mut archive = tar::Archive::new(&out[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            seen.push((name, entry.header().mode().unwrap()));
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                ("sgid".to_owned(), 0o711),
                ("sticky".to_owned(), 0o777),
                ("suid".to_owned(), 0o755)
            ]
        );
    }
}
