//! Raw system calls that `nix` does not wrap. This is the only module of the helper with `unsafe`.
//!
//! Every function here is a thin, typed wrapper over one syscall; policy lives in the callers.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// Result of [`clone_into_namespaces`], like `fork`'s.
pub enum CloneResult {
    Parent { child: Pid, pidfd: OwnedFd },
    Child,
}

/// Why a process could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// Another thread exists (or shares this address space): the child would inherit locks held
    /// by threads that do not exist in it, so it could deadlock or corrupt memory before exec.
    #[error("refusing to fork a process with more than one thread")]
    Threaded,
    /// Flags other than `CLONE_NEW*` namespace flags were asked for.
    #[error("clone flags {0:#x} are not namespace flags")]
    NotNamespaceFlags(libc::c_int),
    #[error("{0}")]
    Sys(#[source] Errno),
}

impl From<ForkError> for Errno {
    /// For callers that only report an errno: `EDEADLK` stands for "would deadlock".
    fn from(e: ForkError) -> Errno {
        match e {
            ForkError::Threaded => Errno::EDEADLK,
            ForkError::NotNamespaceFlags(_) => Errno::EINVAL,
            ForkError::Sys(e) => e,
        }
    }
}

/// Fail unless the calling thread is the only thread of its process and shares its memory with
/// no other task. `unshare(CLONE_VM)` checks exactly that in the kernel (unshare(2): "EINVAL ...
/// the calling process is multithreaded") and changes nothing when it holds. One syscall, and it
/// works where `/proc/self` does not name us (an exec's shim sits in the sandbox's mount
/// namespace but outside its PID namespace).
///
/// Only the calling thread can create another thread, and it is busy here until the fork: so
/// the answer still holds when the caller forks right after.
pub fn check_single_threaded() -> Result<(), ForkError> {
    match nix::sched::unshare(nix::sched::CloneFlags::CLONE_VM) {
        Ok(()) => Ok(()),
        Err(Errno::EINVAL) => Err(ForkError::Threaded),
        Err(e) => Err(ForkError::Sys(e)),
    }
}

/// `struct clone_args` of clone3(2), version 2 (88 bytes: up to the `cgroup` field).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3's CLONE_INTO_CGROUP (Linux 5.7), not in every libc crate version.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The namespace flags `clone_into_namespaces` accepts: nothing that shares memory, files or
/// signal handlers with the parent, so the child is a plain copy as after fork(2).
const NAMESPACE_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP;

/// clone3 with fork semantics (the child continues on a copy of the caller's stack) into the new
/// namespaces named by `ns_flags` (only `CLONE_NEW*` flags), returning a pidfd for the child in
/// the parent. Refuses, like [`fork`], to run in a process with more than one thread.
///
/// With `cgroup` (a cgroup v2 directory), the child is born in that cgroup (CLONE_INTO_CGROUP):
/// no instant of it runs outside its limits.
pub fn clone_into_namespaces(
    ns_flags: libc::c_int,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<CloneResult, ForkError> {
    if ns_flags & !NAMESPACE_FLAGS != 0 {
        return Err(ForkError::NotNamespaceFlags(ns_flags));
    }
    check_single_threaded()?;
    let mut pidfd: libc::c_int = -1;
    let mut args = CloneArgs {
        flags: ns_flags as u64 | libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd.as_raw_fd() as u64;
    }
    // SAFETY: `args` is a valid clone_args of the size we pass, `pidfd` outlives the call, and no
    // stack is given, so the child runs on a copy of this stack exactly as after fork(2). The
    // flags are namespace flags only (checked above: no CLONE_VM, CLONE_FILES, CLONE_THREAD...),
    // and this process was just found single-threaded, so no lock can be held by a thread that
    // does not exist in the child.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    match ret {
        -1 => Err(ForkError::Sys(Errno::last())),
        0 => Ok(CloneResult::Child),
        pid => Ok(CloneResult::Parent {
            child: Pid::from_raw(pid as libc::pid_t),
            // SAFETY: on success the kernel stored a new, open pidfd that nothing else owns.
            pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
        }),
    }
}

/// fork(2), refused (with [`ForkError::Threaded`]) unless the caller is single-threaded, which
/// is what makes it sound: the child then inherits no lock held by a thread it does not have.
/// The helper never starts a thread; neither do its forked children.
pub fn fork() -> Result<nix::unistd::ForkResult, ForkError> {
    check_single_threaded()?;
    // SAFETY: this process was just found to have one thread (and that thread is here), so the
    // child cannot inherit a lock held by another thread.
    unsafe { nix::unistd::fork() }.map_err(ForkError::Sys)
}

