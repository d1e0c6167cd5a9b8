//! The monitor's control socket: connections from the daemon (and the helper, for `ns`), their
//! requests ([`ControlRequest`], parsed once), and the connections an exec request takes over:
//! the start's reply, `exec-wait` waiters and `attach` attachments.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use nix::poll::PollFlags;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use sandboxd_protocol::control::{ControlError, ControlRequest};
use sandboxd_protocol::exec::{ExecCommand, ExecStarted, Frame, STDIN_BUSY};
use uuid::Uuid;

use super::events::{Poll, Source};
use crate::process::Process;
use crate::sys;

const MAX_CONTROL_CONNECTIONS: usize = 64;
/// Connections held for `exec-wait` and `attach` together (each is a descriptor of the monitor).
const MAX_HELD_CONNECTIONS: usize = 256;

/// What an exec request needs of the sandbox.
pub struct SandboxView<'a> {
    pub dir: BorrowedFd<'a>,
    pub exec_context: &'a crate::exec::Context,
}

struct Attachment {
    process: Uuid,
    stream: UnixStream,
    buf: Vec<u8>,
    writer: bool,
}

pub struct Control {
    listener: UnixListener,
    daemon_uid: u32,
    clients: Vec<(UnixStream, Vec<u8>)>,
    attachments: Vec<Attachment>,
    waiters: Vec<(Uuid, UnixStream)>,
    /// Exec starts not answered yet: answered once the command has been executed.
    replies: Vec<(Uuid, UnixStream)>,
    ended: HashSet<Uuid>,
}

fn answer(stream: &mut UnixStream, line: &str) {
    // The connection is non-blocking and the answer small: it fits the socket buffer.
    let _ = stream.write_all(line.as_bytes());
}

fn find(processes: &mut [Process], id: Uuid) -> Option<&mut Process> {
    processes.iter_mut().find(|p| p.id == id)
}

impl Control {
    pub fn new(listener: UnixListener, daemon_uid: u32) -> Control {
        Control {
            listener,
            daemon_uid,
            clients: Vec::new(),
            attachments: Vec::new(),
            waiters: Vec::new(),
            replies: Vec::new(),
            ended: HashSet::new(),
        }
    }

