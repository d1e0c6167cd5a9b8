//! Turns a [`SpawnRequest`] from the daemon into a [`ValidSpawn`], or refuses it.
//!
//! The daemon validates too, but the helper trusts nothing it is sent: a compromised daemon must
//! not be able to make the helper map another uid range, escape the sandboxes directory, or feed
//! NUL bytes and unbounded sizes into the setup code.

use std::ffi::CString;
use std::time::Duration;

use sandboxd_protocol::wire::{Mode, PortMapping, SpawnLimits, SpawnNetwork, SpawnRequest};
use sandboxd_protocol::{capabilities, rules};
use uuid::Uuid;

use crate::config::{Config, UID_RANGE_SIZE};

const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 1024;
const MAX_TOTAL_BYTES: usize = 512 * 1024;
const MAX_TIMEOUT_SECS: u64 = 366 * 24 * 3600;
/// Published ports of one sandbox at most.
pub const MAX_PORTS: usize = 64;
/// Group members listed in one sandbox's /etc/hosts at most.
const MAX_PEERS: usize = 1024;

/// How ids inside the sandbox map to host ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdMap {
    /// Ids `0..size` inside are `base..base+size` outside; `slot` names the range.
    Range { slot: u32, base: u32, size: u32 },
    /// Rootless: only root inside exists, and it is the helper's own uid/gid.
    Single { uid: u32, gid: u32 },
}

impl IdMap {
    /// Host uid of root inside the sandbox.
    pub fn host_root_uid(&self) -> u32 {
        match *self {
            IdMap::Range { base, .. } => base,
            IdMap::Single { uid, .. } => uid,
        }
    }
    pub fn host_root_gid(&self) -> u32 {
        match *self {
            IdMap::Range { base, .. } => base,
            IdMap::Single { gid, .. } => gid,
        }
    }
}

/// A spawn request that passed every check; only this type reaches the setup code.
#[derive(Debug, Clone)]
pub struct ValidSpawn {
    pub id: Uuid,
    pub ids: IdMap,
    pub command: Vec<CString>,
    pub env: Vec<CString>,
    pub cwd: CString,
    pub hostname: String,
    pub timeout: Option<Duration>,
    pub limits: SpawnLimits,
    /// The bounding set the sandbox keeps: the default set, or a set the operator allows.
    pub capabilities: Vec<&'static str>,
    pub nested_user_namespaces: bool,
    /// Keep stdin open for attach connections.
    pub stdin: bool,
    /// A terminal of this size (cols, rows).
    pub tty: Option<(u16, u16)>,
    /// The root filesystem: the host's (read-only) or an image's.
    pub rootfs: Rootfs,
    /// Bridged networking; `None` is mode `none` (only `lo`).
    pub network: Option<ValidNet>,
    /// Who the command should run as, as the request said (`None`: root).
    pub user: Option<rules::UserSpec>,
    /// The same, resolved against the root filesystem by `spawn` before the monitor starts
    /// (`None`: root).
    pub run_as: Option<RunAs>,
}

/// The identity a command runs as inside the sandbox: ids of its user namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary one first).
    pub groups: Vec<u32>,
}

/// Where a sandbox's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rootfs {
    Host,
    /// A stored image (its digest, checked to be 64 hex digits) under a private upper layer.
    Image {
        digest: String,
        readonly: bool,
    },
}

impl ValidNet {
    /// The hub's device that holds the gateway: the group's bridge, or the veth itself.
    pub fn hub_device(&self) -> &str {
        self.bridge.as_deref().unwrap_or(&self.veth)
    }
}

