//! File transfers in and out of a sandbox (`Request::Files`), done by a *file worker*.
//!
//! The helper validates the request (the spawn request exactly like a `Spawn`, the path and the
//! mode) and opens the sandbox's work directory by descriptor.
//!
//! *Running sandbox*: its monitor hands over init's user and mount namespaces (`ns` on
//! `monitor.sock`, SCM_RIGHTS; opened while init was still dumpable). The helper forks, the fork
//! forks the worker and exits; the worker joins both namespaces — it then sees exactly the
//! sandbox's root, its tmpfs mounts included — becomes root there (the sandbox's root uid on the
//! host), drops every capability and sets no_new_privs, and goes to step 5 below.
//!
//! *Created or exited sandbox* (no monitor): the fork clones the worker into new user, mount, pid
//! and ipc namespaces, writes its uid/gid maps (the sandbox's own range, or the daemon's uid
//! rootless) and exits. The worker, in this fixed order:
//!
//! 1. closes every descriptor but the transfer's connection, the work directory and the sync
//!    pipe, and waits for its maps;
//! 2. becomes root of its user namespace — on the host, the sandbox's root uid;
//! 3. builds the sandbox's root with the very code init uses ([`crate::sandbox::rootfs::build`])
//!    and pivots into it, so it sees what the sandbox sees and nothing of the host;
//! 4. drops every capability and sets no_new_privs ([`crate::sandbox::harden::apply`] with an
//!    empty set): from here on it is an ordinary process of the sandbox's host uid, which can
//!    touch only what the sandbox's root owns, even if a path resolution were wrong;
//! 5. resolves the path with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` and streams the
//!    content over the connection ([`worker`]).
//!
//! Either way the worker is a process of the sandbox's root uid without capabilities in a mount
//! namespace whose root is the sandbox's; the host's tree is not mounted there. Building the root
//! with init's own code means that a root from an image (overlay) is seen the same way before
//! start and after exit, and joining init's namespace means that a running sandbox's overlay is
//! never mounted twice.

mod archive;
mod chunks;
mod resolve;
mod worker;

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use nix::fcntl::OFlag;
use nix::unistd::{pipe2, ForkResult, Gid, Uid};
use sandboxd_protocol::files::{check_mode, SandboxPath};
use sandboxd_protocol::layout::{PRIVATE_DIR, SANDBOXES_DIR, WORK_DIR};
use sandboxd_protocol::wire::{self, FilesRequest, HelperError, HelperErrorCode, Response};

use crate::config::Config;
use crate::dirs::SandboxesDir;
use crate::image::ImageStore;
use crate::sys::{self, CloneResult};
use crate::validate::{self, IdMap, ValidSpawn};

/// The worker needs a mount namespace for the root, a pid namespace and an ipc namespace owned
/// by its user namespace to mount /proc and /dev/mqueue as init does; no network, uts or cgroup
/// namespace (it runs no command).
const NAMESPACES: libc::c_int =
    libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC;

/// A validated transfer: only this reaches the worker.
pub struct ValidFiles {
    pub spawn: ValidSpawn,
    pub op: sandboxd_protocol::files::FileOp,
    pub path: SandboxPath,
    pub mode: Option<u32>,
}

