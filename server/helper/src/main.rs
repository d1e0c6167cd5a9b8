//! `sandboxd-helper`: the only sandboxd process that may hold privileges.
//!
//! Started by `sandboxd` (as root in privileged mode, as the daemon's own user in rootless mode)
//! before the daemon drops its privileges. In this fixed order it:
//!
//! 1. ties its life to its parent's (PR_SET_PDEATHSIG, and the `--exit-with-stdin` lifeline pipe,
//!    which also works when an unprivileged daemon may not signal a root helper) — running
//!    sandboxes do not depend on it;
//! 2. sanitises itself: clears the environment, closes inherited descriptors, sets a private
//!    umask (`sys::PRIVATE_UMASK`: a sandbox's processes get `SANDBOX_UMASK` back), becomes
//!    non-dumpable;
//! 3. parses and checks its command line;
//! 4. opens `<state>/sandboxes` by descriptor and binds `<state>/helper/helper.sock` for the
//!    daemon's uid;
//! 5. prints `ready` on stdout and serves requests on one thread (see `server.rs`).
//!
//! It never starts a thread, so forking it (to start monitors) is always sound.
//!
//! # Layers
//!
//! The modules form an order, bottom to top; each uses only modules below it (`layers_test.rs`
//! holds the table and fails on any other `crate::` edge; ARCHITECTURE.md draws it):
//!
//! 1. leaves: `sys` (the only `unsafe`), `config`, `error`, `cgroup`;
//! 2. descriptors and file work by descriptor: `fds`, `fdfs`, `disk`; `uidrange` (host-wide
//!    reservation of the uid ranges);
//! 3. `validate` (requests into valid types), then `dirs` (the sandboxes directory's layout);
//! 4. process plumbing: `child`, `output`;
//! 5. per-sandbox work: `net`, `image`, `sandbox` (init and its root), `files`, `exec`;
//! 6. `monitor`, the top of per-sandbox code; `preflight` and `info`; `spawn` (a new sandbox's directory,
//!    image, cgroup, network and monitor, rolled back by a guard);
//! 7. `server`, which dispatches requests and hands each worker only what it needs; `main`.

mod cgroup;
mod child;
mod config;
mod dirs;
mod disk;
mod error;
mod exec;
mod fdfs;
mod fds;
mod files;
mod image;
mod info;
#[cfg(test)]
mod layers_test;
mod monitor;
mod net;
mod output;
mod preflight;
mod process;
mod sandbox;
mod server;
mod spawn;
mod sys;
mod uidrange;
mod validate;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use sandboxd_protocol::layout::{HELPER_DIR, HELPER_SOCKET};

use crate::config::Config;
use crate::dirs::SandboxesDir;

fn main() -> ExitCode {
    match run() {
        Ok(never) => match never {},
        Err(message) => {
            eprintln!("sandboxd-helper: {message}");
            ExitCode::FAILURE
        }
    }
}

enum Never {}

