//! Execs, on the monitor's side: extra processes in a running sandbox, owned by the sandbox's
//! monitor exactly like the main command, so that a daemon restart neither kills an exec nor
//! loses a byte of its output or its stdin/terminal.
//!
//! For each exec the monitor creates `execs/<id>/` (output files handed to the daemon's uid),
//! forks a shim that joins the sandbox ([`join`]) and keeps, in its own single-threaded event
//! loop: the read ends of stdout/stderr (or the pty master), which it drains into the exec's
//! `output.log`/`output.idx` whether or not anyone listens; the write end of stdin (or the
//! master), fed by at most one attached connection; the shim's status pipe and pidfd. When the
//! shim has exited and the output has reached end of file (or a grace period passed), it writes
//! the exec's `status.json`, answers `exec-wait` connections and closes the exec's attachments.
//! The wire format of the requests is `sandboxd_protocol::exec`.

pub mod join;

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{renameat, OFlag};
use nix::poll::{PollFd, PollFlags};
use nix::sys::stat::{mkdirat, Mode};
use nix::sys::wait::waitpid;
use nix::unistd::{pipe2, Gid, Pid, Uid};
use sandboxd_protocol::exec::{
    ExecCommand, ExecRequest, ExecStarted, ExecStatus, Frame, EXECS_DIR, MAX_RUNNING_EXECS,
    NOT_RUNNING, STDIN_BUSY,
};
use sandboxd_protocol::layout::{OUTPUT_INDEX, OUTPUT_LOG, STATUS_FILE};
use uuid::Uuid;

use crate::monitor::{append_output, now_ms, read_status, StatusReport};
use crate::sys::{self, CloneResult};
use crate::validate::{valid_env_name, IdMap};

/// Bytes read from an output at once.
const READ_CHUNK: usize = 256 * 1024;
/// Reads of one output per wake-up (a busy exec must not starve the rest of the loop).
const MAX_READS_PER_WAKEUP: usize = 4;
/// After the shim exits, how long stragglers may keep the output open.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// Stdin bytes buffered in the monitor before it stops reading from the writer's connection.
const MAX_PENDING_STDIN: usize = 256 * 1024;
/// How long the monitor waits for a shim to hand over its pty master.
const PTY_HANDOVER_TIMEOUT_MS: u16 = 5000;
const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 1024;
/// Connections held for `exec-wait` and `attach` together (each is a descriptor of the monitor).
const MAX_HELD_CONNECTIONS: usize = 256;
/// A terminal's end-of-file character (VEOF, ^D): what `close_stdin` sends to a terminal.
const VEOF: u8 = 4;

/// What every exec of this sandbox shares with its main command.
pub struct Context {
    pub ids: IdMap,
    pub capabilities: Vec<&'static str>,
    pub nested_user_namespaces: bool,
    /// The sandbox's environment (`KEY=VALUE`), which an exec's `env` extends.
    pub env: Vec<CString>,
    pub cwd: CString,
    pub output_cap: u64,
    pub daemon_uid: u32,
    pub daemon_gid: u32,
    /// cgroup v1: the `cgroup.procs` files of the sandbox's cgroups.
    pub cgroup_procs: Vec<PathBuf>,
    /// cgroup v2: the sandbox's cgroup directory (execs are born in it).
    pub cgroup_v2: Option<OwnedFd>,
    pub namespaces: Namespaces,
}

/// The sandbox's namespaces, opened by the monitor right after the clone, while init still
/// waits for its uid maps: init is then our own unreaped child (its pid cannot be reused) and
/// still dumpable, so this works without privileges too. (Later, init is non-dumpable, and
/// joining through its pidfd would need CAP_SYS_PTRACE on the host, which a rootless monitor
/// does not have.)
pub struct Namespaces {
    pub user: OwnedFd,
    /// mnt, pid, uts, ipc, net and (unless it is unshared late, on cgroup v1) cgroup.
    pub others: Vec<OwnedFd>,
    /// cgroup v1: init unshares its cgroup namespace after joining its cgroups, so the shim
    /// joins that one through init's pidfd before it leaves the host's user namespace.
    pub late_cgroup: bool,
}