/// Send a signal to the process a pidfd refers to (never to a recycled pid).
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signo: libc::c_int) -> Result<(), Errno> {
    // SAFETY: plain syscall on a borrowed, open fd with a null siginfo, as the man page allows.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signo,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    Errno::result(ret).map(drop)
}

/// Close every file descriptor from `first` upwards.
pub fn close_fds_from(first: RawFd) -> Result<(), Errno> {
    // SAFETY: close_range only closes descriptors; callers own every fd at or above `first`
    // (they call it right before exec or right after fork, when nothing else uses them).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    Errno::result(ret).map(drop)
}

/// Bring the loopback interface of the current network namespace up.
pub fn loopback_up() -> Result<(), Errno> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the flags of the interface named in `req` into `req`.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the union member ifru_flags is the one SIOCGIFFLAGS just filled in.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, which names "lo" and carries the new flags.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// The start and end addresses of this process's argument and environment areas, as the kernel
/// records them (`/proc/self/stat` fields 48 to 51): what `/proc/PID/cmdline` and `environ` show.
fn arg_env_areas() -> Option<[(usize, usize); 2]> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces and parentheses) start at field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<usize> = rest
        .split_whitespace()
        .skip(45)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    match fields[..] {
        [arg_start, arg_end, env_start, env_end] if arg_start < arg_end && env_start <= env_end => {
            Some([(arg_start, arg_end), (env_start, env_end)])
        }
        _ => None,
    }
}

/// Give this process a neutral name: its command line becomes `title` (the rest of the argument
/// area zeros), its environment area zeros, and its `comm` `title` too. For init, a fork of the
/// helper: otherwise `/proc/1/cmdline` inside the sandbox shows the helper's path and arguments
/// (the state directory, uid ranges) and `/proc/1/environ` the daemon's environment at start.
pub fn retitle(title: &str) -> Result<(), Errno> {
    let [(arg_start, arg_end), (env_start, env_end)] = arg_env_areas().ok_or(Errno::EINVAL)?;
    let title = title.as_bytes();
    if title.len() >= arg_end - arg_start {
        return Err(Errno::ENAMETOOLONG);
    }
    let arg = std::ptr::with_exposed_provenance_mut::<u8>(arg_start);
    let env = std::ptr::with_exposed_provenance_mut::<u8>(env_start);
    // SAFETY: the ranges are this process's own argument and environment strings as the kernel
    // laid them out at exec (on the initial stack, mapped and writable for the whole life of the
    // process); `title` is shorter than the argument area, so every write stays inside it. Nothing
    // reads these bytes as anything but NUL-terminated strings: the helper cleared its environment
    // (no `environ` entry points there any more) and reads its arguments only at start, and both
    // areas end in NUL after this, so a late reader sees short strings, never unterminated ones.
    unsafe {
        std::ptr::write_bytes(arg, 0, arg_end - arg_start);
        std::ptr::copy_nonoverlapping(title.as_ptr(), arg, title.len());
        std::ptr::write_bytes(env, 0, env_end - env_start);
    }
    let name = std::ffi::CString::new(title).map_err(|_| Errno::EINVAL)?;
    nix::sys::prctl::set_name(&name)
}

/// The helper's own umask: nothing it creates is open to other users unless a mode says so
/// explicitly (directories a sandbox's host uid must traverse are `fchmod`ed to 0711); files the
/// daemon reads keep their group bits (the daemon's group).
pub const PRIVATE_UMASK: u32 = 0o027;

/// The umask a sandbox's processes start with, and the one its files (its root, `/etc`, what a
/// transfer creates) are made with: the conventional one, independent of the helper's.
pub const SANDBOX_UMASK: u32 = 0o022;

/// Set the calling process's umask.
pub fn set_umask(mask: u32) {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
}

/// Terminate the calling process at once, without running destructors or atexit handlers.
/// Used in forked children that must not flush buffers or unwind into the parent's code.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit is always safe to call; it never returns.
    unsafe { libc::_exit(code) }
}

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// Add mount attributes (never clear any) to the mount at `path`, and to every mount below it when
/// `recursive`. Adding restrictions is allowed inside a user namespace even on locked mounts.
pub fn mount_setattr(path: &std::ffi::CStr, recursive: bool, attr_set: u64) -> Result<(), Errno> {
    let mut attr = MountAttr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 } | libc::AT_NO_AUTOMOUNT;
    // SAFETY: `path` is a valid C string, `attr` a valid mount_attr of the size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    Errno::result(ret).map(drop)
}

