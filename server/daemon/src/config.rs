//! Command-line arguments of `sandboxd` and their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::limits::{self, LimitPolicy};

/// Default number of uid ranges (and so of concurrently running sandboxes) in privileged mode.
pub const DEFAULT_UID_SLOTS: u32 = 1024;
/// Default first host uid of the sandbox ranges in privileged mode.
pub const DEFAULT_UID_BASE: u32 = 100_000_000;

#[derive(Debug, Clone, Parser)]
#[command(name = "sandboxd", version, about = "Rootless Linux sandbox daemon")]
pub struct Args {
    /// Address of the HTTP API.
    #[arg(long, env = "SANDBOXD_LISTEN", default_value = "127.0.0.1:4280")]
    pub listen: SocketAddr,
    /// Directory of the database, the helper socket and the sandboxes.
    /// Default: /var/lib/sandboxd as root, else $XDG_STATE_HOME/sandboxd or ~/.local/state/sandboxd.
    #[arg(long, env = "SANDBOXD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// User the daemon runs as after starting the helper (only meaningful when started as root).
    #[arg(long, env = "SANDBOXD_USER", default_value = "sandboxd")]
    pub user: String,
    /// Path of the helper binary. Default: `sandboxd-helper` next to this executable.
    #[arg(long, env = "SANDBOXD_HELPER")]
    pub helper: Option<PathBuf>,
    /// First host uid of the per-sandbox uid ranges (privileged mode).
    #[arg(long, env = "SANDBOXD_UID_BASE", default_value_t = DEFAULT_UID_BASE)]
    pub uid_base: u32,
    /// Number of per-sandbox uid ranges (privileged mode).
    #[arg(long, env = "SANDBOXD_UID_SLOTS", default_value_t = DEFAULT_UID_SLOTS,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub uid_slots: u32,
    /// Extra host names accepted in the `Host` header (IP literals and `localhost` always are):
    /// everything else is refused, which defeats DNS rebinding of a localhost daemon.
    #[arg(
        long = "allowed-host",
        env = "SANDBOXD_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// Browser origins (`https://dash.example:8443`) allowed to open websockets and make
    /// state-changing requests; requests without an `Origin` header (curl, CI) are unaffected.
    #[arg(
        long = "allowed-origin",
        env = "SANDBOXD_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// A capability sandboxes may add to the default bounding set (`capabilities.add`);
    /// repeatable, e.g. `--allow-cap SYS_PTRACE`. Nothing beyond the default set otherwise.
    #[arg(long = "allow-cap", env = "SANDBOXD_ALLOW_CAPS", value_delimiter = ',')]
    pub allow_caps: Vec<String>,
    /// Let requests ask for nested user namespaces (`nested_user_namespaces: true`), which the
    /// seccomp filter refuses by default: inside one a process regains every capability.
    #[arg(long, env = "SANDBOXD_ALLOW_NESTED_USERNS")]
    pub allow_nested_userns: bool,
    /// IPv4 subnet bridged sandboxes get their addresses from (privileged mode); its first
    /// address is the gateway. Each daemon's bridges live in a network namespace of their own,
    /// so the subnet need not be unique on the host.
    #[arg(long, env = "SANDBOXD_NET_SUBNET", default_value = sandboxd_protocol::net::DEFAULT_SUBNET,
          value_parser = |s: &str| sandboxd_protocol::net::Subnet::parse(s).map(|n| n.to_string()))]
    pub net_subnet: String,
    /// Host ports sandboxes may publish, `LOW-HIGH` (inclusive): a requested host port outside
    /// it is refused (422), an unspecified one (0) is chosen inside it. The default lies in
    /// Linux's ephemeral range, where no well-known service listens.
    #[arg(long, env = "SANDBOXD_PUBLISH_PORTS", value_name = "LOW-HIGH",
          default_value = sandboxd_protocol::net::DEFAULT_PUBLISH_PORTS,
          value_parser = |s: &str| sandboxd_protocol::net::PortRange::parse(s))]
    pub publish_ports: sandboxd_protocol::net::PortRange,
    /// Do not put sandboxes in cgroups: no memory, cpus or pids limits, no cgroup accounting
    /// (for hosts where something else manages cgroups, and for measuring their cost).
    #[arg(long, env = "SANDBOXD_NO_CGROUPS")]
    pub no_cgroups: bool,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax (`info`, `sandboxd=debug`...).
    #[arg(long, env = "SANDBOXD_LOG", default_value = "info")]
    pub log_level: String,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub transport: TransportArgs,
    #[command(flatten)]
    pub egress: EgressArgs,
}

