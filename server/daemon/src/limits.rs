//! Resource limits: the daemon's defaults and maximums, what the host can enforce, and the
//! resolution of a request's `limits` into the `SpawnLimits` the helper gets.
//!
//! Malformed values (zero memory, NaN cpus...) are refused with 400 by `validate.rs`; this module
//! answers 422 for well-formed requests the daemon will not honour: above a configured maximum
//! ([`LimitError::Exceeded`]) or not enforceable on this host ([`LimitError::Unenforceable`]).
//! A limit is never silently dropped.

use sandboxd_api::{CreateSandbox, Limits};
use sandboxd_protocol::wire::{HelperInfo, SpawnLimits};

/// Names of the limits in `HelperInfo::enforceable_limits` and `Info::limits`.
pub const MEMORY: &str = "memory";
pub const CPUS: &str = "cpus";
pub const PIDS: &str = "pids";
pub const DISK: &str = "disk";

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;

/// Default `limits.memory_bytes` (`--default-memory`; applied only where memory can be enforced).
pub const DEFAULT_MEMORY: u64 = GIB;
/// Default `limits.pids` (applied only where pids can be enforced).
pub const DEFAULT_PIDS: u64 = 4096;
/// Default and largest `limits.output_bytes`.
pub const DEFAULT_OUTPUT_BYTES: u64 = 64 * MIB;
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = GIB;

/// Parse a byte size: a plain number of bytes, or a number (fractions allowed) with a suffix
/// `K`, `M`, `G`, `T`, optionally followed by `i` and/or `B`, case-insensitive. All suffixes are
/// binary: `256M` and `256Mi` are both 268435456 bytes (as `docker run --memory` reads them).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    let bad =
        || format!("invalid size {text:?}: expected a number of bytes or e.g. 256M, 1.5G, 512Ki");
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(bad());
    }
    let unit = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kb" | "kib" => KIB,
        "m" | "mi" | "mb" | "mib" => MIB,
        "g" | "gi" | "gb" | "gib" => GIB,
        "t" | "ti" | "tb" | "tib" => 1024 * GIB,
        _ => return Err(bad()),
    };
    if let Ok(n) = number.parse::<u64>() {
        return n
            .checked_mul(unit)
            .ok_or_else(|| format!("size {text:?} is too large"));
    }
    let f: f64 = number.parse().map_err(|_| bad())?;
    let bytes = (f * unit as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("size {text:?} is too large"));
    }
    Ok(bytes as u64)
}

/// The daemon's defaults and maximums (from the command line).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitPolicy {
    pub default_memory: Option<u64>,
    pub max_memory: Option<u64>,
    /// Default `limits.disk_bytes` (`--default-disk`), where the host can enforce it.
    pub default_disk: Option<u64>,
    pub default_cpus: Option<f64>,
    pub max_cpus: Option<f64>,
    pub default_pids: Option<u64>,
    pub max_pids: Option<u64>,
    pub default_output_bytes: u64,
    pub max_output_bytes: u64,
    pub max_timeout_secs: Option<u64>,
    pub max_ttl_secs: Option<u64>,
    /// Capabilities a request may add to the default bounding set (`--allow-cap`).
    pub allowed_caps: Vec<&'static str>,
    /// Whether a request may ask for nested user namespaces (`--allow-nested-userns`).
    pub allow_nested_userns: bool,
    /// Largest image upload and unpacked image (`--max-image-bytes`).
    pub max_image_bytes: u64,
    /// Host ports sandboxes may publish (`--publish-ports`).
    pub publish_ports: sandboxd_protocol::net::PortRange,
    /// Which tenants may give their sandboxes an egress policy (`--egress-tenants`).
    pub egress_tenants: EgressTenants,
}

/// `--egress-tenants`: `all` (the default), `none`, or a comma-separated list of tenants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EgressTenants {
    #[default]
    All,
    None,
    Only(Vec<String>),
}

impl EgressTenants {
    pub fn parse(s: &str) -> Result<EgressTenants, String> {
        match s.trim() {
            "all" => Ok(EgressTenants::All),
            "none" => Ok(EgressTenants::None),
            list => {
                let tenants: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect();
                if tenants.is_empty() {
                    return Err("expected all, none or a comma-separated list of tenants".into());
                }
                Ok(EgressTenants::Only(tenants))
            }
        }
    }

