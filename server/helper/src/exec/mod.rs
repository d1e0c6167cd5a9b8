//! Execs: extra processes in a running sandbox, owned by the sandbox's monitor exactly like the
//! main command (each is a [`crate::process::Process`], as the main command is), so that a daemon
//! restart neither kills an exec nor loses a byte of its output or its stdin/terminal.
//!
//! This module validates an exec request again ([`plan`](Context::plan)), creates
//! `execs/<id>/` (output files handed to the daemon's uid), clones the shim that joins the
//! sandbox ([`join`]) and returns the new process; the monitor's event loop drains it, feeds its
//! stdin and, once it has ended, has [`write_status`] record it in `execs/<id>/status.json`.
//! The wire format of the requests is `sandboxd_protocol::exec`.

pub mod join;

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{pipe2, Gid, Pid, Uid};
use sandboxd_protocol::exec::{ExecRequest, ExecStatus, EXECS_DIR, MAX_RUNNING_EXECS, NOT_RUNNING};
use sandboxd_protocol::layout::{OUTPUT_INDEX, OUTPUT_LOG};
use uuid::Uuid;

use crate::child::SpawnGuard;
use crate::output::{now_ms, OutputError, OutputLog};
use crate::process::{Outputs, Process};
use crate::sys::{self, CloneResult};
use crate::validate::{valid_env_name, IdMap};

const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 1024;

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

/// The sandbox as an exec's start sees it at one moment.
pub struct Sandbox<'a> {
    pub dir: BorrowedFd<'a>,
    pub init: BorrowedFd<'a>,
    pub running: bool,
    /// Execs running now.
    pub execs: usize,
}

impl Context {
    /// Start an exec: validate the request, create its directory and output files, clone the
    /// shim (born in the sandbox's cgroup on v2) and return the new process. The shim reports on
    /// its status pipe; the terminal, if any, arrives through the event loop.
    pub fn start(&self, req: ExecRequest, sandbox: &Sandbox<'_>) -> Result<Process, String> {
        if !sandbox.running {
            return Err(NOT_RUNNING.into());
        }
        if sandbox.execs >= MAX_RUNNING_EXECS {
            return Err(format!("at most {MAX_RUNNING_EXECS} execs may run at once"));
        }
        let plan = self.plan(&req)?;
        let dir = create_exec_dir(sandbox.dir, req.id)?;
        let daemon_file = |name: &str| -> Result<File, String> {
            let fd = sys::openat(
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
                Some(Uid::from_raw(self.daemon_uid)),
                Some(Gid::from_raw(self.daemon_gid)),
            )
            .map_err(|e| format!("handing {name} to the daemon: {e}"))?;
            Ok(File::from(fd))
        };
        let output = OutputLog::new(
            daemon_file(OUTPUT_LOG)?,
            daemon_file(OUTPUT_INDEX)?,
            self.output_cap,
        );

        let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
        let (status_r, status_w) = pipe()?;
        let mut fds = join::ShimFds {
            sandbox: sandbox
                .init
                .try_clone_to_owned()
                .map_err(|e| format!("duplicating the pidfd: {e}"))?,
            user_ns: dup_ns(&self.namespaces.user)?,
            other_ns: self
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
        // Our ends.
        let mut stdin_w = None;
        let outputs = if req.tty {
            let (mine, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
            fds.pty_socket = Some(OwnedFd::from(theirs));
            Outputs::Terminal {
                socket: mine,
                stdin: req.stdin,
            }
        } else {
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            fds.stdout = Some(out_w);
            fds.stderr = Some(err_w);
            if req.stdin {
                let (in_r, in_w) = pipe()?;
                fds.stdin = Some(in_r);
                stdin_w = Some(in_w);
            }
            Outputs::Pipes {
                stdout: File::from(out_r),
                stderr: File::from(err_r),
            }
        };
        let cgroup = self.cgroup_v2.as_ref().map(|fd| fd.as_fd());
        let shim = match sys::clone_into_namespaces(0, cgroup).map_err(|e| format!("fork: {e}"))? {
            CloneResult::Child => {
                drop((outputs, stdin_w));
                join::run_shim(&plan, fds)
            }
            CloneResult::Parent { child, pidfd } => SpawnGuard::new(child, pidfd),
        };
        drop(fds);
        Ok(Process::new(
            req.id,
            dir,
            shim.keep(),
            status_r,
            outputs,
            stdin_w,
            output,
        ))
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
        let mut env = self.env.clone();
        for (k, v) in &req.env {
            if !valid_env_name(k) {
                return Err(format!("invalid environment variable name {k:?}"));
            }
            let prefix = format!("{k}=");
            env.retain(|kv| !kv.as_bytes().starts_with(prefix.as_bytes()));
            env.push(cstring(&format!("{k}={v}"), "env")?);
        }
        let cwd = match &req.cwd {
            None => self.cwd.clone(),
            Some(c) if c.starts_with('/') && !c.split('/').any(|p| p == "..") => cstring(c, "cwd")?,
            Some(_) => return Err("cwd must be an absolute path without '..'".into()),
        };
        let size = |n: u16, default: u16| if n == 0 { default } else { n };
        Ok(join::Plan {
            monitor: nix::unistd::getpid(),
            cgroup_procs: self.cgroup_procs.clone(),
            late_cgroup_ns: self.namespaces.late_cgroup,
            ids: self.ids,
            capabilities: self.capabilities.clone(),
            nested_user_namespaces: self.nested_user_namespaces,
            command,
            env,
            cwd,
            tty: req.tty.then(|| (size(req.cols, 80), size(req.rows, 24))),
        })
    }
}

/// Record an exec that has ended in its `status.json`, for the daemon (`owner`).
pub fn write_status(exec: &Process, owner: (u32, u32)) -> Result<(), OutputError> {
    let outcome = &exec.outcome;
    let never_ran = outcome.started_at_ms.is_none();
    let status = ExecStatus {
        exit_code: if never_ran {
            None
        } else {
            Some(outcome.end.map(|e| e.0).unwrap_or(255))
        },
        signal: outcome.end.and_then(|e| e.1),
        started_at_unix_ms: outcome.started_at_ms,
        finished_at_unix_ms: now_ms(),
        error: outcome
            .exec_error
            .clone()
            .or_else(|| outcome.setup_error.clone()),
        setup_failed: never_ran,
    };
    crate::output::write_status_file(exec.dir(), &status, owner)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn execs() -> Context {
        let null = || OwnedFd::from(File::open("/dev/null").expect("/dev/null opens"));
        Context {
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
        }
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
