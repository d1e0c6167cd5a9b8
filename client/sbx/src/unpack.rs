//! Unpacking a tar stream that came out of a sandbox (`GET /archive`) onto the local machine.
//!
//! The stream is the sandbox's doing, so nothing in it is trusted, whatever the daemon promises:
//! only regular files, directories and symbolic links are created (a device node, FIFO, socket,
//! hard link or sparse entry refuses the whole download, naming the entry); modes keep only the
//! permission bits (`0o777`: no setuid, setgid or sticky bit, so `sbx cp` run as root never
//! leaves a setuid program behind); owners and extended attributes are never applied; an entry
//! whose name climbs out (`..`) or whose parent resolves out of the destination through a link
//! (one the archive made earlier, or one already there) is refused; a file replaces a link of the
//! same name instead of writing through it.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The permission bits an unpacked entry may keep.
pub const MODE_BITS: u32 = 0o777;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("reading the archive")]
    Read(#[source] io::Error),
    #[error(
        "archive entry {path:?} is {kind}: only files, directories and symbolic links are unpacked"
    )]
    Refused { path: String, kind: &'static str },
    #[error("archive entry {0:?} leads outside the destination")]
    Outside(String),
    #[error("unpacking archive entry {path:?}")]
    Entry {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("setting the mode of {path}")]
    Mode {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an entry type is called in a refusal, or `None` when it may be unpacked.
fn refused_kind(kind: tar::EntryType) -> Option<&'static str> {
    match kind {
        tar::EntryType::Regular
        | tar::EntryType::Continuous
        | tar::EntryType::Directory
        | tar::EntryType::Symlink => None,
        tar::EntryType::Char => Some("a character device"),
        tar::EntryType::Block => Some("a block device"),
        tar::EntryType::Fifo => Some("a FIFO"),
        tar::EntryType::Link => Some("a hard link"),
        tar::EntryType::GNUSparse => Some("a sparse file"),
        _ => Some("of an unknown type"),
    }
}

/// Unpack the tar stream `input` into the existing directory `dest`.
pub fn unpack(input: impl Read, dest: &Path) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(false);
    archive.set_mask(!MODE_BITS & 0o7777);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    // Directories get their mode once everything is in (a read-only one would refuse its own
    // contents otherwise), deepest first.
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if let Some(kind) = refused_kind(kind) {
            return Err(UnpackError::Refused { path, kind });
        }
        let mode = entry.header().mode().unwrap_or(0o644) & MODE_BITS;
        let inside = entry.unpack_in(dest).map_err(|source| {
            // The tar crate checks a parent's canonical path against the destination.
            if source.to_string().contains("outside of") {
                UnpackError::Outside(path.clone())
            } else {
                UnpackError::Entry {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        if !inside {
            return Err(UnpackError::Outside(path));
        }
        let rel: PathBuf = Path::new(&path)
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .collect();
        // An entry for "." is the destination itself, which keeps its own mode.
        if kind == tar::EntryType::Directory && rel.components().next().is_some() {
            let at = dest.join(rel);
            set_mode(&at, mode | 0o700)?;
            dirs.push((at, mode));
        }
    }
    dirs.sort_by_key(|(at, _)| std::cmp::Reverse(at.components().count()));
    for (at, mode) in dirs {
        set_mode(&at, mode)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), UnpackError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        UnpackError::Mode {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// An archive built entry by entry, as a hostile sandbox could send it.
    struct Hostile(tar::Builder<Vec<u8>>);

    impl Hostile {
        fn new() -> Hostile {
            Hostile(tar::Builder::new(Vec::new()))
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
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(data.len() as u64);
            h.set_uid(0);
            h.set_gid(0);
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            if kind == tar::EntryType::Char || kind == tar::EntryType::Block {
                h.set_device_major(1).unwrap();
                h.set_device_minor(3).unwrap();
            }
            // Written byte for byte: the crate's path setter refuses `..`, a sandbox need not.
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn unpack_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<(), UnpackError>) {
        let dir = tempfile::tempdir().unwrap();
        let result = unpack(bytes, dir.path());
        (dir, result)
    }

    #[test]
    fn setuid_setgid_and_sticky_bits_are_dropped() {
        let archive = Hostile::new()
            .add(tar::EntryType::Directory, "d/", 0o1777, "", b"")
            .add(
                tar::EntryType::Regular,
                "d/suid",
                0o4755,
                "",
                b"#!/bin/sh\n",
            )
            .add(tar::EntryType::Regular, "sgid", 0o2711, "", b"x")
            .add(tar::EntryType::Directory, "ro/", 0o555, "", b"")
            .add(tar::EntryType::Regular, "ro/f", 0o444, "", b"y")
            .bytes();
        let (dir, result) = unpack_bytes(&archive);
        result.unwrap();
        let mode = |p: &str| {
            std::fs::symlink_metadata(dir.path().join(p))
                .unwrap()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("d"), 0o777);
        assert_eq!(mode("d/suid"), 0o755);
        assert_eq!(mode("sgid"), 0o711);
        assert_eq!(mode("ro"), 0o555);
        assert_eq!(mode("ro/f"), 0o444);
        assert_eq!(std::fs::read(dir.path().join("ro/f")).unwrap(), b"y");
    }

    #[test]
    fn device_nodes_fifos_and_hard_links_are_refused() {
        for (kind, what) in [
            (tar::EntryType::Char, "a character device"),
            (tar::EntryType::Block, "a block device"),
            (tar::EntryType::Fifo, "a FIFO"),
            (tar::EntryType::Link, "a hard link"),
        ] {
            let link = if kind == tar::EntryType::Link {
                "f"
            } else {
                ""
            };
            let archive = Hostile::new()
                .add(tar::EntryType::Regular, "f", 0o644, "", b"x")
                .add(kind, "special", 0o666, link, b"")
                .bytes();
            let (dir, result) = unpack_bytes(&archive);
            match result {
                Err(UnpackError::Refused { path, kind }) => {
                    assert_eq!((path.as_str(), kind), ("special", what))
                }
                other => panic!("{what}: {other:?}"),
            }
            assert!(std::fs::symlink_metadata(dir.path().join("special")).is_err());
            let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(entries.len(), 1, "{what}: only the regular file was made");
            let ft = std::fs::symlink_metadata(dir.path().join("f"))
                .unwrap()
                .file_type();
            assert!(!ft.is_char_device() && !ft.is_fifo());
        }
    }

    #[test]
    fn nothing_lands_outside_the_destination() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap().to_owned();
        // A link to the outside, then a file through it and a file of the link's own name.
        let archive = Hostile::new()
            .add(tar::EntryType::Symlink, "out", 0o777, &target, b"")
            .add(tar::EntryType::Regular, "out/planted", 0o644, "", b"x")
            .bytes();
        let (dir, result) = unpack_bytes(&archive);
        assert!(
            matches!(result, Err(UnpackError::Outside(ref p)) if p == "out/planted"),
            "{result:?}"
        );
        assert!(!outside.path().join("planted").exists());
        assert!(dir.path().join("out").is_symlink());

        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"host").unwrap();
        let archive = Hostile::new()
            .add(
                tar::EntryType::Symlink,
                "v",
                0o777,
                victim.to_str().unwrap(),
                b"",
            )
            .add(tar::EntryType::Regular, "v", 0o644, "", b"sandbox")
            .bytes();
        let (dir, result) = unpack_bytes(&archive);
        result.unwrap();
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"host",
            "not written through"
        );
        assert_eq!(std::fs::read(dir.path().join("v")).unwrap(), b"sandbox");

        let archive = Hostile::new()
            .add(tar::EntryType::Regular, "../escaped", 0o644, "", b"x")
            .bytes();
        let (dir, result) = unpack_bytes(&archive);
        assert!(matches!(result, Err(UnpackError::Outside(_))), "{result:?}");
        assert!(!dir.path().parent().unwrap().join("escaped").exists());
    }
}
