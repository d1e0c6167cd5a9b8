//! The default seccomp filter of every sandboxed command, in the spirit of Docker's default
//! profile: an **allowlist** of ordinary syscalls; everything else fails with `EPERM`.
//!
//! Two filters are compiled (with `seccompiler`, as Firecracker does) and both installed in the
//! command's process just before `execve`; they are inherited across fork and exec.
//!
//! * `allow`: allowlisted syscalls pass, the rest answer `EPERM`. Unknown syscall numbers, and the
//!   x32 ABI's (bit `0x4000_0000` set on x86_64), are in no allowlist and so are denied too.
//! * `enosys`: `clone3` answers `ENOSYS`, so that libc falls back to `clone`, whose flags a
//!   classic BPF filter can inspect (`clone3` passes them in memory). The kernel runs every
//!   installed filter and the most restrictive answer wins: `ERRNO(ENOSYS)` over `ALLOW`.
//!
//! A syscall of another architecture (i386 `int 0x80` on x86_64, arm32 on aarch64) fails the
//! audit-arch check every seccompiler program starts with, whose action is fixed by seccompiler to
//! `KillProcess`: stricter than `Errno(ENOSYS)`, and a 32-bit binary cannot run at all.

use std::collections::HashMap;
use std::env::consts::ARCH;

use seccompiler::{BpfProgram, TargetArch};
use serde_json::{json, Value};

/// Allowed on every supported architecture, by group.
#[rustfmt::skip]
const ALLOWED: &[(&str, &[&str])] = &[
    // Files, directories, metadata, extended attributes.
    (
        "files",
        &[
            "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "preadv2",
            "pwritev", "pwritev2", "openat", "openat2", "close", "close_range", "lseek", "dup",
            "dup3", "fcntl", "ioctl", "flock", "fsync", "fdatasync", "sync", "syncfs",
            "sync_file_range", "fallocate", "fadvise64", "readahead", "truncate", "ftruncate",
            "fstat", "newfstatat", "statx", "statfs", "fstatfs", "faccessat", "faccessat2",
            "getcwd", "chdir", "fchdir", "getdents64", "mkdirat", "mknodat", "unlinkat",
            "renameat", "renameat2", "linkat", "symlinkat", "readlinkat", "fchmod", "fchmodat",
            "fchmodat2", "fchown", "fchownat", "umask", "utimensat", "getxattr", "lgetxattr",
            "fgetxattr", "setxattr", "lsetxattr", "fsetxattr", "listxattr", "llistxattr",
            "flistxattr", "removexattr", "lremovexattr", "fremovexattr", "copy_file_range",
            "sendfile", "splice", "tee", "vmsplice", "inotify_init1", "inotify_add_watch",
            "inotify_rm_watch", "fanotify_mark", "memfd_create", "chroot",
        ],
    ),
    // Asynchronous I/O (the old io_* API; io_uring is denied).
    (
        "aio",
        &[
            "io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents",
        ],
    ),
    // Waiting for descriptors, and descriptors for events, timers and signals.
    (
        "events",
        &[
            "epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "ppoll", "pselect6",
            "pipe2", "eventfd2", "timerfd_create", "timerfd_settime", "timerfd_gettime",
            "signalfd4",
        ],
    ),
    // Memory.
    (
        "memory",
        &[
            "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync", "mlock",
            "mlock2", "mlockall", "munlock", "munlockall", "membarrier", "remap_file_pages",
            "pkey_alloc", "pkey_free", "pkey_mprotect", "memfd_secret", "mseal",
            "map_shadow_stack", "get_mempolicy", "cachestat",
        ],
    ),
    // Processes and threads (`clone` and `unshare` are conditional, below).
    (
        "processes",
        &[
            "execve", "execveat", "exit", "exit_group", "wait4", "waitid", "set_tid_address",
            "set_robust_list", "get_robust_list", "rseq", "futex", "futex_waitv", "futex_wake",
            "futex_wait", "futex_requeue", "getpid", "getppid", "gettid", "getpgid", "setpgid",
            "getsid", "setsid", "prctl", "getpriority", "setpriority", "getrlimit", "setrlimit",
            "prlimit64", "getrusage", "times", "sched_yield", "sched_getaffinity",
            "sched_setaffinity", "sched_getparam", "sched_setparam", "sched_getscheduler",
            "sched_setscheduler", "sched_getattr", "sched_setattr", "sched_get_priority_max",
            "sched_get_priority_min", "sched_rr_get_interval", "getcpu", "ioprio_get",
            "ioprio_set", "capget", "capset", "restart_syscall", "seccomp",
            "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "pidfd_open",
            "pidfd_send_signal", "process_mrelease",
        ],
    ),
    // Debugging inside the sandbox, which is its own pid namespace (Docker allows these on
    // kernels >= 4.8, where seccomp can no longer be bypassed through ptrace).
    (
        "debugging",
        &[
            "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
        ],
    ),
    // Identities (only within the sandbox's user namespace).
    (
        "identity",
        &[
            "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid", "getgroups",
            "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid",
            "setfsgid", "setgroups",
        ],
    ),
    // Signals.
    (
        "signals",
        &[
            "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigsuspend",
            "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "sigaltstack", "kill",
            "tkill", "tgkill",
        ],
    ),
    // Time and timers (setting clocks needs CAP_SYS_TIME, which the sandbox lacks).
    (
        "time",
        &[
            "clock_gettime", "clock_getres", "clock_nanosleep", "clock_adjtime", "adjtimex",
            "gettimeofday", "nanosleep", "getitimer", "setitimer", "timer_create", "timer_settime",
            "timer_gettime", "timer_getoverrun", "timer_delete",
        ],
    ),
    // Sockets (`socket` itself is conditional, below); the network namespace has only `lo`.
    (
        "sockets",
        &[
            "socketpair", "bind", "listen", "accept", "accept4", "connect", "shutdown",
            "getsockname", "getpeername", "getsockopt", "setsockopt", "sendto", "recvfrom",
            "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
        ],
    ),
    // System V and POSIX IPC (the sandbox has its own ipc namespace).
    (
        "ipc",
        &[
            "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl",
            "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
            "mq_timedreceive", "mq_notify", "mq_getsetattr",
        ],
    ),
    // System information.
    ("system", &["uname", "sysinfo", "getrandom"]),
];

