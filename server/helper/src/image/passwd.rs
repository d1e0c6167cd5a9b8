//! Who a `user` spec names (`UID[:GID]`, `NAME[:GROUP]`), looked up in an image's `/etc/passwd`
//! and `/etc/group` as Docker (runc's `GetExecUser`) does: a name must exist; a number need not
//! (its group is then the entry's if there is one, else 0); supplementary groups are the groups
//! that list the user's name.
//!
//! The files come from the image, which is hostile: they are opened inside the image's root
//! (`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, so a link resolves inside it), must be
//! regular files of at most [`MAX_FILE`] bytes, and are parsed line by line with every id checked
//! to lie in the sandbox's range; a malformed line is skipped, as libc does.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use sandboxd_protocol::layout::IMAGE_ROOTFS;
use sandboxd_protocol::rules::{IdRef, UserSpec, ID_RANGE};

use super::ImageStore;
use crate::validate::RunAs;

/// Largest `/etc/passwd` or `/etc/group` read.
const MAX_FILE: u64 = 4 << 20;
/// Most supplementary groups kept (the kernel allows more; no image needs them).
const MAX_GROUPS: usize = 64;

/// Why a user spec names nobody.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("user {0:?} is not in the image's /etc/passwd")]
    NoSuchUser(String),
    #[error("group {0:?} is not in the image's /etc/group")]
    NoSuchGroup(String),
    #[error("user names are looked up in an image's /etc/passwd: a sandbox on the host root takes UID[:GID]")]
    NameWithoutImage,
    #[error("a rootless sandbox has only root (0:0), not {0}:{1}")]
    Rootless(u32, u32),
    #[error("reading the image's {file}: {source}")]
    Read {
        file: &'static str,
        #[source]
        source: Errno,
    },
}

/// One `/etc/passwd` entry.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
}

/// One `/etc/group` entry.
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: Vec<&'a str>,
}

fn id(field: &str) -> Option<u32> {
    field.parse::<u32>().ok().filter(|n| *n < ID_RANGE)
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let uid = id(f.next()?)?;
        let gid = id(f.next()?)?;
        (!name.is_empty()).then_some(PasswdEntry { name, uid, gid })
    })
}

fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    text.lines().filter_map(|line| {
        let mut f = line.split(':');
        let name = f.next()?;
        let _password = f.next()?;
        let gid = id(f.next()?)?;
        let members = f
            .next()
            .unwrap_or("")
            .split(',')
            .filter(|m| !m.is_empty())
            .collect();
        (!name.is_empty()).then_some(GroupEntry { name, gid, members })
    })
}

/// Resolve `spec` against the text of `/etc/passwd` and `/etc/group` (empty when absent).
pub fn resolve(spec: &UserSpec, passwd: &str, group: &str) -> Result<RunAs, UserError> {
    let entry = match &spec.user {
        IdRef::Name(name) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == name)
                .ok_or_else(|| UserError::NoSuchUser(name.clone()))?,
        ),
        IdRef::Id(uid) => passwd_entries(passwd).find(|e| e.uid == *uid),
    };
    let uid = match (&spec.user, &entry) {
        (IdRef::Id(uid), _) => *uid,
        (IdRef::Name(_), Some(e)) => e.uid,
        (IdRef::Name(name), None) => return Err(UserError::NoSuchUser(name.clone())),
    };
    let gid = match &spec.group {
        Some(IdRef::Id(gid)) => *gid,
        Some(IdRef::Name(name)) => {
            group_entries(group)
                .find(|g| g.name == name)
                .ok_or_else(|| UserError::NoSuchGroup(name.clone()))?
                .gid
        }
        None => entry.as_ref().map_or(0, |e| e.gid),
    };
    let mut groups = vec![gid];
    if let Some(e) = &entry {
        for g in group_entries(group) {
            if groups.len() >= MAX_GROUPS {
                break;
            }
            if g.members.contains(&e.name) && !groups.contains(&g.gid) {
                groups.push(g.gid);
            }
        }
    }
    Ok(RunAs { uid, gid, groups })
}