/// Reset a signal to its default disposition (undoing, for instance, Rust's ignored SIGPIPE so
/// that the sandbox's commands see the defaults they expect).
pub fn reset_signal(signal: nix::sys::signal::Signal) -> Result<(), Errno> {
    let default = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigDfl,
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: installing SIG_DFL involves no handler code, so no handler can run unsafely.
    unsafe { nix::sys::signal::sigaction(signal, &default) }.map(drop)
}

/// Wrap a descriptor number in an `OwnedFd`, which closes it when dropped.
///
/// # Safety
/// `fd` must be open, and nothing else may own it: no other `OwnedFd`, `File` or socket object
/// closes it, now or later. (The wrappers below return `OwnedFd`s straight from the syscall, so
/// callers rarely need this.)
pub unsafe fn own_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller promises that `fd` is open and owned by nothing else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `open(2)`, returning the new descriptor owned (close-on-exec is the caller's flag to pass).
pub fn open<P: ?Sized + nix::NixPath>(
    path: &P,
    flags: nix::fcntl::OFlag,
    mode: nix::sys::stat::Mode,
) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::open(path, flags, mode)?;
    // SAFETY: a successful open returns a new descriptor that nothing else owns.
    Ok(unsafe { own_fd(fd) })
}

/// `openat(2)` relative to `dir` (`None`: the working directory), returning the new descriptor
/// owned. A wrong `dir` number makes the call fail or resolve elsewhere, never unsound.
pub fn openat<P: ?Sized + nix::NixPath>(
    dir: Option<RawFd>,
    path: &P,
    flags: nix::fcntl::OFlag,
    mode: nix::sys::stat::Mode,
) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(dir, path, flags, mode)?;
    // SAFETY: a successful openat returns a new descriptor that nothing else owns.
    Ok(unsafe { own_fd(fd) })
}

/// `openat2(2)` relative to `dir`, returning the new descriptor owned.
pub fn openat2<P: ?Sized + nix::NixPath>(
    dir: RawFd,
    path: &P,
    how: nix::fcntl::OpenHow,
) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat2(dir, path, how)?;
    // SAFETY: a successful openat2 returns a new descriptor that nothing else owns.
    Ok(unsafe { own_fd(fd) })
}

/// A close-on-exec duplicate of `fd` numbered `min` or above (`F_DUPFD_CLOEXEC`).
pub fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> Result<OwnedFd, Errno> {
    let new = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))?;
    // SAFETY: a successful F_DUPFD_CLOEXEC returns a new descriptor that nothing else owns.
    Ok(unsafe { own_fd(new) })
}

/// Receive one message of at most `buf.len()` bytes and up to `N` descriptors (SCM_RIGHTS,
/// close-on-exec) on a unix socket: the number of bytes and the descriptors, owned.
pub fn recv_with_fds<const N: usize>(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, Vec<OwnedFd>), Errno> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut space = nix::cmsg_space!([RawFd; N]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: descriptors received with SCM_RIGHTS are new in this process; nothing
            // else owns them.
            fds.extend(received.into_iter().map(|fd| unsafe { own_fd(fd) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// Unlock the slave of a pseudo-terminal master (`unlockpt`), so that it can be opened.
pub fn pty_unlock(master: BorrowedFd<'_>) -> Result<(), Errno> {
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int through the pointer, which points at a live local.
    Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) }).map(drop)
}

/// Open the slave of a pseudo-terminal master through the master itself (TIOCGPTPEER, Linux
/// 4.13): no path is resolved, so the slave is certainly the one of this master's devpts.
pub fn pty_peer(master: BorrowedFd<'_>) -> Result<OwnedFd, Errno> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes its flags by value and returns a new descriptor or -1.
    let fd = Errno::result(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) })?;
    // SAFETY: on success the kernel returned a new, open descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Set a terminal's window size (TIOCSWINSZ); the foreground process group gets SIGWINCH.
pub fn set_window_size(tty: BorrowedFd<'_>, cols: u16, rows: u16) -> Result<(), Errno> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize through the pointer, which points at a live local.
    Errno::result(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSWINSZ, &size) }).map(drop)
}

/// Make `tty` the controlling terminal of the calling session leader (TIOCSCTTY, without
/// stealing it from another session).
pub fn set_controlling_tty(tty: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: TIOCSCTTY takes an int argument by value (0: do not steal).
    Errno::result(unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCSCTTY, 0) }).map(drop)
}

/// The id of the mount an open descriptor is on (statx `STATX_MNT_ID`, Linux 5.8): how the file
/// worker checks that a write lands on `/work` without trusting any path.
pub fn mount_id(fd: BorrowedFd<'_>) -> Result<u64, Errno> {
    // SAFETY: statx is plain old data; zeroed is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: an empty, NUL-terminated path with AT_EMPTY_PATH makes statx describe `fd` itself;
    // `stx` is a valid, writable statx buffer that outlives the call.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    Errno::result(ret)?;
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(Errno::ENOSYS);
    }
    Ok(stx.stx_mnt_id)
}

