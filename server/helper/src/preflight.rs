//! What the host provides for the helper's mode, each missing piece with its fix: the
//! `preflight` of `GET /v1/info` and of `sbx doctor`. Facts are read from /proc, /etc and the
//! usual binary directories into [`Host`] (so the judgement is unit-tested on made-up hosts);
//! [`checks`] judges them. The daemon starts in whatever mode the host allows; these say what it
//! cannot enforce there and how to change that.

use std::path::{Path, PathBuf};

use sandboxd_protocol::wire::{Mode, PreflightCheck};

use crate::cgroup::{Cgroups, DELEGATION_FIX};

/// The facts the checks are made from.
#[derive(Debug, Clone, Default)]
pub struct Host {
    pub euid: u32,
    /// The helper's user name (from /etc/passwd), for the subordinate id files.
    pub user: Option<String>,
    /// `kernel.unprivileged_userns_clone` (Debian's switch; absent elsewhere).
    pub unprivileged_userns_clone: Option<u64>,
    pub max_user_namespaces: Option<u64>,
    /// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 23.10 and later).
    pub apparmor_restrict: Option<u64>,
    pub subuid: String,
    pub subgid: String,
    pub newuidmap: Option<PathBuf>,
    pub newgidmap: Option<PathBuf>,
    pub pasta: Option<PathBuf>,
    /// `major.minor` of the running kernel.
    pub kernel: (u32, u32),
    /// overlay is in /proc/filesystems.
    pub overlay: bool,
}

