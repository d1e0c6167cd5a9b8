//! The filter's own seccomp filter, installed by itself once its sockets are adopted and its
//! runtime is built, before it reads a byte from a sandbox. A deny list of what the filter never
//! needs once serving and what would let a compromised filter reach beyond its sockets: it runs
//! as the daemon's uid, and the helper's and the daemon's own unix sockets accept that uid.
//!
//! Denied (EPERM): opening files (it opens none after start), sockets of any family but IPv4
//! (no unix, netlink or packet socket), executing a program, tracing or reading other processes,
//! `kill`, new namespaces (`unshare`, `setns`, `clone` with a `CLONE_NEW*` flag), mounts, BPF,
//! io_uring, userfaultfd, perf events and keyrings. `clone3` answers ENOSYS, so that the C
//! library falls back to `clone`, whose flags a seccomp filter can read.

use std::collections::BTreeMap;

use seccompiler::{
    apply_filter_all_threads, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp,
    SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("this architecture has no seccomp filter here")]
    Arch,
    #[error("build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    #[error("compile the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    #[error("the seccomp filter is not in force: {0} was not refused")]
    NotInForce(&'static str),
}

fn arch() -> Result<TargetArch, SeccompError> {
    if cfg!(target_arch = "x86_64") {
        Ok(TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(TargetArch::aarch64)
    } else {
        Err(SeccompError::Arch)
    }
}

/// System calls denied whatever their arguments.
fn denied() -> Vec<libc::c_long> {
    let mut calls = vec![
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_socketpair,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kill,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_bpf,
        libc::SYS_io_uring_setup,
        libc::SYS_userfaultfd,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_open, libc::SYS_creat]);
    calls
}

/// `CLONE_NEW*` flags, each checked on its own (a rule's conditions are all required; a
/// syscall's rules are alternatives).
const CLONE_NAMESPACES: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, SeccompError> {
    SeccompRule::new(conditions).map_err(SeccompError::Build)
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(SeccompError::Build)
}

/// The two programs: the EPERM deny list, and ENOSYS for `clone3`.
fn programs() -> Result<[BpfProgram; 2], SeccompError> {
    let arch = arch()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied().into_iter().map(|nr| (nr, Vec::new())).collect();
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(
            0,
            SeccompCmpOp::Ne,
            libc::AF_INET as u64,
        )?])?],
    );
    let clone_rules = CLONE_NAMESPACES
        .iter()
        .map(|flag| {
            let flag = *flag as u64;
            rule(vec![cond(0, SeccompCmpOp::MaskedEq(flag), flag)?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(SeccompError::Build)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(SeccompError::Build)?;
    Ok([
        deny.try_into().map_err(SeccompError::Compile)?,
        clone3.try_into().map_err(SeccompError::Compile)?,
    ])
}

/// Install both programs on every thread of the process (and so on every later one), then
/// check that they hold: opening a file and making a unix socket must both fail with EPERM.
pub fn install() -> Result<(), SeccompError> {
    for program in programs()? {
        apply_filter_all_threads(&program).map_err(SeccompError::Install)?;
    }
    let refused = |r: std::io::Result<()>| r.is_err_and(|e| e.raw_os_error() == Some(libc::EPERM));
    if !refused(std::fs::File::open("/proc/self/status").map(drop)) {
        return Err(SeccompError::NotInForce("opening a file"));
    }
    if !refused(std::os::unix::net::UnixDatagram::unbound().map(drop)) {
        return Err(SeccompError::NotInForce("a unix socket"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_compile() {
        let [deny, clone3] = programs().expect("programs");
        assert!(deny.len() > denied().len());
        assert!(!clone3.is_empty());
    }
}
