//! Host-wide reservation of a privileged daemon's uid ranges. Slot locks live in each daemon's
//! state directory, so two daemons with the same `--uid-base` would hand out the same host uids:
//! each privileged helper holds, for its whole life, an flock on a file of its own under
//! [`RESERVATIONS`] that names its range (`<first>-<end>.lock`) and holds its state directory.
//! A helper whose range overlaps a live reservation refuses to start, naming the other's state
//! directory; a reservation whose lock is free belongs to a helper that is gone and is removed.
//! Ranges that contain an existing user or group, or an `/etc/subuid`/`/etc/subgid` entry, are
//! refused too (the files, not NSS: users of a directory service are not seen).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::FlockArg;

use crate::fdfs::flock;

/// Where privileged helpers reserve their ranges (root's, on the host's `/run`).
pub const RESERVATIONS: &str = "/run/sandboxd/uid-ranges";

/// How long a helper waits for the previous helper of its own state directory to let go (a
/// restarted daemon starts its helper while the old one is still noticing its lifeline closed).
const SAME_OWNER_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UidRangeError {
    #[error("{step} {path}")]
    Io {
        step: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "uid range {first}..{end} overlaps the range {other_first}..{other_end} of the sandboxd \
         whose state directory is {other_state_dir}; give one of them another --uid-base"
    )]
    InUse {
        first: u64,
        end: u64,
        other_first: u64,
        other_end: u64,
        other_state_dir: String,
    },
    #[error(
        "uid range {first}..{end} contains {what} {name} ({id}) from {file}; choose a --uid-base \
         that no user, group or subordinate id range uses"
    )]
    Taken {
        first: u64,
        end: u64,
        what: &'static str,
        name: String,
        id: u64,
        file: &'static str,
    },
}

/// The held reservation: the lock is released when the helper exits.
#[derive(Debug)]
pub struct Reservation {
    _lock: File,
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> UidRangeError + 'a {
    move |source| UidRangeError::Io {
        step,
        path: path.display().to_string(),
        source,
    }
}

/// `<first>-<end>.lock` → (first, end).
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let (first, end) = name.strip_suffix(".lock")?.split_once('-')?;
    Some((first.parse().ok()?, end.parse().ok()?))
}

/// Refuse a range that contains a user or group of `passwd`/`group` (name:x:id:...) or an entry
/// of `subuid`/`subgid` (name:first:count).
pub fn check_free(
    first: u64,
    end: u64,
    files: &[(&'static str, &str)],
) -> Result<(), UidRangeError> {
    let overlaps = |a: u64, b: u64| a < end && first < b;
    for (file, text) in files {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let fields: Vec<&str> = line.split(':').collect();
            let (what, id, count) = match *file {
                "/etc/passwd" | "/etc/group" if fields.len() > 2 => (
                    if *file == "/etc/passwd" {
                        "user"
                    } else {
                        "group"
                    },
                    fields[2].parse::<u64>().ok(),
                    Some(1),
                ),
                "/etc/subuid" | "/etc/subgid" if fields.len() > 2 => (
                    "the subordinate id range of",
                    fields[1].parse::<u64>().ok(),
                    fields[2].parse::<u64>().ok(),
                ),
                _ => continue,
            };
            if let (Some(id), Some(count)) = (id, count) {
                if overlaps(id, id + count) {
                    return Err(UidRangeError::Taken {
                        first,
                        end,
                        what,
                        name: fields[0].to_string(),
                        id,
                        file,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Reserve `first..end` for the helper of `state_dir` in the directory `dir` (see the module
/// docs). The returned reservation must be kept for the helper's life.
pub fn reserve(
    dir: &Path,
    first: u64,
    end: u64,
    state_dir: &Path,
) -> Result<Reservation, UidRangeError> {
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    // One helper at a time looks and reserves.
    let guard_path = dir.join(".lock");
    let guard = File::create(&guard_path).map_err(io("opening", &guard_path))?;
    flock(guard.as_raw_fd(), FlockArg::LockExclusive)
        .map_err(|e| io("locking", &guard_path)(e.into()))?;
    let me = state_dir.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(io("listing", dir))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((other_first, other_end)) = parse_name(&name) else {
            continue;
        };
        let path = entry.path();
        let Ok(mut file) = File::options().read(true).write(true).open(&path) else {
            continue;
        };
        let mut owner = String::new();
        let _ = file.read_to_string(&mut owner);
        let deadline = Instant::now() + SAME_OWNER_WAIT;
        let free = loop {
            match flock(file.as_raw_fd(), FlockArg::LockExclusiveNonblock) {
                Ok(()) => break true,
                Err(Errno::EWOULDBLOCK) if owner == me && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(Errno::EWOULDBLOCK) => break false,
                Err(e) => return Err(io("locking", &path)(e.into())),
            }
        };
        if free {
            // Its helper is gone.
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if other_first < end && first < other_end {
            return Err(UidRangeError::InUse {
                first,
                end,
                other_first,
                other_end,
                other_state_dir: owner,
            });
        }
    }
    let path = dir.join(format!("{first}-{end}.lock"));
    let mut lock = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("creating", &path))?;
    flock(lock.as_raw_fd(), FlockArg::LockExclusiveNonblock)
        .map_err(|e| io("locking", &path)(e.into()))?;
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| lock.write_all(me.as_bytes()))
        .map_err(io("writing", &path))?;
    Ok(Reservation { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sandboxd-uidrange-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn overlapping_ranges_are_refused_naming_the_other_state_dir() {
        let dir = temp();
        let a = reserve(&dir, 1000, 2000, Path::new("/var/lib/a")).unwrap();
        let err = reserve(&dir, 1500, 2500, Path::new("/var/lib/b")).unwrap_err();
        assert!(err.to_string().contains("/var/lib/a"), "{err}");
        // A disjoint range is fine, and a released one is taken over.
        let c = reserve(&dir, 2000, 3000, Path::new("/var/lib/c")).unwrap();
        drop(a);
        let b = reserve(&dir, 1500, 2000, Path::new("/var/lib/b")).unwrap();
        assert!(!dir.join("1000-2000.lock").exists());
        drop((b, c));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn users_groups_and_subordinate_ranges_inside_are_refused() {
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1500:1500::/home/alice:/bin/sh\n";
        let subuid = "bob:100000:65536\n";
        let files = [("/etc/passwd", passwd), ("/etc/subuid", subuid)];
        let err = check_free(1000, 2000, &files).unwrap_err();
        assert!(err.to_string().contains("alice"), "{err}");
        let err = check_free(160_000, 300_000, &files).unwrap_err();
        assert!(err.to_string().contains("bob"), "{err}");
        check_free(200_000, 300_000, &files).unwrap();
    }
}