    pub fn register<'a>(&'a self, poll: &mut Poll<'a>, processes: &[Process]) {
        poll.register(self.listener.as_fd(), PollFlags::POLLIN, Source::Listener);
        for (i, (c, _)) in self.clients.iter().enumerate() {
            poll.register(c.as_fd(), PollFlags::POLLIN, Source::Client(i));
        }
        for (i, a) in self.attachments.iter().enumerate() {
            // Backpressure: a writer is not read while its process's stdin is full.
            let full = a.writer
                && processes
                    .iter()
                    .find(|p| p.id == a.process)
                    .is_some_and(|p| p.input.full());
            let flags = if full {
                PollFlags::empty()
            } else {
                PollFlags::POLLIN
            };
            poll.register(a.stream.as_fd(), flags, Source::Attachment(i));
        }
    }

    /// Act on the control sources that have events. True when a kill was delivered.
    pub fn on_ready(
        &mut self,
        ready: Vec<Source>,
        processes: &mut Vec<Process>,
        sandbox: &SandboxView<'_>,
    ) -> bool {
        let mut clients = Vec::new();
        let mut attachments = Vec::new();
        let mut accept = false;
        for source in ready {
            match source {
                Source::Listener => accept = true,
                Source::Client(i) => clients.push(i),
                Source::Attachment(i) => attachments.push(i),
                _ => {}
            }
        }
        // Highest index first, so that removing one does not move the others.
        attachments.sort_unstable();
        for i in attachments.into_iter().rev() {
            self.read_attachment(i, processes);
        }
        if accept {
            self.accept();
        }
        let mut killed = false;
        clients.sort_unstable();
        for i in clients.into_iter().rev() {
            killed |= self.serve_client(i, processes, sandbox);
        }
        killed
    }

    fn accept(&mut self) {
        while let Ok((stream, _)) = self.listener.accept() {
            // The daemon, and the helper (our own uid) for `ns`.
            let own = nix::unistd::geteuid().as_raw();
            let allowed = getsockopt(&stream, PeerCredentials)
                .map(|c| c.uid() == self.daemon_uid || c.uid() == own)
                .unwrap_or(false);
            if !allowed || self.clients.len() >= MAX_CONTROL_CONNECTIONS {
                continue;
            }
            if stream.set_nonblocking(true).is_ok() {
                self.clients.push((stream, Vec::new()));
            }
        }
    }

    /// Read one control connection and answer its complete lines. True when a kill was
    /// delivered.
    fn serve_client(
        &mut self,
        i: usize,
        processes: &mut Vec<Process>,
        sandbox: &SandboxView<'_>,
    ) -> bool {
        let mut chunk = [0u8; 4096];
        let mut close = false;
        let mut killed = false;
        match self.clients[i].0.read(&mut chunk) {
            Ok(0) => close = true,
            Ok(n) => self.clients[i].1.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => close = true,
        }
        while let Some(pos) = self.clients[i].1.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.clients[i].1.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            let answer_line = match ControlRequest::parse(&line) {
                // Exec requests take the connection over (an attach keeps it for its frames).
                Ok(ControlRequest::Exec(cmd)) => {
                    let (stream, rest) = self.clients.swap_remove(i);
                    self.exec_command(cmd, stream, rest, processes, sandbox);
                    return killed;
                }
                Err(ControlError::Exec(e)) => {
                    let (mut stream, _) = self.clients.swap_remove(i);
                    answer(&mut stream, &format!("err {e}\n"));
                    return killed;
                }
                Ok(ControlRequest::Namespaces) => {
                    self.send_namespaces(i, processes, sandbox);
                    continue;
                }
                Ok(ControlRequest::Kill(signo)) if processes[0].running() => {
                    match sys::pidfd_send_signal(processes[0].pidfd(), signo) {
                        Ok(()) => {
                            killed = true;
                            "ok\n".to_string()
                        }
                        Err(e) => format!("err {e}\n"),
                    }
                }
                Ok(ControlRequest::Kill(_)) => "err not running\n".to_string(),
                Err(e @ ControlError::Invalid) => format!("err {e}\n"),
            };
            answer(&mut self.clients[i].0, &answer_line);
        }
        if close || self.clients[i].1.len() > ControlRequest::max_line(&self.clients[i].1) {
            self.clients.swap_remove(i);
        }
        killed
    }

    /// Answer `ns`: init's user and mount namespaces as SCM_RIGHTS, for the helper only (our own
    /// uid; rootless, the daemon shares it and is no boundary there anyway).
    fn send_namespaces(&mut self, i: usize, processes: &[Process], sandbox: &SandboxView<'_>) {
        let own = nix::unistd::geteuid().as_raw();
        let stream = &mut self.clients[i].0;
        let from_helper = getsockopt(&*stream, PeerCredentials)
            .map(|c| c.uid() == own)
            .unwrap_or(false);
        if from_helper && processes[0].running() {
            let (user, mnt) = sandbox.exec_context.namespaces.user_and_mount();
            let fds = [user.as_raw_fd(), mnt.as_raw_fd()];
            let _ = nix::sys::socket::sendmsg::<()>(
                stream.as_raw_fd(),
                &[std::io::IoSlice::new(b"ok\n")],
                &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                None,
            );
        } else {
            let _ = stream.write_all(b"err not running\n");
        }
    }

    /// Handle one exec line of a control connection, which this takes over.
    fn exec_command(
        &mut self,
        cmd: ExecCommand,
        mut stream: UnixStream,
        rest: Vec<u8>,
        processes: &mut Vec<Process>,
        sandbox: &SandboxView<'_>,
    ) {
        let held = self.attachments.len() + self.waiters.len();
        if held >= MAX_HELD_CONNECTIONS && !matches!(cmd, ExecCommand::Start(_)) {
            answer(&mut stream, "err too many connections\n");
            return;
        }
        match cmd {
            ExecCommand::Start(req) => {
                let id = req.id;
                let view = crate::exec::Sandbox {
                    dir: sandbox.dir,
                    init: processes[0].pidfd(),
                    running: processes[0].running(),
                    execs: processes.len() - 1,
                };
                match sandbox.exec_context.start(*req, &view) {
                    Ok(process) => {
                        processes.push(process);
                        self.replies.push((id, stream));
                    }
                    Err(e) => answer(&mut stream, &format!("err {e}\n")),
                }
            }
            ExecCommand::Wait(id) => {
                if self.ended.contains(&id) {
                    answer(&mut stream, "ended\n");
                } else if processes[1..].iter().any(|p| p.id == id) {
                    self.waiters.push((id, stream));
                } else {
                    answer(&mut stream, "err no such exec\n");
                }
            }
            ExecCommand::Attach { id, stdin } => {
                let ended = self.ended.contains(&id);
                let Some(process) = find(processes, id).filter(|p| p.attachable) else {
                    let why = if ended {
                        "ended"
                    } else if id.is_nil() {
                        "no_stdin"
                    } else {
                        "no such exec"
                    };
                    answer(&mut stream, &format!("err {why}\n"));
                    return;
                };
                if stdin {
                    let input = &process.input;
                    if input.stdin.is_none() && input.pending.is_empty() {
                        answer(&mut stream, "err no_stdin\n");
                        return;
                    }
                    if self.attachments.iter().any(|a| a.process == id && a.writer) {
                        answer(&mut stream, &format!("err {STDIN_BUSY}\n"));
                        return;
                    }
                }
                answer(&mut stream, "ok\n");
                self.attachments.push(Attachment {
                    process: id,
                    stream,
                    buf: rest,
                    writer: stdin,
                });
                let i = self.attachments.len() - 1;
                if !self.serve_attachment_frames(i, processes) {
                    self.attachments.swap_remove(i);
                }
            }
        }
    }

    fn read_attachment(&mut self, i: usize, processes: &mut [Process]) {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut close = false;
        match self.attachments[i].stream.read(&mut chunk) {
            Ok(0) => close = true,
            Ok(n) => self.attachments[i].buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(_) => close = true,
        }
        if !self.serve_attachment_frames(i, processes) || close {
            // Closing an attachment releases stdin; the process goes on.
            self.attachments.swap_remove(i);
        }
    }

    /// Apply the complete frames buffered for attachment `i`. False when it must be closed.
    fn serve_attachment_frames(&mut self, i: usize, processes: &mut [Process]) -> bool {
        loop {
            let a = &mut self.attachments[i];
            let frame = match Frame::decode(&mut a.buf) {
                Ok(Some(f)) => f,
                Ok(None) => return true,
                Err(_) => return false,
            };
            let (target, writer) = (a.process, a.writer);
            let Some(process) = find(processes, target) else {
                return false;
            };
            process.input.apply(frame, writer);
        }
    }

    /// Answer the `exec` request once the command has been executed (or failed to be).
    pub fn maybe_reply(&mut self, exec: &Process) {
        let Some(started) = exec.started() else {
            return;
        };
        let Some(pos) = self.replies.iter().position(|(id, _)| *id == exec.id) else {
            return;
        };
        let (_, mut reply) = self.replies.swap_remove(pos);
        let started = ExecStarted {
            started_at_unix_ms: started,
            exec_error: exec.outcome.exec_error.clone(),
        };
        let json = serde_json::to_string(&started).unwrap_or_default();
        answer(&mut reply, &format!("ok {json}\n"));
    }

    /// An exec has ended and its record is written: answer its start if it never started, its
    /// waiters, and close its attachments.
    pub fn ended(&mut self, exec: &Process) {
        self.maybe_reply(exec);
        if let Some(pos) = self.replies.iter().position(|(id, _)| *id == exec.id) {
            let (_, mut reply) = self.replies.swap_remove(pos);
            let why = exec
                .outcome
                .setup_error
                .clone()
                .unwrap_or_else(|| "the exec ended before it started".into());
            answer(&mut reply, &format!("err joining the sandbox: {why}\n"));
        }
        let id = exec.id;
        self.ended.insert(id);
        self.attachments.retain(|a| a.process != id);
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.0 == id);
        self.waiters = keep;
        for (_, mut w) in done {
            answer(&mut w, "ended\n");
        }
    }
}