    pub fn allows(&self, tenant: &str) -> bool {
        match self {
            EgressTenants::All => true,
            EgressTenants::None => false,
            EgressTenants::Only(list) => list.iter().any(|t| t == tenant),
        }
    }
}

/// Default `--max-image-bytes`.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 8 * GIB;

impl Default for LimitPolicy {
    fn default() -> Self {
        LimitPolicy {
            default_memory: None,
            max_memory: None,
            default_disk: None,
            default_cpus: None,
            max_cpus: None,
            default_pids: Some(DEFAULT_PIDS),
            max_pids: None,
            default_output_bytes: DEFAULT_OUTPUT_BYTES,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            max_timeout_secs: None,
            max_ttl_secs: None,
            allowed_caps: Vec::new(),
            allow_nested_userns: false,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            publish_ports: sandboxd_protocol::net::PortRange {
                low: 32768,
                high: 60999,
            },
            egress_tenants: EgressTenants::All,
        }
    }
}

impl LimitPolicy {
    /// Refuse a configuration whose defaults are malformed or above its own maximums.
    pub fn check(&self) -> Result<(), String> {
        let defaults = Limits {
            memory_bytes: self.default_memory,
            disk_bytes: self.default_disk,
            cpus: self.default_cpus,
            pids: self.default_pids,
            output_bytes: Some(self.default_output_bytes),
            ..Limits::default()
        };
        crate::validate::check_limits(&defaults).map_err(|e| format!("default {e}"))?;
        let maxima = Limits {
            memory_bytes: self.max_memory,
            cpus: self.max_cpus,
            pids: self.max_pids,
            output_bytes: Some(self.max_output_bytes),
            ..Limits::default()
        };
        crate::validate::check_limits(&maxima).map_err(|e| format!("maximum {e}"))?;
        let above = |name: &str, d: Option<f64>, m: Option<f64>| match (d, m) {
            (Some(d), Some(m)) if d > m => Err(format!(
                "--default-{name} ({d}) is above --max-{name} ({m})"
            )),
            _ => Ok(()),
        };
        let f = |v: Option<u64>| v.map(|v| v as f64);
        above("memory", f(self.default_memory), f(self.max_memory))?;
        above("cpus", self.default_cpus, self.max_cpus)?;
        above("pids", f(self.default_pids), f(self.max_pids))?;
        above(
            "output-bytes",
            Some(self.default_output_bytes as f64),
            Some(self.max_output_bytes as f64),
        )?;
        Ok(())
    }

    /// Warnings for defaults that cannot be applied on this host (logged at start).
    pub fn unapplied_defaults(&self, host: &HostLimits) -> Vec<String> {
        let mut out = Vec::new();
        for (name, flag, set) in [
            (MEMORY, "--default-memory", self.default_memory.is_some()),
            (CPUS, "--default-cpus", self.default_cpus.is_some()),
            (PIDS, "--default-pids", self.default_pids.is_some()),
            (DISK, "--default-disk", self.default_disk.is_some()),
        ] {
            if set && !host.can(name) {
                out.push(format!(
                    "{flag} is not applied: {name} limits cannot be enforced on this host ({})",
                    host.why_not(name)
                ));
            }
        }
        out
    }
}

impl LimitPolicy {
    /// The limits a sandbox created without asking goes without, and why (`GET /v1/info`):
    /// its defaults cannot be enforced on this host, or the operator turned them off.
    pub fn unenforced(&self, host: &HostLimits) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (name, flag, default) in [
            (MEMORY, "--default-memory", self.default_memory.is_some()),
            (PIDS, "--default-pids", self.default_pids.is_some()),
            (DISK, "--default-disk", self.default_disk.is_some()),
        ] {
            if !host.can(name) {
                let why = if name == DISK {
                    host.why_not_disk()
                } else {
                    host.why_not(name)
                };
                out.push((name, format!("cannot be enforced on this host: {why}")));
            } else if !default {
                out.push((name, format!("no default: this daemon runs with {flag} 0")));
            }
        }
        out
    }
}

