//! Baseline hardening applied to init before the command is started; the command inherits it.

use caps::{CapSet, Capability};

use super::{step, SetupError};

fn caps_err(what: &'static str) -> impl Fn(caps::errors::CapsError) -> SetupError {
    move |_| SetupError {
        step: what.to_string(),
        source: nix::errno::Errno::last(),
    }
}

/// Keep `keep` (validated names: the default set of `sandboxd_protocol::capabilities`, or one the
/// operator allows) as the bounding, permitted and effective sets; clear the rest.
pub fn apply(keep: &[&str]) -> Result<(), SetupError> {
    let kept: caps::CapsHashSet = keep
        .iter()
        .filter_map(|name| name.parse::<Capability>().ok())
        .collect();
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