/// A bridged network request that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidNet {
    pub group: Option<String>,
    /// The group's bridge in the hub; `None` for a sandbox without a group, whose veth end in
    /// the hub carries the gateway itself (a bridge of one would only cost a device to delete).
    pub bridge: Option<String>,
    /// The hub's end of the sandbox's veth pair.
    pub veth: String,
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: std::net::Ipv4Addr,
    pub peers: Vec<(String, std::net::Ipv4Addr)>,
    pub ports: Vec<PortMapping>,
    /// Where host ports come from: a port 0 is chosen in it, starting at `port_seed`.
    pub publish_ports: sandboxd_protocol::net::PortRange,
    /// Where the search for a free port starts (from the sandbox's random id, so that
    /// sandboxes started together do not all try the same ports first).
    pub port_seed: u32,
    /// The sandbox's name server: the gateway, where the egress filter answers, when this
    /// helper has egress (`--egress-dns`); none otherwise.
    pub resolver: Option<std::net::Ipv4Addr>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidateError {
    #[error("command is empty")]
    EmptyCommand,
    #[error("too many arguments or environment variables")]
    TooMany,
    #[error("request is larger than {MAX_TOTAL_BYTES} bytes")]
    TooLarge,
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("invalid environment variable name {0:?}")]
    EnvName(String),
    #[error("cwd must be an absolute path without '..'")]
    Cwd,
    #[error("invalid hostname")]
    Hostname,
    #[error("timeout must be between 1 and {MAX_TIMEOUT_SECS} seconds")]
    Timeout,
    #[error("uid slot {0:?} is not valid in this mode")]
    Slot(Option<u32>),
    #[error("limit out of range: {0}")]
    Limit(&'static str),
    #[error("capability {0} is unknown or not allowed by the operator")]
    Capability(String),
    #[error("nested user namespaces are not allowed by the operator")]
    NestedUserns,
    #[error("malformed image digest")]
    ImageDigest,
    #[error("a read-only root needs an image (the host root is always read-only)")]
    Readonly,
    #[error("bridged networking needs the privileged helper")]
    NetworkRootless,
    #[error("invalid network: {0}")]
    Network(String),
    #[error("user: {0}")]
    User(rules::RuleError),
}

/// Check a bridged network request against the helper's own subnet.
pub fn validate_network(
    net: &SpawnNetwork,
    id: Uuid,
    config: &Config,
) -> Result<ValidNet, ValidateError> {
    let bad = |m: String| ValidateError::Network(m);
    if let Some(g) = &net.group {
        if !sandboxd_protocol::net::valid_group(g) {
            return Err(bad(format!("group {g:?}")));
        }
    }
    let subnet = config.net_subnet;
    if !subnet.is_sandbox_address(net.address) {
        return Err(bad(format!("address {} is not in {subnet}", net.address)));
    }
    if net.peers.len() > MAX_PEERS {
        return Err(bad("too many peers".into()));
    }
    let mut peers = Vec::with_capacity(net.peers.len());
    for p in &net.peers {
        if !valid_hostname(&p.hostname) || !subnet.is_sandbox_address(p.address) {
            return Err(bad(format!("peer {:?} {}", p.hostname, p.address)));
        }
        peers.push((p.hostname.clone(), p.address));
    }
    if net.ports.len() > MAX_PORTS {
        return Err(bad(format!("at most {MAX_PORTS} published ports")));
    }
    let range = config.publish_ports;
    for (i, p) in net.ports.iter().enumerate() {
        // Host ports outside the operator's range may be the host's services' (the helper binds
        // as root); 0 is chosen inside the range when the forwarder binds.
        if p.sandbox == 0 || (p.host != 0 && (p.host < 1024 || !range.contains(p.host))) {
            return Err(bad(format!(
                "port {}:{} (host ports must be in {range})",
                p.sandbox, p.host
            )));
        }
        let dup = net.ports[..i]
            .iter()
            .any(|q| q.sandbox == p.sandbox || (p.host != 0 && q.host == p.host));
        if dup {
            return Err(bad(format!("port {}:{} given twice", p.sandbox, p.host)));
        }
    }
    Ok(ValidNet {
        bridge: net
            .group
            .as_deref()
            .map(sandboxd_protocol::net::bridge_name),
        veth: sandboxd_protocol::net::veth_name(id),
        group: net.group.clone(),
        address: net.address,
        prefix_len: subnet.prefix_len(),
        gateway: subnet.gateway(),
        peers,
        ports: net.ports.clone(),
        publish_ports: range,
        port_seed: (id.as_u128() % u128::from(u32::MAX)) as u32,
        resolver: config.egress.dns.map(|_| subnet.gateway()),
    })
}

