//! Applying one layer (a tar stream) to a root directory, treating every entry as hostile.
//!
//! Everything happens relative to the root's descriptor and never through a path the archive
//! controls: entry names are cleaned first (absolute names and `..` are refused), parent
//! directories are resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` so a link an
//! earlier entry planted (`etc -> /etc`, `x -> ../../..`) resolves inside the root and never
//! outside, and the final component is created with `O_EXCL`/`O_NOFOLLOW` after removing
//! whatever was there. Device nodes and sockets are left out; setuid, setgid and file
//! capabilities are dropped; sizes and entry counts are capped (decompression bombs stop at the
//! cap). Whiteouts (`.wh.NAME`, `.wh..wh..opq`) remove what earlier layers put there.
//!
//! The unpacker runs as root of a user namespace mapped onto the image uid range, so ownership
//! from the archive lands as `image_base + uid` on the host and a chown outside the range fails
//! (the file then stays owned by the image's root).

use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fchmodat, fstatat, mkdirat, mknodat, FchmodatFlags, Mode, SFlag};
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Longest entry name or link target accepted.
const MAX_PATH: usize = 4096;
/// Ids the image range holds (and so the only owners an entry can keep).
const ID_RANGE: u64 = 65536;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {path:?}: {why}")]
    Hostile { path: String, why: &'static str },
    #[error("the image unpacks to more than {0} bytes")]
    TooLarge(u64),
    #[error("the image has more than {0} entries")]
    TooManyEntries(u64),
    #[error("reading the archive: {0}")]
    Read(#[source] std::io::Error),
    #[error("entry {path:?}: {step}: {source}")]
    Write {
        path: String,
        step: &'static str,
        source: Errno,
    },
}

/// What unpacking may still use, and what it used.
#[derive(Debug, Clone)]
pub struct Budget {
    pub max_bytes: u64,
    pub max_entries: u64,
    pub bytes: u64,
    pub entries: u64,
    pub skipped: u64,
}

impl Budget {
    pub fn new(max_bytes: u64, max_entries: u64) -> Self {
        Budget {
            max_bytes,
            max_entries,
            bytes: 0,
            entries: 0,
            skipped: 0,
        }
    }

    fn take_bytes(&mut self, n: u64) -> Result<(), UnpackError> {
        self.bytes = self.bytes.saturating_add(n);
        if self.bytes > self.max_bytes {
            return Err(UnpackError::TooLarge(self.max_bytes));
        }
        Ok(())
    }
}

fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// An entry name split into components: no empty, `.` or `..` component, never absolute.
pub fn clean_path(raw: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    if raw.len() > MAX_PATH {
        return Err("name too long");
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("'..' in path"),
            p => parts.push(p),
        }
    }
    Ok(parts)
}

fn cstr(bytes: &[u8]) -> Result<CString, &'static str> {
    CString::new(bytes).map_err(|_| "NUL byte in name")
}

fn resolve_how() -> OpenHow {
    OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

/// Open (creating what is missing, mode 0755) the directory `parts` below `root`, resolving every
/// component inside the root.
fn open_dir(root: &OwnedFd, parts: &[&[u8]], path: &[u8]) -> Result<OwnedFd, UnpackError> {
    let write = |step, source| UnpackError::Write {
        path: lossy(path),
        step,
        source,
    };
    let joined = |n: usize| {
        let mut p = b".".to_vec();
        for part in &parts[..n] {
            p.push(b'/');
            p.extend_from_slice(part);
        }
        p
    };
    let open = |n: usize| -> Result<OwnedFd, Errno> {
        let p = CString::new(joined(n)).map_err(|_| Errno::EINVAL)?;
        crate::sys::openat2(root.as_raw_fd(), p.as_c_str(), resolve_how())
    };
    match open(parts.len()) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(write("opening the parent directory", e)),
    }
    // Create the missing directories one at a time, each inside the one resolved before it.
    let mut dir = open(0).map_err(|e| write("opening the root", e))?;
    for n in 1..=parts.len() {
        dir = match open(n) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                let name = cstr(parts[n - 1]).map_err(|why| UnpackError::Hostile {
                    path: lossy(path),
                    why,
                })?;
                match mkdirat(
                    Some(dir.as_raw_fd()),
                    name.as_c_str(),
                    Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(write("creating a parent directory", e)),
                }
                open(n).map_err(|e| write("opening a parent directory", e))?
            }
            Err(e) => return Err(write("opening a parent directory", e)),
        };
    }
    Ok(dir)
}

/// Remove `name` in `dir`, whatever it is (a directory with everything in it), never following
/// a link. Missing is fine.
fn remove_any(dir: RawFd, name: &CStr) -> Result<(), Errno> {
    match unlinkat(Some(dir), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EISDIR) => crate::fdfs::remove_tree(dir, name),
        Err(e) => Err(e),
    }
}