impl Namespaces {
    /// The user and mount namespaces (what the helper's file workers join).
    pub fn user_and_mount(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        // `open` puts mnt first among the others.
        (self.user.as_fd(), self.others[0].as_fd())
    }

    /// Open the namespaces of `child` (a clone that has not run its own code yet).
    pub fn open(child: Pid, late_cgroup: bool) -> Result<Namespaces, String> {
        let open = |name: &str| {
            crate::sys::open(
                format!("/proc/{child}/ns/{name}").as_str(),
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| format!("opening the sandbox's {name} namespace: {e}"))
        };
        let mut names = vec!["mnt", "pid", "uts", "ipc", "net"];
        if !late_cgroup {
            names.push("cgroup");
        }
        Ok(Namespaces {
            user: open("user")?,
            others: names.into_iter().map(open).collect::<Result<_, _>>()?,
            late_cgroup,
        })
    }
}

/// The sandbox as the exec manager sees it at one moment.
pub struct Sandbox<'a> {
    pub dir: BorrowedFd<'a>,
    pub init: BorrowedFd<'a>,
    pub running: bool,
}

struct Exec {
    id: Uuid,
    dir: OwnedFd,
    shim: Pid,
    shim_pidfd: OwnedFd,
    shim_exited: Option<Instant>,
    status: Option<File>,
    status_buf: Vec<u8>,
    /// stdout, or the pty master.
    out: Option<File>,
    err: Option<File>,
    input: Input,
    log: File,
    index: File,
    log_len: u64,
    truncated: bool,
    reply: Option<UnixStream>,
    started_at: Option<i64>,
    exec_error: Option<String>,
    setup_error: Option<String>,
    end: Option<(i32, Option<i32>)>,
}

/// Where attached stdin goes: one exec's, or the main command's.
struct Input {
    /// The write end of stdin, or (a duplicate of) the pty master.
    stdin: Option<File>,
    /// With a terminal: (a duplicate of) the master, for resizes.
    master: Option<File>,
    pending: Vec<u8>,
    close_when_flushed: bool,
}

impl Input {
    fn new(stdin: Option<File>, master: Option<File>) -> Input {
        for f in [&stdin, &master].into_iter().flatten() {
            let _ = nix::fcntl::fcntl(
                f.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
            );
        }
        Input {
            stdin,
            master,
            pending: Vec::new(),
            close_when_flushed: false,
        }
    }