/// Why a transfer could not start; the request loop answers it as the wire's error
/// ([`FilesError::into_wire`]). Once a worker runs, it answers on the connection itself.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The request: its spawn, path or mode.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Dir(#[from] crate::dirs::DirError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error("opening monitor.lock")]
    OpenLock(#[source] nix::errno::Errno),
    #[error("the sandbox is being started; retry in a moment")]
    Starting,
    #[error("locking monitor.lock")]
    Lock(#[source] nix::errno::Errno),
    #[error("fork")]
    Fork(#[source] sys::ForkError),
}

impl FilesError {
    /// This error on the wire.
    pub fn into_wire(self) -> HelperError {
        let code = match self {
            FilesError::Dir(e) => return e.into_wire(),
            FilesError::Image(e) => return e.into_wire(),
            FilesError::Invalid(_) => HelperErrorCode::Invalid,
            FilesError::Starting => HelperErrorCode::Busy,
            FilesError::OpenLock(_) | FilesError::Lock(_) | FilesError::Fork(_) => {
                HelperErrorCode::SetupFailed
            }
        };
        crate::error::wire(code, &self)
    }
}

fn invalid(message: impl Into<String>) -> FilesError {
    FilesError::Invalid(message.into())
}

/// What a transfer needs of the helper: no more than its configuration, the sandboxes directory
/// and the image store (the request loop hands these over, not itself).
pub struct Context<'a> {
    pub config: &'a Config,
    pub sandboxes: &'a SandboxesDir,
    pub images: &'a ImageStore,
}

fn validate_files(req: &FilesRequest, cx: &Context<'_>) -> Result<ValidFiles, FilesError> {
    let spawn = validate::validate(&req.spawn, cx.config).map_err(|e| invalid(e.to_string()))?;
    let path = SandboxPath::parse(&req.path).map_err(|e| invalid(e.to_string()))?;
    path.check_for(req.op).map_err(|e| invalid(e.to_string()))?;
    let mode = req.mode.map(check_mode).transpose().map_err(invalid)?;
    Ok(ValidFiles {
        spawn,
        op: req.op,
        path,
        mode,
    })
}

/// Start a worker for `req` on `conn`. On success the worker owns the exchange and the cx
/// must close its copy of the connection; on failure the helper answers the error itself.
pub fn start(cx: &Context<'_>, req: &FilesRequest, conn: &UnixStream) -> Result<(), FilesError> {
    let files = validate_files(req, cx)?;
    let work = cx.sandboxes.open_work(files.spawn.id, files.spawn.ids)?;
    let work_path = cx
        .config
        .state_dir
        .join(SANDBOXES_DIR)
        .join(files.spawn.id.to_string())
        .join(PRIVATE_DIR)
        .join(WORK_DIR);
    // A running sandbox is reached through its init's namespaces, which its monitor holds; for
    // a created or exited one (no monitor) the worker builds the root itself.
    let namespaces = running_namespaces(cx, files.spawn.id);
    // A worker that builds the root itself holds `monitor.lock` shared for its whole life: a
    // start (whose monitor takes it exclusively) then waits until no transfer is in flight,
    // instead of mounting the same upper layer a second time; and a monitor that holds it
    // already means the sandbox is starting.
    let root_lock = match &namespaces {
        Some(_) => None,
        None => Some(share_monitor_lock(cx, files.spawn.id)?),
    };
    // A root built here from an image needs the image's lower layer, as init gets it.
    let image = match (&namespaces, &files.spawn.rootfs) {
        (None, crate::validate::Rootfs::Image { digest, .. }) => Some(match cx.config.mode {
            sandboxd_protocol::wire::Mode::Privileged => crate::sandbox::ImageLower::Idmapped(
                crate::image::idmapped_lower(cx.images, cx.config, digest, files.spawn.ids)?,
            ),
            sandboxd_protocol::wire::Mode::Rootless => {
                crate::sandbox::ImageLower::Path(crate::image::lower_path(cx.config, digest))
            }
        }),
        _ => None,
    };
    // SAFETY-relevant invariant: the helper is single-threaded, so forking it is sound.
    match sys::fork().map_err(FilesError::Fork)? {
        ForkResult::Parent { child } => {
            // The fork exits as soon as the worker has its maps.
            let _ = nix::sys::wait::waitpid(child, None);
            Ok(())
        }
        ForkResult::Child => {
            let code =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match namespaces {
                    Some(ns) => {
                        drop(work);
                        fork_joining_worker(&files, conn, ns)
                    }
                    None => clone_worker(&files, conn, work, &work_path, image, root_lock),
                }))
                .unwrap_or(1);
            sys::exit_now(code)
        }
    }
}