/// Egress: the way out of bridged sandboxes (`network.egress`). The helper sets up the uplink
/// and the filter; these flags go to its command line under the same names.
#[derive(Debug, Clone, clap::Args)]
pub struct EgressArgs {
    /// The network namespace (a path like /run/netns/NAME) the hub's uplink goes into; the
    /// host's own when absent.
    #[arg(long, env = "SANDBOXD_EGRESS_UPLINK", value_name = "PATH")]
    pub egress_uplink: Option<PathBuf>,
    /// The resolver the filter asks for names a policy allows, reached through the uplink.
    /// Egress is offered only when it is set.
    #[arg(long, env = "SANDBOXD_EGRESS_DNS", value_name = "ADDR[:PORT]",
          value_parser = parse_dns)]
    pub egress_dns: Option<String>,
    /// An always-denied range (private, loopback, link-local, ...) that policies may open after
    /// all; repeatable.
    #[arg(long = "egress-allow-range", env = "SANDBOXD_EGRESS_ALLOW_RANGES",
          value_delimiter = ',', value_name = "CIDR", value_parser = parse_cidr)]
    pub egress_allow_ranges: Vec<String>,
    /// The /30 (or larger) the link between the hub and the uplink namespace takes its two
    /// addresses from (the helper's default when absent).
    #[arg(long, env = "SANDBOXD_EGRESS_LINK", value_name = "CIDR", value_parser = parse_cidr)]
    pub egress_link: Option<String>,
    /// Which tenants may use egress: `all`, `none` or a comma-separated list.
    #[arg(long, env = "SANDBOXD_EGRESS_TENANTS", value_name = "all|none|LIST",
          default_value = "all", value_parser = limits::EgressTenants::parse)]
    pub egress_tenants: limits::EgressTenants,
}

impl EgressArgs {
    /// The helper's arguments for these flags.
    pub fn helper_args(&self) -> Vec<std::ffi::OsString> {
        let mut out: Vec<std::ffi::OsString> = Vec::new();
        if let Some(p) = &self.egress_uplink {
            out.push("--egress-uplink".into());
            out.push(p.clone().into_os_string());
        }
        if let Some(d) = &self.egress_dns {
            out.push("--egress-dns".into());
            out.push(d.into());
        }
        for r in &self.egress_allow_ranges {
            out.push("--egress-allow-range".into());
            out.push(r.into());
        }
        if let Some(l) = &self.egress_link {
            out.push("--egress-link".into());
            out.push(l.into());
        }
        out
    }
}

/// `ADDR` or `ADDR:PORT` (port 53 when absent), IPv4.
fn parse_dns(s: &str) -> Result<String, String> {
    if s.parse::<std::net::SocketAddrV4>().is_ok() || s.parse::<std::net::Ipv4Addr>().is_ok() {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?}: expected an IPv4 address with an optional :PORT"
        ))
    }
}

fn parse_cidr(s: &str) -> Result<String, String> {
    s.parse::<sandboxd_api::egress::Ipv4Net>()
        .map(|n| n.to_string())
        .map_err(|e| e.to_string())
}