    /// Apply one frame from the stdin owner (`writer`) or a reader.
    fn apply(&mut self, frame: Frame, writer: bool) {
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

    fn flush(&mut self) {
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

    fn full(&self) -> bool {
        self.pending.len() >= MAX_PENDING_STDIN
    }
}

struct Attachment {
    exec: Uuid,
    stream: UnixStream,
    buf: Vec<u8>,
    writer: bool,
}

/// Where each polled descriptor came from.
#[derive(Clone, Copy)]
pub enum Slot {
    Out(usize),
    Err(usize),
    Status(usize),
    Shim(usize),
    Stdin(usize),
    MainStdin,
    Attachment(usize),
}

/// Every exec of one sandbox.
pub struct Execs {
    ctx: Context,
    running: Vec<Exec>,
    ended: HashSet<Uuid>,
    attachments: Vec<Attachment>,
    waiters: Vec<(Uuid, UnixStream)>,
    /// The main command's input, when it was started with stdin or a terminal; attached to as
    /// the nil exec id.
    main: Option<Input>,
}

fn answer(stream: &mut UnixStream, line: &str) {
    // The connection is non-blocking and the answer small: it fits the socket buffer.
    let _ = stream.write_all(line.as_bytes());
}

impl Execs {
    /// The sandbox's user and mount namespaces (the helper's file workers join them).
    pub fn user_and_mount_namespaces(&self) -> (BorrowedFd<'_>, BorrowedFd<'_>) {
        self.ctx.namespaces.user_and_mount()
    }

    pub fn new(ctx: Context) -> Self {
        Execs {
            ctx,
            running: Vec::new(),
            ended: HashSet::new(),
            attachments: Vec::new(),
            waiters: Vec::new(),
            main: None,
        }
    }

    /// The main command's stdin (a pipe, or the pty master) and, with a terminal, the master.
    pub fn set_main_input(&mut self, stdin: Option<File>, master: Option<File>) {
        self.main = Some(Input::new(stdin, master));
    }

    fn input_of(&mut self, id: Uuid) -> Option<&mut Input> {
        if id.is_nil() {
            return self.main.as_mut();
        }
        self.running
            .iter_mut()
            .find(|e| e.id == id)
            .map(|e| &mut e.input)
    }

    /// True when no exec is running any more (the monitor may exit).
    pub fn all_ended(&self) -> bool {
        self.running.is_empty()
    }

    /// Handle one exec line of a control connection, which this takes over.
    pub fn command(
        &mut self,
        cmd: ExecCommand,
        mut stream: UnixStream,
        rest: Vec<u8>,
        sandbox: &Sandbox<'_>,
    ) {
        let held = self.attachments.len() + self.waiters.len();
        if held >= MAX_HELD_CONNECTIONS && !matches!(cmd, ExecCommand::Start(_)) {
            answer(&mut stream, "err too many connections\n");
            return;
        }
        match cmd {
            ExecCommand::Start(req) => {
                if let Err(e) = self.start(*req, stream.try_clone().ok(), sandbox) {
                    answer(&mut stream, &format!("err {e}\n"));
                }
            }
            ExecCommand::Wait(id) => {
                if self.ended.contains(&id) {
                    answer(&mut stream, "ended\n");
                } else if self.running.iter().any(|e| e.id == id) {
                    self.waiters.push((id, stream));
                } else {
                    answer(&mut stream, "err no such exec\n");
                }
            }
            ExecCommand::Attach { id, stdin } => {
                let ended = self.ended.contains(&id);
                let Some(input) = self.input_of(id) else {
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
                    if input.stdin.is_none() && input.pending.is_empty() {
                        answer(&mut stream, "err no_stdin\n");
                        return;
                    }
                    if self.attachments.iter().any(|a| a.exec == id && a.writer) {
                        answer(&mut stream, &format!("err {STDIN_BUSY}\n"));
                        return;
                    }
                }
                answer(&mut stream, "ok\n");
                self.attachments.push(Attachment {
                    exec: id,
                    stream,
                    buf: rest,
                    writer: stdin,
                });
                let i = self.attachments.len() - 1;
                if !self.serve_attachment_frames(i) {
                    self.attachments.swap_remove(i);
                }
            }
        }
    }

    fn start(
        &mut self,
        req: ExecRequest,
        reply: Option<UnixStream>,
        sandbox: &Sandbox<'_>,
    ) -> Result<(), String> {
        if !sandbox.running {
            return Err(NOT_RUNNING.into());
        }
        if self.running.len() >= MAX_RUNNING_EXECS {
            return Err(format!("at most {MAX_RUNNING_EXECS} execs may run at once"));
        }
        let plan = self.plan(&req)?;
        let dir = create_exec_dir(sandbox.dir, req.id)?;
        let daemon_file = |name: &str| -> Result<File, String> {
            let fd = crate::sys::openat(
                Some(dir.as_raw_fd()),
                name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_APPEND
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o640),
            )
            .map_err(|e| format!("creating {name}: {e}"))?;
            nix::unistd::fchown(
                fd.as_raw_fd(),
                Some(Uid::from_raw(self.ctx.daemon_uid)),
                Some(Gid::from_raw(self.ctx.daemon_gid)),
            )
            .map_err(|e| format!("handing {name} to the daemon: {e}"))?;
            Ok(File::from(fd))
        };
        let log = daemon_file(OUTPUT_LOG)?;
        let index = daemon_file(OUTPUT_INDEX)?;

        let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
        let (status_r, status_w) = pipe()?;
        let sandbox_pidfd = sandbox
            .init
            .try_clone_to_owned()
            .map_err(|e| format!("duplicating the pidfd: {e}"))?;
        let mut fds = join::ShimFds {
            sandbox: sandbox_pidfd,
            user_ns: dup_ns(&self.ctx.namespaces.user)?,
            other_ns: self
                .ctx
                .namespaces
                .others
                .iter()
                .map(dup_ns)
                .collect::<Result<_, _>>()?,
            status: status_w,
            stdin: None,
            stdout: None,
            stderr: None,
            pty_socket: None,
        };
        // Our ends: (stdout or master, stderr, stdin, pty socket).
        let mut ours: (
            Option<OwnedFd>,
            Option<OwnedFd>,
            Option<OwnedFd>,
            Option<UnixStream>,
        ) = (None, None, None, None);
        if req.tty {
            let (mine, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            fds.pty_socket = Some(OwnedFd::from(theirs));
            ours.3 = Some(mine);
        } else {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            fds.stdout = Some(out_w);
            fds.stderr = Some(err_w);
            ours.0 = Some(out_r);
            ours.1 = Some(err_r);
            if req.stdin {
                let (in_r, in_w) = pipe()?;
                fds.stdin = Some(in_r);
                ours.2 = Some(in_w);
            }
        }
        let cgroup = self.ctx.cgroup_v2.as_ref().map(|fd| fd.as_fd());
        let (shim, shim_pidfd) =
            match sys::clone_into_namespaces(0, cgroup).map_err(|e| format!("fork: {e}"))? {
                CloneResult::Child => {
                    drop(ours);
                    join::run_shim(&plan, fds)
                }
                CloneResult::Parent { child, pidfd } => (child, pidfd),
            };
        drop(fds);
        let (out, err, stdin, master) = if let Some(socket) = ours.3 {
            match receive_master(&socket) {
                Ok(master) => {
                    let dup = || {
                        master
                            .try_clone()
                            .map_err(|e| format!("duplicating the pty master: {e}"))
                    };
                    let input = if req.stdin { Some(dup()?) } else { None };
                    let resize = Some(dup()?);
                    (Some(master), None, input, resize)
                }
                Err(e) => {
                    // The shim failed before handing over a terminal; its status pipe says why.
                    let _ = sys::pidfd_send_signal(shim_pidfd.as_fd(), libc::SIGKILL);
                    let _ = waitpid(shim, None);
                    let mut why = String::new();
                    let _ = File::from(status_r).read_to_string(&mut why);
                    let why = why
                        .lines()
                        .find_map(|l| l.strip_prefix("setup_failed "))
                        .map(str::to_owned)
                        .unwrap_or(e);
                    return Err(format!("joining the sandbox: {why}"));
                }
            }
        } else {
            (
                ours.0.map(File::from),
                ours.1.map(File::from),
                ours.2.map(File::from),
                None,
            )
        };
        for f in [&out, &err].into_iter().flatten() {
            let _ = nix::fcntl::fcntl(
                f.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
            );
        }
        let _ = nix::fcntl::fcntl(
            status_r.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
        );
        self.running.push(Exec {
            id: req.id,
            dir,
            shim,
            shim_pidfd,
            shim_exited: None,
            status: Some(File::from(status_r)),
            status_buf: Vec::new(),
            out,
            err,
            input: Input::new(stdin, master),
            log,
            index,
            log_len: 0,
            truncated: false,
            reply,
            started_at: None,
            exec_error: None,
            setup_error: None,
            end: None,
        });
        Ok(())
    }

    /// Validate a request (the monitor trusts the daemon no more than the helper does) and turn
    /// it into what the shim needs.
    fn plan(&self, req: &ExecRequest) -> Result<join::Plan, String> {
        let cstring = |s: &str, what: &str| {
            CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
        };
        if req.command.is_empty() {
            return Err("command is empty".into());
        }
        if req.command.len() > MAX_ARGS || req.env.len() > MAX_ENV {
            return Err("too many arguments or environment variables".into());
        }
        let command = req
            .command
            .iter()
            .map(|a| cstring(a, "command"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut env = self.ctx.env.clone();
        for (k, v) in &req.env {
            if !valid_env_name(k) {
                return Err(format!("invalid environment variable name {k:?}"));
            }
            let prefix = format!("{k}=");
            env.retain(|kv| !kv.as_bytes().starts_with(prefix.as_bytes()));
            env.push(cstring(&format!("{k}={v}"), "env")?);
        }
        let cwd = match &req.cwd {
            None => self.ctx.cwd.clone(),
            Some(c) if c.starts_with('/') && !c.split('/').any(|p| p == "..") => cstring(c, "cwd")?,
            Some(_) => return Err("cwd must be an absolute path without '..'".into()),
        };
        let size = |n: u16, default: u16| if n == 0 { default } else { n };
        Ok(join::Plan {
            monitor: nix::unistd::getpid(),
            cgroup_procs: self.ctx.cgroup_procs.clone(),
            late_cgroup_ns: self.ctx.namespaces.late_cgroup,
            ids: self.ctx.ids,
            capabilities: self.ctx.capabilities.clone(),
            nested_user_namespaces: self.ctx.nested_user_namespaces,
            command,
            env,
            cwd,
            tty: req.tty.then(|| (size(req.cols, 80), size(req.rows, 24))),
        })
    }

    /// Add every descriptor to poll; `slots[i]` says what `fds[first + i]` is.
    pub fn poll_fds<'a>(&'a self, fds: &mut Vec<PollFd<'a>>, slots: &mut Vec<Slot>) {
        let mut add = |fd: BorrowedFd<'a>, flags: PollFlags, slot: Slot| {
            fds.push(PollFd::new(fd, flags));
            slots.push(slot);
        };
        for (i, e) in self.running.iter().enumerate() {
            if let Some(f) = &e.out {
                add(f.as_fd(), PollFlags::POLLIN, Slot::Out(i));
            }
            if let Some(f) = &e.err {
                add(f.as_fd(), PollFlags::POLLIN, Slot::Err(i));
            }
            if let Some(f) = &e.status {
                add(f.as_fd(), PollFlags::POLLIN, Slot::Status(i));
            }
            if e.shim_exited.is_none() {
                add(e.shim_pidfd.as_fd(), PollFlags::POLLIN, Slot::Shim(i));
            }
            if let (Some(f), false) = (&e.input.stdin, e.input.pending.is_empty()) {
                add(f.as_fd(), PollFlags::POLLOUT, Slot::Stdin(i));
            }
        }
        if let Some(Input {
            stdin: Some(f),
            pending,
            ..
        }) = &self.main
        {
            if !pending.is_empty() {
                add(f.as_fd(), PollFlags::POLLOUT, Slot::MainStdin);
            }
        }
        for (i, a) in self.attachments.iter().enumerate() {
            // Backpressure: a writer is not read while its exec's stdin is full.
            let full = a.writer
                && if a.exec.is_nil() {
                    self.main.as_ref().is_some_and(Input::full)
                } else {
                    self.running
                        .iter()
                        .find(|e| e.id == a.exec)
                        .is_some_and(|e| e.input.full())
                };
            let flags = if full {
                PollFlags::empty()
            } else {
                PollFlags::POLLIN
            };
            add(a.stream.as_fd(), flags, Slot::Attachment(i));
        }
    }

    /// Act on what poll reported (`ready` holds the slots with events), then finish the execs
    /// that are done.
    pub fn on_ready(&mut self, ready: &[Slot], buf: &mut [u8]) {
        let mut attachments = Vec::new();
        for slot in ready {
            match *slot {
                Slot::Out(i) => self.pump(i, 1, buf),
                Slot::Err(i) => self.pump(i, 2, buf),
                Slot::Status(i) => self.running[i].read_status(),
                Slot::Shim(i) => {
                    let e = &mut self.running[i];
                    let _ = waitpid(e.shim, None);
                    e.shim_exited = Some(Instant::now());
                    e.read_status();
                }
                Slot::Stdin(i) => self.running[i].input.flush(),
                Slot::MainStdin => {
                    if let Some(main) = &mut self.main {
                        main.flush();
                    }
                }
                Slot::Attachment(i) => attachments.push(i),
            }
        }
        // Highest index first, so that removing one does not move the others.
        attachments.sort_unstable();
        for i in attachments.into_iter().rev() {
            self.read_attachment(i);
        }
        self.finish_ended();
    }

    /// Earliest moment something must happen without an event (end of a drain grace period).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.running
            .iter()
            .filter_map(|e| e.shim_exited.map(|t| t + DRAIN_GRACE))
            .min()
    }

    /// Called on every loop turn: finish execs whose grace period ran out.
    pub fn tick(&mut self) {
        self.finish_ended();
    }

    fn pump(&mut self, i: usize, channel: u8, buf: &mut [u8]) {
        let cap = self.ctx.output_cap;
        let e = &mut self.running[i];
        let want = READ_CHUNK.min(buf.len());
        for _ in 0..MAX_READS_PER_WAKEUP {
            let pipe = if channel == 1 { &mut e.out } else { &mut e.err };
            let Some(file) = pipe else { return };
            match file.read(&mut buf[..want]) {
                Ok(0) => {
                    *pipe = None;
                    return;
                }
                Ok(n) => {
                    e.store_output(channel, &buf[..n], cap);
                    if n < want {
                        return;
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                // EIO on a pty master: every slave descriptor is closed, the end of output.
                Err(_) => {
                    *pipe = None;
                    return;
                }
            }
        }
    }

    fn read_attachment(&mut self, i: usize) {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut close = false;
        match self.attachments[i].stream.read(&mut chunk) {
            Ok(0) => close = true,
            Ok(n) => self.attachments[i].buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(_) => close = true,
        }
        if !self.serve_attachment_frames(i) || close {
            // Closing an attachment releases stdin; the process goes on.
            self.attachments.swap_remove(i);
        }
    }

    /// Apply the complete frames buffered for attachment `i`. False when it must be closed.
    fn serve_attachment_frames(&mut self, i: usize) -> bool {
        loop {
            let a = &mut self.attachments[i];
            let frame = match Frame::decode(&mut a.buf) {
                Ok(Some(f)) => f,
                Ok(None) => return true,
                Err(_) => return false,
            };
            let (target, writer) = (a.exec, a.writer);
            let Some(input) = self.input_of(target) else {
                return false;
            };
            input.apply(frame, writer);
        }
    }

    /// Record every exec that is done: its shim exited and its output is complete (or the grace
    /// period for stragglers holding it open is over).
    fn finish_ended(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let e = &mut self.running[i];
            e.maybe_reply();
            let done = match e.shim_exited {
                None => false,
                Some(at) => (e.out.is_none() && e.err.is_none()) || at.elapsed() > DRAIN_GRACE,
            };
            if !done {
                i += 1;
                continue;
            }
            let mut e = self.running.swap_remove(i);
            e.read_status();
            e.maybe_reply();
            if let Some(mut reply) = e.reply.take() {
                let why = e
                    .setup_error
                    .clone()
                    .unwrap_or_else(|| "the exec ended before it started".into());
                answer(&mut reply, &format!("err joining the sandbox: {why}\n"));
            }
            let _ = e.write_status(self.ctx.daemon_uid, self.ctx.daemon_gid);
            self.ended.insert(e.id);
            let id = e.id;
            self.attachments.retain(|a| a.exec != id);
            for (_, mut w) in self.waiters.extract_if_id(id) {
                answer(&mut w, "ended\n");
            }
        }
    }
}

trait ExtractWaiters {
    fn extract_if_id(&mut self, id: Uuid) -> Vec<(Uuid, UnixStream)>;
}

impl ExtractWaiters for Vec<(Uuid, UnixStream)> {
    fn extract_if_id(&mut self, id: Uuid) -> Vec<(Uuid, UnixStream)> {
        let (out, keep): (Vec<_>, Vec<_>) =
            std::mem::take(self).into_iter().partition(|w| w.0 == id);
        *self = keep;
        out
    }
}

impl Exec {
    fn store_output(&mut self, channel: u8, data: &[u8], cap: u64) {
        if self.truncated {
            return;
        }
        let room = cap.saturating_sub(self.log_len);
        let keep = (data.len() as u64).min(room) as usize;
        if keep > 0 {
            append_output(
                &mut self.log,
                &mut self.index,
                &mut self.log_len,
                channel,
                &data[..keep],
            );
        }
        if keep < data.len() {
            self.truncated = true;
            let marker = format!("\n[sandboxd: output truncated at {cap} bytes]\n");
            append_output(
                &mut self.log,
                &mut self.index,
                &mut self.log_len,
                2,
                marker.as_bytes(),
            );
        }
    }

    /// Read the shim's status lines (see [`read_status`]).
    fn read_status(&mut self) {
        read_status(
            &mut self.status,
            &mut self.status_buf,
            StatusReport {
                started_at_ms: &mut self.started_at,
                exec_error: &mut self.exec_error,
                setup_error: &mut self.setup_error,
                end: &mut self.end,
            },
        );
    }

    /// Answer the `exec` request once the command has been executed (or failed to be).
    fn maybe_reply(&mut self) {
        let Some(started) = self.started_at else {
            return;
        };
        let Some(mut reply) = self.reply.take() else {
            return;
        };
        let started = ExecStarted {
            started_at_unix_ms: started,
            exec_error: self.exec_error.clone(),
        };
        let json = serde_json::to_string(&started).unwrap_or_default();
        answer(&mut reply, &format!("ok {json}\n"));
    }

    fn write_status(&self, daemon_uid: u32, daemon_gid: u32) -> Result<(), Errno> {
        let never_ran = self.started_at.is_none();
        let status = ExecStatus {
            exit_code: if never_ran {
                None
            } else {
                Some(self.end.map(|e| e.0).unwrap_or(255))
            },
            signal: self.end.and_then(|e| e.1),
            started_at_unix_ms: self.started_at,
            finished_at_unix_ms: now_ms(),
            error: self.exec_error.clone().or_else(|| self.setup_error.clone()),
            setup_failed: never_ran,
        };
        let bytes = serde_json::to_vec(&status).map_err(|_| Errno::EINVAL)?;
        let tmp = format!("{STATUS_FILE}.tmp");
        let fd = sys::openat(
            Some(self.dir.as_raw_fd()),
            tmp.as_str(),
            OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_TRUNC
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o640),
        )?;
        let mut file = File::from(fd);
        nix::unistd::fchown(
            file.as_raw_fd(),
            Some(Uid::from_raw(daemon_uid)),
            Some(Gid::from_raw(daemon_gid)),
        )?;
        file.write_all(&bytes).map_err(|_| Errno::EIO)?;
        drop(file);
        renameat(
            Some(self.dir.as_raw_fd()),
            tmp.as_str(),
            Some(self.dir.as_raw_fd()),
            STATUS_FILE,
        )
    }
}

/// `execs/` (created on first use) and `execs/<id>/`, which must be new.
fn create_exec_dir(sandbox: BorrowedFd<'_>, id: Uuid) -> Result<OwnedFd, String> {
    let mode = Mode::from_bits_truncate(0o711);
    match mkdirat(Some(sandbox.as_raw_fd()), EXECS_DIR, mode) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(format!("creating {EXECS_DIR}/: {e}")),
    }
    let open_dir = |parent: BorrowedFd<'_>, name: &str| {
        crate::sys::openat(
            Some(parent.as_raw_fd()),
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("opening {name}: {e}"))
    };
    let execs = open_dir(sandbox, EXECS_DIR)?;
    let name = id.to_string();
    mkdirat(Some(execs.as_raw_fd()), name.as_str(), mode).map_err(|e| match e {
        Errno::EEXIST => "an exec with this id exists".to_string(),
        e => format!("creating the exec's directory: {e}"),
    })?;
    let dir = open_dir(execs.as_fd(), &name)?;
    // mkdirat honours the umask; make the mode exact (the daemon traverses, never writes).
    let _ = nix::sys::stat::fchmod(dir.as_raw_fd(), mode);
    let _ = nix::sys::stat::fchmod(execs.as_raw_fd(), mode);
    Ok(dir)
}