/// Allowed on x86_64 only: the legacy calls aarch64 never had, and x86's thread-pointer calls.
#[rustfmt::skip]
const ALLOWED_X86_64: &[&str] = &[
    "open", "creat", "stat", "lstat", "access", "chmod", "chown", "lchown", "mkdir", "mknod",
    "rmdir", "unlink", "rename", "link", "symlink", "readlink", "getdents", "utime", "utimes",
    "futimesat", "dup2", "pipe", "poll", "select", "epoll_create", "epoll_wait", "epoll_ctl_old",
    "epoll_wait_old", "eventfd", "signalfd", "inotify_init", "alarm", "pause", "time", "getpgrp",
    "fork", "vfork", "arch_prctl", "get_thread_area", "set_thread_area", "uretprobe",
];

/// Answered `ENOSYS` (by the second filter) so that libc falls back to a filterable call.
pub const ENOSYS: &[&str] = &["clone3"];

/// Never allowed: not in any allowlist, so they answer `EPERM`. Listed for review and tests.
#[rustfmt::skip]
pub const DENIED: &[&str] = &[
    // Keyrings are not namespaced.
    "keyctl", "add_key", "request_key",
    // Kernel attack surface that ordinary programs do not need.
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "lookup_dcookie",
    // The kernel itself.
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "syslog",
    // Mounts, beyond what setup needed (done before the filter).
    "mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsmount", "fspick",
    "mount_setattr", "quotactl", "quotactl_fd",
    // File handles bypass the mount namespace's view of the tree.
    "name_to_handle_at", "open_by_handle_at",
    // Entering other namespaces.
    "setns",
    // Clocks and host names (they would need capabilities the sandbox lacks anyway).
    "settimeofday", "clock_settime", "sethostname", "setdomainname",
];

