//! What this host lets the helper do, read from /proc and /sys once per request.

use sandboxd_protocol::wire::{HelperInfo, Mode};

use crate::cgroup::{cgroup_mounts, Cgroups};
use crate::config::{Config, UID_RANGE_SIZE};

pub fn detect(config: &Config, limits: &Cgroups) -> HelperInfo {
    let user_namespaces = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    let overlayfs = std::fs::read_to_string("/proc/filesystems").is_ok_and(|s| {
        s.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    });
    let (cgroup_version, cgroup_controllers) =
        cgroups(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    HelperInfo {
        mode: config.mode,
        user_namespaces,
        cgroup_version,
        cgroup_controllers,
        overlayfs,
        uid_base: config.uid_base,
        uid_range_size: UID_RANGE_SIZE,
        uid_slots: config.uid_slots,
        enforceable_limits: {
            let mut l = limits.enforceable();
            if crate::disk::unavailable(config.mode == Mode::Privileged).is_none() {
                l.push("disk".to_owned());
            }
            l
        },
        network_modes: Vec::new(),
        network_subnet: None,
        // Filled in by the server from the network (`Network::egress_status`).
        egress: sandboxd_protocol::egress::EgressStatus::default(),
        limits_note: limits.why_unenforceable(),
        preflight: crate::preflight::checks(config.mode, &crate::preflight::Host::read(), limits),
    }
}

/// The cgroup layout from a mountinfo text: `v2` (unified at /sys/fs/cgroup), `hybrid` (v1
/// controllers plus a v2 mount), `v1`, or `none`; and the controllers available.
fn cgroups(mountinfo: &str) -> (String, Vec<String>) {
    let mut v1 = Vec::new();
    let mut v2_root = false;
    let mut v2_elsewhere = false;
    for mount in cgroup_mounts(mountinfo) {
        match mount.fstype {
            "cgroup2" if mount.mount_point == "/sys/fs/cgroup" => v2_root = true,
            "cgroup2" => v2_elsewhere = true,
            _ => {
                const KNOWN: &[&str] = &[
                    "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "devices", "freezer",
                    "io", "hugetlb",
                ];
                v1.extend(
                    mount
                        .super_opts
                        .iter()
                        .filter(|o| KNOWN.contains(o))
                        .map(|o| o.to_string()),
                );
            }
        }
    }
    if v2_root {
        let controllers =
            std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
        return (
            "v2".into(),
            controllers.split_whitespace().map(str::to_owned).collect(),
        );
    }
    v1.sort();
    v1.dedup();
    let version = match (v1.is_empty(), v2_elsewhere) {
        (false, true) => "hybrid",
        (false, false) => "v1",
        (true, true) => "v2",
        (true, false) => "none",
    };
    (version.into(), v1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hybrid_hosts_are_recognised() {
        let text =
            "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
                    31 25 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n\
                    32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroups(text),
            (
                "hybrid".to_string(),
                vec!["memory".to_string(), "pids".to_string()]
            )
        );
        assert_eq!(cgroups("").0, "none");
    }
}
