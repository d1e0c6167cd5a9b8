//! The free-space reserve of the state directory's filesystem (`--min-free-space`): below it,
//! the daemon adds no bulk data (image imports, new sandboxes) and answers 507, so that the
//! disk never fills up under it and the database (SQLite, in the same directory) always has room
//! for the writes that free space again: deletes, state changes, token and quota updates.

use std::path::{Path, PathBuf};

use crate::limits::GIB;

/// Default `--min-free-space`.
pub const DEFAULT_MIN_FREE_SPACE: &str = "1G";

/// How much must stay free: a size, or a percentage of the filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reserve {
    Bytes(u64),
    Percent(f64),
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve::Bytes(GIB)
    }
}

impl Reserve {
    /// `1G`, `512M`, `0` (no reserve) or `5%`.
    pub fn parse(text: &str) -> Result<Reserve, String> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("invalid percentage {text:?}"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err(format!("{text:?}: a percentage must be 0-100"));
            }
            return Ok(Reserve::Percent(p));
        }
        crate::limits::parse_size(t).map(Reserve::Bytes)
    }

    /// The reserve in bytes on a filesystem of `total` bytes.
    pub fn bytes_of(&self, total: u64) -> u64 {
        match *self {
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => (total as f64 * p / 100.0).ceil() as u64,
        }
    }
}

impl std::fmt::Display for Reserve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reserve::Bytes(b) => write!(f, "{b} bytes"),
            Reserve::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("reading the free space of {path}")]
    Statvfs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// Below the reserve: the message is for the client (no path in it).
    #[error(
        "the daemon's storage is full: {free} bytes are free and {reserve} must stay free \
         (--min-free-space {setting}); delete sandboxes or images to make room"
    )]
    BelowReserve {
        free: u64,
        reserve: u64,
        setting: Reserve,
    },
}

/// The filesystem of a directory and the reserve kept on it.
#[derive(Debug, Clone)]
pub struct FreeSpace {
    path: PathBuf,
    reserve: Reserve,
}

/// Size of the filesystem that holds `path`, in bytes.
pub fn capacity(path: &Path) -> Result<u64, StorageError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|source| StorageError::Statvfs {
        path: path.to_owned(),
        source,
    })?;
    Ok((st.blocks() as u64).saturating_mul(st.fragment_size() as u64))
}

impl FreeSpace {
    pub fn new(path: &Path, reserve: Reserve) -> Self {
        FreeSpace {
            path: path.to_owned(),
            reserve,
        }
    }

    /// Bytes that may still be written before the reserve is reached; `BelowReserve` when none.
    pub fn headroom(&self) -> Result<u64, StorageError> {
        let st =
            nix::sys::statvfs::statvfs(&self.path).map_err(|source| StorageError::Statvfs {
                path: self.path.clone(),
                source,
            })?;
        let block = st.fragment_size() as u64;
        // What an unprivileged writer (the daemon, a rootless helper) may use.
        let free = (st.blocks_available() as u64).saturating_mul(block);
        let total = (st.blocks() as u64).saturating_mul(block);
        let reserve = self.reserve.bytes_of(total);
        if free <= reserve {
            return Err(StorageError::BelowReserve {
                free,
                reserve,
                setting: self.reserve,
            });
        }
        Ok(free - reserve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_parse_as_sizes_or_percentages() {
        assert_eq!(Reserve::parse("1G"), Ok(Reserve::Bytes(GIB)));
        assert_eq!(Reserve::parse("0"), Ok(Reserve::Bytes(0)));
        assert_eq!(Reserve::parse("5%"), Ok(Reserve::Percent(5.0)));
        assert_eq!(
            Reserve::parse(DEFAULT_MIN_FREE_SPACE),
            Ok(Reserve::default())
        );
        assert_eq!(Reserve::Percent(5.0).bytes_of(1000), 50);
        for bad in ["", "x", "101%", "-1%", "5%%"] {
            assert!(Reserve::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headroom_is_what_is_free_above_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let none = FreeSpace::new(dir.path(), Reserve::Bytes(0))
            .headroom()
            .unwrap();
        assert!(none > 0);
        let all = FreeSpace::new(dir.path(), Reserve::Percent(100.0)).headroom();
        assert!(
            matches!(all, Err(StorageError::BelowReserve { .. })),
            "{all:?}"
        );
        let huge = FreeSpace::new(dir.path(), Reserve::Bytes(u64::MAX)).headroom();
        let message = huge.unwrap_err().to_string();
        assert!(message.contains("--min-free-space"), "{message}");
        assert!(
            FreeSpace::new(Path::new("/no/such/dir"), Reserve::default())
                .headroom()
                .is_err()
        );
    }
}