/// `clone(2)`'s and `unshare(2)`'s flag that creates a user namespace, where the sandbox would
/// regain every capability, and with them kernel attack surface.
const CLONE_NEWUSER: u64 = 0x1000_0000;
/// `socket(2)`'s family for virtual-machine sockets, which no network namespace contains.
const AF_VSOCK: u64 = 40;
/// The `personality(2)` values Docker allows: `PER_LINUX`, `PER_LINUX32`, `UNAME26`,
/// `UNAME26|PER_LINUX32` and the query `0xffffffff`. The others (`ADDR_NO_RANDOMIZE`,
/// `READ_IMPLIES_EXEC`, ...) weaken the hardening of whatever the process execs next.
const PERSONALITIES: &[u64] = &[0x0, 0x8, 0x2_0000, 0x2_0008, 0xffff_ffff];

/// The policies, compiled once when the helper starts (default, and with nested user namespaces)
/// and inherited by every monitor and init through fork.
static COMPILED: std::sync::OnceLock<Result<(Filters, Filters), CompileError>> =
    std::sync::OnceLock::new();

/// Compile both variants of the policy for this machine; call once at helper start.
pub fn compile_at_start() -> Result<(), CompileError> {
    let result = COMPILED.get_or_init(|| {
        Ok((
            Filters::compile_with(ARCH, false)?,
            Filters::compile_with(ARCH, true)?,
        ))
    });
    result.as_ref().map(drop).map_err(Clone::clone)
}

/// The precompiled filters for a sandbox (compiled now if the helper did not do it at start).
pub fn precompiled(nested_user_namespaces: bool) -> Result<&'static Filters, CompileError> {
    compile_at_start()?;
    match COMPILED.get() {
        Some(Ok((default, nested))) => Ok(if nested_user_namespaces {
            nested
        } else {
            default
        }),
        Some(Err(e)) => Err(e.clone()),
        None => Err(CompileError {
            arch: ARCH.to_string(),
            reason: "not compiled".into(),
        }),
    }
}

/// The two compiled filters, installed in this order.
pub struct Filters {
    allow: BpfProgram,
    enosys: BpfProgram,
}

/// The policy could not be compiled for this machine.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no seccomp filter for architecture {arch}: {reason}")]
pub struct CompileError {
    pub arch: String,
    pub reason: String,
}

impl Filters {
    /// Compile the default policy for `arch` (`x86_64` or `aarch64`).
    #[cfg(test)]
    pub fn compile(arch: &str) -> Result<Filters, CompileError> {
        Filters::compile_with(arch, false)
    }

    /// Compile the policy for `arch`, with or without nested user namespaces.
    pub fn compile_with(arch: &str, nested_user_namespaces: bool) -> Result<Filters, CompileError> {
        let error = |reason: String| CompileError {
            arch: arch.to_string(),
            reason,
        };
        if let Some(name) = DENIED
            .iter()
            .find(|d| allowed_names(arch).any(|a| a == **d))
        {
            return Err(error(format!("{name} is both denied and allowed")));
        }
        let target = match arch {
            "x86_64" | "aarch64" => TargetArch::try_from(arch).map_err(|e| error(e.to_string()))?,
            _ => return Err(error("only x86_64 and aarch64 are supported".into())),
        };
        let policy = json!({
            "allow": {
                "mismatch_action": {"errno": libc::EPERM},
                "match_action": "allow",
                "filter": allow_rules(arch, nested_user_namespaces),
            },
            "enosys": {
                "mismatch_action": "allow",
                "match_action": {"errno": libc::ENOSYS},
                "filter": ENOSYS.iter().map(|s| json!({"syscall": s})).collect::<Vec<_>>(),
            },
        });
        let text = policy.to_string();
        let mut map: HashMap<String, BpfProgram> =
            seccompiler::compile_from_json(text.as_bytes(), target)
                .map_err(|e| error(e.to_string()))?;
        let mut take = |name: &str| map.remove(name).ok_or_else(|| error(format!("no {name}")));
        Ok(Filters {
            allow: take("allow")?,
            enosys: take("enosys")?,
        })
    }

