//! The privilege drop of `main`: user lookup, setgroups/setresgid/setresuid, capability check and
//! `PR_SET_NO_NEW_PRIVS`. This is the only place in the daemon that uses `nix`, and it never
//! creates namespaces, mounts anything or forks.

use nix::unistd::{Gid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "user {0:?} does not exist: create it with `useradd --system --no-create-home {0}` or pass --user"
    )]
    NoSuchUser(String),
    #[error("looking up user {0:?}")]
    Lookup(String, #[source] nix::Error),
    #[error("refusing to run the daemon as root: --user {0:?} has uid 0")]
    UserIsRoot(String),
    #[error("setgroups failed")]
    SetGroups(#[source] nix::Error),
    #[error("setresgid failed")]
    SetGid(#[source] nix::Error),
    #[error("setresuid failed")]
    SetUid(#[source] nix::Error),
    #[error("reading /proc/self/status")]
    ReadStatus(#[source] std::io::Error),
    #[error("capabilities remain after dropping privileges ({0})")]
    CapabilitiesRemain(String),
    #[error("setting PR_SET_NO_NEW_PRIVS failed")]
    NoNewPrivs(#[source] nix::Error),
}

/// The account the daemon switches to when started as root.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

pub fn is_root() -> bool {
    Uid::effective().is_root()
}

pub fn current_uid() -> u32 {
    Uid::effective().as_raw()
}

/// Make every file the daemon creates private to its user unless a mode says otherwise (the
/// state directory is set to 0711 explicitly). Inherited by the helper, which sets its own.
pub fn set_private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

pub fn current_gid() -> u32 {
    Gid::effective().as_raw()
}

/// Look up `name` in the user database.
pub fn lookup_user(name: &str) -> Result<Target, PrivilegeError> {
    let user = User::from_name(name)
        .map_err(|e| PrivilegeError::Lookup(name.to_owned(), e))?
        .ok_or_else(|| PrivilegeError::NoSuchUser(name.to_owned()))?;
    if user.uid.is_root() {
        return Err(PrivilegeError::UserIsRoot(name.to_owned()));
    }
    Ok(Target {
        name: user.name,
        uid: user.uid,
        gid: user.gid,
    })
}

/// Become `target` for good: supplementary groups first, then the gid, then the uid (after which
/// the other two calls would no longer be permitted), then check that no capability survived.
pub fn drop_to(target: &Target) -> Result<(), PrivilegeError> {
    nix::unistd::setgroups(&[target.gid]).map_err(PrivilegeError::SetGroups)?;
    nix::unistd::setresgid(target.gid, target.gid, target.gid).map_err(PrivilegeError::SetGid)?;
    nix::unistd::setresuid(target.uid, target.uid, target.uid).map_err(PrivilegeError::SetUid)?;
    verify_no_capabilities()
}

/// Fail unless the effective and permitted capability sets are empty.
pub fn verify_no_capabilities() -> Result<(), PrivilegeError> {
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(PrivilegeError::ReadStatus)?;
    check_capabilities(&status)
}

fn check_capabilities(status: &str) -> Result<(), PrivilegeError> {
    for key in ["CapEff:", "CapPrm:"] {
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::trim)
            .ok_or_else(|| PrivilegeError::CapabilitiesRemain(format!("{key} missing")))?;
        if u64::from_str_radix(value, 16).ok() != Some(0) {
            return Err(PrivilegeError::CapabilitiesRemain(format!("{key} {value}")));
        }
    }
    Ok(())
}

/// Forbid gaining privileges through exec for this process and everything it starts.
pub fn set_no_new_privs() -> Result<(), PrivilegeError> {
    nix::sys::prctl::set_no_new_privs().map_err(PrivilegeError::NoNewPrivs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_check_reads_both_sets() {
        assert!(
            check_capabilities("CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n").is_ok()
        );
        assert!(
            check_capabilities("CapPrm:\t0000000000000000\nCapEff:\t0000000000000400\n").is_err()
        );
        assert!(check_capabilities("CapEff:\t0000000000000000\n").is_err());
    }
}
