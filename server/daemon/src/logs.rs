//! Reading a sandbox's output: `output.log` (every byte, in order) described by `output.idx`
//! (one `sandboxd_protocol::logindex` record per write saying which stream the bytes came from).
//!
//! The monitor appends the bytes first and the record second, so the reader only ever trusts the
//! index: a byte is delivered once a visible record covers it. Offsets count bytes of the
//! combined stream. Following uses inotify on `output.idx` plus the sandbox's exit notification;
//! once the sandbox is final the files are read to the end one last time, so nothing written
//! before the exit is missed.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sandboxd_protocol::layout::SandboxDir;
use sandboxd_protocol::logindex::{self, RECORD_LEN};
use tokio::sync::{mpsc, watch};

/// Largest chunk handed out at once (and so the largest websocket message).
pub const MAX_CHUNK: usize = 256 * 1024;
/// Chunks a reader task may have read ahead of its consumer. With [`MAX_CHUNK`], a reader that
/// falls behind (a slow websocket or HTTP client) holds at most about 1.25 MiB of output in the
/// daemon (this, plus the chunk being sent); it simply reads on from the file at its own pace.
pub const READ_AHEAD_CHUNKS: usize = 4;
/// How much of the index is read at once.
const INDEX_READ: usize = 64 * 1024 / RECORD_LEN * RECORD_LEN;
/// Poll interval used only when inotify is unavailable (for instance, out of instances).
const FALLBACK_POLL: Duration = Duration::from_millis(200);

/// What to read.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// First byte, as an offset into the combined stream.
    pub offset: u64,
    /// Only this channel (1 stdout, 2 stderr).
    pub channel: Option<u8>,
    /// Keep reading until the sandbox is final.
    pub follow: bool,
    /// Never merge bytes of different channels into one chunk (for websocket messages).
    pub split_channels: bool,
}

/// A blocking cursor over the log, driven by the index.
pub struct LogCursor {
    log_path: PathBuf,
    idx_path: PathBuf,
    log: Option<File>,
    idx: Option<File>,
    idx_off: u64,
    queue: VecDeque<logindex::Record>,
    /// The record being consumed: its channel and how many of its bytes are left.
    current: Option<(u8, u64)>,
    /// Combined-stream offset of the next byte of `current` (or of the next record).
    pos: u64,
    opts: ReadOptions,
}

/// One run of bytes from one channel (or from both when channels are not split).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub channel: u8,
    pub data: Vec<u8>,
}