fn sysctl(name: &str) -> Option<u64> {
    std::fs::read_to_string(Path::new("/proc/sys").join(name.replace('.', "/")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The first executable `name` in the directories a distribution installs to (the helper runs
/// with an empty environment, so there is no PATH to search).
fn find_binary(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `6.1.0-48-amd64` → (6, 1).
fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

impl Host {
    pub fn read() -> Host {
        let euid = nix::unistd::geteuid();
        let read = |f: &str| std::fs::read_to_string(f).unwrap_or_default();
        Host {
            euid: euid.as_raw(),
            user: nix::unistd::User::from_uid(euid)
                .ok()
                .flatten()
                .map(|u| u.name),
            unprivileged_userns_clone: sysctl("kernel.unprivileged_userns_clone"),
            max_user_namespaces: sysctl("user.max_user_namespaces"),
            apparmor_restrict: sysctl("kernel.apparmor_restrict_unprivileged_userns"),
            subuid: read("/etc/subuid"),
            subgid: read("/etc/subgid"),
            newuidmap: find_binary("newuidmap"),
            newgidmap: find_binary("newgidmap"),
            pasta: find_binary("pasta"),
            kernel: kernel_version(&read("/proc/sys/kernel/osrelease")),
            overlay: read("/proc/filesystems")
                .lines()
                .any(|l| l.split_whitespace().last() == Some("overlay")),
        }
    }

    /// The helper user's entry (`first:count`) in a subordinate id file, by name or by uid.
    fn subordinate(&self, text: &str) -> Option<String> {
        let uid = self.euid.to_string();
        text.lines().find_map(|l| {
            let mut f = l.trim().split(':');
            let who = f.next()?;
            let (first, count) = (f.next()?, f.next()?);
            (who == uid || Some(who) == self.user.as_deref()).then(|| format!("{first}:{count}"))
        })
    }
}

fn check(name: &str, ok: bool, detail: String, fix: Option<String>) -> PreflightCheck {
    PreflightCheck {
        name: name.to_owned(),
        ok,
        detail,
        fix: if ok { None } else { fix },
    }
}

/// Judge the host for `mode`. `cgroups` is what the helper set up at start.
pub fn checks(mode: Mode, host: &Host, cgroups: &Cgroups) -> Vec<PreflightCheck> {
    let mut out = Vec::new();
    let enforced = cgroups.enforceable();
    let all_limits = ["memory", "cpus", "pids"]
        .iter()
        .all(|l| enforced.iter().any(|e| e == l));
    let cgroup_detail = if all_limits {
        match cgroups.v2_base() {
            Some(base) => format!(
                "memory, cpus and pids limits are enforced (cgroup v2, below {})",
                base.display()
            ),
            None => "memory, cpus and pids limits are enforced".to_owned(),
        }
    } else {
        format!(
            "enforced: {}; {}",
            if enforced.is_empty() {
                "none".to_owned()
            } else {
                enforced.join(", ")
            },
            cgroups
                .why_unenforceable()
                .unwrap_or_else(|| "a controller is missing".into())
        )
    };
    if mode == Mode::Privileged {
        out.push(check(
            "user_namespaces",
            true,
            "the privileged helper creates user namespaces as root".into(),
            None,
        ));
        out.push(check(
            "cgroup_limits",
            all_limits,
            cgroup_detail,
            Some("see deploy/cgroups.md".into()),
        ));
        out.push(check(
            "uid_isolation",
            true,
            "each sandbox gets a range of 65536 host uids of its own, reserved host-wide".into(),
            None,
        ));
        return out;
    }

    // Rootless: the kernel must let an ordinary user make user namespaces.
    let clone_off = host.unprivileged_userns_clone == Some(0);
    let max_zero = host.max_user_namespaces == Some(0);
    out.push(check(
        "user_namespaces",
        !clone_off && !max_zero,
        match (clone_off, max_zero) {
            (true, _) => "kernel.unprivileged_userns_clone is 0".into(),
            (_, true) => "user.max_user_namespaces is 0".into(),
            _ => format!(
                "unprivileged user namespaces are allowed (user.max_user_namespaces = {})",
                host.max_user_namespaces.unwrap_or(0)
            ),
        },
        Some(if clone_off {
            "sysctl -w kernel.unprivileged_userns_clone=1 (and set it in /etc/sysctl.d/)".into()
        } else {
            "sysctl -w user.max_user_namespaces=15000 (and set it in /etc/sysctl.d/)".into()
        }),
    ));
    let restricted = host.apparmor_restrict == Some(1);
    out.push(check(
        "apparmor_userns",
        !restricted,
        if restricted {
            "kernel.apparmor_restrict_unprivileged_userns is 1: AppArmor denies unconfined \
             programs capabilities in the user namespaces they create"
                .into()
        } else {
            "AppArmor does not restrict unprivileged user namespaces".into()
        },
        Some(
            "install an AppArmor profile that allows user namespaces to sandboxd-helper, e.g. \
             /etc/apparmor.d/sandboxd-helper: `abi <abi/4.0>, include <tunables/global> profile \
             sandboxd-helper /usr/local/bin/sandboxd-helper flags=(unconfined) { userns, }` and \
             `apparmor_parser -r /etc/apparmor.d/sandboxd-helper`; or, host-wide, sysctl -w \
             kernel.apparmor_restrict_unprivileged_userns=0"
                .into(),
        ),
    ));
    let overlay_ok = host.overlay && host.kernel >= (5, 11);
    out.push(check(
        "overlayfs_userns",
        overlay_ok,
        if overlay_ok {
            format!(
                "overlayfs mounts in a user namespace (kernel {}.{})",
                host.kernel.0, host.kernel.1
            )
        } else if !host.overlay {
            "overlayfs is not available (not in /proc/filesystems)".into()
        } else {
            format!(
                "kernel {}.{} cannot mount overlayfs in a user namespace (5.11 or newer can)",
                host.kernel.0, host.kernel.1
            )
        },
        Some(if host.overlay {
            "run a kernel 5.11 or newer for image sandboxes of a rootless daemon".into()
        } else {
            "modprobe overlay (and list it in /etc/modules-load.d/)".into()
        }),
    ));
    out.push(check(
        "cgroup_limits",
        all_limits,
        cgroup_detail,
        Some(format!(
            "for memory, cpus and pids limits: {DELEGATION_FIX}"
        )),
    ));
    out.push(check(
        "uid_isolation",
        false,
        format!(
            "every sandbox of this rootless daemon runs as host uid {}: sandboxes share one uid \
             and its per-user kernel limits",
            host.euid
        ),
        Some(
            "run sandboxd as root (it drops to --user; only its helper keeps privileges) for a \
             uid range per sandbox; per-sandbox subordinate id slices are not implemented yet"
                .into(),
        ),
    ));
    let user = host.user.clone().unwrap_or_else(|| host.euid.to_string());
    let (subuid, subgid) = (
        host.subordinate(&host.subuid),
        host.subordinate(&host.subgid),
    );
    out.push(check(
        "subordinate_ids",
        subuid.is_some() && subgid.is_some(),
        match (&subuid, &subgid) {
            (Some(u), Some(g)) => format!("{user} has subuid {u} and subgid {g}"),
            _ => format!("{user} has no entry in /etc/subuid or /etc/subgid"),
        },
        Some(format!(
            "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user} (pick a \
             range no other user has)"
        )),
    ));
    let maps = host.newuidmap.is_some() && host.newgidmap.is_some();
    out.push(check(
        "newuidmap",
        maps,
        match (&host.newuidmap, &host.newgidmap) {
            (Some(u), Some(g)) => format!("found {} and {}", u.display(), g.display()),
            _ => "newuidmap or newgidmap is not installed".into(),
        },
        Some("apt-get install uidmap (dnf install shadow-utils)".into()),
    ));
    out.push(check(
        "pasta",
        host.pasta.is_some(),
        match &host.pasta {
            Some(p) => format!("found {}", p.display()),
            None => {
                "pasta is not installed: a rootless daemon offers network mode none only".into()
            }
        },
        Some("apt-get install passt".into()),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Layout;

    fn names_failing(checks: &[PreflightCheck]) -> Vec<&str> {
        checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[test]
    fn a_bare_host_names_every_missing_piece_with_its_fix() {
        let host = Host {
            euid: 1002,
            user: Some("alice".into()),
            unprivileged_userns_clone: Some(0),
            apparmor_restrict: Some(1),
            kernel: (5, 10),
            overlay: true,
            ..Host::default()
        };
        let cg = Cgroups::setup(Layout::None, "p".into(), false, "");
        let checks = checks(Mode::Rootless, &host, &cg);
        assert_eq!(
            names_failing(&checks),
            vec![
                "user_namespaces",
                "apparmor_userns",
                "overlayfs_userns",
                "cgroup_limits",
                "uid_isolation",
                "subordinate_ids",
                "newuidmap",
                "pasta"
            ]
        );
        for c in &checks {
            assert!(c.fix.as_deref().is_some_and(|f| !f.is_empty()), "{c:?}");
        }
        let fix = |n: &str| {
            checks
                .iter()
                .find(|c| c.name == n)
                .and_then(|c| c.fix.clone())
                .unwrap()
        };
        assert!(fix("user_namespaces").contains("kernel.unprivileged_userns_clone=1"));
        assert!(fix("subordinate_ids").contains("alice"));
        assert!(fix("cgroup_limits").contains("Delegate=yes"));
        assert!(fix("pasta").contains("passt"));
    }

    #[test]
    fn a_prepared_host_passes_all_but_what_is_not_built() {
        let host = Host {
            euid: 1002,
            user: Some("alice".into()),
            unprivileged_userns_clone: Some(1),
            max_user_namespaces: Some(15000),
            apparmor_restrict: None,
            subuid: "bob:1:2\n1002:100000:65536\n".into(),
            subgid: "alice:100000:65536\n".into(),
            newuidmap: Some("/usr/bin/newuidmap".into()),
            newgidmap: Some("/usr/bin/newgidmap".into()),
            pasta: Some("/usr/bin/pasta".into()),
            kernel: (6, 1),
            overlay: true,
        };
        let cg = Cgroups::setup(Layout::None, "p".into(), false, "");
        let checks = checks(Mode::Rootless, &host, &cg);
        assert_eq!(
            names_failing(&checks),
            vec!["cgroup_limits", "uid_isolation"]
        );
        let sub = checks.iter().find(|c| c.name == "subordinate_ids").unwrap();
        assert!(
            sub.detail.contains("100000:65536") && sub.fix.is_none(),
            "{sub:?}"
        );
        assert_eq!(kernel_version("6.18.44-fc-v1147"), (6, 18));
    }
}