fn is_dir(dir: RawFd, name: &CStr) -> bool {
    fstatat(Some(dir), name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// Permission bits an unpacked file may keep: no setuid, no setgid (the sticky bit stays).
fn safe_mode(mode: u32) -> Mode {
    Mode::from_bits_truncate(mode & 0o1777)
}

/// Apply one layer. `written` collects the paths this layer created, for opaque whiteouts.
pub fn apply_layer<R: Read>(
    root: &OwnedFd,
    reader: R,
    budget: &mut Budget,
) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut written: HashSet<Vec<u8>> = HashSet::new();
    let entries = archive.entries().map_err(UnpackError::Read)?;
    for entry in entries {
        let mut entry = entry.map_err(UnpackError::Read)?;
        budget.entries += 1;
        if budget.entries > budget.max_entries {
            return Err(UnpackError::TooManyEntries(budget.max_entries));
        }
        let raw = entry.path_bytes().into_owned();
        let hostile = |why| UnpackError::Hostile {
            path: lossy(&raw),
            why,
        };
        let parts = clean_path(&raw).map_err(hostile)?;
        let Some((name, parents)) = parts.split_last() else {
            // The root itself ("./"): it exists already.
            continue;
        };
        let key = parts.join(&b'/');
        let header = entry.header().clone();
        let kind = header.entry_type();
        let dir = open_dir(root, parents, &raw)?;
        let d = dir.as_raw_fd();
        let write = |step| {
            let path = lossy(&raw);
            move |source| UnpackError::Write { path, step, source }
        };

        if *name == OPAQUE_MARKER {
            clear_opaque(d, parents, &written).map_err(write("applying an opaque whiteout"))?;
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(hostile("malformed whiteout"));
            }
            let hidden = cstr(hidden).map_err(hostile)?;
            remove_any(d, &hidden).map_err(write("applying a whiteout"))?;
            continue;
        }
        let cname = cstr(name).map_err(hostile)?;
        let mode = header.mode().unwrap_or(0o644);
        match kind {
            tar::EntryType::Directory => {
                if !is_dir(d, &cname) {
                    remove_any(d, &cname).map_err(write("replacing an entry"))?;
                    match mkdirat(Some(d), cname.as_c_str(), Mode::from_bits_truncate(0o700)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(write("creating a directory")(e)),
                    }
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let size = header.size().unwrap_or(0);
                if budget.bytes.saturating_add(size) > budget.max_bytes {
                    return Err(UnpackError::TooLarge(budget.max_bytes));
                }
                remove_any(d, &cname).map_err(write("replacing an entry"))?;
                let fd = crate::sys::openat(
                    Some(d),
                    cname.as_c_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )
                .map_err(write("creating a file"))?;
                let mut file = File::from(fd);
                copy_capped(&mut entry, &mut file, budget, &raw)?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile("symlink without a target"))?
                    .into_owned();
                if target.is_empty() || target.len() > MAX_PATH {
                    return Err(hostile("bad symlink target"));
                }
                // The target is stored as text and never followed here; inside the sandbox it
                // resolves inside its own root.
                let target = cstr(&target).map_err(hostile)?;
                remove_any(d, &cname).map_err(write("replacing an entry"))?;
                symlinkat(target.as_c_str(), Some(d), cname.as_c_str())
                    .map_err(write("creating a symlink"))?;
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile("hard link without a target"))?
                    .into_owned();
                let tparts = clean_path(&target).map_err(hostile)?;
                let Some((tname, tparents)) = tparts.split_last() else {
                    return Err(hostile("hard link to the root"));
                };
                let tdir = open_dir(root, tparents, &raw)?;
                let tname = cstr(tname).map_err(hostile)?;
                if tdir.as_raw_fd() >= 0 && is_dir(tdir.as_raw_fd(), &tname) {
                    return Err(hostile("hard link to a directory"));
                }
                remove_any(d, &cname).map_err(write("replacing an entry"))?;
                linkat(
                    Some(tdir.as_raw_fd()),
                    tname.as_c_str(),
                    Some(d),
                    cname.as_c_str(),
                    nix::fcntl::AtFlags::empty(),
                )
                .map_err(write("creating a hard link"))?;
                written.insert(key);
                // A hard link shares its target's owner and mode: nothing more to set.
                continue;
            }
            tar::EntryType::Fifo => {
                remove_any(d, &cname).map_err(write("replacing an entry"))?;
                mknodat(
                    Some(d),
                    cname.as_c_str(),
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(0o600),
                    0,
                )
                .map_err(write("creating a fifo"))?;
            }
            // Device nodes (and anything else) never enter an image.
            _ => {
                budget.skipped += 1;
                continue;
            }
        }
        written.insert(key);
        // Owner first (a chown clears setuid bits anyway), then the mode, never following a link.
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        if uid < ID_RANGE && gid < ID_RANGE {
            // Fails outside the user namespace's map (a rootless helper maps only root): the
            // entry then stays owned by the image's root.
            let _ = fchownat(
                Some(d),
                cname.as_c_str(),
                Some(Uid::from_raw(uid as u32)),
                Some(Gid::from_raw(gid as u32)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            );
        }
        if kind != tar::EntryType::Symlink {
            fchmodat(
                Some(d),
                cname.as_c_str(),
                safe_mode(mode),
                FchmodatFlags::NoFollowSymlink,
            )
            .or_else(|e| match e {
                // fchmodat cannot refuse to follow links on every kernel; the entry is not a
                // link (we just created it), so following is the same thing.
                Errno::EOPNOTSUPP => fchmodat(
                    Some(d),
                    cname.as_c_str(),
                    safe_mode(mode),
                    FchmodatFlags::FollowSymlink,
                ),
                e => Err(e),
            })
            .map_err(write("setting the mode"))?;
        }
        if let Ok(mtime) = header.mtime() {
            let t = nix::sys::time::TimeSpec::new(mtime.min(i64::MAX as u64) as i64, 0);
            let _ = nix::sys::stat::utimensat(
                Some(d),
                cname.as_c_str(),
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            );
        }
    }
    Ok(())
}

