//! Baseline hardening applied to init before the command is started; the command inherits it.

use caps::{CapSet, Capability};

use super::{step, SetupError};

/// The bounding set sandboxes keep: Docker's default set, enough for package managers and
/// servers, without CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_MODULE and friends.
const KEPT: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_MKNOD,
    Capability::CAP_NET_RAW,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_SETPCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

fn caps_err(what: &'static str) -> impl Fn(caps::errors::CapsError) -> SetupError {
    move |_| SetupError {
        step: what.to_string(),
        source: nix::errno::Errno::last(),
    }
}

pub fn apply() -> Result<(), SetupError> {
    let kept: caps::CapsHashSet = KEPT.iter().copied().collect();
    for cap in caps::all() {
        if !kept.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap)
                .map_err(caps_err("dropping from the bounding set"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clearing ambient capabilities"))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(caps_err("clearing inheritable capabilities"))?;
    caps::set(None, CapSet::Effective, &kept)
        .map_err(caps_err("setting effective capabilities"))?;
    caps::set(None, CapSet::Permitted, &kept)
        .map_err(caps_err("setting permitted capabilities"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("prctl(PR_SET_NO_NEW_PRIVS)"))?;
    Ok(())
}