/// `monitor.lock` of a sandbox that does not run, locked shared (see `start`). Busy when a
/// monitor holds it: the sandbox is being started. (A raw flock: it must stay with the worker's
/// inherited copy of the descriptor when the helper closes its own.)
fn share_monitor_lock(cx: &Context<'_>, id: uuid::Uuid) -> Result<OwnedFd, FilesError> {
    use nix::fcntl::{FlockArg, OFlag};
    let dir = cx.sandboxes.open_dir(id)?;
    let lock = crate::sys::openat(
        Some(dir.as_raw_fd()),
        sandboxd_protocol::layout::MONITOR_LOCK,
        OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(FilesError::OpenLock)?;
    match crate::fdfs::flock(lock.as_raw_fd(), FlockArg::LockSharedNonblock) {
        Ok(()) => Ok(lock),
        Err(nix::errno::Errno::EWOULDBLOCK) => Err(FilesError::Starting),
        Err(e) => Err(FilesError::Lock(e)),
    }
}

/// Send a final frame on the transfer's connection (best effort: the daemon may be gone).
pub(crate) fn send(conn: &UnixStream, response: &Response) {
    if let Ok(frame) = wire::encode(response) {
        let mut conn = conn;
        let _ = conn.write_all(&frame);
    }
}

/// Ask the sandbox's monitor for init's user and mount namespaces (`ns` on its control socket).
/// `None` when no monitor answers: the sandbox is not running.
fn running_namespaces(cx: &Context<'_>, id: uuid::Uuid) -> Option<[OwnedFd; 2]> {
    let dir = cx.sandboxes.open_dir(id).ok()?;
    // Through the directory's descriptor: the helper's own directory, which nobody can swap.
    let path = format!(
        "/proc/self/fd/{}/{}",
        dir.as_raw_fd(),
        sandboxd_protocol::layout::MONITOR_SOCKET
    );
    let mut stream = UnixStream::connect(path).ok()?;
    let _ = stream.set_read_timeout(Some(MONITOR_TIMEOUT));
    let _ = stream.set_write_timeout(Some(MONITOR_TIMEOUT));
    stream
        .write_all(format!("{}\n", sandboxd_protocol::control::NAMESPACES).as_bytes())
        .ok()?;
    let mut buf = [0u8; 64];
    let (len, mut fds) = sys::recv_with_fds::<2>(stream.as_fd(), &mut buf).ok()?;
    let answered_ok = buf[..len].starts_with(b"ok\n");
    if !answered_ok || fds.len() != 2 {
        return None;
    }
    let mnt = fds.pop()?;
    let user = fds.pop()?;
    Some([user, mnt])
}

/// How long the helper waits for a monitor's answer to `ns`.
const MONITOR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// In the helper's fork, for a running sandbox: fork the worker, which joins init's user and
/// mount namespaces (so it sees exactly the sandbox's root, its tmpfs mounts included), and exit.
fn fork_joining_worker(files: &ValidFiles, conn: &UnixStream, ns: [OwnedFd; 2]) -> i32 {
    let fail = |step: &str, e: &dyn std::fmt::Display| {
        send(
            conn,
            &Response::Error(HelperError::new(
                HelperErrorCode::SetupFailed,
                format!("{step}: {e}"),
            )),
        );
        1
    };
    let keep = [conn.as_raw_fd(), ns[0].as_raw_fd(), ns[1].as_raw_fd()];
    if let Err(e) = crate::fds::close_all_except(&keep) {
        return fail("closing inherited descriptors", &e);
    }
    match sys::fork() {
        Err(e) => fail("fork", &e),
        Ok(ForkResult::Parent { .. }) => 0,
        Ok(ForkResult::Child) => {
            let [user, mnt] = ns;
            let joined = nix::sched::setns(&user, nix::sched::CloneFlags::CLONE_NEWUSER)
                .and_then(|()| nix::sched::setns(&mnt, nix::sched::CloneFlags::CLONE_NEWNS))
                .and_then(|()| nix::unistd::chdir("/"));
            drop((user, mnt));
            if let Err(e) = joined {
                sys::exit_now(fail("joining the sandbox's namespaces", &e));
            }
            if let Err(e) = become_root(files.spawn.ids) {
                sys::exit_now(fail("becoming the sandbox's root", &e));
            }
            if let Err(e) = crate::sandbox::harden::apply(&[]) {
                sys::exit_now(fail("dropping capabilities", &e));
            }
            let _ = conn.set_read_timeout(Some(worker::IDLE_TIMEOUT));
            let _ = conn.set_write_timeout(Some(worker::IDLE_TIMEOUT));
            limit_memory();
            sys::exit_now(worker::serve(files, conn))
        }
    }
}

/// In the helper's fork: clone the worker, give it its maps, and exit.
fn clone_worker(
    files: &ValidFiles,
    conn: &UnixStream,
    work: OwnedFd,
    work_path: &std::path::Path,
    image: Option<crate::sandbox::ImageLower>,
    root_lock: Option<OwnedFd>,
) -> i32 {
    let fail = |step: &str, e: &dyn std::fmt::Display| {
        send(
            conn,
            &Response::Error(HelperError::new(
                HelperErrorCode::SetupFailed,
                format!("{step}: {e}"),
            )),
        );
        1
    };
    // Nothing of the helper (its socket, other connections, other sandboxes) may reach the worker.
    let Ok((sync_r, sync_w)) = pipe2(OFlag::O_CLOEXEC) else {
        return fail("pipe", &"failed");
    };
    let image_fd = match &image {
        Some(crate::sandbox::ImageLower::Idmapped(fd)) => Some(fd.as_raw_fd()),
        _ => None,
    };
    let keep: Vec<_> = [
        conn.as_raw_fd(),
        work.as_raw_fd(),
        sync_r.as_raw_fd(),
        sync_w.as_raw_fd(),
    ]
    .into_iter()
    .chain(image_fd)
    .chain(root_lock.as_ref().map(|l| l.as_raw_fd()))
    .collect();
    if let Err(e) = crate::fds::close_all_except(&keep) {
        return fail("closing inherited descriptors", &e);
    }
    // As the monitor does: the child must start dumpable so that its uid_map belongs to us.
    if let Err(e) = nix::sys::prctl::set_dumpable(true) {
        return fail("prctl", &e);
    }
    match sys::clone_into_namespaces(NAMESPACES, None) {
        Err(e) => fail("clone", &e),
        Ok(CloneResult::Child) => {
            drop(sync_w);
            worker_main(files, conn, work, work_path, sync_r, image)
        }
        Ok(CloneResult::Parent { child, pidfd }) => {
            drop((sync_r, work, image, root_lock));
            if let Err(e) = crate::child::write_id_maps(child, files.spawn.ids) {
                let _ = sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL);
                let _ = nix::sys::wait::waitpid(child, None);
                return fail("writing the worker's id maps", &crate::child::chain(&e));
            }
            let _ = nix::sys::prctl::set_dumpable(false);
            let _ = (&std::fs::File::from(sync_w)).write_all(b"1");
            // The worker is reparented when we exit; it ends with its transfer.
            0
        }
    }
}

