//! The per-sandbox monitor: the process that owns a sandbox for its whole life.
//!
//! The helper forks twice so the monitor belongs to no one (a new session, reparented to the
//! host's init): neither a daemon restart nor a helper restart touches it. The monitor
//!
//! 1. clones the sandbox's init into new user, mount, pid, uts, ipc, net and cgroup namespaces and
//!    writes its uid/gid maps, in the fixed order of [`prepare_and_clone`];
//! 2. reports the outcome of the start to the helper over a pipe, then closes it;
//! 3. holds the main command as process zero and every exec as a further
//!    [`Process`](crate::process::Process): drains their outputs into their `output.log`/
//!    `output.idx` whether or not anyone listens, feeds their stdin or terminal from attached
//!    connections ([`control`]);
//! 4. serves `kill` requests from the daemon's uid on `monitor.sock` and enforces the timeout;
//!    hands init's user and mount namespaces (opened right after the clone, while init is still
//!    dumpable) to the helper's file workers (`ns`, the helper's uid only);
//! 5. when init has exited and its output is drained, and no exec runs, writes `status.json`,
//!    removes the socket and exits, which closes every control connection: the daemon's signal
//!    that the sandbox ended.
//!
//! Everything it waits for is a source of one event loop ([`events`]). It is single-threaded,
//! holds every process by pidfd (never by pid), and is non-dumpable.

mod control;
mod events;
mod oom;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{pipe2, setsid, ForkResult, Gid, Pid, Uid};

use sandboxd_protocol::layout::MONITOR_SOCKET;
use sandboxd_protocol::status::{ExitReason, ExitStatus};
use sandboxd_protocol::wire::{HelperError, HelperErrorCode, SandboxStats, Spawned};

use crate::cgroup::Cgroups;
use crate::child::{self, Gate, SpawnGuard};
use crate::config::Config;
use crate::dirs::SandboxFiles;
use crate::net::SandboxNet;
use crate::output::{now_ms, OutputLog};
use crate::process::{Outputs, Process};
use crate::sandbox::{self, InitFds};
use crate::sys::{self, CloneResult, ForkError};
use crate::validate::ValidSpawn;
use control::Control;
use events::{Poll, Source};
use oom::OomEvent;

/// How long the helper waits for a monitor to report that its sandbox started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Pipe buffer requested for stdout/stderr, so fast writers rarely wait on the monitor.
const PIPE_SIZE: libc::c_int = 1 << 20;

const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

type StartReport = Result<Spawned, HelperError>;