pub const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// open_tree(2) with OPEN_TREE_CLONE: a detached copy of the mount tree at `path` below `dir`
/// (not recursive), returned as a descriptor. Needs CAP_SYS_ADMIN in the mount namespace's owner.
pub fn open_tree_clone(dir: BorrowedFd<'_>, path: &std::ffi::CStr) -> Result<OwnedFd, Errno> {
    // SAFETY: `path` is a valid C string; the flags ask for a new descriptor, which we own.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            path.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    // SAFETY: on success open_tree returned a new descriptor that nothing else owns.
    Errno::result(ret).map(|fd| unsafe { own_fd(fd as RawFd) })
}

/// Make the detached mount `tree` idmapped through the user namespace `userns` (and add the
/// attributes in `attr_set`): see mount_setattr(2), MOUNT_ATTR_IDMAP.
pub fn idmap_detached_mount(
    tree: BorrowedFd<'_>,
    userns: BorrowedFd<'_>,
    attr_set: u64,
) -> Result<(), Errno> {
    let mut attr = MountAttr {
        attr_set: attr_set | MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: an empty C string with AT_EMPTY_PATH names `tree` itself; `attr` is a valid
    // mount_attr of the size we pass, and the kernel only reads it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &mut attr as *mut MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    Errno::result(ret).map(drop)
}

/// Attach the detached mount `tree` at `target` (move_mount(2) with MOVE_MOUNT_F_EMPTY_PATH).
pub fn attach_mount(tree: BorrowedFd<'_>, target: &std::ffi::CStr) -> Result<(), Errno> {
    // SAFETY: both strings are valid C strings; the call only reads them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    Errno::result(ret).map(drop)
}

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
/// The loop device detaches itself when its last user (the mounted filesystem) lets go.
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of <linux/loop.h>.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Number of a free loop device (LOOP_CTL_GET_FREE on /dev/loop-control).
pub fn loop_get_free(control: BorrowedFd<'_>) -> Result<u32, Errno> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
    let ret = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
    Errno::result(ret).map(|n| n as u32)
}

/// Back the loop device `dev` with `backing` in one step (LOOP_CONFIGURE), auto-clearing.
pub fn loop_configure(dev: BorrowedFd<'_>, backing: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: an all-zero loop_config is valid (no offset, no size limit, no encryption).
    let mut config: LoopConfig = unsafe { std::mem::zeroed() };
    config.fd = backing.as_raw_fd() as u32;
    config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
    // SAFETY: LOOP_CONFIGURE reads a loop_config, which `config` is, for the call's duration.
    let ret = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_CONFIGURE as _,
            &config as *const LoopConfig,
        )
    };
    Errno::result(ret).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_is_refused_while_another_thread_exists() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        #[allow(clippy::disallowed_methods, reason = "the test needs a second thread")]
        let other = std::thread::spawn(move || rx.recv());
        assert!(matches!(check_single_threaded(), Err(ForkError::Threaded)));
        assert!(matches!(fork(), Err(ForkError::Threaded)));
        assert!(matches!(
            clone_into_namespaces(0, None),
            Err(ForkError::Threaded)
        ));
        tx.send(()).unwrap();
        other.join().unwrap().unwrap();
    }

    #[test]
    fn clone_takes_namespace_flags_only() {
        assert!(matches!(
            clone_into_namespaces(libc::CLONE_VM, None),
            Err(ForkError::NotNamespaceFlags(_))
        ));
        assert!(matches!(
            clone_into_namespaces(libc::CLONE_NEWPID | libc::CLONE_FILES, None),
            Err(ForkError::NotNamespaceFlags(_))
        ));
    }

    #[test]
    fn received_descriptors_are_owned() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        let (a, b) = UnixStream::pair().unwrap();
        let (mut r, mut w) = UnixStream::pair().unwrap();
        let fds = [r.as_raw_fd()];
        nix::sys::socket::sendmsg::<()>(
            a.as_raw_fd(),
            &[std::io::IoSlice::new(b"ok\n")],
            &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .unwrap();
        let mut buf = [0u8; 8];
        let (len, received) = recv_with_fds::<2>(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..len], b"ok\n");
        assert_eq!(received.len(), 1);
        let mut copy = std::fs::File::from(received.into_iter().next().unwrap());
        w.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        copy.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"x");
        drop(copy);
        // The original end still works: the received copy was a new descriptor.
        w.write_all(b"y").unwrap();
        r.read_exact(&mut byte).unwrap();
        assert_eq!(&byte, b"y");
    }
}
