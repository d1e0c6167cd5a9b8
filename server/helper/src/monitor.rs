//! The per-sandbox monitor: the process that owns a sandbox for its whole life.
//!
//! The helper forks twice so the monitor belongs to no one (a new session, reparented to the
//! host's init): neither a daemon restart nor a helper restart touches it. The monitor
//!
//! 1. clones the sandbox's init into new user, mount, pid, uts, ipc, net and cgroup namespaces and
//!    writes its uid/gid maps (the child cannot map itself into a range it does not own);
//! 2. reports the outcome of the start to the helper over a pipe, then closes it;
//! 3. drains the command's stdout and stderr into `output.log`/`output.idx` whether or not anyone
//!    listens, so no byte is lost and the sandbox never blocks on a full pipe;
//! 4. serves `kill` requests from the daemon's uid on `monitor.sock` and enforces the timeout;
//!    hands init's user and mount namespaces (opened right after the clone, while init is still
//!    dumpable) to the helper's file workers (`ns`, the helper's uid only);
//! 5. when init has exited and both pipes are drained, writes `status.json`, removes the socket and
//!    exits, which closes every control connection: the daemon's signal that the sandbox ended.
//!
//! It is single-threaded, holds the sandbox by pidfd (never by pid), and is non-dumpable.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{renameat, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{pipe2, setsid, ForkResult, Gid, Pid, Uid};

use crate::sys::fork;

use sandboxd_protocol::control;
use sandboxd_protocol::layout::{MONITOR_SOCKET, OUTPUT_TRUNCATED, STATUS_FILE};
use sandboxd_protocol::logindex::Record;
use sandboxd_protocol::status::{ExitReason, ExitStatus};
use sandboxd_protocol::wire::{HelperError, HelperErrorCode, SandboxStats, Spawned};

use crate::cgroup::Cgroups;
use crate::config::Config;
use crate::dirs::SandboxFiles;
use crate::net::SandboxNet;
use crate::sandbox::{self, InitFds};
use crate::sys::{self, CloneResult};
use crate::validate::{IdMap, ValidSpawn};

/// How long the helper waits for a monitor to report that its sandbox started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from a pipe at once.
const READ_CHUNK: usize = 256 * 1024;
/// Pipe buffer requested for stdout/stderr, so fast writers rarely wait on the monitor.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// After init exits, how long stragglers may keep the output pipes open.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
const MAX_CONTROL_CONNECTIONS: usize = 64;
/// Reads of one pipe per wake-up of the event loop (4 x 256 KiB).
const MAX_READS_PER_WAKEUP: usize = 4;

const NAMESPACES: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

type StartReport = Result<Spawned, HelperError>;

fn setup_error(step: &str, e: impl std::fmt::Display) -> HelperError {
    HelperError::new(HelperErrorCode::SetupFailed, format!("{step}: {e}"))
}

/// Where the lines of a status pipe go: init and the exec shims report alike.
pub(crate) struct StatusReport<'a> {
    pub started_at_ms: &'a mut Option<i64>,
    pub exec_error: &'a mut Option<String>,
    pub setup_error: &'a mut Option<String>,
    /// Exit code (`128 + N` for signal N) and the signal.
    pub end: &'a mut Option<(i32, Option<i32>)>,
}