fn cstring(s: &str, what: &'static str) -> Result<CString, ValidateError> {
    CString::new(s).map_err(|_| ValidateError::Nul(what))
}

/// The shared rule ([`rules::EnvName`]).
pub(crate) fn valid_env_name(name: &str) -> bool {
    rules::EnvName::parse(name).is_ok()
}

/// The shared rule ([`rules::Hostname`]).
pub fn valid_hostname(name: &str) -> bool {
    rules::Hostname::parse(name).is_ok()
}

pub fn validate(req: &SpawnRequest, config: &Config) -> Result<ValidSpawn, ValidateError> {
    if req.command.is_empty() || req.command[0].is_empty() {
        return Err(ValidateError::EmptyCommand);
    }
    if req.command.len() > MAX_ARGS || req.env.len() > MAX_ENV {
        return Err(ValidateError::TooMany);
    }
    let total: usize = req.command.iter().map(|a| a.len() + 1).sum::<usize>()
        + req
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2)
            .sum::<usize>()
        + req.cwd.len();
    if total > MAX_TOTAL_BYTES {
        return Err(ValidateError::TooLarge);
    }
    let command = req
        .command
        .iter()
        .map(|a| cstring(a, "command"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut env = Vec::with_capacity(req.env.len());
    for (k, v) in &req.env {
        let entry = rules::EnvEntry::parse(k, v).map_err(|e| match e {
            rules::RuleError::EnvName(k) => ValidateError::EnvName(k),
            _ => ValidateError::Nul("env"),
        })?;
        env.push(cstring(&entry.to_assignment(), "env")?);
    }
    if !req.cwd.starts_with('/') || req.cwd.split('/').any(|c| c == "..") || req.cwd.len() > 4096 {
        return Err(ValidateError::Cwd);
    }
    let cwd = cstring(&req.cwd, "cwd")?;
    if !valid_hostname(&req.hostname) {
        return Err(ValidateError::Hostname);
    }
    let timeout = match req.timeout_secs {
        None => None,
        Some(s) if (1..=MAX_TIMEOUT_SECS).contains(&s) => Some(Duration::from_secs(s)),
        Some(_) => return Err(ValidateError::Timeout),
    };
    let ids = match (config.mode, req.uid_slot) {
        (Mode::Privileged, Some(slot)) if slot < config.uid_slots => IdMap::Range {
            slot,
            base: config.slot_base(slot),
            size: UID_RANGE_SIZE,
        },
        (Mode::Rootless, None) => IdMap::Single {
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        },
        (_, slot) => return Err(ValidateError::Slot(slot)),
    };
    let l = req.limits;
    if l.memory_bytes.is_some_and(|m| m < 1 << 20) {
        return Err(ValidateError::Limit("memory_bytes below 1 MiB"));
    }
    if l.cpu_millis.is_some_and(|c| c == 0 || c > 1_024_000) {
        return Err(ValidateError::Limit("cpu_millis"));
    }
    if l.pids
        .is_some_and(|p| !(1..=sandboxd_protocol::wire::MAX_PIDS).contains(&p))
    {
        return Err(ValidateError::Limit("pids"));
    }
    if l.output_bytes < 1024 {
        return Err(ValidateError::Limit("output_bytes below 1 KiB"));
    }
    let capabilities = match &req.capabilities {
        None => capabilities::DEFAULT.to_vec(),
        Some(names) => {
            let mut set = Vec::new();
            for name in names {
                let cap = capabilities::canonical(name)
                    .filter(|c| {
                        capabilities::DEFAULT.contains(c) || config.allowed_caps.contains(c)
                    })
                    .ok_or_else(|| ValidateError::Capability(name.clone()))?;
                if !set.contains(&cap) {
                    set.push(cap);
                }
            }
            set
        }
    };
    if req.nested_user_namespaces && !config.allow_nested_userns {
        return Err(ValidateError::NestedUserns);
    }
    if l.disk_bytes
        .is_some_and(|d| d < crate::disk::MIN_DISK_BYTES)
    {
        return Err(ValidateError::Limit("disk_bytes below 16 MiB"));
    }
    if req.tty.is_some_and(|(cols, rows)| cols == 0 || rows == 0) {
        return Err(ValidateError::Limit("terminal size"));
    }
    let rootfs = match &req.rootfs_image {
        None if req.rootfs_readonly => return Err(ValidateError::Readonly),
        None => Rootfs::Host,
        Some(d) if rules::Digest::parse(d).is_ok() => Rootfs::Image {
            digest: d.clone(),
            readonly: req.rootfs_readonly,
        },
        Some(_) => return Err(ValidateError::ImageDigest),
    };
    let user = req
        .user
        .as_deref()
        .map(rules::UserSpec::parse)
        .transpose()
        .map_err(ValidateError::User)?;
    let network = match (&req.network, config.mode) {
        (None, _) => None,
        (Some(_), Mode::Rootless) => return Err(ValidateError::NetworkRootless),
        (Some(net), Mode::Privileged) => Some(validate_network(net, req.id, config)?),
    };
    Ok(ValidSpawn {
        network,
        user,
        run_as: None,
        stdin: req.stdin,
        tty: req.tty,
        rootfs,
        nested_user_namespaces: req.nested_user_namespaces,
        capabilities,
        limits: l,
        id: req.id,
        ids,
        command,
        env,
        cwd,
        hostname: req.hostname.clone(),
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: Mode) -> Config {
        Config {
            state_dir: "/s".into(),
            allow_uid: 1000,
            allow_gid: 1000,
            mode,
            uid_base: 100_000_000,
            uid_slots: 4,
            exit_with_stdin: false,
            no_cgroups: false,
            allowed_caps: vec!["CAP_SYS_PTRACE"],
            allow_nested_userns: false,
            max_image_bytes: 1 << 30,
            net_subnet: sandboxd_protocol::net::Subnet::parse("10.88.0.0/16").unwrap(),
            publish_ports: sandboxd_protocol::net::PortRange::parse("32768-60999").unwrap(),
            egress: Default::default(),
        }
    }

    fn request() -> SpawnRequest {
        SpawnRequest {
            id: Uuid::nil(),
            uid_slot: Some(1),
            command: vec!["true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/work".into(),
            hostname: "box-1".into(),
            timeout_secs: Some(5),
            limits: SpawnLimits {
                output_bytes: 1 << 20,
                ..Default::default()
            },
            capabilities: None,
            nested_user_namespaces: false,
            stdin: false,
            tty: None,
            prepared: false,
            rootfs_image: None,
            rootfs_readonly: false,
            network: None,
            user: None,
        }
    }

    fn check(edit: impl FnOnce(&mut SpawnRequest), expect: Result<(), ValidateError>) {
        let mut req = request();
        edit(&mut req);
        assert_eq!(validate(&req, &config(Mode::Privileged)).map(drop), expect);
    }

    #[test]
    fn every_field_is_checked() {
        check(|_| {}, Ok(()));
        check(|r| r.user = Some("1000:1000".into()), Ok(()));
        check(|r| r.user = Some("app".into()), Ok(()));
        check(
            |r| r.user = Some("70000".into()),
            Err(ValidateError::User(rules::RuleError::User)),
        );
        check(
            |r| r.user = Some("a\0b".into()),
            Err(ValidateError::User(rules::RuleError::User)),
        );
        check(|r| r.command.clear(), Err(ValidateError::EmptyCommand));
        check(
            |r| r.command = vec!["a\0b".into()],
            Err(ValidateError::Nul("command")),
        );
        check(
            |r| r.env.push(("A=B".into(), "x".into())),
            Err(ValidateError::EnvName("A=B".into())),
        );
        check(
            |r| r.env.push(("1A".into(), "x".into())),
            Err(ValidateError::EnvName("1A".into())),
        );
        check(
            |r| r.env.push(("A".into(), "\0".into())),
            Err(ValidateError::Nul("env")),
        );
        check(|r| r.cwd = "work".into(), Err(ValidateError::Cwd));
        check(|r| r.cwd = "/work/../..".into(), Err(ValidateError::Cwd));
        check(|r| r.hostname = "-x".into(), Err(ValidateError::Hostname));
        check(|r| r.hostname = "a b".into(), Err(ValidateError::Hostname));
        check(|r| r.hostname = "".into(), Err(ValidateError::Hostname));
        check(|r| r.timeout_secs = Some(0), Err(ValidateError::Timeout));
        check(|r| r.uid_slot = Some(4), Err(ValidateError::Slot(Some(4))));
        check(|r| r.uid_slot = None, Err(ValidateError::Slot(None)));
        check(
            |r| r.command = vec!["x".repeat(600 * 1024)],
            Err(ValidateError::TooLarge),
        );
        check(
            |r| r.rootfs_image = Some("../../etc".into()),
            Err(ValidateError::ImageDigest),
        );
        check(|r| r.rootfs_readonly = true, Err(ValidateError::Readonly));
        check(|r| r.rootfs_image = Some("ab".repeat(32)), Ok(()));
        check(
            |r| r.limits.disk_bytes = Some(1 << 20),
            Err(ValidateError::Limit("disk_bytes below 16 MiB")),
        );
    }

    #[test]
    fn network_requests_are_checked_against_the_helpers_subnet() {
        use sandboxd_protocol::wire::NetworkPeer;
        let net = |edit: &dyn Fn(&mut SpawnNetwork)| {
            let mut n = SpawnNetwork {
                group: Some("web".into()),
                address: "10.88.0.7".parse().unwrap(),
                peers: vec![NetworkPeer {
                    hostname: "db".into(),
                    address: "10.88.0.2".parse().unwrap(),
                }],
                ports: vec![PortMapping {
                    sandbox: 80,
                    host: 0,
                }],
            };
            edit(&mut n);
            let mut r = request();
            r.network = Some(n);
            validate(&r, &config(Mode::Privileged)).map(|v| v.network)
        };
        let ok = net(&|_| {}).unwrap().unwrap();
        assert_eq!(ok.gateway, std::net::Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(ok.prefix_len, 16);
        assert!(net(&|n| n.address = "10.88.0.1".parse().unwrap()).is_err());
        assert!(net(&|n| n.address = "192.168.0.7".parse().unwrap()).is_err());
        assert!(net(&|n| n.group = Some("Bad Group".into())).is_err());
        assert!(net(&|n| n.peers[0].hostname = "a b".into()).is_err());
        assert!(net(&|n| n.ports[0].host = 22).is_err());
        // Outside the operator's range (32768-60999 here): refused, whatever the daemon said.
        assert!(net(&|n| n.ports[0].host = 6379).is_err());
        assert!(net(&|n| n.ports[0].host = 61000).is_err());
        assert!(net(&|n| n.ports[0].host = 40000).is_ok());
        assert!(net(&|n| n.ports[0].sandbox = 0).is_err());
        assert!(net(&|n| n.ports.push(PortMapping {
            sandbox: 80,
            host: 0
        }))
        .is_err());
        let mut r = request();
        r.uid_slot = None;
        r.network = Some(SpawnNetwork {
            group: None,
            address: "10.88.0.7".parse().unwrap(),
            peers: vec![],
            ports: vec![],
        });
        assert_eq!(
            validate(&r, &config(Mode::Rootless)).map(drop),
            Err(ValidateError::NetworkRootless)
        );
    }

    #[test]
    fn slots_map_to_disjoint_ranges_and_rootless_maps_itself() {
        let v = validate(&request(), &config(Mode::Privileged)).unwrap();
        assert_eq!(
            v.ids,
            IdMap::Range {
                slot: 1,
                base: 100_065_536,
                size: 65536
            }
        );
        let mut req = request();
        req.uid_slot = None;
        let v = validate(&req, &config(Mode::Rootless)).unwrap();
        assert_eq!(v.ids.host_root_uid(), nix::unistd::geteuid().as_raw());
        req.uid_slot = Some(0);
        assert!(validate(&req, &config(Mode::Rootless)).is_err());
    }
}