/// Copy an entry's content, charging every byte to the budget (a lying header cannot get past).
fn copy_capped<R: Read>(
    from: &mut R,
    to: &mut File,
    budget: &mut Budget,
    path: &[u8],
) -> Result<(), UnpackError> {
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let n = from.read(&mut buf).map_err(UnpackError::Read)?;
        if n == 0 {
            return Ok(());
        }
        budget.take_bytes(n as u64)?;
        to.write_all(&buf[..n]).map_err(|e| UnpackError::Write {
            path: lossy(path),
            step: "writing a file",
            source: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
    }
}

/// An opaque directory hides everything earlier layers put in it: remove every child this layer
/// did not write itself.
fn clear_opaque(dir: RawFd, parents: &[&[u8]], written: &HashSet<Vec<u8>>) -> Result<(), Errno> {
    let mut listing = crate::fdfs::open_listing(dir)?;
    let mut doomed = Vec::new();
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let mut key = parents.join(&b'/');
        if !key.is_empty() {
            key.push(b'/');
        }
        key.extend_from_slice(name);
        if !written.contains(&key) {
            doomed.push(entry.file_name().to_owned());
        }
    }
    drop(listing);
    for name in doomed {
        remove_any(dir, &name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (tempfile::TempDir, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        let fd = crate::sys::open(
            dir.path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap();
        (dir, fd)
    }

    /// A tar stream built entry by entry, names and link targets written raw (the tar crate's
    /// builder refuses `..`, which is exactly what these tests need to send).
    struct Tar(tar::Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Tar(tar::Builder::new(Vec::new()))
        }
        fn add(
            mut self,
            kind: tar::EntryType,
            name: &str,
            mode: u32,
            link: &str,
            data: &[u8],
        ) -> Self {
            let mut h = tar::Header::new_gnu();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }
        fn file(self, name: &str, data: &[u8]) -> Self {
            self.add(tar::EntryType::Regular, name, 0o644, "", data)
        }
        fn dir(self, name: &str) -> Self {
            self.add(tar::EntryType::Directory, name, 0o755, "", b"")
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn apply(fd: &OwnedFd, tar: Vec<u8>) -> Result<Budget, UnpackError> {
        let mut budget = Budget::new(1 << 20, 1000);
        apply_layer(fd, tar.as_slice(), &mut budget).map(|()| budget)
    }

    #[test]
    fn names_with_dotdot_or_absolute_are_refused() {
        assert_eq!(
            clean_path(b"./a//b/./c").unwrap(),
            vec![&b"a"[..], b"b", b"c"]
        );
        assert!(clean_path(b"/etc/passwd").is_err());
        assert!(clean_path(b"a/../../x").is_err());
        assert!(clean_path(b"..").is_err());
        let (dir, fd) = root();
        let err = apply(&fd, Tar::new().file("a/../../escaped", b"x").bytes()).unwrap_err();
        assert!(matches!(err, UnpackError::Hostile { .. }), "{err}");
        assert!(!dir.path().parent().unwrap().join("escaped").exists());
    }

    #[test]
    fn links_planted_by_earlier_entries_resolve_inside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let (dir, fd) = root();
        let target = outside.path().to_str().unwrap().to_owned();
        let tar = Tar::new()
            .add(tar::EntryType::Symlink, "abs", 0o777, &target, b"")
            .add(tar::EntryType::Symlink, "up", 0o777, "../../../../..", b"")
            .file("abs/through-absolute", b"1")
            .file("up/through-relative", b"2")
            .bytes();
        // The absolute link dangles inside the root, so the entry below it is refused; `..`
        // stops at the root, so the other one lands there. Nothing reaches the outside.
        let _ = apply(&fd, tar);
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        let relative = Tar::new()
            .add(tar::EntryType::Symlink, "up", 0o777, "../../../../..", b"")
            .file("up/through-relative", b"2")
            .bytes();
        apply(&fd, relative).unwrap();
        assert!(dir.path().join("through-relative").exists());
    }

    #[test]
    fn hard_links_cannot_leave_the_tree() {
        let (_dir, fd) = root();
        let err = apply(
            &fd,
            Tar::new()
                .add(
                    tar::EntryType::Link,
                    "shadow",
                    0o644,
                    "../../../etc/shadow",
                    b"",
                )
                .bytes(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::Hostile { .. }), "{err}");
        let err = apply(
            &fd,
            Tar::new()
                .add(tar::EntryType::Link, "shadow", 0o644, "/etc/shadow", b"")
                .bytes(),
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::Hostile { .. }), "{err}");
        // A link to a file of the image works.
        apply(
            &fd,
            Tar::new()
                .file("f", b"data")
                .add(tar::EntryType::Link, "g", 0o644, "f", b"")
                .bytes(),
        )
        .unwrap();
    }

    #[test]
    fn devices_are_left_out_and_setuid_is_dropped() {
        let (dir, fd) = root();
        let budget = apply(
            &fd,
            Tar::new()
                .add(tar::EntryType::Char, "null", 0o666, "", b"")
                .add(tar::EntryType::Block, "sda", 0o660, "", b"")
                .add(tar::EntryType::Regular, "su", 0o6755, "", b"#!")
                .add(tar::EntryType::Directory, "sticky", 0o1777, "", b"")
                .bytes(),
        )
        .unwrap();
        assert_eq!(budget.skipped, 2);
        assert!(!dir.path().join("null").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("su"), 0o755);
        assert_eq!(mode("sticky"), 0o1777);
    }

    #[test]
    fn sizes_and_entry_counts_are_capped() {
        let (_dir, fd) = root();
        let mut budget = Budget::new(1000, 1000);
        let err = apply_layer(
            &fd,
            Tar::new().file("big", &[0u8; 1001]).bytes().as_slice(),
            &mut budget,
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::TooLarge(1000)));
        let mut budget = Budget::new(1 << 20, 2);
        let err = apply_layer(
            &fd,
            Tar::new().dir("a").dir("b").dir("c").bytes().as_slice(),
            &mut budget,
        )
        .unwrap_err();
        assert!(matches!(err, UnpackError::TooManyEntries(2)));
    }

    #[test]
    fn whiteouts_and_opaque_directories_remove_earlier_layers() {
        let (dir, fd) = root();
        apply(
            &fd,
            Tar::new()
                .file("etc/gone", b"1")
                .file("etc/kept", b"2")
                .file("opaque/old", b"3")
                .bytes(),
        )
        .unwrap();
        apply(
            &fd,
            Tar::new()
                .file("etc/.wh.gone", b"")
                .dir("opaque")
                .file("opaque/new", b"4")
                .file("opaque/.wh..wh..opq", b"")
                .bytes(),
        )
        .unwrap();
        assert!(!dir.path().join("etc/gone").exists());
        assert!(!dir.path().join("etc/.wh.gone").exists());
        assert!(dir.path().join("etc/kept").exists());
        assert!(!dir.path().join("opaque/old").exists());
        assert!(dir.path().join("opaque/new").exists());
        assert!(!dir.path().join("opaque/.wh..wh..opq").exists());
    }

    #[test]
    fn an_entry_replaces_what_an_earlier_layer_left_without_following_it() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), b"safe").unwrap();
        let (dir, fd) = root();
        let victim = outside.path().join("victim");
        apply(
            &fd,
            Tar::new()
                .add(
                    tar::EntryType::Symlink,
                    "x",
                    0o777,
                    victim.to_str().unwrap(),
                    b"",
                )
                .bytes(),
        )
        .unwrap();
        apply(&fd, Tar::new().file("x", b"overwritten?").bytes()).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"safe");
        assert_eq!(
            std::fs::read(dir.path().join("x")).unwrap(),
            b"overwritten?"
        );
    }
}