/// The worker: set up as described in the module documentation, then serve the transfer.
fn worker_main(
    files: &ValidFiles,
    conn: &UnixStream,
    work: OwnedFd,
    work_path: &std::path::Path,
    sync: OwnedFd,
    image: Option<crate::sandbox::ImageLower>,
) -> ! {
    let fail = |e: HelperError| -> ! {
        send(conn, &Response::Error(e));
        sys::exit_now(1)
    };
    let mut byte = [0u8; 1];
    if !matches!(nix::unistd::read(sync.as_raw_fd(), &mut byte), Ok(1)) {
        sys::exit_now(1);
    }
    drop(sync);
    if let Err(e) = become_root(files.spawn.ids) {
        fail(HelperError::new(
            HelperErrorCode::SetupFailed,
            format!("becoming the sandbox's root: {e}"),
        ));
    }
    let built =
        crate::sandbox::rootfs::build(&files.spawn, &work, work_path, files.spawn.ids, image)
            .and_then(|()| crate::sandbox::harden::apply(&[]));
    drop(work);
    if let Err(e) = built {
        fail(HelperError::new(
            HelperErrorCode::SetupFailed,
            format!("building the sandbox's root: {e}"),
        ));
    }
    // A transfer may wait on a slow client, but not forever on a vanished one.
    let _ = conn.set_read_timeout(Some(worker::IDLE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(worker::IDLE_TIMEOUT));
    limit_memory();
    let code = worker::serve(files, conn);
    sys::exit_now(code)
}

/// The worker's address space: it streams with small buffers, but the tar parser keeps a long
/// name or a pax header of an entry in memory, whatever size the archive claims. A hostile
/// archive makes the worker fail here, not the host run out of memory.
const WORKER_ADDRESS_SPACE: u64 = 1 << 30;

fn limit_memory() {
    use nix::sys::resource::{setrlimit, Resource};
    let _ = setrlimit(
        Resource::RLIMIT_AS,
        WORKER_ADDRESS_SPACE,
        WORKER_ADDRESS_SPACE,
    );
}

/// Root of the worker's user namespace (the sandbox's root uid on the host), non-dumpable.
fn become_root(ids: IdMap) -> Result<(), nix::errno::Errno> {
    let (g, u) = (Gid::from_raw(0), Uid::from_raw(0));
    nix::unistd::setresgid(g, g, g)?;
    if matches!(ids, IdMap::Range { .. }) {
        nix::unistd::setgroups(&[])?;
    }
    nix::unistd::setresuid(u, u, u)?;
    nix::sys::prctl::set_dumpable(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_errors_reach_the_wire_with_their_code() {
        let cases = [
            (invalid("bad mode"), HelperErrorCode::Invalid, "bad mode"),
            (
                FilesError::Starting,
                HelperErrorCode::Busy,
                "the sandbox is being started; retry in a moment",
            ),
            (
                FilesError::Lock(nix::errno::Errno::EIO),
                HelperErrorCode::SetupFailed,
                "locking monitor.lock: EIO: I/O error",
            ),
            (
                FilesError::Image(crate::image::ImageError::NotStored),
                HelperErrorCode::NotFound,
                "the image is not stored",
            ),
        ];
        for (error, code, message) in cases {
            let wire = error.into_wire();
            assert_eq!((wire.code, wire.message.as_str()), (code, message));
        }
    }
}