/// The steps of a monitor's start that can fail, in their order.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("closing inherited descriptors")]
    CloseInherited(#[source] Errno),
    #[error("stdio")]
    Stdio(#[source] Errno),
    #[error("opening the host's network namespace")]
    HostNetns(#[source] Errno),
    #[error("forking the port forwarder")]
    Forwarder(#[source] ForkError),
    #[error("binding monitor.sock")]
    BindSocket(#[source] std::io::Error),
    #[error("handing monitor.sock to the daemon")]
    ChownSocket(#[source] Errno),
    #[error("pipe")]
    Pipe(#[source] Errno),
    #[error("socketpair")]
    Socketpair(#[source] std::io::Error),
    #[error("opening the cgroup: missing")]
    OpenCgroup,
    #[error("entering the sandbox's network namespace")]
    EnterNetns(#[source] Errno),
    #[error("prctl")]
    Dumpable(#[source] Errno),
    #[error("clone")]
    Clone(#[source] ForkError),
    #[error("leaving the sandbox's network namespace")]
    LeaveNetns(#[source] Errno),
    #[error("mapping init's ids")]
    IdMaps(#[source] child::ChildError),
    #[error("joining {0}")]
    JoinCgroup(String, #[source] std::io::Error),
    #[error("opening the namespaces: {0}")]
    Namespaces(String),
    #[error("duplicating the sandbox's directory")]
    DupDir(#[source] std::io::Error),
}

impl MonitorError {
    /// The wire error, at the edge: the step and its causes, as the helper reports them.
    fn to_wire(&self) -> HelperError {
        HelperError::new(HelperErrorCode::SetupFailed, child::chain(self))
    }
}

fn setup_error(step: &str, e: impl std::fmt::Display) -> HelperError {
    HelperError::new(HelperErrorCode::SetupFailed, format!("{step}: {e}"))
}

/// Start a sandbox under a new monitor. Runs in the (single-threaded) helper and returns once the
/// command has been executed, or failed to be.
pub fn start(
    spawn: &ValidSpawn,
    files: SandboxFiles,
    config: &Config,
    cgroups: &Cgroups,
    net: Option<SandboxNet>,
) -> StartReport {
    let (report_r, report_w) =
        pipe2(OFlag::O_CLOEXEC).map_err(|e| setup_error("report pipe", e))?;
    // `fork` refuses to run unless the helper is single-threaded (it never starts a thread).
    match sys::fork().map_err(|e| setup_error("fork", e))? {
        ForkResult::Parent { child } => {
            drop(report_w);
            drop(files);
            // The sandbox's namespace and published ports belong to the monitor from now on.
            drop(net);
            // The intermediate process exits as soon as the monitor is forked.
            let _ = waitpid(child, None);
            read_report(report_r)
        }
        ForkResult::Child => {
            drop(report_r);
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if setsid().is_err() {
                    return 1;
                }
                match sys::fork() {
                    Ok(ForkResult::Parent { .. }) => 0,
                    Ok(ForkResult::Child) => {
                        run(spawn, files, config, cgroups, net, report_w);
                        0
                    }
                    Err(_) => 1,
                }
            }))
            .unwrap_or(1);
            sys::exit_now(code)
        }
    }
}

fn read_report(report: OwnedFd) -> StartReport {
    let mut fds = [PollFd::new(report.as_fd(), PollFlags::POLLIN)];
    let timeout =
        PollTimeout::try_from(START_TIMEOUT.as_millis() as i32).unwrap_or(PollTimeout::MAX);
    loop {
        match poll(&mut fds, timeout) {
            Ok(0) => {
                return Err(setup_error(
                    "start",
                    "the monitor did not report within 30 s",
                ));
            }
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(setup_error("waiting for the monitor", e)),
        }
    }
    let mut buf = Vec::new();
    File::from(report)
        .take(64 * 1024)
        .read_to_end(&mut buf)
        .map_err(|e| setup_error("reading the monitor's report", e))?;
    if buf.is_empty() {
        return Err(setup_error("start", "the monitor exited without reporting"));
    }
    let report: Report = serde_json::from_slice(&buf).map_err(|e| {
        setup_error(
            "decoding the monitor's report",
            format!("{e}: {}", String::from_utf8_lossy(&buf)),
        )
    })?;
    match report {
        Report::Started(s) => Ok(s),
        Report::Failed(e) => Err(e),
    }
}

/// What a monitor tells the helper about the start of its sandbox.
#[derive(serde::Serialize, serde::Deserialize)]
enum Report {
    Started(Spawned),
    Failed(HelperError),
}

/// Write the start report (once) and close the pipe. False when the helper did not get it (it
/// gave up waiting): then nobody knows this sandbox exists, and it must not run.
fn send_report(report: &mut Option<OwnedFd>, result: StartReport) -> bool {
    let Some(fd) = report.take() else { return true };
    let report = match result {
        Ok(s) => Report::Started(s),
        Err(e) => Report::Failed(e),
    };
    serde_json::to_vec(&report)
        .map(|bytes| File::from(fd).write_all(&bytes).is_ok())
        .unwrap_or(false)
}

/// The monitor process. Never returns to the helper's code.
fn run(
    spawn: &ValidSpawn,
    files: SandboxFiles,
    config: &Config,
    cgroups: &Cgroups,
    net: Option<SandboxNet>,
    report_w: OwnedFd,
) {
    // The helper takes SIGTERM through a signalfd; the monitor (and so the sandbox) must not
    // inherit it blocked.
    let mut term = nix::sys::signal::SigSet::empty();
    term.add(nix::sys::signal::Signal::SIGTERM);
    let _ = term.thread_unblock();
    let report_fd = report_w.as_raw_fd();
    let mut report = Some(report_w);
    match prepare_and_clone(spawn, files, config, cgroups, net, report_fd) {
        Ok(monitor) => monitor.event_loop(&mut report),
        Err(e) => {
            send_report(&mut report, Err(e.to_wire()));
        }
    }
}

struct Monitor {
    id: uuid::Uuid,
    /// The sandbox's cgroups, when this host has them.
    cgroups: Option<Cgroups>,
    oom_event: Option<OomEvent>,
    /// The memory limit was hit: the whole sandbox was killed.
    oom: bool,
    dir: OwnedFd,
    daemon_uid: u32,
    daemon_gid: u32,
    /// Process zero is the main command (its pid is init's); the others are execs.
    processes: Vec<Process>,
    control: Control,
    exec_context: crate::exec::Context,
    /// The published-port forwarder, until it is reaped.
    forwarder: Option<(Pid, OwnedFd)>,
    deadline: Option<Instant>,
    // Held for their flocks until the monitor exits.
    _lock: Option<File>,
    _slot_lock: Option<File>,
    kill_requested: bool,
    timed_out: bool,
}

/// The pipes and sockets between the monitor and init (step 5).
struct Wiring {
    out: (OwnedFd, OwnedFd),
    err: (OwnedFd, OwnedFd),
    status: (OwnedFd, OwnedFd),
    /// `stdin: true` without a terminal.
    stdin: Option<(OwnedFd, OwnedFd)>,
    /// With a terminal: (ours, init's), where init sends the pty master.
    pty: Option<(UnixStream, OwnedFd)>,
}

impl Wiring {
    fn new(spawn: &ValidSpawn) -> Result<Wiring, MonitorError> {
        let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(MonitorError::Pipe);
        let wiring = Wiring {
            out: pipe()?,
            err: pipe()?,
            status: pipe()?,
            // The command's input for attach connections: a pipe, or a terminal whose master
            // init sends us once it has opened it in the sandbox's devpts.
            stdin: match (spawn.stdin, spawn.tty) {
                (true, None) => Some(pipe()?),
                _ => None,
            },
            pty: match spawn.tty {
                Some(_) => {
                    let (a, b) = UnixStream::pair().map_err(MonitorError::Socketpair)?;
                    Some((a, OwnedFd::from(b)))
                }
                None => None,
            },
        };
        for (_, w) in [&wiring.out, &wiring.err] {
            let _ = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        }
        Ok(wiring)
    }
}

/// Set the sandbox up, in this fixed order:
///
/// 1. keep only this sandbox's descriptors, stdio on /dev/null;
/// 2. (privileged networking) hold the host's network namespace, to come back to it;
/// 3. fork the port forwarder, if ports are published;
/// 4. bind `monitor.sock`;
/// 5. make init's pipes (output, status, stdin) and its terminal socket;
/// 6. open the sandbox's v2 cgroup (init is born in it);
/// 7. (privileged networking) enter the sandbox's network namespace;
/// 8. become dumpable, so that init's /proc files are ours to write;
/// 9. clone init (it waits at its gate); from here a [`SpawnGuard`] kills and reaps it if a
///    later step fails;
/// 10. leave the sandbox's network namespace;
/// 11. write init's uid/gid maps, move it into its v1 cgroups;
/// 12. open its namespaces for execs and file workers, while it is still dumpable;
/// 13. become non-dumpable again, open init's gate.
fn prepare_and_clone(
    spawn: &ValidSpawn,
    files: SandboxFiles,
    config: &Config,
    cgroups: &Cgroups,
    net: Option<SandboxNet>,
    report_fd: RawFd,
) -> Result<Box<Monitor>, MonitorError> {
    let SandboxFiles {
        dir,
        work,
        log,
        index,
        lock,
        slot_lock,
        image_lower,
    } = files;

    // 1. Keep only what this sandbox needs: never the helper's socket or other sandboxes' files.
    let keep: Vec<RawFd> = [
        dir.as_raw_fd(),
        work.as_raw_fd(),
        log.as_raw_fd(),
        index.as_raw_fd(),
        lock.as_raw_fd(),
        report_fd,
    ]
    .into_iter()
    .chain(slot_lock.as_ref().map(|f| f.as_raw_fd()))
    .chain(image_lower.as_ref().map(|f| f.as_raw_fd()))
    .chain(net.as_ref().map_or(Vec::new(), net_fds))
    .collect();
    crate::fds::close_all_except(&keep).map_err(MonitorError::CloseInherited)?;
    crate::fds::stdio_to_devnull().map_err(MonitorError::Stdio)?;
    // 2. Privileged: init is cloned into the network namespace the helper prepared (owned by
    // the host's user namespace), so the monitor enters it for the clone and leaves it after.
    let host_netns = match &net {
        Some(_) => Some(
            sys::open(
                "/proc/self/ns/net",
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(MonitorError::HostNetns)?,
        ),
        None => None,
    };
    // 3.
    let (netns, forwarder) = match net {
        Some(SandboxNet { netns, forward }) => {
            let forwarder = match forward {
                Some(forward) => Some(start_forwarder(forward, spawn)?),
                None => None,
            };
            (Some(netns), forwarder)
        }
        None => (None, None),
    };
    // 4.
    let listener = bind_control_socket(&dir, config)?;
    // 5.
    let wiring = Wiring::new(spawn)?;
    let gate = Gate::new().map_err(MonitorError::Pipe)?;

    // 6. The sandbox's cgroup: on v2 the child is born in it (CLONE_INTO_CGROUP) and gets its
    // cgroup namespace at clone time; on v1 we move it there before it runs a single
    // instruction of its own (it waits at its gate) and it unshares its cgroup namespace
    // afterwards, so that the namespace's root is the sandbox's cgroup in both cases.
    let cgroups = cgroups.is_active().then(|| cgroups.clone());
    let v2_cgroup = cgroups
        .as_ref()
        .filter(|c| c.is_v2())
        .map(|c| c.open_for_clone(spawn.id).ok_or(MonitorError::OpenCgroup))
        .transpose()?;
    let late_cgroupns = cgroups.as_ref().is_some_and(|c| !c.is_v2());
    let mut namespaces = if late_cgroupns {
        NAMESPACES & !libc::CLONE_NEWCGROUP
    } else {
        NAMESPACES
    };
    // 7.
    if let Some(netns) = &netns {
        namespaces &= !libc::CLONE_NEWNET;
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(MonitorError::EnterNetns)?;
    }

    // 8. The helper is non-dumpable and so, by inheritance, are we. The child must start
    // dumpable so that its /proc files (uid_map, gid_map, setgroups) belong to our uid and we
    // can write them without privileges; both become non-dumpable again once the maps are
    // written.
    nix::sys::prctl::set_dumpable(true).map_err(MonitorError::Dumpable)?;
    // 9.
    let Wiring {
        out: (out_r, out_w),
        err: (err_r, err_w),
        status: (status_r, status_w),
        stdin,
        pty,
    } = wiring;
    let (stdin_r, stdin_w) = stdin.unzip();
    let (pty_ours, pty_theirs) = pty.unzip();
    let init = match sys::clone_into_namespaces(namespaces, v2_cgroup.as_ref().map(|fd| fd.as_fd()))
        .map_err(MonitorError::Clone)?
    {
        CloneResult::Child => {
            drop((
                out_r, err_r, status_r, listener, log, index, lock, slot_lock, dir,
            ));
            drop((stdin_w, pty_ours));
            sandbox::run_init(
                spawn,
                InitFds {
                    work,
                    work_path: config
                        .state_dir
                        .join(sandboxd_protocol::layout::SANDBOXES_DIR)
                        .join(spawn.id.to_string())
                        .join(sandboxd_protocol::layout::PRIVATE_DIR)
                        .join(sandboxd_protocol::layout::WORK_DIR),
                    sync: gate.child(),
                    status: status_w,
                    stdout: out_w,
                    stderr: err_w,
                    unshare_cgroupns: late_cgroupns,
                    stdin: stdin_r,
                    pty_socket: pty_theirs,
                    image: match &spawn.rootfs {
                        crate::validate::Rootfs::Host => None,
                        crate::validate::Rootfs::Image { digest, .. } => Some(match image_lower {
                            Some(fd) => sandbox::ImageLower::Idmapped(fd),
                            None => {
                                sandbox::ImageLower::Path(crate::image::lower_path(config, digest))
                            }
                        }),
                    },
                    own_network: netns.is_none(),
                },
            )
        }
        CloneResult::Parent { child, pidfd } => SpawnGuard::new(child, pidfd),
    };
    drop((out_w, err_w, status_w, work, v2_cgroup, image_lower));
    drop((stdin_r, pty_theirs));
    let gate = gate.parent();
    // 10. Back to the host's namespace: the sandbox's must end with the sandbox (its veth with
    // it), not live on as the monitor's.
    if let Some(host) = &host_netns {
        nix::sched::setns(host.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(MonitorError::LeaveNetns)?;
    }
    drop((netns, host_netns));
    // 11.
    child::write_id_maps(init.pid(), spawn.ids).map_err(MonitorError::IdMaps)?;
    if let Some(c) = &cgroups {
        join_v1_cgroup(c, spawn.id, init.pid())?;
    }
    // 12. For execs: the namespaces, while init is still dumpable and waiting for us.
    let exec_namespaces = crate::exec::Namespaces::open(init.pid(), late_cgroupns)
        .map_err(MonitorError::Namespaces)?;
    // 13. Non-dumpable from now on: no process of the same uid may ptrace the monitor or read
    // its memory. (Not before the clone: the child inherits the flag, and a non-dumpable
    // child's /proc files, uid_map included, belong to root, which rootless we are not.)
    nix::sys::prctl::set_dumpable(false).map_err(MonitorError::Dumpable)?;
    let dup_dir = || dir.try_clone().map_err(MonitorError::DupDir);
    let output =
        OutputLog::new(log, index, spawn.limits.output_bytes).with_truncation_marker(dup_dir()?);
    let outputs = match pty_ours {
        Some(socket) => Outputs::Terminal {
            socket,
            stdin: spawn.stdin,
        },
        None => Outputs::Pipes {
            stdout: File::from(out_r),
            stderr: File::from(err_r),
        },
    };
    let main_dir = dup_dir()?;
    // One byte: "your maps are written, go on". Without it (a failed step above dropped the
    // gate), init exits.
    gate.open();
    let mut main = Process::new(
        uuid::Uuid::nil(),
        main_dir,
        init.keep(),
        status_r,
        outputs,
        stdin_w,
        output,
    );
    main.attachable = spawn.stdin || spawn.tty.is_some();
    let oom_event = cgroups
        .as_ref()
        .filter(|_| spawn.limits.memory_bytes.is_some())
        .and_then(|c| OomEvent::watch(c, spawn.id));
    let exec_context = crate::exec::Context {
        namespaces: exec_namespaces,
        ids: spawn.ids,
        capabilities: spawn.capabilities.clone(),
        nested_user_namespaces: spawn.nested_user_namespaces,
        env: spawn.env.clone(),
        cwd: spawn.cwd.clone(),
        output_cap: spawn.limits.output_bytes,
        daemon_uid: config.allow_uid,
        daemon_gid: config.allow_gid,
        cgroup_procs: cgroups
            .as_ref()
            .map(|c| c.procs_files(spawn.id))
            .unwrap_or_default(),
        cgroup_v2: cgroups
            .as_ref()
            .filter(|c| c.is_v2())
            .and_then(|c| c.open_for_clone(spawn.id)),
    };
    Ok(Box::new(Monitor {
        id: spawn.id,
        cgroups,
        oom_event,
        oom: false,
        dir,
        daemon_uid: config.allow_uid,
        daemon_gid: config.allow_gid,
        processes: vec![main],
        control: Control::new(listener, config.allow_uid),
        exec_context,
        forwarder,
        deadline: spawn.timeout.map(|t| Instant::now() + t),
        _lock: Some(lock),
        _slot_lock: slot_lock,
        kill_requested: false,
        timed_out: false,
    }))
}

/// Descriptors of a sandbox's network the monitor keeps.
fn net_fds(net: &SandboxNet) -> Vec<RawFd> {
    let mut fds = vec![net.netns.as_raw_fd()];
    if let Some(f) = &net.forward {
        fds.push(f.hub.as_raw_fd());
        fds.extend(f.listeners.iter().map(|(l, _)| l.as_raw_fd()));
    }
    fds
}

/// Step 3: clone the published-port forwarder (see `net/forward.rs`), a child of the monitor, so
/// it survives daemon restarts and dies with the monitor; the monitor reaps it through its pidfd.
fn start_forwarder(
    forward: crate::net::Forward,
    spawn: &ValidSpawn,
) -> Result<(Pid, OwnedFd), MonitorError> {
    match sys::clone_into_namespaces(0, None).map_err(MonitorError::Forwarder)? {
        CloneResult::Parent { child, pidfd } => Ok((child, pidfd)),
        CloneResult::Child => {
            let mut keep = vec![forward.hub.as_raw_fd()];
            keep.extend(forward.listeners.iter().map(|(l, _)| l.as_raw_fd()));
            if crate::fds::close_all_except(&keep).is_err() {
                sys::exit_now(1);
            }
            crate::net::forward::run(
                forward,
                spawn.ids.host_root_uid(),
                spawn.ids.host_root_gid(),
            )
        }
    }
}

/// Step 4: `monitor.sock`, for the daemon's uid.
fn bind_control_socket(dir: &OwnedFd, config: &Config) -> Result<UnixListener, MonitorError> {
    // Bind through the directory descriptor so a swapped path cannot redirect the socket, with a
    // umask that keeps it private from the first instant.
    let path = format!("/proc/self/fd/{}/{MONITOR_SOCKET}", dir.as_raw_fd());
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(&path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(MonitorError::BindSocket)?;
    nix::unistd::fchownat(
        Some(dir.as_raw_fd()),
        MONITOR_SOCKET,
        Some(Uid::from_raw(config.allow_uid)),
        Some(Gid::from_raw(config.allow_gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(MonitorError::ChownSocket)?;
    listener
        .set_nonblocking(true)
        .map_err(MonitorError::BindSocket)?;
    Ok(listener)
}

/// Step 11: move the (still waiting) child into its v1 cgroups. On v2 it was born there.
fn join_v1_cgroup(cgroups: &Cgroups, id: uuid::Uuid, child: Pid) -> Result<(), MonitorError> {
    for procs in cgroups.procs_files(id) {
        std::fs::write(&procs, child.as_raw().to_string())
            .map_err(|e| MonitorError::JoinCgroup(procs.display().to_string(), e))?;
    }
    Ok(())
}

impl Monitor {
    fn main(&self) -> &Process {
        &self.processes[0]
    }

    fn event_loop(mut self, report: &mut Option<OwnedFd>) {
        let mut buf = vec![0u8; crate::output::READ_CHUNK];
        loop {
            // Execs die with the sandbox's PID namespace; their records are written before we go.
            self.finish_execs();
            if self.main().done() && self.processes.len() == 1 {
                break;
            }
            if report.is_some() {
                self.maybe_report(report);
            }
            let Ok(ready) = self.poll() else { continue };
            self.dispatch(ready, &mut buf);
            if let Some(deadline) = self.deadline {
                if Instant::now() >= deadline && self.main().running() && !self.timed_out {
                    self.timed_out = true;
                    self.main().kill();
                }
            }
        }
        // Everything the sandbox wrote is in the log now.
        let setup_failed = self.main().outcome.setup_error.is_some();
        if setup_failed {
            self.remove_socket();
        }
        if report.is_some() {
            self.maybe_report(report);
        }
        if !self.oom
            && self
                .cgroups
                .as_ref()
                .is_some_and(|c| c.oom_kills(self.id) > 0)
        {
            // The kernel killed a process for memory without our noticing in time: still oom.
            self.oom = true;
        }
        if !setup_failed {
            let status = self.exit_status();
            let _ = crate::output::write_status_file(
                self.dir.as_fd(),
                &status,
                (self.daemon_uid, self.daemon_gid),
            );
        }
        if let Some(c) = &self.cgroups {
            c.remove(self.id);
        }
        self.remove_socket();
        // Release the locks before the control connections close: the daemon reacts to the
        // close by asking the helper to remove the directory, which the locks would refuse.
        self._lock.take();
        self._slot_lock.take();
        drop(self.control);
    }

    fn remove_socket(&self) {
        let _ = nix::unistd::unlinkat(
            Some(self.dir.as_raw_fd()),
            MONITOR_SOCKET,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }

    /// Every source registers what it waits for; then one poll.
    fn poll(&self) -> Result<Vec<Source>, Errno> {
        let mut poll = Poll::new();
        for (i, p) in self.processes.iter().enumerate() {
            for (fd, flags, event) in p.sources() {
                poll.register(fd, flags, Source::Process(i, event));
            }
            if let Some(at) = p.deadline() {
                poll.wake_at(at);
            }
        }
        self.control.register(&mut poll, &self.processes);
        if let (Some(ev), true) = (&self.oom_event, self.main().running()) {
            let (fd, flags) = ev.fd();
            poll.register(fd, flags, Source::Oom);
        }
        if let Some((_, pidfd)) = &self.forwarder {
            poll.register(pidfd.as_fd(), PollFlags::POLLIN, Source::Forwarder);
        }
        if let (Some(deadline), false) = (self.deadline, self.timed_out) {
            poll.wake_at(deadline);
        }
        poll.wait()
    }

    fn dispatch(&mut self, ready: Vec<Source>, buf: &mut [u8]) {
        // A terminal first: its master is in the socket before the process reports `started`.
        let (first, rest): (Vec<Source>, Vec<Source>) = ready
            .into_iter()
            .partition(|s| matches!(s, Source::Process(_, crate::process::Event::Terminal)));
        let mut control = Vec::new();
        for source in first.into_iter().chain(rest) {
            match source {
                Source::Process(i, event) => self.processes[i].on(event, buf),
                Source::Oom => self.on_oom_event(),
                Source::Forwarder => {
                    if let Some((pid, _)) = &self.forwarder {
                        if !matches!(
                            waitpid(*pid, Some(WaitPidFlag::WNOHANG)),
                            Ok(WaitStatus::StillAlive)
                        ) {
                            self.forwarder = None;
                        }
                    }
                }
                other => control.push(other),
            }
        }
        let sandbox = control::SandboxView {
            dir: self.dir.as_fd(),
            exec_context: &self.exec_context,
        };
        let killed = self
            .control
            .on_ready(control, &mut self.processes, &sandbox);
        self.kill_requested |= killed;
    }

    /// Record every exec that is done: its shim exited and its output is complete (or the grace
    /// period for stragglers holding it open is over).
    fn finish_execs(&mut self) {
        let mut i = 1;
        while i < self.processes.len() {
            self.control.maybe_reply(&self.processes[i]);
            if !self.processes[i].done() {
                i += 1;
                continue;
            }
            let mut exec = self.processes.swap_remove(i);
            exec.read_status();
            let _ = crate::exec::write_status(&exec, (self.daemon_uid, self.daemon_gid));
            self.control.ended(&exec);
        }
    }

    fn maybe_report(&mut self, report: &mut Option<OwnedFd>) {
        let main = &self.processes[0];
        let outcome = main.outcome.clone();
        let running = main.running();
        let base = Spawned {
            init_pid: main.pid().as_raw(),
            host_uid: 0,
            started_at_unix_ms: outcome.started_at_ms.unwrap_or_else(now_ms),
            exec_error: None,
            ports: Vec::new(),
        };
        if let Some(e) = &outcome.setup_error {
            // Report only once init is gone and our locks are released, so that the helper's
            // rollback can remove the directory.
            if !running {
                self._lock.take();
                self._slot_lock.take();
                send_report(report, Err(setup_error("sandbox setup", e)));
            }
        } else if let Some(e) = &outcome.exec_error {
            let delivered = send_report(
                report,
                Ok(Spawned {
                    exec_error: Some(e.clone()),
                    ..base
                }),
            );
            if !delivered {
                self.abandon();
            }
        } else if outcome.started_at_ms.is_some() && !send_report(report, Ok(base)) {
            self.abandon();
        } else if !running {
            send_report(
                report,
                Err(setup_error(
                    "sandbox setup",
                    "init exited before starting the command",
                )),
            );
        }
    }

    /// The kernel's OOM killer struck in the sandbox's cgroup: the sandbox goes as a whole
    /// (on v2 memory.oom.group already did that; on v1 only one process was killed).
    fn on_oom_event(&mut self) {
        let Some(ev) = &mut self.oom_event else {
            return;
        };
        ev.reset();
        // v1 notifies when the cgroup enters OOM, before the OOM killer has counted its kill, so
        // the notification itself is the verdict. v2's memory.events also changes for `high` and
        // `max` events: there the counters decide.
        let oom = match ev {
            OomEvent::V1 { .. } => true,
            OomEvent::V2 { .. } => self
                .cgroups
                .as_ref()
                .is_some_and(|c| c.oom_kills(self.id) > 0),
        };
        if oom && !self.oom {
            self.oom = true;
            self.main().kill();
        }
    }

    /// The helper gave up on this sandbox and told the daemon it failed: end it.
    fn abandon(&mut self) {
        self.main().kill();
    }

    fn exit_status(&self) -> ExitStatus {
        let main = self.main();
        let outcome = &main.outcome;
        let started = outcome.started_at_ms.unwrap_or_else(now_ms);
        let finished = now_ms();
        let (exit_code, signal) = match (main.wait_status(), outcome.end) {
            // init itself was killed (SIGKILL from kill or timeout): the whole sandbox died.
            (Some(WaitStatus::Signaled(_, sig, _)), _) => (128 + sig as i32, Some(sig as i32)),
            (_, Some(end)) => end,
            (Some(WaitStatus::Exited(_, code)), None) => (code, None),
            _ => (255, None),
        };
        let reason = if outcome.exec_error.is_some() {
            ExitReason::ExecFailed
        } else if self.oom {
            ExitReason::Oom
        } else if self.timed_out {
            ExitReason::Timeout
        } else if self.kill_requested && signal.is_some() {
            ExitReason::Killed
        } else {
            ExitReason::Exited
        };
        ExitStatus {
            exit_code,
            signal,
            reason,
            started_at_unix_ms: started,
            finished_at_unix_ms: finished,
            error: outcome.exec_error.clone(),
            stats: self.final_stats(),
        }
    }

    fn final_stats(&self) -> SandboxStats {
        let mut stats = self
            .cgroups
            .as_ref()
            .map(|c| c.stats(self.id))
            .unwrap_or_default();
        // Live figures mean little once everything has exited; the peaks are what count.
        stats.memory_bytes = stats.memory_bytes.map(|_| 0);
        stats.pids = stats.pids.map(|_| 0);
        stats.output_bytes = self.main().output.len();
        stats.output_truncated = self.main().output.truncated();
        stats.disk_bytes = crate::dirs::work_usage(&self.dir);
        stats
    }
}