/// Resolve `spec` for a sandbox: against the image `digest`'s files, or (host root, `None`)
/// numbers only. A rootless sandbox maps only root.
pub fn resolve_for(
    store: &ImageStore,
    digest: Option<&str>,
    spec: &UserSpec,
    rootless: bool,
) -> Result<RunAs, UserError> {
    let run_as = match digest {
        Some(digest) => {
            let passwd = read_image_file(store, digest, "etc/passwd")?;
            let group = read_image_file(store, digest, "etc/group")?;
            resolve(spec, &passwd, &group)?
        }
        None => match (&spec.user, &spec.group) {
            (IdRef::Id(uid), None | Some(IdRef::Id(_))) => {
                let gid = match spec.group {
                    Some(IdRef::Id(g)) => g,
                    _ => 0,
                };
                RunAs {
                    uid: *uid,
                    gid,
                    groups: vec![gid],
                }
            }
            _ => return Err(UserError::NameWithoutImage),
        },
    };
    if rootless && (run_as.uid != 0 || run_as.gid != 0) {
        return Err(UserError::Rootless(run_as.uid, run_as.gid));
    }
    Ok(run_as)
}

/// The text of `path` (relative) inside the image's root, or empty when it does not exist.
fn read_image_file(
    store: &ImageStore,
    digest: &str,
    path: &'static str,
) -> Result<String, UserError> {
    let fail = |source| UserError::Read { file: path, source };
    let root = crate::sys::openat(
        Some(store.raw_fd()),
        format!("{digest}/{IMAGE_ROOTFS}").as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(fail)?;
    let how = OpenHow::new()
        // Non-blocking: a FIFO planted as /etc/passwd must not hang the helper.
        .flags(OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match crate::sys::openat2(root.as_raw_fd(), path, how) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => return Ok(String::new()),
        Err(e) => return Err(fail(e)),
    };
    let file = File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| fail(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    if !meta.file_type().is_file() {
        return Err(fail(Errno::EINVAL));
    }
    if meta.len() > MAX_FILE {
        return Err(fail(Errno::EFBIG));
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        bad line\n\
        huge:x:70000:70000::/:/bin/sh\n\
        app:x:1000:1001:App:/home/app:/bin/sh\n\
        :x:5:5::/:\n\
        nobody:x:65534:65534:nobody:/:/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\n\
        staff:x:50:app,other\n\
        app:x:1001:\n\
        video:x:44:other,app\n\
        broken\n";

    fn check(spec: &str, want: Result<(u32, u32, &[u32]), UserError>) {
        let spec = UserSpec::parse(spec).expect("a valid spec");
        let got = resolve(&spec, PASSWD, GROUP).map(|r| (r.uid, r.gid, r.groups));
        assert_eq!(got, want.map(|(u, g, gs)| (u, g, gs.to_vec())), "{spec:?}");
    }

    #[test]
    fn users_resolve_as_docker_does() {
        check("app", Ok((1000, 1001, &[1001, 50, 44])));
        check("1000", Ok((1000, 1001, &[1001, 50, 44])));
        check("app:staff", Ok((1000, 50, &[50, 44])));
        check("app:7", Ok((1000, 7, &[7, 50, 44])));
        check("root", Ok((0, 0, &[0])));
        // A number need not exist; its group is then 0.
        check("4242", Ok((4242, 0, &[0])));
        check("4242:4242", Ok((4242, 4242, &[4242])));
        check("ghost", Err(UserError::NoSuchUser("ghost".into())));
        check("app:ghosts", Err(UserError::NoSuchGroup("ghosts".into())));
        // Entries outside the sandbox's range, or malformed, do not exist.
        check("huge", Err(UserError::NoSuchUser("huge".into())));
    }

    #[test]
    fn empty_files_know_only_numbers() {
        let spec = UserSpec::parse("1000:5").expect("valid");
        assert_eq!(
            resolve(&spec, "", ""),
            Ok(RunAs {
                uid: 1000,
                gid: 5,
                groups: vec![5]
            })
        );
        let spec = UserSpec::parse("root").expect("valid");
        assert_eq!(
            resolve(&spec, "", ""),
            Err(UserError::NoSuchUser("root".into()))
        );
    }
}
