//! The helper's file work by descriptor, below every module that touches a directory tree: open
//! relative to a directory without following links, list a directory, lock, remove a tree, measure
//! a tree. Nothing here knows a sandbox's or the image store's layout (that is `dirs` and `image`
//! on top); every function works on descriptors the caller opened.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FlockArg, OFlag};
use nix::sys::stat::{fchmodat, fstat, FchmodatFlags, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

/// openat(2) below `dir` (`None`: the working directory), never following a link in the last
/// component, close-on-exec.
pub fn open_fd<P: ?Sized + nix::NixPath>(
    dir: Option<RawFd>,
    name: &P,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    crate::sys::openat(
        dir,
        name,
        flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        mode,
    )
}

/// flock(2) on a raw descriptor. nix's `Flock` guard unlocks on drop, which would release the lock
/// the monitor inherits when the helper drops its copy after fork; a raw flock lives as long as
/// any descriptor of the open file description does.
#[allow(deprecated)]
pub fn flock(fd: RawFd, arg: FlockArg) -> Result<(), Errno> {
    nix::fcntl::flock(fd, arg)
}

fn fd_into_raw(fd: OwnedFd) -> RawFd {
    std::os::fd::IntoRawFd::into_raw_fd(fd)
}

/// A listing of the directory `dir`, read through a new open file description of it (so `dir`'s
/// own offset is untouched). The caller skips `.` and `..`.
pub fn open_listing(dir: RawFd) -> Result<nix::dir::Dir, Errno> {
    let dup = open_fd(
        Some(dir),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )?;
    nix::dir::Dir::from_fd(fd_into_raw(dup))
}

/// Open directory `name` under `parent` without following links, opening up a directory the
/// sandbox made unreadable (its contents are the sandbox's).
fn open_dir_for_removal(parent: RawFd, name: &CStr) -> Result<OwnedFd, Errno> {
    let open = || {
        open_fd(
            Some(parent),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
    };
    let dir = match open() {
        Err(Errno::EACCES) => {
            fchmodat(
                Some(parent),
                name,
                Mode::from_bits_truncate(0o700),
                FchmodatFlags::NoFollowSymlink,
            )?;
            open()?
        }
        other => other?,
    };
    let st = fstat(dir.as_raw_fd())?;
    if st.st_mode & 0o700 != 0o700 {
        nix::sys::stat::fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(0o700))?;
    }
    Ok(dir)
}

/// The first entry of a directory that is itself a directory, after unlinking every other entry.
fn clear_files(dir: &OwnedFd) -> Result<Option<CString>, Errno> {
    let mut listing = open_listing(dir.as_raw_fd())?;
    for entry in listing.iter() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => {}
            Err(Errno::EISDIR) | Err(Errno::EPERM) => return Ok(Some(name.to_owned())),
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Remove `name` under `parent` and everything below it, never following a link.
///
/// Iterative, holding one directory descriptor at a time: a sandbox can build a tree as deep as
/// it likes, and neither the helper's stack nor its descriptor table may depend on that. Going
/// back up uses `..`, checked against the device and inode recorded on the way down (nothing can
/// rename things meanwhile: this runs only once the sandbox's processes are gone).
pub fn remove_tree(parent: RawFd, name: &CStr) -> Result<(), Errno> {
    match unlinkat(Some(parent), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => return Ok(()),
        Err(Errno::EISDIR) | Err(Errno::EPERM) => {}
        Err(e) => return Err(e),
    }
    let parent_st = fstat(parent)?;
    // The path from `parent` down to the current directory, with each step's (dev, ino).
    let mut path: Vec<(CString, (u64, u64))> = Vec::new();
    let mut current = open_dir_for_removal(parent, name)?;
    let st = fstat(current.as_raw_fd())?;
    path.push((name.to_owned(), (st.st_dev, st.st_ino)));
    loop {
        if let Some(child) = clear_files(&current)? {
            let next = open_dir_for_removal(current.as_raw_fd(), &child)?;
            let st = fstat(next.as_raw_fd())?;
            path.push((child, (st.st_dev, st.st_ino)));
            current = next;
            continue;
        }
        // `current` is empty: remove it from its parent and continue there.
        let (done, _) = path.pop().ok_or(Errno::EINVAL)?;
        let expected = path
            .last()
            .map(|(_, id)| *id)
            .unwrap_or((parent_st.st_dev, parent_st.st_ino));
        let up = if path.is_empty() {
            open_fd(
                Some(parent),
                ".",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )?
        } else {
            open_fd(
                Some(current.as_raw_fd()),
                "..",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )?
        };
        let st = fstat(up.as_raw_fd())?;
        if (st.st_dev, st.st_ino) != expected {
            return Err(Errno::ESTALE);
        }
        unlinkat(
            Some(up.as_raw_fd()),
            done.as_c_str(),
            UnlinkatFlags::RemoveDir,
        )?;
        if path.is_empty() {
            return Ok(());
        }
        current = up;
    }
}

/// Bytes allocated to the trees below `roots` (each an open directory), never following a link.
/// Bounded: after 100000 entries, or below 64 pending directories, the walk stops counting, so a
/// sandbox's tree cannot make it run long or hold many descriptors.
pub fn tree_usage(roots: Vec<OwnedFd>) -> u64 {
    const MAX_ENTRIES: usize = 100_000;
    let mut stack = roots;
    let mut total = 0u64;
    let mut seen = 0usize;
    while let Some(dir) = stack.pop() {
        let Ok(mut listing) = open_listing(dir.as_raw_fd()) else {
            continue;
        };
        for entry in listing.iter().flatten() {
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            seen += 1;
            if seen > MAX_ENTRIES {
                return total;
            }
            let Ok(st) = nix::sys::stat::fstatat(
                Some(dir.as_raw_fd()),
                name,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) else {
                continue;
            };
            total += st.st_blocks as u64 * 512;
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR && stack.len() < 64 {
                if let Ok(child) = open_fd(
                    Some(dir.as_raw_fd()),
                    name,
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                    Mode::empty(),
                ) {
                    stack.push(child);
                }
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::mkdirat;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    #[test]
    fn removes_deep_unreadable_trees_without_following_links() {
        let base = std::env::temp_dir().join(format!("sandboxd-rm-{}", std::process::id()));
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let tree = base.join("tree");
        std::fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("link")).unwrap();
        // Deeper than PATH_MAX allows to name: built one directory descriptor at a time.
        let mut deep = open_fd(
            None,
            tree.as_path(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
        for _ in 0..3000 {
            mkdirat(Some(deep.as_raw_fd()), "d", Mode::from_bits_truncate(0o755)).unwrap();
            deep = open_fd(
                Some(deep.as_raw_fd()),
                "d",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
        }
        nix::unistd::symlinkat(&outside, Some(deep.as_raw_fd()), "link").unwrap();
        drop(
            open_fd(
                Some(deep.as_raw_fd()),
                "f",
                OFlag::O_WRONLY | OFlag::O_CREAT,
                Mode::from_bits_truncate(0o644),
            )
            .unwrap(),
        );
        let locked = tree.join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::write(locked.join("f"), "x").unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();

        let parent = std::fs::File::open(&base).unwrap();
        remove_tree(parent.as_raw_fd(), c"tree").unwrap();
        assert!(!tree.exists());
        assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "x");
        std::fs::remove_dir_all(&base).unwrap();
    }

    fn open_dir(path: &Path) -> OwnedFd {
        open_fd(
            None,
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn a_listing_names_every_entry_and_open_refuses_a_link() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "x").unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("c")).unwrap();
        let fd = open_dir(dir.path());
        let mut names: Vec<String> = open_listing(fd.as_raw_fd())
            .unwrap()
            .iter()
            .map(|e| e.unwrap().file_name().to_str().unwrap().to_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b", "c"]);
        let link = open_fd(
            Some(fd.as_raw_fd()),
            "c",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            Mode::empty(),
        );
        // ELOOP, or ENOTDIR where O_DIRECTORY is checked first: never the link's target.
        assert!(matches!(link.err(), Some(Errno::ELOOP | Errno::ENOTDIR)));
    }

    #[test]
    fn usage_counts_allocated_blocks_below_the_roots_and_not_behind_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/data"), vec![1u8; 256 * 1024]).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("big"), vec![1u8; 1024 * 1024]).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let used = tree_usage(vec![open_dir(&root)]);
        assert!(used >= 256 * 1024, "{used}");
        assert!(used < 1024 * 1024, "the link was followed: {used}");
        assert_eq!(tree_usage(vec![]), 0);
    }

    #[test]
    fn a_lock_is_exclusive_between_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open_dir(dir.path()), open_dir(dir.path()));
        flock(a.as_raw_fd(), FlockArg::LockExclusiveNonblock).unwrap();
        assert_eq!(
            flock(b.as_raw_fd(), FlockArg::LockSharedNonblock),
            Err(Errno::EWOULDBLOCK)
        );
        drop(a);
        flock(b.as_raw_fd(), FlockArg::LockSharedNonblock).unwrap();
    }
}
