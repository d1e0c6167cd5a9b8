//! Starting and finding the egress filter, `sandboxd-egress` (the binary next to the helper's).
//!
//! The helper binds the filter's three sockets itself (it is root; the filter never is): in the
//! hub, a TCP listener on [`FILTER_PORT`](super::uplink::FILTER_PORT) and a UDP socket on port
//! 53, both on every address of the hub (the gateway exists only while a bridge or veth holds
//! it; the hub's input chain refuses new connections from the uplink); and the daemon's control
//! socket `<state>/helper/egress.sock` (owned by the daemon's uid, 0600). Then it double-forks
//! the filter into its own session, in the hub, as the daemon's uid and gid without supplementary
//! groups, capabilities or the right to gain any (no_new_privs), and execs it with its
//! [`FilterConfig`] as `--config` JSON. Like a monitor, it survives helper and daemon restarts.
//!
//! One filter per state directory: the filter inherits a descriptor of `egress.lock` on which
//! the helper took an exclusive `flock`, so the lock is held exactly as long as the filter (or
//! a process it forked) lives. A helper that finds the lock taken leaves the running filter
//! alone; one that gets it starts a new filter, which is also how a dead filter is restarted.
//! `egress.pid` names the filter's pid (for stopping it at teardown), `egress.log` takes its
//! standard error (daemon-readable).

use std::ffi::CString;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::fcntl::{FcntlArg, FdFlag, OFlag};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use sandboxd_protocol::egress::{FilterConfig, FILTER_SOCKET};

use super::inside;