/// Read what a (non-blocking) status pipe holds and apply its complete lines to `report`:
/// `started`, `exec_failed MSG`, `setup_failed MSG`, `exit N`, `signal N`. The pipe is dropped
/// at end of file, or when more than 64 KiB arrive without a newline.
pub(crate) fn read_status(pipe: &mut Option<File>, buf: &mut Vec<u8>, report: StatusReport<'_>) {
    let Some(file) = pipe else { return };
    let mut chunk = [0u8; 4096];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => {
                *pipe = None;
                break;
            }
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 64 * 1024 {
                    *pipe = None;
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
        let line: Vec<u8> = buf.drain(..=pos).collect();
        let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
        let (word, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match word {
            "started" => *report.started_at_ms = Some(now_ms()),
            "exec_failed" => {
                report.started_at_ms.get_or_insert_with(now_ms);
                *report.exec_error = Some(rest.to_string());
            }
            "setup_failed" => *report.setup_error = Some(rest.to_string()),
            "exit" => {
                if let Ok(code) = rest.parse() {
                    *report.end = Some((code, None));
                }
            }
            "signal" => {
                if let Ok(sig) = rest.parse::<i32>() {
                    *report.end = Some((128 + sig, Some(sig)));
                }
            }
            _ => {}
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
    match fork().map_err(|e| setup_error("fork", e))? {
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
                match fork() {
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
            send_report(&mut report, Err(e));
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
    output_cap: u64,
    truncated: bool,
    dir: OwnedFd,
    daemon_uid: u32,
    daemon_gid: u32,
    init: Pid,
    pidfd: OwnedFd,
    stdout: Option<File>,
    stderr: Option<File>,
    status: Option<File>,
    status_buf: Vec<u8>,
    log: File,
    index: File,
    /// Bytes of `log` covered by index records.
    log_len: u64,
    listener: UnixListener,
    clients: Vec<(UnixStream, Vec<u8>)>,
    deadline: Option<Instant>,
    // Held for their flocks until the monitor exits.
    _lock: Option<File>,
    _slot_lock: Option<File>,
    // What happened.
    started_at_ms: Option<i64>,
    exec_error: Option<String>,
    setup_error: Option<String>,
    command_end: Option<(i32, Option<i32>)>,
    init_status: Option<WaitStatus>,
    kill_requested: bool,
    timed_out: bool,
    init_exited_at: Option<Instant>,
    /// Execs: extra processes in this sandbox (`crate::exec`).
    execs: crate::exec::Execs,
    /// With a terminal: where init sends the pty master (until it has).
    pty_socket: Option<UnixStream>,
    /// The command was started with `stdin`.
    stdin_wanted: bool,
}

fn prepare_and_clone(
    spawn: &ValidSpawn,
    files: SandboxFiles,
    config: &Config,
    cgroups: &Cgroups,
    net: Option<SandboxNet>,
    report_fd: RawFd,
) -> Result<Box<Monitor>, HelperError> {
    let SandboxFiles {
        dir,
        work,
        log,
        index,
        lock,
        slot_lock,
        image_lower,
    } = files;

    // Keep only what this sandbox needs: never the helper's socket or other sandboxes' files.
    let keep: Vec<RawFd> = [
        dir.as_raw_fd(),
        work.as_raw_fd(),
        log.as_raw_fd(),
        index.as_raw_fd(),
        lock.as_raw_fd(),
    ]
    .into_iter()
    .chain(slot_lock.as_ref().map(|f| f.as_raw_fd()))
    .chain(image_lower.as_ref().map(|f| f.as_raw_fd()))
    .chain(net.as_ref().map_or(Vec::new(), net_fds))
    .collect();
    crate::fds::close_all_except(&[keep.as_slice(), &[report_fd]].concat())
        .map_err(|e| setup_error("closing inherited descriptors", e))?;
    crate::fds::stdio_to_devnull().map_err(|e| setup_error("stdio", e))?;
    // Privileged: init is cloned into the network namespace the helper prepared (owned by the
    // host's user namespace), so the monitor enters it for the clone and leaves it right after.
    let host_netns = match &net {
        Some(_) => Some(
            crate::sys::open(
                "/proc/self/ns/net",
                OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| setup_error("opening the host's network namespace", e))?,
        ),
        None => None,
    };
    let netns = match net {
        Some(SandboxNet { netns, forward }) => {
            if let Some(forward) = forward {
                start_forwarder(forward, spawn)?;
            }
            Some(netns)
        }
        None => None,
    };

    let listener = bind_control_socket(&dir, config)?;

    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| setup_error("pipe", e));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (sync_r, sync_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    // The command's input for attach connections: a pipe, or a terminal whose master init
    // sends us once it has opened it in the sandbox's devpts.
    let (stdin_r, stdin_w) = match (spawn.stdin, spawn.tty) {
        (true, None) => {
            let (r, w) = pipe()?;
            (Some(r), Some(w))
        }
        _ => (None, None),
    };
    let (pty_ours, pty_theirs) = match spawn.tty {
        Some(_) => {
            let (a, b) = UnixStream::pair().map_err(|e| setup_error("socketpair", e))?;
            (Some(a), Some(OwnedFd::from(b)))
        }
        None => (None, None),
    };
    for w in [&out_w, &err_w] {
        let _ = nix::fcntl::fcntl(w.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    }

    // The sandbox's cgroup: on v2 the child is born in it (CLONE_INTO_CGROUP) and gets its cgroup
    // namespace at clone time; on v1 we move it there before it runs a single instruction of its
    // own (it waits for the sync byte) and it unshares its cgroup namespace afterwards, so that
    // the namespace's root is the sandbox's cgroup in both cases.
    let cgroups = cgroups.is_active().then(|| cgroups.clone());
    let v2_cgroup = cgroups
        .as_ref()
        .filter(|c| c.is_v2())
        .map(|c| {
            c.open_for_clone(spawn.id)
                .ok_or_else(|| setup_error("opening the cgroup", "missing"))
        })
        .transpose()?;
    let late_cgroupns = cgroups.as_ref().is_some_and(|c| !c.is_v2());
    let mut namespaces = if late_cgroupns {
        NAMESPACES & !libc::CLONE_NEWCGROUP
    } else {
        NAMESPACES
    };
    if let Some(netns) = &netns {
        namespaces &= !libc::CLONE_NEWNET;
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| setup_error("entering the sandbox's network namespace", e))?;
    }

    // The helper is non-dumpable and so, by inheritance, are we. The child must start dumpable so
    // that its /proc files (uid_map, gid_map, setgroups) belong to our uid and we can write them
    // without privileges; both become non-dumpable again once the maps are written.
    nix::sys::prctl::set_dumpable(true).map_err(|e| setup_error("prctl", e))?;
    match sys::clone_into_namespaces(namespaces, v2_cgroup.as_ref().map(|fd| fd.as_fd()))
        .map_err(|e| setup_error("clone", e))?
    {
        CloneResult::Child => {
            drop((
                out_r, err_r, sync_w, status_r, listener, log, index, lock, slot_lock, dir,
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
                    sync: sync_r,
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
        CloneResult::Parent { child, pidfd } => {
            drop((out_w, err_w, sync_r, status_w, work, v2_cgroup, image_lower));
            drop((stdin_r, pty_theirs));
            // Back to the host's namespace: the sandbox's must end with the sandbox (its veth
            // with it), not live on as the monitor's.
            if let Some(host) = &host_netns {
                if let Err(e) =
                    nix::sched::setns(host.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                {
                    let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
                    let _ = waitpid(child, None);
                    return Err(setup_error("leaving the sandbox's network namespace", e));
                }
            }
            drop((netns, host_netns));
            let mapped = write_id_maps(child, spawn.ids).and_then(|()| match &cgroups {
                Some(c) => join_v1_cgroup(c, spawn.id, child),
                None => Ok(()),
            });
            // For execs: the namespaces, while init is still dumpable and waiting for us.
            let mapped = mapped.and_then(|()| {
                crate::exec::Namespaces::open(child, late_cgroupns)
                    .map_err(|e| setup_error("opening the namespaces", e))
            });
            let sync = File::from(sync_w);
            let namespaces = match mapped {
                Ok(namespaces) => namespaces,
                Err(e) => {
                    let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
                    let _ = waitpid(child, None);
                    return Err(e);
                }
            };
            // Non-dumpable from now on: no process of the same uid may ptrace the monitor or read
            // its memory. (Not before the clone: the child inherits the flag, and a non-dumpable
            // child's /proc files, uid_map included, belong to root, which rootless we are not.)
            if let Err(e) = nix::sys::prctl::set_dumpable(false) {
                let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
                let _ = waitpid(child, None);
                return Err(setup_error("prctl", e));
            }
            // One byte: "your maps are written, go on". Closing without it makes init exit.
            let _ = (&sync).write_all(b"1");
            drop(sync);
            for fd in [&out_r, &err_r, &status_r] {
                let _ = nix::fcntl::fcntl(
                    fd.as_raw_fd(),
                    nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
                );
            }
            let oom_event = cgroups
                .as_ref()
                .filter(|_| spawn.limits.memory_bytes.is_some())
                .and_then(|c| OomEvent::watch(c, spawn.id));
            let mut execs = crate::exec::Execs::new(crate::exec::Context {
                namespaces,
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
            });
            if let Some(w) = stdin_w {
                execs.set_main_input(Some(File::from(w)), None);
            }
            Ok(Box::new(Monitor {
                id: spawn.id,
                cgroups,
                oom_event,
                oom: false,
                output_cap: spawn.limits.output_bytes,
                truncated: false,
                dir,
                daemon_uid: config.allow_uid,
                daemon_gid: config.allow_gid,
                init: child,
                pidfd,
                stdout: Some(File::from(out_r)),
                stderr: Some(File::from(err_r)),
                status: Some(File::from(status_r)),
                status_buf: Vec::new(),
                log,
                index,
                log_len: 0,
                listener,
                clients: Vec::new(),
                deadline: spawn.timeout.map(|t| Instant::now() + t),
                _lock: Some(lock),
                _slot_lock: slot_lock,
                started_at_ms: None,
                exec_error: None,
                setup_error: None,
                command_end: None,
                init_status: None,
                kill_requested: false,
                timed_out: false,
                init_exited_at: None,
                execs,
                pty_socket: pty_ours,
                stdin_wanted: spawn.stdin,
            }))
        }
    }
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

/// Fork the published-port forwarder (see `net/forward.rs`): a child of the monitor, so it
/// survives daemon restarts and dies with the monitor.
fn start_forwarder(forward: crate::net::Forward, spawn: &ValidSpawn) -> Result<(), HelperError> {
    // The monitor is single-threaded, so forking it is sound.
    match fork().map_err(|e| setup_error("forking the port forwarder", e))? {
        ForkResult::Parent { .. } => Ok(()),
        ForkResult::Child => {
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

fn bind_control_socket(dir: &OwnedFd, config: &Config) -> Result<UnixListener, HelperError> {
    // Bind through the directory descriptor so a swapped path cannot redirect the socket, with a
    // umask that keeps it private from the first instant.
    let path = format!("/proc/self/fd/{}/{MONITOR_SOCKET}", dir.as_raw_fd());
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(&path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(|e| setup_error("binding monitor.sock", e))?;
    nix::unistd::fchownat(
        Some(dir.as_raw_fd()),
        MONITOR_SOCKET,
        Some(Uid::from_raw(config.allow_uid)),
        Some(Gid::from_raw(config.allow_gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| setup_error("handing monitor.sock to the daemon", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| setup_error("monitor.sock", e))?;
    Ok(listener)
}

/// Move the (still waiting) child into its v1 cgroups. On v2 it was born there.
fn join_v1_cgroup(cgroups: &Cgroups, id: uuid::Uuid, child: Pid) -> Result<(), HelperError> {
    for procs in cgroups.procs_files(id) {
        std::fs::write(&procs, child.as_raw().to_string())
            .map_err(|e| setup_error(&format!("joining {}", procs.display()), e))?;
    }
    Ok(())
}

/// Notification of an OOM kill in the sandbox's cgroup (notifications, not polling).
enum OomEvent {
    /// v1: an eventfd registered on memory.oom_control through cgroup.event_control.
    V1 { eventfd: File, _oom_control: File },
    /// v2: memory.events, which signals POLLPRI when it changes.
    V2 { events: File },
}

impl OomEvent {
    fn watch(cgroups: &Cgroups, id: uuid::Uuid) -> Option<OomEvent> {
        let (file, control) = cgroups.oom_event_files(id)?;
        match control {
            None => File::open(file).ok().map(|events| OomEvent::V2 { events }),
            Some(control) => {
                let oom_control = File::open(&file).ok()?;
                let efd = nix::sys::eventfd::EventFd::from_flags(
                    nix::sys::eventfd::EfdFlags::EFD_CLOEXEC
                        | nix::sys::eventfd::EfdFlags::EFD_NONBLOCK,
                )
                .ok()?;
                let eventfd = File::from(OwnedFd::from(efd));
                let line = format!("{} {}", eventfd.as_raw_fd(), oom_control.as_raw_fd());
                std::fs::write(control, line).ok()?;
                Some(OomEvent::V1 {
                    eventfd,
                    _oom_control: oom_control,
                })
            }
        }
    }

    fn fd(&self) -> (BorrowedFd<'_>, PollFlags) {
        match self {
            OomEvent::V1 { eventfd, .. } => (eventfd.as_fd(), PollFlags::POLLIN),
            OomEvent::V2 { events } => (events.as_fd(), PollFlags::POLLPRI),
        }
    }

    /// Consume the notification.
    fn reset(&mut self) {
        match self {
            OomEvent::V1 { eventfd, .. } => {
                let mut buf = [0u8; 8];
                let _ = eventfd.read(&mut buf);
            }
            OomEvent::V2 { events } => {
                use std::io::{Seek, SeekFrom};
                let mut buf = String::new();
                let _ = events.seek(SeekFrom::Start(0));
                let _ = events.read_to_string(&mut buf);
            }
        }
    }
}

pub(crate) fn write_id_maps(child: Pid, ids: IdMap) -> Result<(), HelperError> {
    let proc = format!("/proc/{child}");
    let write = |file: &str, content: &str| {
        std::fs::write(format!("{proc}/{file}"), content)
            .map_err(|e| setup_error(&format!("writing {file}"), e))
    };
    match ids {
        IdMap::Range { base, size, .. } => {
            write("uid_map", &format!("0 {base} {size}\n"))?;
            write("gid_map", &format!("0 {base} {size}\n"))?;
        }
        IdMap::Single { uid, gid } => {
            // Without privileges a gid map needs setgroups denied first.
            write("setgroups", "deny")?;
            write("uid_map", &format!("0 {uid} 1\n"))?;
            write("gid_map", &format!("0 {gid} 1\n"))?;
        }
    }
    Ok(())
}

impl Monitor {
    fn event_loop(mut self, report: &mut Option<OwnedFd>) {
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            // Execs die with the sandbox's PID namespace; their records are written before we go.
            self.execs.tick();
            let execs_done = self.execs.all_ended();
            if self.init_status.is_some()
                && self.stdout.is_none()
                && self.stderr.is_none()
                && self.pty_socket.is_none()
                && execs_done
            {
                break;
            }
            if let Some(at) = self.init_exited_at {
                if at.elapsed() > DRAIN_GRACE && execs_done {
                    break;
                }
            }
            if report.is_some() {
                self.maybe_report(report);
            }
            let timeout = self.poll_timeout();
            let ready = self.poll_once(timeout);
            let Ok(ready) = ready else { continue };
            if ready.stdout {
                self.pump(1, &mut buf);
            }
            if ready.stderr {
                self.pump(2, &mut buf);
            }
            if ready.status {
                self.read_status();
            }
            if ready.pty {
                self.receive_terminal();
            }
            if ready.pidfd {
                self.reap();
            }
            if ready.listener {
                self.accept();
            }
            if ready.oom {
                self.on_oom_event();
            }
            for i in ready.clients.into_iter().rev() {
                self.serve_client(i);
            }
            self.execs.on_ready(&ready.execs, &mut buf);
            if let Some(deadline) = self.deadline {
                if Instant::now() >= deadline && self.init_status.is_none() && !self.timed_out {
                    self.timed_out = true;
                    let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
                }
            }
        }
        // Everything the sandbox wrote is in the log now.
        if self.setup_error.is_some() {
            let _ = nix::unistd::unlinkat(
                Some(self.dir.as_raw_fd()),
                MONITOR_SOCKET,
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
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
        if self.setup_error.is_none() {
            let _ = self.write_status();
        }
        if let Some(c) = &self.cgroups {
            c.remove(self.id);
        }
        let _ = nix::unistd::unlinkat(
            Some(self.dir.as_raw_fd()),
            MONITOR_SOCKET,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        // Release the locks before the control connections close: the daemon reacts to the
        // close by asking the helper to remove the directory, which the locks would refuse.
        self._lock.take();
        self._slot_lock.take();
        self.clients.clear();
    }

    fn maybe_report(&mut self, report: &mut Option<OwnedFd>) {
        let base = Spawned {
            init_pid: self.init.as_raw(),
            host_uid: 0,
            started_at_unix_ms: self.started_at_ms.unwrap_or_else(now_ms),
            exec_error: None,
            ports: Vec::new(),
        };
        if let Some(e) = &self.setup_error {
            // Report only once init is gone and our locks are released, so that the helper's
            // rollback can remove the directory.
            if self.init_status.is_some() {
                self._lock.take();
                self._slot_lock.take();
                send_report(report, Err(setup_error("sandbox setup", e)));
            }
        } else if let Some(e) = &self.exec_error {
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
        } else if self.started_at_ms.is_some() && !send_report(report, Ok(base)) {
            self.abandon();
        } else if self.init_status.is_some() {
            send_report(
                report,
                Err(setup_error(
                    "sandbox setup",
                    "init exited before starting the command",
                )),
            );
        }
    }

    /// Init opened the command's terminal and sends its master: from now on the terminal is
    /// the command's output (channel 1) and, with `stdin`, its input.
    fn receive_terminal(&mut self) {
        let Some(socket) = self.pty_socket.take() else {
            return;
        };
        // Nothing (init failed before): its status pipe says why.
        let Ok(master) = crate::exec::receive_master(&socket) else {
            return;
        };
        let _ = nix::fcntl::fcntl(
            master.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK),
        );
        let input = self.stdin_wanted.then(|| master.try_clone().ok()).flatten();
        self.execs.set_main_input(input, master.try_clone().ok());
        self.stdout = Some(master);
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
            let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
        }
    }

    /// The helper gave up on this sandbox and told the daemon it failed: end it.
    fn abandon(&mut self) {
        let _ = sys::pidfd_send_signal(self.pidfd.as_fd(), libc::SIGKILL);
    }

    fn poll_timeout(&self) -> PollTimeout {
        let mut wait = Duration::from_secs(3600);
        if let Some(deadline) = self.deadline {
            if !self.timed_out {
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            }
        }
        if let Some(at) = self.init_exited_at {
            wait = wait.min((at + DRAIN_GRACE).saturating_duration_since(Instant::now()));
        }
        if let Some(at) = self.execs.next_deadline() {
            wait = wait.min(at.saturating_duration_since(Instant::now()));
        }
        PollTimeout::try_from((wait.as_millis() as i32).saturating_add(1))
            .unwrap_or(PollTimeout::MAX)
    }

    fn poll_once(&self, timeout: PollTimeout) -> Result<Ready, Errno> {
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(6 + self.clients.len());
        let mut slots = Slots::default();
        fn add<'a>(fds: &mut Vec<PollFd<'a>>, fd: BorrowedFd<'a>) -> Option<usize> {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
            Some(fds.len() - 1)
        }
        slots.stdout = self.stdout.as_ref().and_then(|f| add(&mut fds, f.as_fd()));
        slots.stderr = self.stderr.as_ref().and_then(|f| add(&mut fds, f.as_fd()));
        slots.status = self.status.as_ref().and_then(|f| add(&mut fds, f.as_fd()));
        if self.init_status.is_none() {
            slots.pidfd = add(&mut fds, self.pidfd.as_fd());
        }
        slots.listener = add(&mut fds, self.listener.as_fd());
        slots.pty = self
            .pty_socket
            .as_ref()
            .and_then(|s| add(&mut fds, s.as_fd()));
        if let (Some(ev), None) = (&self.oom_event, self.init_status) {
            let (fd, flags) = ev.fd();
            fds.push(PollFd::new(fd, flags));
            slots.oom = Some(fds.len() - 1);
        }
        let first_client = fds.len();
        for (c, _) in &self.clients {
            fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
        }
        let first_exec = fds.len();
        let mut exec_slots = Vec::new();
        self.execs.poll_fds(&mut fds, &mut exec_slots);
        poll(&mut fds, timeout)?;
        let hit = |slot: Option<usize>| {
            slot.and_then(|i| fds[i].revents())
                .is_some_and(|r| !r.is_empty())
        };
        Ok(Ready {
            stdout: hit(slots.stdout),
            stderr: hit(slots.stderr),
            status: hit(slots.status),
            pidfd: hit(slots.pidfd),
            listener: hit(slots.listener),
            pty: hit(slots.pty),
            oom: hit(slots.oom),
            clients: (first_client..first_exec)
                .filter(|&i| fds[i].revents().is_some_and(|r| !r.is_empty()))
                .map(|i| i - first_client)
                .collect(),
            execs: exec_slots
                .iter()
                .enumerate()
                .filter(|(i, _)| fds[first_exec + i].revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, slot)| *slot)
                .collect(),
        })
    }

    /// Move what is in one output pipe to the log, then its index record.
    fn pump(&mut self, channel: u8, buf: &mut [u8]) {
        // A bounded number of reads per wake-up: a sandbox that writes without pause must not
        // keep the monitor from kill requests, the timeout and the other stream.
        for _ in 0..MAX_READS_PER_WAKEUP {
            let pipe = if channel == 1 {
                &mut self.stdout
            } else {
                &mut self.stderr
            };
            let Some(file) = pipe else { return };
            match file.read(buf) {
                Ok(0) => {
                    *pipe = None;
                    return;
                }
                Ok(n) => {
                    self.store_output(channel, n, buf);
                    if n < buf.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    *pipe = None;
                    return;
                }
            }
        }
    }

    /// Store what was read, up to the output cap; past it, note the truncation once and drop
    /// the rest (the pipes are still drained, so the sandbox never blocks on them).
    fn store_output(&mut self, channel: u8, n: usize, buf: &[u8]) {
        if self.truncated {
            return;
        }
        let room = self.output_cap.saturating_sub(self.log_len);
        let keep = (n as u64).min(room) as usize;
        if keep > 0 {
            append_output(
                &mut self.log,
                &mut self.index,
                &mut self.log_len,
                channel,
                &buf[..keep],
            );
        }
        if keep < n {
            self.truncated = true;
            let marker = format!(
                "\n[sandboxd: output truncated at {} bytes]\n",
                self.output_cap
            );
            append_output(
                &mut self.log,
                &mut self.index,
                &mut self.log_len,
                2,
                marker.as_bytes(),
            );
            let _ = crate::sys::openat(
                Some(self.dir.as_raw_fd()),
                OUTPUT_TRUNCATED,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            );
        }
    }

    /// Read init's status lines (see [`read_status`]).
    fn read_status(&mut self) {
        read_status(
            &mut self.status,
            &mut self.status_buf,
            StatusReport {
                started_at_ms: &mut self.started_at_ms,
                exec_error: &mut self.exec_error,
                setup_error: &mut self.setup_error,
                end: &mut self.command_end,
            },
        );
    }

    fn reap(&mut self) {
        match waitpid(self.init, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(status) => {
                self.init_status = Some(status);
                self.init_exited_at = Some(Instant::now());
                // Whatever init said last is in the status pipe already.
                self.read_status();
            }
            Err(_) => {
                self.init_status = Some(WaitStatus::Exited(self.init, 255));
                self.init_exited_at = Some(Instant::now());
            }
        }
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

    fn serve_client(&mut self, i: usize) {
        let mut chunk = [0u8; 4096];
        let mut close = false;
        match self.clients[i].0.read(&mut chunk) {
            Ok(0) => close = true,
            Ok(n) => self.clients[i].1.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => close = true,
        }
        while let Some(pos) = self.clients[i].1.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.clients[i].1.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if let Some(cmd) = sandboxd_protocol::exec::parse(&line) {
                // Exec requests take the connection over (an attach keeps it for its frames).
                let (mut stream, rest) = self.clients.swap_remove(i);
                match cmd {
                    Ok(cmd) => {
                        let sandbox = crate::exec::Sandbox {
                            dir: self.dir.as_fd(),
                            init: self.pidfd.as_fd(),
                            running: self.init_status.is_none(),
                        };
                        self.execs.command(cmd, stream, rest, &sandbox);
                    }
                    Err(e) => {
                        let _ = stream.write_all(format!("err {e}\n").as_bytes());
                    }
                }
                return;
            }
            if line == control::NAMESPACES {
                self.send_namespaces(i);
                continue;
            }
            let answer = match control::parse_kill(&line) {
                Some(signo) if self.init_status.is_none() => {
                    match sys::pidfd_send_signal(self.pidfd.as_fd(), signo) {
                        Ok(()) => {
                            self.kill_requested = true;
                            "ok\n".to_string()
                        }
                        Err(e) => format!("err {e}\n"),
                    }
                }
                Some(_) => "err not running\n".to_string(),
                None => "err invalid request\n".to_string(),
            };
            let _ = self.clients[i].0.write_all(answer.as_bytes());
        }
        let max_line = if sandboxd_protocol::exec::is_long_line(&self.clients[i].1) {
            sandboxd_protocol::exec::MAX_EXEC_LINE
        } else {
            control::MAX_LINE
        };
        if close || self.clients[i].1.len() > max_line {
            self.clients.swap_remove(i);
        }
    }

    /// Answer `ns`: init's user and mount namespaces as SCM_RIGHTS, for the helper only (our own
    /// uid; rootless, the daemon shares it and is no boundary there anyway).
    fn send_namespaces(&mut self, i: usize) {
        let own = nix::unistd::geteuid().as_raw();
        let stream = &mut self.clients[i].0;
        let from_helper = getsockopt(&*stream, PeerCredentials)
            .map(|c| c.uid() == own)
            .unwrap_or(false);
        match self.execs.user_and_mount_namespaces() {
            (user, mnt) if from_helper && self.init_status.is_none() => {
                let fds = [user.as_raw_fd(), mnt.as_raw_fd()];
                let _ = nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[std::io::IoSlice::new(b"ok\n")],
                    &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    None,
                );
            }
            _ => {
                let _ = stream.write_all(b"err not running\n");
            }
        }
    }

    fn exit_status(&self) -> ExitStatus {
        let started = self.started_at_ms.unwrap_or_else(now_ms);
        let finished = now_ms();
        let (exit_code, signal) = match (self.init_status, self.command_end) {
            // init itself was killed (SIGKILL from kill or timeout): the whole sandbox died.
            (Some(WaitStatus::Signaled(_, sig, _)), _) => (128 + sig as i32, Some(sig as i32)),
            (_, Some(end)) => end,
            (Some(WaitStatus::Exited(_, code)), None) => (code, None),
            _ => (255, None),
        };
        let reason = if self.exec_error.is_some() {
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
            error: self.exec_error.clone(),
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
        stats.output_bytes = self.log_len;
        stats.output_truncated = self.truncated;
        stats.disk_bytes = crate::dirs::work_usage(&self.dir);
        stats
    }

    /// Write status.json atomically (temp file, then rename) for the daemon to read.
    fn write_status(&self) -> Result<(), Errno> {
        let status = self.exit_status();
        let bytes = serde_json::to_vec(&status).map_err(|_| Errno::EINVAL)?;
        let tmp = format!("{STATUS_FILE}.tmp");
        let _ = nix::unistd::unlinkat(
            Some(self.dir.as_raw_fd()),
            tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        let fd = sys::openat(
            Some(self.dir.as_raw_fd()),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o640),
        )?;
        let mut file = File::from(fd);
        nix::unistd::fchown(
            file.as_raw_fd(),
            Some(Uid::from_raw(self.daemon_uid)),
            Some(Gid::from_raw(self.daemon_gid)),
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

/// Append one chunk: the bytes to the log, then their index record. If the log write fails
/// part-way (a full disk), the log is cut back to its last indexed length, so that the index and
/// the log always agree and every offset stays meaningful; the chunk is lost.
pub(crate) fn append_output(
    log: &mut File,
    index: &mut File,
    log_len: &mut u64,
    channel: u8,
    data: &[u8],
) {
    match log.write_all(data) {
        Ok(()) => {
            let record = Record {
                channel,
                len: data.len() as u32,
            };
            if index.write_all(&record.encode()).is_ok() {
                *log_len += data.len() as u64;
            } else {
                let _ = log.set_len(*log_len);
            }
        }
        Err(_) => {
            let _ = log.set_len(*log_len);
        }
    }
}

#[derive(Default)]
struct Slots {
    oom: Option<usize>,
    stdout: Option<usize>,
    stderr: Option<usize>,
    status: Option<usize>,
    pidfd: Option<usize>,
    listener: Option<usize>,
    pty: Option<usize>,
}

struct Ready {
    oom: bool,
    stdout: bool,
    stderr: bool,
    status: bool,
    pidfd: bool,
    listener: bool,
    pty: bool,
    clients: Vec<usize>,
    execs: Vec<crate::exec::Slot>,
}
