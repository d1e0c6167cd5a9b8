//! One process of a sandbox as its monitor holds it: the main command (process zero, the nil id)
//! and every exec alike. A [`Process`] is its pidfd, its status pipe (the [`StatusLine`]s of init
//! or of the exec's shim), its outputs drained into its [`OutputLog`], the hand-over of its
//! terminal, and its [`Input`] (stdin or the pty master, fed by attached connections).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use sandboxd_protocol::exec::Frame;
use sandboxd_protocol::status::StatusLine;
use uuid::Uuid;

use crate::output::{self, now_ms, OutputLog};
use crate::sys;

/// After the process exits, how long stragglers may keep its outputs open.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Stdin bytes buffered in the monitor before it stops reading from the writer's connection.
const MAX_PENDING_STDIN: usize = 256 * 1024;
/// A terminal's end-of-file character (VEOF, ^D): what `close_stdin` sends to a terminal.
const VEOF: u8 = 4;

/// What the status pipe said.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub started_at_ms: Option<i64>,
    pub exec_error: Option<String>,
    pub setup_error: Option<String>,
    /// Exit code (`128 + N` for signal N) and the signal.
    pub end: Option<(i32, Option<i32>)>,
}

impl Outcome {
    fn apply(&mut self, line: StatusLine) {
        match line {
            StatusLine::Started => self.started_at_ms = Some(now_ms()),
            StatusLine::ExecFailed(e) => {
                self.started_at_ms.get_or_insert_with(now_ms);
                self.exec_error = Some(e);
            }
            StatusLine::SetupFailed(e) => self.setup_error = Some(e),
            StatusLine::Exit(code) => self.end = Some((code, None)),
            StatusLine::Signal(sig) => self.end = Some((128 + sig, Some(sig))),
        }
    }
}

/// The read end of a status pipe and what it holds of an incomplete line.
struct StatusPipe {
    file: Option<File>,
    buf: Vec<u8>,
}