/// The filter's binary, next to the helper's own.
pub const FILTER_BINARY: &str = "sandboxd-egress";
const LOCK_FILE: &str = "egress.lock";
const PID_FILE: &str = "egress.pid";
const LOG_FILE: &str = "egress.log";

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("the egress filter {0} is missing (it is installed next to sandboxd-helper)")]
    Missing(PathBuf),
    #[error("finding the helper's own executable")]
    Exe(#[source] std::io::Error),
    #[error("{step}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}")]
    Sys {
        step: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("binding the filter's sockets in the hub")]
    Bind(#[source] Box<super::NetError>),
    #[error("encoding the filter's configuration")]
    Config(#[source] serde_json::Error),
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> FilterError {
    move |source| FilterError::Io { step, source }
}

fn sys(step: &'static str) -> impl FnOnce(nix::errno::Errno) -> FilterError {
    move |source| FilterError::Sys { step, source }
}

/// Everything the filter's start needs besides the sockets (bound here).
pub struct FilterStart<'a> {
    pub helper_dir: BorrowedFd<'a>,
    pub hub: BorrowedFd<'a>,
    pub host: BorrowedFd<'a>,
    /// The filter's configuration, descriptors left at -1: they are filled in here.
    pub config: FilterConfig,
    pub daemon_gid: u32,
}

/// Where the filter's binary is: next to the helper's executable.
pub fn binary() -> Result<PathBuf, FilterError> {
    let exe = std::env::current_exe().map_err(FilterError::Exe)?;
    let path = exe
        .parent()
        .map(|d| d.join(FILTER_BINARY))
        .unwrap_or_else(|| PathBuf::from(FILTER_BINARY));
    if !path.is_file() {
        return Err(FilterError::Missing(path));
    }
    Ok(path)
}

fn helper_path(dir: BorrowedFd<'_>, name: &str) -> String {
    format!("/proc/self/fd/{}/{name}", dir.as_raw_fd())
}

/// Open (creating) the lock file and try to take it. `None`: a filter holds it.
fn try_lock(dir: BorrowedFd<'_>) -> Result<Option<std::fs::File>, FilterError> {
    let fd = crate::sys::openat(
        Some(dir.as_raw_fd()),
        LOCK_FILE,
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(sys("opening egress.lock"))?;
    // A raw flock: it must stay with the filter's copy of the descriptor when ours closes.
    match crate::fdfs::flock(fd.as_raw_fd(), nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(()) => Ok(Some(std::fs::File::from(fd))),
        Err(nix::errno::Errno::EWOULDBLOCK) => Ok(None),
        Err(e) => Err(sys("locking egress.lock")(e)),
    }
}

/// Is a filter running for this state directory (someone holds the lock)?
pub fn running(dir: BorrowedFd<'_>) -> bool {
    matches!(try_lock(dir), Ok(None))
}

/// The running filter's pid, if the lock is held and the pid file names a live filter.
pub fn running_pid(dir: BorrowedFd<'_>) -> Option<i32> {
    if !running(dir) {
        return None;
    }
    let text = std::fs::read_to_string(helper_path(dir, PID_FILE)).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    exe.file_name()
        .is_some_and(|n| n == FILTER_BINARY)
        .then_some(pid)
}

/// Start the filter unless one runs. True when one was started.
pub fn ensure(start: FilterStart<'_>) -> Result<bool, FilterError> {
    let Some(lock) = try_lock(start.helper_dir)? else {
        return Ok(false);
    };
    let binary = binary()?;
    // The sockets, in the hub.
    let (tcp, dns) = inside(start.hub, start.host, || {
        let tcp = TcpListener::bind(SocketAddrV4::new(
            Ipv4Addr::UNSPECIFIED,
            super::uplink::FILTER_PORT,
        ))
        .map_err(|e| super::NetError::Sysctl("binding the filter's TCP port", e))?;
        let dns = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 53))
            .map_err(|e| super::NetError::Sysctl("binding the filter's DNS port", e))?;
        Ok((tcp, dns))
    })
    .map_err(|e| FilterError::Bind(Box::new(e)))?;
    let control = bind_control(start.helper_dir, start.config.daemon_uid, start.daemon_gid)?;
    let log = crate::sys::openat(
        Some(start.helper_dir.as_raw_fd()),
        LOG_FILE,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_APPEND | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o640),
    )
    .map_err(sys("opening egress.log"))?;
    nix::unistd::fchown(
        log.as_raw_fd(),
        Some(Uid::from_raw(start.config.daemon_uid)),
        Some(Gid::from_raw(start.daemon_gid)),
    )
    .map_err(sys("handing egress.log to the daemon"))?;
    let mut config = start.config;
    config.tcp_fd = tcp.as_raw_fd();
    config.dns_fd = dns.as_raw_fd();
    config.control_fd = control.as_raw_fd();
    let json = serde_json::to_string(&config).map_err(FilterError::Config)?;
    let argv = [
        CString::new(FILTER_BINARY).map_err(|_| FilterError::Missing(binary.clone()))?,
        CString::new("--config").map_err(|_| FilterError::Missing(binary.clone()))?,
        CString::new(json).map_err(|_| FilterError::Missing(binary.clone()))?,
    ];
    let path = CString::new(binary.as_os_str().as_encoded_bytes())
        .map_err(|_| FilterError::Missing(binary.clone()))?;
    let keep = [
        tcp.as_raw_fd(),
        dns.as_raw_fd(),
        control.as_raw_fd(),
        lock.as_raw_fd(),
    ];
    let child = Child {
        hub: start.hub,
        dir: start.helper_dir,
        log: log.as_fd(),
        keep,
        uid: config.daemon_uid,
        gid: start.daemon_gid,
    };
    detached(|| {
        let why = child.exec(&path, &argv);
        // Only reached when the exec did not happen; the log is the filter's stderr by now.
        let _ = writeln!(
            std::io::stderr(),
            "sandboxd-helper: starting the filter: {why}"
        );
    })?;
    // Our copies close here; the filter's keep the sockets, and the lock, alive.
    drop((tcp, dns, control, lock, log));
    Ok(true)
}

/// Fork twice: the grandchild (its own session) does `work`, then exits. The intermediate
/// process is reaped here.
fn detached(work: impl FnOnce()) -> Result<(), FilterError> {
    match crate::sys::fork().map_err(|e| FilterError::Sys {
        step: "forking the filter",
        source: match e {
            crate::sys::ForkError::Sys(errno) => errno,
            _ => nix::errno::Errno::EINVAL,
        },
    })? {
        nix::unistd::ForkResult::Parent { child } => {
            let _ = nix::sys::wait::waitpid(child, None);
            Ok(())
        }
        nix::unistd::ForkResult::Child => {
            let _ = nix::unistd::setsid();
            if let Ok(nix::unistd::ForkResult::Child) = crate::sys::fork() {
                work();
            }
            crate::sys::exit_now(0);
        }
    }
}

/// What the filter's process needs between fork and exec.
struct Child<'a> {
    hub: BorrowedFd<'a>,
    dir: BorrowedFd<'a>,
    log: BorrowedFd<'a>,
    keep: [RawFd; 4],
    uid: u32,
    gid: u32,
}

