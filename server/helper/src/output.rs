//! What a process (the main command or an exec) leaves for the daemon: its output in
//! `output.log` + `output.idx`, drained from its pipes and capped, and its `status.json`, written
//! atomically. One copy for every process.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use sandboxd_protocol::layout::{OUTPUT_TRUNCATED, STATUS_FILE};
use sandboxd_protocol::logindex::Record;

use crate::sys;

/// Bytes read from an output at once.
pub const READ_CHUNK: usize = 256 * 1024;
/// Reads of one output per wake-up of the event loop (4 x 256 KiB): a process that writes
/// without pause must not keep the monitor from kill requests, the timeout and the other outputs.
pub const MAX_READS_PER_WAKEUP: usize = 4;

/// Milliseconds since the Unix epoch (the time stamps of status files).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Why a status file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("encoding the status")]
    Encode(#[source] serde_json::Error),
    #[error("creating the temporary status file")]
    CreateTemp(#[source] Errno),
    #[error("handing the status file to the daemon")]
    Chown(#[source] Errno),
    #[error("writing the status file")]
    Write(#[source] std::io::Error),
    #[error("renaming the status file into place")]
    Rename(#[source] Errno),
}

/// The log and index of one process, with its output cap.
pub struct OutputLog {
    log: File,
    index: File,
    /// Bytes of `log` covered by index records.
    len: u64,
    cap: u64,
    truncated: bool,
    /// Where to create `output.truncated` when the cap is reached (the sandbox's directory, for
    /// the main command).
    marker_dir: Option<OwnedFd>,
}

impl OutputLog {
    pub fn new(log: File, index: File, cap: u64) -> OutputLog {
        OutputLog {
            log,
            index,
            len: 0,
            cap,
            truncated: false,
            marker_dir: None,
        }
    }

    /// Also mark truncation with an `output.truncated` file in `dir`.
    pub fn with_truncation_marker(mut self, dir: OwnedFd) -> OutputLog {
        self.marker_dir = Some(dir);
        self
    }

    /// Bytes stored (the marker included).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// Store what was read from `channel` (1 stdout, 2 stderr), up to the cap; past it, note the
    /// truncation once and drop the rest (the pipes are still drained, so the process never
    /// blocks on them).
    pub fn store(&mut self, channel: u8, data: &[u8]) {
        if self.truncated {
            return;
        }
        let room = self.cap.saturating_sub(self.len);
        let keep = (data.len() as u64).min(room) as usize;
        if keep > 0 {
            self.append(channel, &data[..keep]);
        }
        if keep < data.len() {
            self.truncated = true;
            let marker = format!("\n[sandboxd: output truncated at {} bytes]\n", self.cap);
            self.append(2, marker.as_bytes());
            if let Some(dir) = &self.marker_dir {
                let _ = sys::openat(
                    Some(dir.as_raw_fd()),
                    OUTPUT_TRUNCATED,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o644),
                );
            }
        }
    }

    /// Append one chunk: the bytes to the log, then their index record. If the log write fails
    /// part-way (a full disk), the log is cut back to its last indexed length, so that the index
    /// and the log always agree and every offset stays meaningful; the chunk is lost.
    fn append(&mut self, channel: u8, data: &[u8]) {
        match self.log.write_all(data) {
            Ok(()) => {
                let record = Record {
                    channel,
                    len: data.len() as u32,
                };
                if self.index.write_all(&record.encode()).is_ok() {
                    self.len += data.len() as u64;
                } else {
                    let _ = self.log.set_len(self.len);
                }
            }
            Err(_) => {
                let _ = self.log.set_len(self.len);
            }
        }
    }
}

/// Move what one (non-blocking) output holds into `log`, at most [`MAX_READS_PER_WAKEUP`]
/// reads. `output` becomes `None` at its end: end of file, or an error (EIO on a pty master
/// means every slave descriptor is closed).
pub fn pump(output: &mut Option<File>, channel: u8, log: &mut OutputLog, buf: &mut [u8]) {
    let want = READ_CHUNK.min(buf.len());
    for _ in 0..MAX_READS_PER_WAKEUP {
        let Some(file) = output else { return };
        match file.read(&mut buf[..want]) {
            Ok(0) => {
                *output = None;
                return;
            }
            Ok(n) => {
                log.store(channel, &buf[..n]);
                if n < want {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                *output = None;
                return;
            }
        }
    }
}

/// Write `status` as `status.json` in `dir`, for the daemon (owned by `owner`, mode 0640):
/// a new temporary file (`O_EXCL`, after removing one a crash left behind), written,
/// then renamed into place. A reader sees no file or the whole file, never a part.
pub fn write_status_file(
    dir: BorrowedFd<'_>,
    status: &impl serde::Serialize,
    owner: (u32, u32),
) -> Result<(), OutputError> {
    let bytes = serde_json::to_vec(status).map_err(OutputError::Encode)?;
    let tmp = format!("{STATUS_FILE}.tmp");
    let _ = nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    let fd = sys::openat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o640),
    )
    .map_err(OutputError::CreateTemp)?;
    let mut file = File::from(fd);
    nix::unistd::fchown(
        file.as_raw_fd(),
        Some(Uid::from_raw(owner.0)),
        Some(Gid::from_raw(owner.1)),
    )
    .map_err(OutputError::Chown)?;
    file.write_all(&bytes).map_err(OutputError::Write)?;
    // No fsync: the rename makes the file whole or absent for every reader while the machine is
    // up, which is all it is for (a sandbox does not survive a reboot, and the daemon's database
    // is the durable record of the exit). An fsync here cost every exit several milliseconds on
    // a busy disk (BENCHMARKS.md, issue 11).
    drop(file);
    nix::fcntl::renameat(
        Some(dir.as_raw_fd()),
        tmp.as_str(),
        Some(dir.as_raw_fd()),
        STATUS_FILE,
    )
    .map_err(OutputError::Rename)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandboxd_protocol::layout::{OUTPUT_INDEX, OUTPUT_LOG};
    use sandboxd_protocol::logindex::decode_all;
    use std::os::fd::AsFd;

    fn log_in(dir: &std::path::Path, cap: u64) -> OutputLog {
        let open = |name: &str| {
            std::fs::OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(dir.join(name))
                .unwrap()
        };
        OutputLog::new(open(OUTPUT_LOG), open(OUTPUT_INDEX), cap)
    }

    fn records(dir: &std::path::Path) -> Vec<(u8, u32)> {
        let index = std::fs::read(dir.join(OUTPUT_INDEX)).unwrap();
        decode_all(&index)
            .into_iter()
            .map(|r| (r.channel, r.len))
            .collect()
    }

    fn nonblocking_pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        (File::from(r), File::from(w))
    }

    #[test]
    fn the_pump_stores_each_read_as_one_record_per_channel() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_in(dir.path(), 1 << 20);
        let (out_r, mut out_w) = nonblocking_pipe();
        let (err_r, mut err_w) = nonblocking_pipe();
        let (mut out, mut err) = (Some(out_r), Some(err_r));
        let mut buf = vec![0u8; READ_CHUNK];
        out_w.write_all(b"hello ").unwrap();
        pump(&mut out, 1, &mut log, &mut buf);
        err_w.write_all(b"oops\n").unwrap();
        pump(&mut err, 2, &mut log, &mut buf);
        out_w.write_all(b"world\n").unwrap();
        drop(out_w);
        pump(&mut out, 1, &mut log, &mut buf);
        assert!(err.is_some(), "stderr is still open");
        // Nothing to read: the pump returns at once and keeps the pipe.
        pump(&mut err, 2, &mut log, &mut buf);
        assert!(err.is_some());
        // End of file closes stdout.
        pump(&mut out, 1, &mut log, &mut buf);
        assert!(out.is_none());
        let bytes = std::fs::read(dir.path().join(OUTPUT_LOG)).unwrap();
        assert_eq!(bytes, b"hello oops\nworld\n");
        assert_eq!(records(dir.path()), [(1, 6), (2, 5), (1, 6)]);
        assert_eq!(log.len(), 17);
        assert!(!log.truncated());
    }

    #[test]
    fn the_pump_reads_a_bounded_amount_per_wakeup() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_in(dir.path(), u64::MAX);
        let (r, w) = nonblocking_pipe();
        let _ = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        let mut out = Some(r);
        let mut w = w;
        let chunk = vec![7u8; 4096];
        let mut written = 0usize;
        while written < 1 << 20 {
            match w.write(&chunk) {
                Ok(n) => written += n,
                Err(_) => break,
            }
        }
        // A small buffer: each read is one record, and one wake-up does at most four.
        let mut buf = vec![0u8; 1024];
        pump(&mut out, 1, &mut log, &mut buf);
        assert_eq!(records(dir.path()), vec![(1, 1024); MAX_READS_PER_WAKEUP]);
        assert!(out.is_some());
    }

    #[test]
    fn the_cap_keeps_exactly_cap_bytes_and_marks_the_truncation_once() {
        let dir = tempfile::tempdir().unwrap();
        let marker_dir = File::open(dir.path()).unwrap();
        let mut log = log_in(dir.path(), 10).with_truncation_marker(OwnedFd::from(marker_dir));
        log.store(1, b"12345678");
        assert!(!log.truncated());
        log.store(2, b"abcdef");
        assert!(log.truncated());
        log.store(1, b"never stored");
        let marker = "\n[sandboxd: output truncated at 10 bytes]\n";
        let bytes = std::fs::read(dir.path().join(OUTPUT_LOG)).unwrap();
        assert_eq!(bytes, format!("12345678ab{marker}").as_bytes());
        assert_eq!(
            records(dir.path()),
            [(1, 8), (2, 2), (2, marker.len() as u32)]
        );
        assert_eq!(log.len(), 10 + marker.len() as u64);
        assert!(dir.path().join(OUTPUT_TRUNCATED).exists());
    }

    #[test]
    fn an_exact_fit_is_not_truncation_and_no_marker_without_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = log_in(dir.path(), 4);
        log.store(1, b"abcd");
        assert!(!log.truncated());
        log.store(1, b"e");
        assert!(log.truncated());
        assert_eq!(records(dir.path())[0], (1, 4));
        assert!(!dir.path().join(OUTPUT_TRUNCATED).exists());
    }

    #[derive(serde::Serialize)]
    struct Status {
        exit_code: i32,
        note: String,
    }

    #[test]
    fn the_status_file_is_replaced_whole_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let fd = OwnedFd::from(File::open(dir.path()).unwrap());
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        // A temporary file a crash left behind does not stop the write (O_EXCL after removal).
        std::fs::write(dir.path().join(format!("{STATUS_FILE}.tmp")), "partial").unwrap();
        let first = Status {
            exit_code: 3,
            note: "x".repeat(100_000),
        };
        write_status_file(fd.as_fd(), &first, me).unwrap();
        let read = || std::fs::read_to_string(dir.path().join(STATUS_FILE)).unwrap();
        assert_eq!(read(), serde_json::to_string(&first).unwrap());
        let second = Status {
            exit_code: 0,
            note: "short".into(),
        };
        write_status_file(fd.as_fd(), &second, me).unwrap();
        // Shorter than the first: nothing of the old content survives (a new file, not O_TRUNC).
        assert_eq!(read(), serde_json::to_string(&second).unwrap());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [STATUS_FILE]);
        let mode = std::fs::metadata(dir.path().join(STATUS_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o640
        );
    }

    #[test]
    fn a_status_file_that_cannot_be_placed_leaves_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let fd = OwnedFd::from(File::open(dir.path()).unwrap());
        let me = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        std::fs::write(dir.path().join(STATUS_FILE), "old").unwrap();
        // A directory where the temporary file goes: creating it fails, nothing is replaced.
        std::fs::create_dir(dir.path().join(format!("{STATUS_FILE}.tmp"))).unwrap();
        let new = Status {
            exit_code: 1,
            note: String::new(),
        };
        assert!(matches!(
            write_status_file(fd.as_fd(), &new, me),
            Err(OutputError::CreateTemp(_))
        ));
        assert_eq!(
            std::fs::read_to_string(dir.path().join(STATUS_FILE)).unwrap(),
            "old"
        );
    }
}