impl StatusPipe {
    /// Read what the (non-blocking) pipe holds and apply its complete lines to `outcome`. The
    /// pipe is dropped at end of file, or when more than [`StatusLine::MAX_LEN`] bytes arrive
    /// without a newline.
    fn read(&mut self, outcome: &mut Outcome) {
        let Some(file) = &mut self.file else { return };
        let mut chunk = [0u8; 4096];
        loop {
            match file.read(&mut chunk) {
                Ok(0) => {
                    self.file = None;
                    break;
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    if self.buf.len() > StatusLine::MAX_LEN {
                        self.file = None;
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            // A line we do not know is ignored: the writer is ours, and older or newer.
            if let Ok(line) = StatusLine::parse(&line) {
                outcome.apply(line);
            }
        }
    }
}

/// Where attached stdin goes.
pub struct Input {
    /// The write end of stdin, or (a duplicate of) the pty master.
    pub stdin: Option<File>,
    /// With a terminal: (a duplicate of) the master, for resizes.
    master: Option<File>,
    pub pending: Vec<u8>,
    close_when_flushed: bool,
}

impl Input {
    pub fn new(stdin: Option<File>, master: Option<File>) -> Input {
        for f in [&stdin, &master].into_iter().flatten() {
            set_nonblocking(f.as_fd());
        }
        Input {
            stdin,
            master,
            pending: Vec::new(),
            close_when_flushed: false,
        }
    }

    /// Apply one frame from the stdin owner (`writer`) or a reader.
    pub fn apply(&mut self, frame: Frame, writer: bool) {
        match frame {
            // Only the stdin owner writes; other attachments are readers.
            Frame::Stdin(data) if writer && !self.close_when_flushed => {
                self.pending.extend_from_slice(&data);
                self.flush();
            }
            Frame::CloseStdin if writer => {
                if self.master.is_some() {
                    self.pending.push(VEOF);
                } else {
                    self.close_when_flushed = true;
                }
                self.flush();
            }
            Frame::Resize { cols, rows } if cols > 0 && rows > 0 => {
                if let Some(master) = &self.master {
                    let _ = sys::set_window_size(master.as_fd(), cols, rows);
                }
            }
            _ => {}
        }
    }

    pub fn flush(&mut self) {
        if let Some(f) = &mut self.stdin {
            while !self.pending.is_empty() {
                match f.write(&self.pending) {
                    Ok(0) => break,
                    Ok(n) => {
                        self.pending.drain(..n);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    // EPIPE: the process closed its stdin; what was not read is dropped.
                    Err(_) => {
                        self.pending.clear();
                        self.stdin = None;
                        return;
                    }
                }
            }
        }
        if self.close_when_flushed && self.pending.is_empty() {
            self.stdin = None;
        }
        if self.stdin.is_none() {
            self.pending.clear();
        }
    }

    /// Backpressure: a writer is not read while this is full.
    pub fn full(&self) -> bool {
        self.pending.len() >= MAX_PENDING_STDIN
    }

    /// Waiting to be written (poll for POLLOUT).
    pub fn waiting(&self) -> Option<BorrowedFd<'_>> {
        match &self.stdin {
            Some(f) if !self.pending.is_empty() => Some(f.as_fd()),
            _ => None,
        }
    }
}

/// How the process's stdio reaches the monitor.
pub enum Outputs {
    /// stdout and stderr pipes (read ends).
    Pipes { stdout: File, stderr: File },
    /// A terminal whose master the process sends over this socket once it has opened it in the
    /// sandbox's devpts; `stdin` says whether attached connections may write to it.
    Terminal { socket: UnixStream, stdin: bool },
}

/// One process (see the module docs).
pub struct Process {
    /// The nil id for the main command, the exec's id otherwise.
    pub id: Uuid,
    /// Where its `status.json` goes: the sandbox's directory, or `execs/<id>/`.
    dir: OwnedFd,
    /// Attached connections may reach its input (the main command: only with stdin or a
    /// terminal).
    pub attachable: bool,
    pid: Pid,
    pidfd: OwnedFd,
    wait_status: Option<WaitStatus>,
    exited_at: Option<Instant>,
    status: StatusPipe,
    stdout: Option<File>,
    stderr: Option<File>,
    terminal: Option<(UnixStream, bool)>,
    pub output: OutputLog,
    pub input: Input,
    pub outcome: Outcome,
}

/// What a process has ready, as the event loop registered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Stdout,
    Stderr,
    Status,
    Exited,
    Terminal,
    StdinWritable,
}

impl Process {
    /// `stdin`: the write end of a stdin pipe (with pipes).
    pub fn new(
        id: Uuid,
        dir: OwnedFd,
        (pid, pidfd): (Pid, OwnedFd),
        status: OwnedFd,
        outputs: Outputs,
        stdin: Option<OwnedFd>,
        output: OutputLog,
    ) -> Process {
        let status = File::from(status);
        set_nonblocking(status.as_fd());
        let (stdout, stderr, terminal) = match outputs {
            Outputs::Pipes { stdout, stderr } => {
                set_nonblocking(stdout.as_fd());
                set_nonblocking(stderr.as_fd());
                (Some(stdout), Some(stderr), None)
            }
            Outputs::Terminal { socket, stdin } => (None, None, Some((socket, stdin))),
        };
        Process {
            id,
            dir,
            attachable: true,
            pid,
            pidfd,
            wait_status: None,
            exited_at: None,
            status: StatusPipe {
                file: Some(status),
                buf: Vec::new(),
            },
            stdout,
            stderr,
            terminal,
            output,
            input: Input::new(stdin.map(File::from), None),
            outcome: Outcome::default(),
        }
    }

    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// How the process (init, or the exec's shim) ended, once it has.
    pub fn wait_status(&self) -> Option<WaitStatus> {
        self.wait_status
    }

    pub fn running(&self) -> bool {
        self.wait_status.is_none()
    }

    /// The command has been executed (or failed to be) and its terminal, if any, is here: the
    /// start can be answered.
    pub fn started(&self) -> Option<i64> {
        self.outcome
            .started_at_ms
            .filter(|_| self.terminal.is_none())
    }

    /// Reaped, and its output complete (every output at end of file, the terminal handed over
    /// or never coming); or reaped longer than [`DRAIN_GRACE`] ago.
    pub fn done(&self) -> bool {
        match self.exited_at {
            None => false,
            Some(at) => self.outputs_closed() || at.elapsed() > DRAIN_GRACE,
        }
    }

    pub fn outputs_closed(&self) -> bool {
        self.stdout.is_none() && self.stderr.is_none() && self.terminal.is_none()
    }

    /// The end of the drain grace period, once reaped.
    pub fn deadline(&self) -> Option<Instant> {
        self.exited_at.map(|at| at + DRAIN_GRACE)
    }

    /// Every descriptor with something to wait for, and what it means.
    pub fn sources(&self) -> Vec<(BorrowedFd<'_>, nix::poll::PollFlags, Event)> {
        use nix::poll::PollFlags;
        let mut out = Vec::with_capacity(6);
        if let Some((socket, _)) = &self.terminal {
            out.push((socket.as_fd(), PollFlags::POLLIN, Event::Terminal));
        }
        if let Some(f) = &self.stdout {
            out.push((f.as_fd(), PollFlags::POLLIN, Event::Stdout));
        }
        if let Some(f) = &self.stderr {
            out.push((f.as_fd(), PollFlags::POLLIN, Event::Stderr));
        }
        if let Some(f) = &self.status.file {
            out.push((f.as_fd(), PollFlags::POLLIN, Event::Status));
        }
        if self.wait_status.is_none() {
            out.push((self.pidfd.as_fd(), PollFlags::POLLIN, Event::Exited));
        }
        if let Some(fd) = self.input.waiting() {
            out.push((fd, PollFlags::POLLOUT, Event::StdinWritable));
        }
        out
    }

    /// Act on one event.
    pub fn on(&mut self, event: Event, buf: &mut [u8]) {
        match event {
            Event::Stdout => output::pump(&mut self.stdout, 1, &mut self.output, buf),
            Event::Stderr => output::pump(&mut self.stderr, 2, &mut self.output, buf),
            Event::Status => self.read_status(),
            Event::Exited => self.reap(),
            Event::Terminal => self.receive_terminal(),
            Event::StdinWritable => self.input.flush(),
        }
    }

    /// Read the status pipe (see [`StatusPipe::read`]).
    pub fn read_status(&mut self) {
        self.status.read(&mut self.outcome);
    }

    fn reap(&mut self) {
        let status = match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return,
            Ok(status) => status,
            Err(_) => WaitStatus::Exited(self.pid, 255),
        };
        self.wait_status = Some(status);
        self.exited_at = Some(Instant::now());
        // Whatever it said last is in the status pipe already.
        self.read_status();
    }

    /// The process opened its terminal and sends the master: from now on the terminal is its
    /// output (channel 1) and, with `stdin`, its input. Nothing arrives when it failed before;
    /// its status pipe says why.
    fn receive_terminal(&mut self) {
        let Some((socket, stdin)) = self.terminal.take() else {
            return;
        };
        let mut byte = [0u8; 1];
        let Ok((_, fds)) = sys::recv_with_fds::<1>(socket.as_fd(), &mut byte) else {
            return;
        };
        let Some(master) = fds.into_iter().next().map(File::from) else {
            return;
        };
        set_nonblocking(master.as_fd());
        let input = stdin.then(|| master.try_clone().ok()).flatten();
        self.input = Input::new(input, master.try_clone().ok());
        self.stdout = Some(master);
    }

    /// Kill it (SIGKILL through the pidfd), unless it was reaped already.
    pub fn kill(&self) {
        if self.running() {
            let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
        }
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) {
    let _ = nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_pipe() -> (StatusPipe, File) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        let pipe = StatusPipe {
            file: Some(File::from(r)),
            buf: Vec::new(),
        };
        (pipe, File::from(w))
    }

    #[test]
    fn status_lines_apply_once_complete_and_unknown_ones_are_ignored() {
        let (mut pipe, mut w) = status_pipe();
        let mut outcome = Outcome::default();
        w.write_all(b"started\nexit 4").unwrap();
        pipe.read(&mut outcome);
        assert!(outcome.started_at_ms.is_some());
        assert_eq!(outcome.end, None, "half a line is kept for later");
        w.write_all(b"2\nnonsense 1\nexit x\n").unwrap();
        pipe.read(&mut outcome);
        assert_eq!(outcome.end, Some((42, None)));
        w.write_all(b"signal 9\n").unwrap();
        drop(w);
        pipe.read(&mut outcome);
        assert_eq!(outcome.end, Some((137, Some(9))));
        assert!(pipe.file.is_none(), "end of file drops the pipe");
    }

    #[test]
    fn exec_and_setup_failures_are_recorded() {
        let (mut pipe, mut w) = status_pipe();
        let mut outcome = Outcome::default();
        let lines = [
            StatusLine::SetupFailed("joining a namespace: EPERM".into()),
            StatusLine::ExecFailed("nope: No such file or directory".into()),
        ];
        for line in &lines {
            writeln!(w, "{line}").unwrap();
        }
        pipe.read(&mut outcome);
        assert_eq!(
            outcome.setup_error.as_deref(),
            Some("joining a namespace: EPERM")
        );
        assert_eq!(
            outcome.exec_error.as_deref(),
            Some("nope: No such file or directory")
        );
        // exec_failed counts as started: the command's process existed.
        assert!(outcome.started_at_ms.is_some());
    }

    #[test]
    fn a_line_without_end_drops_the_pipe() {
        let (mut pipe, mut w) = status_pipe();
        let _ = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
        let mut outcome = Outcome::default();
        w.write_all(&vec![b'x'; StatusLine::MAX_LEN + 1]).unwrap();
        pipe.read(&mut outcome);
        assert!(pipe.file.is_none());
        assert!(outcome.started_at_ms.is_none() && outcome.end.is_none());
    }

    #[test]
    fn stdin_frames_are_written_and_close_after_the_pending_bytes() {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let mut input = Input::new(Some(File::from(w)), None);
        input.apply(Frame::Stdin(b"abc".to_vec()), true);
        // A reader's frames are ignored.
        input.apply(Frame::Stdin(b"zzz".to_vec()), false);
        input.apply(Frame::CloseStdin, true);
        assert!(input.stdin.is_none(), "closed once flushed");
        let mut got = Vec::new();
        File::from(r).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abc");
    }
}