/// What the host can enforce, from the helper's `Info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLimits {
    pub enforceable: Vec<String>,
    pub cgroup_version: String,
    pub rootless: bool,
    /// The helper's reason for the cgroup limits it cannot enforce, with the fix.
    pub note: Option<String>,
}

impl HostLimits {
    pub fn from_info(info: &HelperInfo) -> Self {
        HostLimits {
            enforceable: info.enforceable_limits.clone(),
            cgroup_version: info.cgroup_version.clone(),
            rootless: info.mode == sandboxd_protocol::wire::Mode::Rootless,
            note: info.limits_note.clone(),
        }
    }

    pub fn can(&self, limit: &str) -> bool {
        self.enforceable.iter().any(|l| l == limit)
    }

    fn why_not_disk(&self) -> String {
        if self.rootless {
            "a rootless daemon cannot mount a size-limited filesystem (that needs the privileged \
             helper); a sandbox can fill the state directory's filesystem"
                .into()
        } else {
            "it needs loop devices (/dev/loop-control) and mkfs.ext4".into()
        }
    }

    fn why_not(&self, limit: &str) -> String {
        let controller = if limit == CPUS { "cpu" } else { limit };
        if let Some(note) = &self.note {
            return note.clone();
        }
        if self.rootless {
            return format!(
                "a rootless daemon has no delegated cgroup to manage; start sandboxd under \
                 `systemd-run --user --scope -p Delegate=yes sandboxd ...` or as the user unit \
                 deploy/sandboxd-user.service (Delegate=yes) to enforce {controller} limits"
            );
        }
        match self.cgroup_version.as_str() {
            "none" | "" => "no cgroup hierarchy is available to sandboxd".to_owned(),
            v => format!(
                "the {controller} controller of this host's cgroup {v} hierarchy is not available \
                 to sandboxd (see deploy/cgroups.md)"
            ),
        }
    }
}

/// A request the daemon will not honour as asked (422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{0}")]
    Exceeded(String),
    #[error("{0}")]
    Unenforceable(String),
    #[error("capabilities.add: {0} is not allowed by this daemon (an operator allows it with --allow-cap)")]
    CapabilityNotAllowed(String),
    #[error("nested_user_namespaces: not allowed by this daemon (an operator allows it with --allow-nested-userns)")]
    NestedUsernsNotAllowed,
}

impl LimitError {
    pub fn code(&self) -> sandboxd_api::ErrorCode {
        use sandboxd_api::ErrorCode;
        match self {
            LimitError::Exceeded(_) => ErrorCode::LimitExceeded,
            LimitError::Unenforceable(_) => ErrorCode::LimitUnenforceable,
            LimitError::CapabilityNotAllowed(_) => ErrorCode::CapabilityNotAllowed,
            LimitError::NestedUsernsNotAllowed => ErrorCode::NestedUsernsNotAllowed,
        }
    }
}

/// The limits a sandbox gets: what the helper enforces, and the same figures in API form (stored
/// as the sandbox's `spec.limits`, so clients see the defaults that were applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub spawn: SpawnLimits,
    pub limits: Limits,
}

/// Fit the disk cap to the filesystem that will hold it (`capacity` bytes, the state
/// directory's): a requested cap beyond it is refused (the sandbox's filesystem could never be
/// made, or never be filled), a default one is lowered to it.
pub fn fit_disk(resolved: &mut Resolved, requested: bool, capacity: u64) -> Result<(), LimitError> {
    let Some(disk) = resolved.spawn.disk_bytes.filter(|d| *d > capacity) else {
        return Ok(());
    };
    if requested {
        return Err(LimitError::Exceeded(format!(
            "limits.disk_bytes: {disk} is more than the daemon's state filesystem holds \
             ({capacity} bytes)"
        )));
    }
    resolved.spawn.disk_bytes = Some(capacity);
    resolved.limits.disk_bytes = Some(capacity);
    Ok(())
}

fn above_max(
    field: &str,
    value: impl std::fmt::Display,
    max: impl std::fmt::Display,
) -> LimitError {
    LimitError::Exceeded(format!(
        "{field}: {value} is above this daemon's maximum of {max}"
    ))
}