/// How the API is reached beyond the local socket: TLS, CORS and the per-client burst limit.
#[derive(Debug, Clone, clap::Args)]
pub struct TransportArgs {
    /// PEM certificate chain: serve HTTPS. Required (with --tls-key) to listen beyond loopback.
    #[arg(
        long,
        env = "SANDBOXD_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (read before the privilege drop: it may be root's only).
    #[arg(
        long,
        env = "SANDBOXD_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// A browser origin (`https://dash.example:8443`) allowed by CORS and by the Origin check;
    /// repeatable. Never `*`. Without any, no CORS headers are sent.
    #[arg(
        long = "cors-origin",
        env = "SANDBOXD_CORS_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub cors_origins: Vec<String>,
    /// Requests per second one client (one `Authorization` value, else one IP address) may make
    /// on average; beyond its burst it gets 429 with Retry-After. 0 turns the limit off.
    #[arg(
        long,
        env = "SANDBOXD_RATE_LIMIT_PER_SEC",
        value_name = "N",
        default_value_t = 50.0
    )]
    pub rate_limit_per_sec: f64,
    /// Requests one client may make at once before the per-second rate applies.
    #[arg(long, env = "SANDBOXD_RATE_LIMIT_BURST", value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_burst: u32,
    /// Refused credentials one client address may send before it gets 429 (one more comes back
    /// every 2 s).
    #[arg(long, env = "SANDBOXD_FAILED_AUTH_BURST", value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub failed_auth_burst: u32,
}

/// Resource limit defaults (applied when a request omits the limit, and only where the host can
/// enforce it) and maximums (a request above one gets 422). Sizes take K/M/G/T suffixes (binary:
/// 256M = 256 MiB), optionally followed by `i`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Default memory limit of a sandbox (0 for none; default 1G, or --max-memory when that is
    /// lower). It bounds its tmpfs mounts too (their pages are charged to the sandbox's cgroup),
    /// so one sandbox cannot pin the host's memory.
    #[arg(long, env = "SANDBOXD_DEFAULT_MEMORY", value_name = "SIZE", value_parser = limits::parse_size)]
    pub default_memory: Option<u64>,
    /// Default `limits.disk_bytes`: the size of a sandbox's own filesystem (/work, /tmp, an
    /// image root's changes), where the host can mount one (privileged, with loop devices);
    /// writing past it fails with ENOSPC inside. 0 for none.
    #[arg(long, env = "SANDBOXD_DEFAULT_DISK", value_name = "SIZE",
          default_value = "10G", value_parser = limits::parse_size)]
    pub default_disk: u64,
    /// Largest memory limit a request may ask for.
    #[arg(long, env = "SANDBOXD_MAX_MEMORY", value_name = "SIZE", value_parser = limits::parse_size)]
    pub max_memory: Option<u64>,
    /// Default CPU limit, in cores (fractional).
    #[arg(long, env = "SANDBOXD_DEFAULT_CPUS", value_name = "CORES")]
    pub default_cpus: Option<f64>,
    /// Largest CPU limit a request may ask for.
    #[arg(long, env = "SANDBOXD_MAX_CPUS", value_name = "CORES")]
    pub max_cpus: Option<f64>,
    /// Default limit on processes and threads (0 for none).
    #[arg(long, env = "SANDBOXD_DEFAULT_PIDS", value_name = "N", default_value_t = limits::DEFAULT_PIDS)]
    pub default_pids: u64,
    /// Largest pids limit a request may ask for.
    #[arg(long, env = "SANDBOXD_MAX_PIDS", value_name = "N")]
    pub max_pids: Option<u64>,
    /// Default cap on stored output (stdout and stderr together).
    #[arg(long, env = "SANDBOXD_DEFAULT_OUTPUT_BYTES", value_name = "SIZE",
          default_value = "64M", value_parser = limits::parse_size)]
    pub default_output_bytes: u64,
    /// Largest output cap a request may ask for.
    #[arg(long, env = "SANDBOXD_MAX_OUTPUT_BYTES", value_name = "SIZE",
          default_value = "1G", value_parser = limits::parse_size)]
    pub max_output_bytes: u64,
    /// Largest `limits.timeout_secs` a request may ask for.
    #[arg(long, env = "SANDBOXD_MAX_TIMEOUT_SECS", value_name = "SECS")]
    pub max_timeout_secs: Option<u64>,
    /// Largest `ttl_secs` a request (or an extension) may ask for.
    #[arg(long, env = "SANDBOXD_MAX_TTL_SECS", value_name = "SECS")]
    pub max_ttl_secs: Option<u64>,
    /// Largest image: both the upload and its unpacked size (`POST /v1/images`).
    #[arg(long, env = "SANDBOXD_MAX_IMAGE_BYTES", value_name = "SIZE",
          default_value = "8G", value_parser = limits::parse_size)]
    pub max_image_bytes: u64,
    /// Space that must stay free on the state directory's filesystem: a size (`1G`) or a
    /// percentage of the filesystem (`5%`); `0` for none. Below it, image imports and new
    /// sandboxes get 507 while deletes still work (the database lives there too).
    #[arg(long, env = "SANDBOXD_MIN_FREE_SPACE", value_name = "SIZE|PERCENT",
          default_value = crate::storage::DEFAULT_MIN_FREE_SPACE,
          value_parser = crate::storage::Reserve::parse)]
    pub min_free_space: crate::storage::Reserve,
}

