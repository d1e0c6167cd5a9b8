//! The published-port forwarder: a process of its own per sandbox with published ports, forked
//! by the sandbox's monitor, so it outlives daemon and helper restarts and dies with the monitor
//! (PR_SET_PDEATHSIG).
//!
//! It holds the listening sockets the helper bound on the host's 127.0.0.1 (a socket stays in
//! the network namespace it was created in), then enters the hub, so every connection it makes
//! to the sandbox leaves from the hub, bound to the sandbox's device (bridge or veth): the sandbox sees the
//! gateway as the source address. It then drops to the sandbox's host uid, with no capability.
//! One thread, one `poll` loop, a pipe per direction and `splice(2)`: the bytes never enter
//! user space, and it never parses what it forwards.

use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{splice, FcntlArg, OFlag, SpliceFFlags};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

/// Connections forwarded at once per sandbox; more are accepted and closed at once. Each holds
/// six descriptors (two sockets, two pipes), well within the usual limit of 1024.
const MAX_CONNECTIONS: usize = 128;
/// Pipe size asked for per direction of a connection.
const PIPE_SIZE: libc::c_int = 256 * 1024;

/// What a forwarder needs, prepared by the helper.
pub struct Forward {
    /// (listening socket on the host, the sandbox's port it forwards to).
    pub listeners: Vec<(TcpListener, u16)>,
    /// The hub's network namespace.
    pub hub: OwnedFd,
    /// The hub's device towards the sandbox (its group's bridge, or its veth).
    pub device: String,
    pub address: Ipv4Addr,
}

/// One direction of a connection: bytes spliced from one socket into a pipe, waiting to be
/// spliced on into the other socket. They never enter user space (`splice(2)`).
struct Flow {
    pipe_r: OwnedFd,
    pipe_w: OwnedFd,
    /// The pipe's capacity and how much of it is in use.
    capacity: usize,
    in_pipe: usize,
    /// The reading side reached end of file.
    eof: bool,
    /// The writing side was shut down after the end of file was passed on.
    shut: bool,
}

const SPLICE: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