/// Check a validated request against the policy and the host, and fill in defaults.
pub fn resolve(
    policy: &LimitPolicy,
    host: &HostLimits,
    spec: &CreateSandbox,
) -> Result<Resolved, LimitError> {
    let req = &spec.limits;
    if req.disk_bytes.is_some() && !host.can(DISK) {
        return Err(LimitError::Unenforceable(if host.rootless {
            "limits.disk_bytes cannot be enforced by a rootless daemon: it needs a loop-mounted \
             filesystem, which only the privileged helper can mount"
                .into()
        } else {
            "limits.disk_bytes cannot be enforced on this host: it needs loop devices \
             (/dev/loop-control) and mkfs.ext4"
                .into()
        }));
    }
    let unenforceable = |field: &str, name: &str| {
        LimitError::Unenforceable(format!(
            "{field} cannot be enforced on this host: {}",
            host.why_not(name)
        ))
    };
    // A requested limit must be enforceable and within the maximum; a default applies only where
    // it can be enforced (the daemon warned about the others at start).
    let memory = match req.memory_bytes {
        Some(m) => {
            if !host.can(MEMORY) {
                return Err(unenforceable("limits.memory_bytes", MEMORY));
            }
            if let Some(max) = policy.max_memory.filter(|max| m > *max) {
                return Err(above_max("limits.memory_bytes", m, max));
            }
            Some(m)
        }
        None => policy.default_memory.filter(|_| host.can(MEMORY)),
    };
    let cpus = match req.cpus {
        Some(c) => {
            if !host.can(CPUS) {
                return Err(unenforceable("limits.cpus", CPUS));
            }
            if let Some(max) = policy.max_cpus.filter(|max| c > *max) {
                return Err(above_max("limits.cpus", c, max));
            }
            Some(c)
        }
        None => policy.default_cpus.filter(|_| host.can(CPUS)),
    };
    let pids = match req.pids {
        Some(p) => {
            if !host.can(PIDS) {
                return Err(unenforceable("limits.pids", PIDS));
            }
            if let Some(max) = policy.max_pids.filter(|max| p > *max) {
                return Err(above_max("limits.pids", p, max));
            }
            Some(p)
        }
        None => policy.default_pids.filter(|_| host.can(PIDS)),
    };
    // A default disk cap applies only where a limited filesystem can be mounted.
    let disk = req
        .disk_bytes
        .or(policy.default_disk.filter(|_| host.can(DISK)));
    let output = req.output_bytes.unwrap_or(policy.default_output_bytes);
    if output > policy.max_output_bytes {
        return Err(above_max(
            "limits.output_bytes",
            output,
            policy.max_output_bytes,
        ));
    }
    if let (Some(t), Some(max)) = (req.timeout_secs, policy.max_timeout_secs) {
        if t > max {
            return Err(above_max("limits.timeout_secs", t, max));
        }
    }
    if let (Some(t), Some(max)) = (spec.ttl_secs, policy.max_ttl_secs) {
        if t > max {
            return Err(above_max("ttl_secs", t, max));
        }
    }
    Ok(Resolved {
        spawn: SpawnLimits {
            memory_bytes: memory,
            // validate.rs keeps cpus within 0.001..=1024, so this is 1..=1_024_000.
            cpu_millis: cpus.map(|c| (c * 1000.0).round() as u32),
            pids,
            output_bytes: output,
            disk_bytes: disk,
        },
        limits: Limits {
            timeout_secs: req.timeout_secs,
            memory_bytes: memory,
            cpus,
            pids,
            disk_bytes: disk,
            output_bytes: Some(output),
        },
    })
}

