//! A child's identity in its new user namespace: the maps its parent writes, and the switch to
//! root of the namespace the child makes itself.

use nix::unistd::{setgroups, setresgid, setresuid, Gid, Pid, Uid};

use super::ChildError;
use crate::validate::IdMap;

/// Write the uid/gid maps of `child` (a clone waiting at its [`super::Gate`]): the child cannot
/// map itself into a range it does not own.
pub fn write_id_maps(child: Pid, ids: IdMap) -> Result<(), ChildError> {
    let proc = format!("/proc/{child}");
    let write = |file: &'static str, content: &str| {
        std::fs::write(format!("{proc}/{file}"), content)
            .map_err(|source| ChildError::WriteIdMap { file, source })
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

/// Switch every id to root of the new user namespace, so that the host sees the mapped ids and
/// the process keeps no trace of the monitor's identity; then die with the parent and stay
/// non-dumpable (both settings are reset by the uid change, so they come after it).
pub fn become_root(ids: IdMap) -> Result<(), ChildError> {
    let step = |step: &'static str| move |source| ChildError::Identity { step, source };
    let root_g = Gid::from_raw(0);
    let root_u = Uid::from_raw(0);
    setresgid(root_g, root_g, root_g).map_err(step("setresgid"))?;
    if matches!(ids, IdMap::Range { .. }) {
        // Rootless namespaces have setgroups denied; there the group list is already empty.
        setgroups(&[]).map_err(step("setgroups"))?;
    }
    setresuid(root_u, root_u, root_u).map_err(step("setresuid"))?;
    // If the monitor dies, nothing would enforce the timeout, record the exit or answer a kill:
    // the sandbox dies with it.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(step("prctl(PR_SET_PDEATHSIG)"))?;
    // A uid change resets dumpability; keep the process out of reach of ptrace and /proc/N/mem.
    nix::sys::prctl::set_dumpable(false).map_err(step("prctl(PR_SET_DUMPABLE)"))
}