fn open_if_exists(path: &PathBuf) -> io::Result<Option<File>> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl LogCursor {
    pub fn new(dir: &SandboxDir, opts: ReadOptions) -> Self {
        LogCursor {
            log_path: dir.output_log(),
            idx_path: dir.output_index(),
            log: None,
            idx: None,
            idx_off: 0,
            queue: VecDeque::new(),
            current: None,
            pos: 0,
            opts,
        }
    }

    /// Combined-stream offset reached so far (the total once everything is read).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Read more index records, if any were appended.
    fn fill(&mut self) -> io::Result<()> {
        if self.idx.is_none() {
            self.idx = open_if_exists(&self.idx_path)?;
        }
        let Some(idx) = &self.idx else { return Ok(()) };
        let mut buf = vec![0u8; INDEX_READ];
        let mut got = 0;
        while got < buf.len() {
            let n = idx.read_at(&mut buf[got..], self.idx_off + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let whole = got / RECORD_LEN * RECORD_LEN;
        self.queue.extend(logindex::decode_all(&buf[..whole]));
        self.idx_off += whole as u64;
        Ok(())
    }

    /// The next chunk of at most `max` bytes, or `None` when everything indexed so far is read.
    pub fn next_chunk(&mut self, max: usize) -> io::Result<Option<Chunk>> {
        let mut out: Vec<u8> = Vec::new();
        let mut channel = None;
        while out.len() < max {
            let (ch, remaining) = match self.current {
                Some((ch, remaining)) if remaining > 0 => (ch, remaining),
                _ => {
                    if self.queue.is_empty() {
                        self.fill()?;
                    }
                    match self.queue.pop_front() {
                        Some(r) => {
                            self.current = Some((r.channel, u64::from(r.len)));
                            continue;
                        }
                        None => {
                            self.current = None;
                            break;
                        }
                    }
                }
            };
            if self.pos < self.opts.offset {
                // Skip what lies before the requested offset, splitting a record if needed.
                let skip = remaining.min(self.opts.offset - self.pos);
                self.pos += skip;
                self.current = Some((ch, remaining - skip));
                continue;
            }
            if self.opts.channel.is_some_and(|want| want != ch) {
                self.pos += remaining;
                self.current = None;
                continue;
            }
            if self.opts.split_channels && channel.is_some_and(|c| c != ch) {
                break;
            }
            if self.log.is_none() {
                self.log = open_if_exists(&self.log_path)?;
            }
            let Some(log) = &self.log else { break };
            let want = remaining.min((max - out.len()) as u64) as usize;
            let start = out.len();
            out.resize(start + want, 0);
            let mut got = 0;
            while got < want {
                let n = log.read_at(&mut out[start + got..], self.pos + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            out.truncate(start + got);
            self.pos += got as u64;
            self.current = Some((ch, remaining - got as u64));
            channel = Some(ch);
            if got < want {
                // The index promised bytes the log does not have (yet); try again later.
                break;
            }
        }
        Ok(channel.map(|channel| Chunk { channel, data: out }))
    }
}

/// What a reader task produces.
#[derive(Debug)]
pub enum LogEvent {
    Data {
        channel: u8,
        data: Bytes,
    },
    /// Everything was sent; `offset` is the combined-stream offset reached.
    End {
        offset: u64,
    },
}

/// Read (and optionally follow) a sandbox's output in a background task. `exit` turns `true`
/// when the sandbox is final; `None` means it already is. The task stops when the receiver is
/// dropped.
pub fn read_logs(
    dir: SandboxDir,
    opts: ReadOptions,
    exit: Option<watch::Receiver<bool>>,
) -> mpsc::Receiver<io::Result<LogEvent>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD_CHUNKS);
    tokio::spawn(async move {
        if let Err(e) = pump(dir, opts, exit, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

/// Wakes a follower when the index grows.
enum Wakeup {
    Inotify(inotify::EventStream<Vec<u8>>),
    Poll,
}

impl Wakeup {
    fn new(dir: &SandboxDir) -> Self {
        let setup = || -> io::Result<inotify::EventStream<Vec<u8>>> {
            let ino = inotify::Inotify::init()?;
            ino.watches()
                .add(dir.output_index(), inotify::WatchMask::MODIFY)?;
            ino.into_event_stream(vec![0u8; 4096])
        };
        match setup() {
            Ok(stream) => Wakeup::Inotify(stream),
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable; following logs by polling");
                Wakeup::Poll
            }
        }
    }

    async fn wait(&mut self) {
        match self {
            Wakeup::Inotify(stream) => {
                if stream.next().await.is_none() {
                    *self = Wakeup::Poll;
                }
            }
            Wakeup::Poll => tokio::time::sleep(FALLBACK_POLL).await,
        }
    }
}

fn is_final(exit: &Option<watch::Receiver<bool>>) -> bool {
    match exit {
        None => true,
        Some(rx) => *rx.borrow() || rx.has_changed().is_err(),
    }
}

async fn pump(
    dir: SandboxDir,
    opts: ReadOptions,
    mut exit: Option<watch::Receiver<bool>>,
    tx: &mpsc::Sender<io::Result<LogEvent>>,
) -> io::Result<()> {
    // Watch before the first read, so that no write between the read and the wait is missed.
    let mut wakeup = (opts.follow && !is_final(&exit)).then(|| Wakeup::new(&dir));
    let mut cursor = LogCursor::new(&dir, opts);
    loop {
        // Sample "final" before draining: a drain that starts after the sandbox ended sees
        // every byte it wrote.
        let was_final = is_final(&exit);
        loop {
            let (back, chunk) = tokio::task::spawn_blocking(move || {
                let chunk = cursor.next_chunk(MAX_CHUNK);
                (cursor, chunk)
            })
            .await
            .map_err(io::Error::other)?;
            cursor = back;
            match chunk? {
                Some(c) => {
                    let event = LogEvent::Data {
                        channel: c.channel,
                        data: Bytes::from(c.data),
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return Ok(());
                    }
                }
                None => break,
            }
        }
        let Some(waker) = wakeup.as_mut().filter(|_| !was_final) else {
            let _ = tx
                .send(Ok(LogEvent::End {
                    offset: cursor.position(),
                }))
                .await;
            return Ok(());
        };
        match exit.as_mut() {
            Some(rx) => {
                tokio::select! {
                    _ = waker.wait() => {}
                    _ = rx.changed() => {}
                }
            }
            None => waker.wait().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandboxd_protocol::logindex::Record;
    use std::io::Write;

    struct Writer {
        log: File,
        idx: File,
    }

    impl Writer {
        fn new(dir: &SandboxDir) -> Self {
            std::fs::create_dir_all(dir.root()).unwrap();
            let open = |p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .unwrap()
            };
            Writer {
                log: open(dir.output_log()),
                idx: open(dir.output_index()),
            }
        }

        /// Like the monitor: bytes first, then the record.
        fn write(&mut self, channel: u8, data: &[u8]) {
            self.log.write_all(data).unwrap();
            let rec = Record {
                channel,
                len: data.len() as u32,
            };
            self.idx.write_all(&rec.encode()).unwrap();
        }
    }

    fn read_all(dir: &SandboxDir, opts: ReadOptions) -> Vec<Chunk> {
        let mut c = LogCursor::new(dir, opts);
        let mut out = Vec::new();
        while let Some(chunk) = c.next_chunk(MAX_CHUNK).unwrap() {
            out.push(chunk);
        }
        out
    }

    fn opts(offset: u64, channel: Option<u8>, split: bool) -> ReadOptions {
        ReadOptions {
            offset,
            channel,
            follow: false,
            split_channels: split,
        }
    }

    fn setup() -> (tempfile::TempDir, SandboxDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SandboxDir::new(tmp.path(), uuid::Uuid::new_v4());
        let mut w = Writer::new(&dir);
        w.write(1, b"hello ");
        w.write(2, b"oops\n");
        w.write(1, b"world\n");
        w.write(1, b"!");
        (tmp, dir)
    }

    fn bytes(chunks: &[Chunk]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.data.clone()).collect()
    }

    #[test]
    fn reads_everything_in_order() {
        let (_t, dir) = setup();
        assert_eq!(
            bytes(&read_all(&dir, opts(0, None, false))),
            b"hello oops\nworld\n!"
        );
        let split = read_all(&dir, opts(0, None, true));
        let channels: Vec<u8> = split.iter().map(|c| c.channel).collect();
        assert_eq!(channels, vec![1, 2, 1]);
        assert_eq!(split[2].data, b"world\n!");
    }

    #[test]
    fn filters_streams_and_splits_records_at_the_offset() {
        let (_t, dir) = setup();
        assert_eq!(
            bytes(&read_all(&dir, opts(0, Some(1), false))),
            b"hello world\n!"
        );
        assert_eq!(bytes(&read_all(&dir, opts(0, Some(2), false))), b"oops\n");
        // Offset 3 falls inside the first record.
        assert_eq!(
            bytes(&read_all(&dir, opts(3, Some(1), false))),
            b"lo world\n!"
        );
        // Offset 13 falls inside "world\n" (which starts at 11).
        assert_eq!(bytes(&read_all(&dir, opts(13, None, false))), b"rld\n!");
        assert_eq!(bytes(&read_all(&dir, opts(13, Some(2), false))), b"");
        assert!(read_all(&dir, opts(100, None, false)).is_empty());
    }

    #[test]
    fn missing_files_read_as_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SandboxDir::new(tmp.path(), uuid::Uuid::new_v4());
        assert!(read_all(&dir, opts(0, None, false)).is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_a_writer_until_the_end() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = SandboxDir::new(tmp.path(), uuid::Uuid::new_v4());
        let mut w = Writer::new(&dir);
        let (exit_tx, exit_rx) = watch::channel(false);
        let mut rx = read_logs(
            dir.clone(),
            ReadOptions {
                offset: 0,
                channel: None,
                follow: true,
                split_channels: true,
            },
            Some(exit_rx),
        );
        let writer = std::thread::spawn(move || {
            let mut expected = Vec::new();
            for i in 0..2000u32 {
                let data = format!("line {i} {}\n", "x".repeat((i % 97) as usize));
                let ch = if i % 3 == 0 { 2 } else { 1 };
                w.write(ch, data.as_bytes());
                expected.push((ch, data.into_bytes()));
            }
            exit_tx.send_replace(true);
            expected
        });
        let mut got: Vec<(u8, Vec<u8>)> = Vec::new();
        let end = loop {
            match rx.recv().await.unwrap().unwrap() {
                LogEvent::Data { channel, data } => got.push((channel, data.to_vec())),
                LogEvent::End { offset } => break offset,
            }
        };
        let expected = writer.join().unwrap();
        let flatten = |v: &[(u8, Vec<u8>)], ch: u8| -> Vec<u8> {
            v.iter()
                .filter(|(c, _)| *c == ch)
                .flat_map(|(_, d)| d.clone())
                .collect()
        };
        assert_eq!(flatten(&got, 1), flatten(&expected, 1));
        assert_eq!(flatten(&got, 2), flatten(&expected, 2));
        let total: usize = expected.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(end, total as u64);
        let all_got: Vec<u8> = got.iter().flat_map(|(_, d)| d.clone()).collect();
        let all_expected: Vec<u8> = expected.iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(all_got, all_expected);
    }
}