/// Check a TTL (creation or `/extend`) against the policy's maximum.
pub fn check_ttl(policy: &LimitPolicy, ttl_secs: u64) -> Result<(), LimitError> {
    match policy.max_ttl_secs {
        Some(max) if ttl_secs > max => Err(above_max("ttl_secs", ttl_secs, max)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_cap_beyond_the_filesystem_is_refused_when_asked_and_lowered_by_default() {
        let resolved = |disk: u64| Resolved {
            spawn: SpawnLimits {
                disk_bytes: Some(disk),
                ..SpawnLimits::default()
            },
            limits: Limits {
                disk_bytes: Some(disk),
                ..Limits::default()
            },
        };
        let mut r = resolved(10 * GIB);
        assert!(fit_disk(&mut r, true, 20 * GIB).is_ok());
        assert_eq!(r.spawn.disk_bytes, Some(10 * GIB));
        let mut r = resolved(1 << 50);
        let err = fit_disk(&mut r, true, 20 * GIB).unwrap_err();
        assert!(
            matches!(&err, LimitError::Exceeded(m) if m.contains("limits.disk_bytes")),
            "{err}"
        );
        let mut r = resolved(10 * GIB);
        assert!(fit_disk(&mut r, false, 4 * GIB).is_ok());
        assert_eq!(
            (r.spawn.disk_bytes, r.limits.disk_bytes),
            (Some(4 * GIB), Some(4 * GIB))
        );
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 * MIB));
        assert_eq!(parse_size("256m"), Ok(256 * MIB));
        assert_eq!(parse_size("1.5G"), Ok(3 * GIB / 2));
        assert_eq!(parse_size("512Ki"), Ok(512 * KIB));
        assert_eq!(parse_size("2GiB"), Ok(2 * GIB));
        assert_eq!(parse_size("1T"), Ok(1024 * GIB));
        for bad in [
            "",
            "M",
            "1.5.2G",
            "-1",
            "1X",
            ".5G",
            "1e9",
            "99999999999999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    fn host(enforceable: &[&str]) -> HostLimits {
        HostLimits {
            enforceable: enforceable.iter().map(|s| s.to_string()).collect(),
            cgroup_version: "v1".into(),
            rootless: false,
            note: None,
        }
    }

    fn spec(limits: serde_json::Value) -> CreateSandbox {
        serde_json::from_value(serde_json::json!({"command": ["x"], "limits": limits})).unwrap()
    }

    #[test]
    fn defaults_apply_only_where_enforceable() {
        let policy = LimitPolicy {
            default_memory: Some(512 * MIB),
            default_cpus: Some(1.5),
            ..LimitPolicy::default()
        };
        let all = resolve(
            &policy,
            &host(&[MEMORY, CPUS, PIDS]),
            &spec(serde_json::json!({})),
        )
        .unwrap();
        assert_eq!(
            all.spawn,
            SpawnLimits {
                memory_bytes: Some(512 * MIB),
                cpu_millis: Some(1500),
                pids: Some(DEFAULT_PIDS),
                output_bytes: DEFAULT_OUTPUT_BYTES,
                disk_bytes: None,
            }
        );
        let none = resolve(&policy, &host(&[]), &spec(serde_json::json!({}))).unwrap();
        assert_eq!(
            none.spawn,
            SpawnLimits {
                output_bytes: DEFAULT_OUTPUT_BYTES,
                ..SpawnLimits::default()
            }
        );
        assert_eq!(policy.unapplied_defaults(&host(&[])).len(), 3);
        assert!(policy
            .unapplied_defaults(&host(&[MEMORY, CPUS, PIDS]))
            .is_empty());
    }

    #[test]
    fn maxima_and_enforceability_give_422() {
        let policy = LimitPolicy {
            max_memory: Some(4 * GIB),
            max_cpus: Some(2.0),
            max_timeout_secs: Some(60),
            max_ttl_secs: Some(3600),
            ..LimitPolicy::default()
        };
        let all = host(&[MEMORY, CPUS, PIDS]);
        let err = resolve(
            &policy,
            &all,
            &spec(serde_json::json!({"memory_bytes": 10 * GIB})),
        )
        .unwrap_err();
        assert_eq!(
            err,
            LimitError::Exceeded(
                "limits.memory_bytes: 10737418240 is above this daemon's maximum of 4294967296"
                    .into()
            )
        );
        let over = |l: serde_json::Value| {
            resolve(&policy, &all, &spec(l))
                .unwrap_err()
                .code()
                .to_string()
        };
        assert_eq!(over(serde_json::json!({"cpus": 2.5})), "limit_exceeded");
        assert_eq!(
            over(serde_json::json!({"timeout_secs": 61})),
            "limit_exceeded"
        );
        assert_eq!(
            over(serde_json::json!({"output_bytes": 2 * GIB})),
            "limit_exceeded"
        );
        assert_eq!(
            over(serde_json::json!({"disk_bytes": GIB})),
            "limit_unenforceable"
        );
        // Where the helper can mount a limited filesystem, disk_bytes goes through.
        let with_disk = resolve(
            &policy,
            &host(&[MEMORY, CPUS, PIDS, DISK]),
            &spec(serde_json::json!({"disk_bytes": GIB})),
        )
        .unwrap();
        assert_eq!(with_disk.spawn.disk_bytes, Some(GIB));
        assert_eq!(with_disk.limits.disk_bytes, Some(GIB));
        let err = resolve(
            &policy,
            &host(&[CPUS]),
            &spec(serde_json::json!({"pids": 10})),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("limits.pids cannot be enforced on this host: the pids controller of this host's cgroup v1"),
            "{err}"
        );
        let ok = resolve(&policy, &all, &spec(serde_json::json!({"cpus": 0.5}))).unwrap();
        assert_eq!(ok.spawn.cpu_millis, Some(500));
        assert!(check_ttl(&policy, 3601).is_err());
        assert!(check_ttl(&policy, 3600).is_ok());
    }

    #[test]
    fn policy_check_refuses_defaults_above_maxima() {
        let p = LimitPolicy {
            default_memory: Some(2 * GIB),
            max_memory: Some(GIB),
            ..LimitPolicy::default()
        };
        assert!(p.check().is_err());
        assert!(LimitPolicy::default().check().is_ok());
        let p = LimitPolicy {
            default_output_bytes: 10,
            ..LimitPolicy::default()
        };
        assert!(p.check().is_err());
    }
}

/// The bounding set a request asks for: `None` for the default set, else the default set minus
/// `drop` plus `add` (names already checked by `validate.rs`), refusing an `add` the operator does
/// not allow.
pub fn resolve_capabilities(
    policy: &LimitPolicy,
    changes: Option<&sandboxd_api::CapabilityChanges>,
) -> Result<Option<Vec<String>>, LimitError> {
    use sandboxd_protocol::capabilities::{canonical, DEFAULT};
    let Some(changes) = changes else {
        return Ok(None);
    };
    let dropped: Vec<&str> = changes.drop.iter().filter_map(|n| canonical(n)).collect();
    let mut set: Vec<&str> = DEFAULT
        .iter()
        .copied()
        .filter(|c| !dropped.contains(c))
        .collect();
    for name in &changes.add {
        let Some(cap) = canonical(name) else { continue };
        if !DEFAULT.contains(&cap) && !policy.allowed_caps.contains(&cap) {
            return Err(LimitError::CapabilityNotAllowed(cap.to_owned()));
        }
        if !set.contains(&cap) {
            set.push(cap);
        }
    }
    Ok(Some(set.into_iter().map(str::to_owned).collect()))
}

#[cfg(test)]
mod capability_tests {
    use super::*;
    use sandboxd_api::CapabilityChanges;

    #[test]
    fn drop_and_add_within_what_the_operator_allows() {
        let mut policy = LimitPolicy::default();
        assert_eq!(resolve_capabilities(&policy, None).unwrap(), None);
        let changes = CapabilityChanges {
            drop: vec!["net_raw".into()],
            add: vec![],
        };
        let set = resolve_capabilities(&policy, Some(&changes))
            .unwrap()
            .unwrap();
        assert!(
            !set.contains(&"CAP_NET_RAW".to_string()) && set.contains(&"CAP_CHOWN".to_string())
        );
        let changes = CapabilityChanges {
            drop: vec![],
            add: vec!["SYS_PTRACE".into()],
        };
        assert!(matches!(
            resolve_capabilities(&policy, Some(&changes)),
            Err(LimitError::CapabilityNotAllowed(c)) if c == "CAP_SYS_PTRACE"
        ));
        policy.allowed_caps = vec!["CAP_SYS_PTRACE"];
        let set = resolve_capabilities(&policy, Some(&changes))
            .unwrap()
            .unwrap();
        assert!(set.contains(&"CAP_SYS_PTRACE".to_string()));
    }
}