fn run() -> Result<Never, String> {
    // 1. Die with the daemon. Check the parent afterwards: it may have died before the prctl.
    let parent = nix::unistd::getppid();
    // SIGTERM (the parent-death signal, or a supervisor's) is taken through a signalfd by the
    // request loop, so the helper can release the network hub before it exits. Monitors unblock
    // it again (monitor.rs).
    let mut term = nix::sys::signal::SigSet::empty();
    term.add(Signal::SIGTERM);
    term.thread_block()
        .map_err(|e| format!("blocking SIGTERM: {e}"))?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(|e| format!("prctl: {e}"))?;
    if nix::unistd::getppid() != parent {
        return Err("the daemon exited during start-up".into());
    }

    // 2. Sanitise.
    let args: Vec<String> = std::env::args().skip(1).collect();
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    fds::close_all_except(&[]).map_err(|e| format!("closing inherited descriptors: {e}"))?;
    let sigterm = nix::sys::signalfd::SignalFd::with_flags(
        &term,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .map_err(|e| format!("signalfd: {e}"))?;
    sys::set_umask(sys::PRIVATE_UMASK);
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("prctl: {e}"))?;

    // 3. Configuration.
    let euid = nix::unistd::geteuid().as_raw();
    let config = Config::parse(args.into_iter(), euid).map_err(|e| e.to_string())?;
    // Privileged: the uid ranges, reserved host-wide for the helper's life.
    let _uid_reservation = match config.mode {
        sandboxd_protocol::wire::Mode::Privileged => {
            let (first, end) = config.id_range();
            let read = |f| std::fs::read_to_string(f).unwrap_or_default();
            let (passwd, group) = (read("/etc/passwd"), read("/etc/group"));
            let (subuid, subgid) = (read("/etc/subuid"), read("/etc/subgid"));
            uidrange::check_free(
                first,
                end,
                &[
                    ("/etc/passwd", &passwd),
                    ("/etc/group", &group),
                    ("/etc/subuid", &subuid),
                    ("/etc/subgid", &subgid),
                ],
            )
            .map_err(|e| e.to_string())?;
            Some(
                uidrange::reserve(
                    std::path::Path::new(uidrange::RESERVATIONS),
                    first,
                    end,
                    &config.state_dir,
                )
                .map_err(|e| error::error_chain(&e))?,
            )
        }
        sandboxd_protocol::wire::Mode::Rootless => None,
    };

    // 4. Directories and the socket, both reached through a descriptor of the state directory.
    let state = sys::open(
        &config.state_dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| {
        format!(
            "opening the state directory {}: {e}",
            config.state_dir.display()
        )
    })?;
    let sandboxes = SandboxesDir::open(&config.state_dir).map_err(|e| e.to_string())?;
    let images = image::ImageStore::open(&config.state_dir)?;
    let listener = bind_socket(&state, &config)?;
    // The hub of bridged sandboxes (privileged mode): opened again, or created.
    let network = net::Network::setup(std::os::fd::AsFd::as_fd(&state), &config)
        .map_err(|e| format!("setting up networking: {}", error::error_chain(&e)))?;

    // 5. Ready. Standard input may be the daemon's lifeline pipe: keep it on another descriptor.
    let lifeline = if config.exit_with_stdin {
        let stdin = std::io::stdin();
        let fd = sys::dup_at_least(std::os::fd::AsFd::as_fd(&stdin), 3)
            .map_err(|e| format!("keeping stdin: {e}"))?;
        Some(fd)
    } else {
        None
    };
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(b"ready\n").and_then(|()| stdout.flush());
    fds::stdio_to_devnull().map_err(|e| format!("stdio: {e}"))?;
    let layout = if config.no_cgroups {
        cgroup::Layout::None
    } else {
        cgroup::Layout::from_mountinfo(
            &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        )
    };
    let mut cgroups = cgroup::Cgroups::setup(
        layout,
        cgroup::parent_name(&config.state_dir),
        config.mode == sandboxd_protocol::wire::Mode::Privileged,
        &std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
    );
    if config.no_cgroups {
        cgroups.unavailable = Some("cgroups are disabled (--no-cgroups)".into());
    }
    if let Some(why) = &cgroups.unavailable {
        eprintln!("sandboxd-helper: resource limits are not enforceable: {why}");
    }
    // The seccomp policy is compiled once here; monitors and inits inherit it through fork.
    if let Err(e) = sandbox::seccomp::compile_at_start() {
        eprintln!("sandboxd-helper: {e}; every sandbox start will fail");
    }
    let helper = server::Helper {
        config,
        sandboxes,
        cgroups,
        images,
        lifeline,
        network,
        sigterm,
    };
    helper.serve(listener)
}

/// Bind `<state>/helper/helper.sock` for the daemon's uid. The socket lives in a directory of
/// the helper's own, so that the daemon (which owns the state directory) cannot swap a link in
/// between the bind and the chown and have root chown something else.
fn bind_socket(state: &std::os::fd::OwnedFd, config: &Config) -> Result<UnixListener, String> {
    match nix::sys::stat::mkdirat(
        Some(state.as_raw_fd()),
        HELPER_DIR,
        Mode::from_bits_truncate(0o700),
    ) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(format!("creating {HELPER_DIR}/: {e}")),
    }
    let dir = crate::sys::openat(
        Some(state.as_raw_fd()),
        HELPER_DIR,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| format!("opening {HELPER_DIR}/: {e}"))?;
    let st = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(|e| format!("{HELPER_DIR}/: {e}"))?;
    if st.st_uid != nix::unistd::geteuid().as_raw() || st.st_mode & 0o022 != 0 {
        return Err(format!(
            "{HELPER_DIR}/ must be owned by the helper's user and not writable by others"
        ));
    }
    // Only the daemon (by its group) passes through to its socket; nobody else reaches the
    // hub's namespace file (whose mode, 0444, the kernel fixes) or anything else in here.
    nix::unistd::fchown(dir.as_raw_fd(), None, Some(Gid::from_raw(config.allow_gid)))
        .map_err(|e| format!("{HELPER_DIR}/: {e}"))?;
    nix::sys::stat::fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(0o710))
        .map_err(|e| format!("{HELPER_DIR}/: {e}"))?;
    let dir = dir.as_raw_fd();
    match nix::unistd::unlinkat(
        Some(dir),
        HELPER_SOCKET,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    ) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(format!("removing a stale {HELPER_SOCKET}: {e}")),
    }
    let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(format!("/proc/self/fd/{dir}/{HELPER_SOCKET}"));
    nix::sys::stat::umask(old);
    let listener = listener.map_err(|e| format!("binding {HELPER_SOCKET}: {e}"))?;
    nix::unistd::fchownat(
        Some(dir),
        HELPER_SOCKET,
        Some(Uid::from_raw(config.allow_uid)),
        Some(Gid::from_raw(config.allow_gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| format!("handing {HELPER_SOCKET} to the daemon: {e}"))?;
    Ok(listener)
}