    /// Install both filters on the calling thread (no_new_privs is already set). Irreversible.
    pub fn apply(&self) -> Result<(), nix::errno::Errno> {
        for program in [&self.allow, &self.enosys] {
            seccompiler::apply_filter(program).map_err(|e| match e {
                seccompiler::Error::Seccomp(io) | seccompiler::Error::Prctl(io) => io
                    .raw_os_error()
                    .map_or(nix::errno::Errno::EINVAL, nix::errno::Errno::from_raw),
                _ => nix::errno::Errno::EINVAL,
            })?;
        }
        Ok(())
    }
}

/// Every allowed syscall of `arch`, unconditional or with the conditions that allow it.
fn allow_rules(arch: &str, nested_user_namespaces: bool) -> Vec<Value> {
    let mut rules: Vec<Value> = allowed_names(arch)
        .map(|name| json!({"syscall": name}))
        .collect();
    let flags_without_newuser = json!([{
        "index": 0, "type": "qword", "op": {"masked_eq": CLONE_NEWUSER}, "val": 0,
    }]);
    // Threads and processes, but no new user namespace. (`clone`'s flags are its first argument on
    // both architectures.) Other namespaces would need CAP_SYS_ADMIN, which the sandbox lacks.
    if nested_user_namespaces {
        rules.push(json!({"syscall": "clone"}));
        rules.push(json!({"syscall": "unshare"}));
    } else {
        rules.push(json!({"syscall": "clone", "args": flags_without_newuser}));
        rules.push(json!({"syscall": "unshare", "args": flags_without_newuser}));
    }
    // clone3 is allowed here and answered ENOSYS by the second filter, whose answer wins.
    rules.extend(ENOSYS.iter().map(|name| json!({"syscall": name})));
    // Any socket family but AF_VSOCK, which would reach the host past the network namespace.
    rules.push(json!({"syscall": "socket", "args": [{
        "index": 0, "type": "dword", "op": "ne", "val": AF_VSOCK,
    }]}));
    for persona in PERSONALITIES {
        rules.push(json!({"syscall": "personality", "args": [{
            "index": 0, "type": "dword", "op": "eq", "val": persona,
        }]}));
    }
    rules
}

/// The unconditionally allowed syscalls of `arch`.
fn allowed_names(arch: &str) -> impl Iterator<Item = &'static str> {
    let legacy: &[&str] = if arch == "x86_64" {
        ALLOWED_X86_64
    } else {
        &[]
    };
    ALLOWED
        .iter()
        .flat_map(|(_, names)| names.iter())
        .chain(legacy)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_for_both_architectures() {
        for arch in ["x86_64", "aarch64"] {
            let filters = Filters::compile(arch).unwrap_or_else(|e| panic!("{e}"));
            // Within the classic BPF limit of 4096 instructions.
            assert!(
                filters.allow.len() < 4096,
                "{arch}: {}",
                filters.allow.len()
            );
            assert!(!filters.enosys.is_empty());
        }
    }

    #[test]
    fn other_architectures_are_refused_by_name() {
        let e = Filters::compile("riscv64")
            .err()
            .expect("riscv64 has no policy");
        assert!(e.to_string().contains("riscv64"), "{e}");
        assert!(Filters::compile("x86").is_err());
    }

    #[test]
    fn denied_syscalls_are_not_allowed() {
        let conditional = ["clone", "unshare", "socket", "personality"];
        for arch in ["x86_64", "aarch64"] {
            let allowed: Vec<&str> = allowed_names(arch).collect();
            for name in DENIED.iter().chain(ENOSYS).chain(&conditional) {
                assert!(!allowed.contains(name), "{name} is allowed on {arch}");
            }
            let mut sorted = allowed.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(
                sorted.len(),
                allowed.len(),
                "duplicates in the {arch} allowlist"
            );
        }
    }
}