/// The shim's own copy of a namespace descriptor (it closes it once joined).
fn dup_ns(fd: &OwnedFd) -> Result<OwnedFd, String> {
    fd.try_clone()
        .map_err(|e| format!("duplicating a namespace descriptor: {e}"))
}

/// Receive the pty master a shim sends (it does so right after joining the sandbox).
pub(crate) fn receive_master(socket: &UnixStream) -> Result<File, String> {
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    match nix::poll::poll(&mut fds, PTY_HANDOVER_TIMEOUT_MS) {
        Ok(0) => return Err("no terminal within 5 s".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("waiting for the terminal: {e}")),
    }
    let mut byte = [0u8; 1];
    let (_, fds) = sys::recv_with_fds::<1>(socket.as_fd(), &mut byte)
        .map_err(|e| format!("receiving the terminal: {e}"))?;
    fds.into_iter()
        .next()
        .map(File::from)
        .ok_or_else(|| "the shim sent no terminal".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn execs() -> Execs {
        let null = || OwnedFd::from(File::open("/dev/null").expect("/dev/null opens"));
        Execs::new(Context {
            ids: IdMap::Single {
                uid: 1000,
                gid: 1000,
            },
            capabilities: vec!["CAP_CHOWN"],
            nested_user_namespaces: false,
            env: vec![
                CString::new("PATH=/bin").expect("no NUL"),
                CString::new("HOME=/root").expect("no NUL"),
            ],
            cwd: CString::new("/work").expect("no NUL"),
            output_cap: 1 << 20,
            daemon_uid: 1000,
            daemon_gid: 1000,
            cgroup_procs: Vec::new(),
            cgroup_v2: None,
            namespaces: Namespaces {
                user: null(),
                others: vec![null()],
                late_cgroup: false,
            },
        })
    }

    fn request(edit: impl FnOnce(&mut ExecRequest)) -> ExecRequest {
        let mut req = ExecRequest {
            id: Uuid::new_v4(),
            command: vec!["sh".into()],
            env: Vec::new(),
            cwd: None,
            tty: false,
            stdin: false,
            cols: 0,
            rows: 0,
        };
        edit(&mut req);
        req
    }

    #[test]
    fn requests_are_validated_again_and_extend_the_sandbox() {
        let execs = execs();
        type Edit = Box<dyn FnOnce(&mut ExecRequest)>;
        let bad: [(&str, Edit); 6] = [
            ("empty command", Box::new(|r| r.command.clear())),
            ("NUL", Box::new(|r| r.command.push("a\0b".into()))),
            (
                "env name",
                Box::new(|r| r.env.push(("1X".into(), "v".into()))),
            ),
            (
                "env NUL",
                Box::new(|r| r.env.push(("X".into(), "\0".into()))),
            ),
            ("relative cwd", Box::new(|r| r.cwd = Some("tmp".into()))),
            (
                "cwd with ..",
                Box::new(|r| r.cwd = Some("/work/../etc".into())),
            ),
        ];
        for (what, edit) in bad {
            assert!(execs.plan(&request(edit)).is_err(), "{what}");
        }
        let plan = execs
            .plan(&request(|r| {
                r.env.push(("HOME".into(), "/tmp".into()));
                r.env.push(("A".into(), "1".into()));
                r.tty = true;
                r.cols = 132;
            }))
            .expect("valid");
        let env: Vec<&str> = plan
            .env
            .iter()
            .map(|e| e.to_str().expect("utf-8"))
            .collect();
        assert_eq!(env, ["PATH=/bin", "HOME=/tmp", "A=1"]);
        assert_eq!(plan.cwd.to_str(), Ok("/work"));
        assert_eq!(plan.tty, Some((132, 24)));
        let plan = execs
            .plan(&request(|r| r.cwd = Some("/tmp".into())))
            .expect("valid");
        assert_eq!((plan.cwd.to_str(), plan.tty), (Ok("/tmp"), None));
    }
}