impl LimitArgs {
    /// The policy, checked for consistency (defaults well-formed and within the maximums).
    pub fn policy(&self) -> Result<LimitPolicy, ConfigError> {
        let policy = LimitPolicy {
            default_memory: match self.default_memory {
                Some(0) => None,
                Some(m) => Some(m),
                None => Some(self.max_memory.map_or(limits::DEFAULT_MEMORY, |max| {
                    max.min(limits::DEFAULT_MEMORY)
                })),
            },
            max_memory: self.max_memory,
            default_disk: Some(self.default_disk).filter(|d| *d > 0),
            default_cpus: self.default_cpus,
            max_cpus: self.max_cpus,
            default_pids: Some(self.default_pids).filter(|p| *p > 0),
            max_pids: self.max_pids,
            default_output_bytes: self.default_output_bytes,
            max_output_bytes: self.max_output_bytes,
            max_timeout_secs: self.max_timeout_secs,
            max_ttl_secs: self.max_ttl_secs,
            allowed_caps: Vec::new(),
            allow_nested_userns: false,
            max_image_bytes: self.max_image_bytes,
            // Set from `Args::publish_ports` by the caller (it is not a limit flag).
            publish_ports: LimitPolicy::default().publish_ports,
            egress_tenants: limits::EgressTenants::All,
        };
        policy.check().map_err(ConfigError::Limits)?;
        Ok(policy)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot determine the state directory: set --state-dir, XDG_STATE_HOME or HOME")]
    NoStateDir,
    #[error("cannot determine the helper path: pass --helper")]
    NoHelperPath(#[source] std::io::Error),
    #[error("resource limit configuration: {0}")]
    Limits(String),
}

/// Where the state lives when `--state-dir` is absent.
pub fn default_state_dir(is_root: bool) -> Result<PathBuf, ConfigError> {
    if is_root {
        return Ok(PathBuf::from("/var/lib/sandboxd"));
    }
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("sandboxd"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/state/sandboxd")),
        None => Err(ConfigError::NoStateDir),
    }
}

/// `sandboxd-helper` next to the running executable.
pub fn default_helper_path() -> Result<PathBuf, ConfigError> {
    let exe = std::env::current_exe().map_err(ConfigError::NoHelperPath)?;
    Ok(exe.with_file_name("sandboxd-helper"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_flags_parse_with_suffixes_and_defaults() {
        let args = Args::try_parse_from([
            "sandboxd",
            "--max-memory",
            "4G",
            "--default-memory",
            "256Mi",
        ])
        .unwrap();
        let p = args.limits.policy().unwrap();
        assert_eq!(p.max_memory, Some(4 << 30));
        assert_eq!(p.default_memory, Some(256 << 20));
        assert_eq!(p.default_pids, Some(limits::DEFAULT_PIDS));
        assert_eq!(p.default_disk, Some(10 << 30));
        let none = Args::try_parse_from(["sandboxd", "--default-memory", "0"]).unwrap();
        assert_eq!(none.limits.policy().unwrap().default_memory, None);
        let plain = Args::try_parse_from(["sandboxd"]).unwrap();
        assert_eq!(plain.limits.policy().unwrap().default_memory, Some(1 << 30));
        // A lower maximum lowers the implicit default (an explicit one above it is an error).
        let low = Args::try_parse_from(["sandboxd", "--max-memory", "256M"]).unwrap();
        assert_eq!(low.limits.policy().unwrap().default_memory, Some(256 << 20));
        assert_eq!(p.default_output_bytes, 64 << 20);
        assert_eq!(p.max_output_bytes, 1 << 30);
        let args =
            Args::try_parse_from(["sandboxd", "--default-cpus", "4", "--max-cpus", "2"]).unwrap();
        assert!(args.limits.policy().is_err());
        assert!(Args::try_parse_from(["sandboxd", "--max-memory", "lots"]).is_err());
    }

    #[test]
    fn transport_flags_parse() {
        let args = Args::try_parse_from(["sandboxd"]).unwrap();
        assert!(args.transport.tls_cert.is_none() && args.transport.cors_origins.is_empty());
        assert_eq!(args.transport.rate_limit_per_sec, 50.0);
        assert_eq!(args.transport.rate_limit_burst, 500);
        let args = Args::try_parse_from([
            "sandboxd",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--cors-origin",
            "https://a.example",
            "--cors-origin",
            "https://b.example",
            "--rate-limit-per-sec",
            "5",
        ])
        .unwrap();
        assert_eq!(args.transport.cors_origins.len(), 2);
        assert_eq!(args.transport.rate_limit_per_sec, 5.0);
        assert!(Args::try_parse_from(["sandboxd", "--tls-cert", "c.pem"]).is_err());
        assert!(Args::try_parse_from(["sandboxd", "--rate-limit-burst", "0"]).is_err());
    }

    #[test]
    fn egress_flags_parse_and_go_to_the_helper_by_the_same_names() {
        let args = Args::try_parse_from(["sandboxd"]).unwrap();
        assert!(args.egress.helper_args().is_empty());
        assert_eq!(args.egress.egress_tenants, limits::EgressTenants::All);
        let args = Args::try_parse_from([
            "sandboxd",
            "--egress-uplink",
            "/run/netns/up",
            "--egress-dns",
            "198.51.100.53",
            "--egress-allow-range",
            "10.1.0.0/16",
            "--egress-allow-range",
            "192.168.7.0/24",
            "--egress-link",
            "169.254.77.0/30",
            "--egress-tenants",
            "ci,dev",
        ])
        .unwrap();
        let helper: Vec<String> = args
            .egress
            .helper_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            helper,
            [
                "--egress-uplink",
                "/run/netns/up",
                "--egress-dns",
                "198.51.100.53",
                "--egress-allow-range",
                "10.1.0.0/16",
                "--egress-allow-range",
                "192.168.7.0/24",
                "--egress-link",
                "169.254.77.0/30"
            ]
        );
        assert!(args.egress.egress_tenants.allows("ci"));
        assert!(!args.egress.egress_tenants.allows("other"));
        assert!(Args::try_parse_from(["sandboxd", "--egress-dns", "dns.example"]).is_err());
        assert!(Args::try_parse_from(["sandboxd", "--egress-allow-range", "10.0.0.1/8"]).is_err());
        assert!(Args::try_parse_from(["sandboxd", "--egress-tenants", ","]).is_err());
        let none = Args::try_parse_from(["sandboxd", "--egress-tenants", "none"]).unwrap();
        assert!(!none.egress.egress_tenants.allows("default"));
    }
}