impl Child<'_> {
    /// Become the filter: the hub, stdio, descriptors, ids, signals; then exec. Returns only
    /// on failure, with the reason.
    fn exec(&self, path: &CString, argv: &[CString]) -> String {
        if let Err(e) = self.prepare() {
            return e;
        }
        let env: [CString; 0] = [];
        match nix::unistd::execve(path, argv, &env) {
            Ok(never) => match never {},
            Err(e) => format!("exec {path:?}: {e}"),
        }
    }

    fn prepare(&self) -> Result<(), String> {
        nix::sched::setns(self.hub, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the hub: {e}"))?;
        let null = crate::sys::open("/dev/null", OFlag::O_RDWR, Mode::empty())
            .map_err(|e| format!("/dev/null: {e}"))?;
        nix::unistd::dup2(null.as_raw_fd(), 0).map_err(|e| format!("stdin: {e}"))?;
        nix::unistd::dup2(null.as_raw_fd(), 1).map_err(|e| format!("stdout: {e}"))?;
        nix::unistd::dup2(self.log.as_raw_fd(), 2).map_err(|e| format!("stderr: {e}"))?;
        // Closed now: `close_all_except` below closes every other descriptor, and an owned one
        // dropped after that would abort the process (std's IO safety check on EBADF).
        drop(null);
        // The pid file, while still root (the helper's directory is root's).
        let pid = nix::unistd::getpid().as_raw();
        let pid_file = crate::sys::openat(
            Some(self.dir.as_raw_fd()),
            PID_FILE,
            OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_TRUNC
                | OFlag::O_CLOEXEC
                | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| format!("egress.pid: {e}"))?;
        std::fs::File::from(pid_file)
            .write_all(format!("{pid}\n").as_bytes())
            .map_err(|e| format!("egress.pid: {e}"))?;
        for fd in self.keep {
            nix::fcntl::fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
                .map_err(|e| format!("keeping descriptor {fd}: {e}"))?;
        }
        crate::fds::close_all_except(&self.keep)
            .map_err(|e| format!("closing descriptors: {e}"))?;
        // Signals as a fresh process has them: the helper blocks SIGTERM and ignores SIGPIPE.
        nix::sys::signal::SigSet::all()
            .thread_unblock()
            .map_err(|e| format!("unblocking signals: {e}"))?;
        crate::sys::reset_signal(Signal::SIGPIPE).map_err(|e| format!("SIGPIPE: {e}"))?;
        nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
        let g = Gid::from_raw(self.gid);
        let u = Uid::from_raw(self.uid);
        nix::unistd::setresgid(g, g, g).map_err(|e| format!("setresgid: {e}"))?;
        // From root to another uid without keepcaps: every capability set is cleared.
        nix::unistd::setresuid(u, u, u).map_err(|e| format!("setresuid: {e}"))?;
        nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
        let effective = caps::read(None, caps::CapSet::Effective).map_err(|e| e.to_string())?;
        let permitted = caps::read(None, caps::CapSet::Permitted).map_err(|e| e.to_string())?;
        if !effective.is_empty() || !permitted.is_empty() {
            return Err("capabilities survived the uid change".into());
        }
        Ok(())
    }
}

/// Bind `<state>/helper/egress.sock` for the daemon's uid (mode 0600), replacing a stale one.
fn bind_control(dir: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<UnixListener, FilterError> {
    match nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        FILTER_SOCKET,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(sys("removing a stale egress.sock")(e)),
    }
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(helper_path(dir, FILTER_SOCKET));
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io("binding egress.sock"))?;
    nix::unistd::fchownat(
        Some(dir.as_raw_fd()),
        FILTER_SOCKET,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(sys("handing egress.sock to the daemon"))?;
    Ok(listener)
}

/// Stop the running filter (SIGTERM, then SIGKILL after two seconds) and remove its files
/// (the log stays). Logs, never fails.
pub fn stop(dir: BorrowedFd<'_>) {
    if let Some(pid) = running_pid(dir) {
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while running(dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if running(dir) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while running(dir) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    if running(dir) {
        eprintln!("sandboxd-helper: the egress filter does not stop; its files stay");
        return;
    }
    for name in [FILTER_SOCKET, PID_FILE, LOCK_FILE] {
        let _ = nix::unistd::unlinkat(
            Some(dir.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}