impl Flow {
    fn new() -> Result<Flow, Errno> {
        let (pipe_r, pipe_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        // A bigger pipe moves more per call; keep the default where the system says no.
        let capacity = nix::fcntl::fcntl(pipe_w.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE))
            .or_else(|_| nix::fcntl::fcntl(pipe_w.as_raw_fd(), FcntlArg::F_GETPIPE_SZ))?;
        Ok(Flow {
            pipe_r,
            pipe_w,
            capacity: usize::try_from(capacity).unwrap_or(4096),
            in_pipe: 0,
            eof: false,
            shut: false,
        })
    }
    fn pending(&self) -> bool {
        self.in_pipe > 0
    }
    fn room(&self) -> bool {
        !self.eof && self.in_pipe < self.capacity
    }
    /// Move what `from` has into the pipe; false on an error.
    fn fill(&mut self, from: &TcpStream) -> bool {
        while self.room() {
            let want = self.capacity - self.in_pipe;
            match splice(from, None, &self.pipe_w, None, want, SPLICE) {
                Ok(0) => self.eof = true,
                Ok(n) => self.in_pipe += n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
        true
    }
    /// Move what the pipe holds to `to`; false on an error.
    fn drain(&mut self, to: &TcpStream) -> bool {
        while self.pending() {
            match splice(&self.pipe_r, None, to, None, self.in_pipe, SPLICE) {
                Ok(0) => return false,
                Ok(n) => self.in_pipe -= n,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
        if self.eof && !self.pending() && !self.shut {
            self.shut = true;
            let _ = to.shutdown(Shutdown::Write);
        }
        true
    }
    fn done(&self) -> bool {
        self.shut
    }
}

struct Connection {
    client: TcpStream,
    upstream: TcpStream,
    connecting: bool,
    /// client → sandbox
    up: Flow,
    /// sandbox → client
    down: Flow,
}

/// Run the forwarder; never returns. `uid`/`gid`: the identity to drop to.
pub fn run(forward: Forward, uid: u32, gid: u32) -> ! {
    if let Err(e) = enter(&forward, uid, gid) {
        eprintln!("sandboxd-helper: port forwarder: {e}");
        crate::sys::exit_now(1);
    }
    let Forward {
        listeners,
        device,
        address,
        ..
    } = forward;
    let mut conns: Vec<Connection> = Vec::new();
    loop {
        let mut fds: Vec<PollFd<'_>> = listeners
            .iter()
            .map(|(l, _)| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        for c in &conns {
            let mut client = PollFlags::empty();
            let mut upstream = PollFlags::empty();
            if c.connecting {
                upstream |= PollFlags::POLLOUT;
            } else {
                if c.up.room() {
                    client |= PollFlags::POLLIN;
                }
                if c.down.pending() {
                    client |= PollFlags::POLLOUT;
                }
                if c.down.room() {
                    upstream |= PollFlags::POLLIN;
                }
                if c.up.pending() {
                    upstream |= PollFlags::POLLOUT;
                }
            }
            fds.push(PollFd::new(c.client.as_fd(), client));
            fds.push(PollFd::new(c.upstream.as_fd(), upstream));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => crate::sys::exit_now(1),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let n = listeners.len();
        // Existing connections first (their indices shift when one closes).
        for i in (0..conns.len()).rev() {
            if !(ready[n + 2 * i] || ready[n + 2 * i + 1]) {
                continue;
            }
            if !step(&mut conns[i]) {
                conns.swap_remove(i);
            }
        }
        for (i, (listener, port)) in listeners.iter().enumerate() {
            if !ready[i] {
                continue;
            }
            while let Ok((client, _)) = listener.accept() {
                if conns.len() >= MAX_CONNECTIONS || client.set_nonblocking(true).is_err() {
                    continue;
                }
                let _ = client.set_nodelay(true);
                let flows = Flow::new().and_then(|up| Ok((up, Flow::new()?)));
                let upstream = connect(&device, SocketAddrV4::new(address, *port));
                if let (Ok(upstream), Ok((up, down))) = (upstream, flows) {
                    conns.push(Connection {
                        client,
                        upstream,
                        connecting: true,
                        up,
                        down,
                    });
                }
            }
        }
    }
}

/// Enter the hub, drop every privilege, and die with the monitor.
fn enter(forward: &Forward, uid: u32, gid: u32) -> Result<(), String> {
    nix::sched::setns(forward.hub.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("entering the hub: {e}"))?;
    for (l, _) in &forward.listeners {
        l.set_nonblocking(true)
            .map_err(|e| format!("listener: {e}"))?;
    }
    let parent = nix::unistd::getppid();
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    let g = nix::unistd::Gid::from_raw(gid);
    let u = nix::unistd::Uid::from_raw(uid);
    nix::unistd::setresgid(g, g, g).map_err(|e| format!("setresgid: {e}"))?;
    nix::unistd::setresuid(u, u, u).map_err(|e| format!("setresuid: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    // After the uid change, which clears it.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("prctl: {e}"))?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl: {e}"))?;
    if nix::unistd::getppid() != parent {
        return Err("the monitor is gone".into());
    }
    Ok(())
}

/// A non-blocking connection to the sandbox from the hub, through the sandbox's device only
/// (every such device holds the same gateway address).
fn connect(device: &str, to: SocketAddrV4) -> Result<TcpStream, Errno> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(
        &fd,
        sockopt::BindToDevice,
        &std::ffi::OsString::from(device),
    )?;
    let _ = socket::setsockopt(&fd, sockopt::TcpNoDelay, &true);
    match socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to)) {
        Ok(()) | Err(Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e),
    }
}

/// Move what can be moved; false when the connection is finished or broken.
fn step(c: &mut Connection) -> bool {
    if c.connecting {
        match socket::getsockopt(&c.upstream, sockopt::SocketError) {
            Ok(0) => c.connecting = false,
            _ => return false,
        }
        // A connect still in progress answers 0 too, but POLLOUT only comes once it is done.
    }
    let ok = c.up.fill(&c.client)
        && c.up.drain(&c.upstream)
        && c.down.fill(&c.upstream)
        && c.down.drain(&c.client);
    ok && !(c.up.done() && c.down.done())
}
