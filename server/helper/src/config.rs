//! The helper's command line. It comes from whoever started the helper (root or the daemon's user
//! before any request exists), so it is trusted; it is still checked for consistency.

use std::path::PathBuf;

use sandboxd_protocol::wire::Mode;

/// Ids each sandbox gets in privileged mode: enough for a distribution's system users and nobody.
pub const UID_RANGE_SIZE: u32 = 65536;

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// The only uid allowed to talk to the helper and to the monitors: the daemon's.
    pub allow_uid: u32,
    /// The daemon's primary gid (`--allow-gid`, required as root), the group of files the
    /// daemon must read.
    pub allow_gid: u32,
    pub mode: Mode,
    pub uid_base: u32,
    pub uid_slots: u32,
    /// Exit when standard input reaches end of file: the daemon holds the other end of the pipe.
    pub exit_with_stdin: bool,
    /// Do not manage cgroups (an operator's choice): no limits are enforceable then.
    pub no_cgroups: bool,
    /// Capabilities a sandbox may keep beyond the default bounding set (the operator's choice).
    pub allowed_caps: Vec<&'static str>,
    /// Whether sandboxes may ask for nested user namespaces (the operator's choice).
    pub allow_nested_userns: bool,
    /// Largest unpacked size of an image (`--max-image-bytes`).
    pub max_image_bytes: u64,
    /// Where bridged sandboxes get their addresses (`--net-subnet`).
    pub net_subnet: sandboxd_protocol::net::Subnet,
    /// The host ports sandboxes may publish (`--publish-ports`); unspecified ones are chosen in it.
    pub publish_ports: sandboxd_protocol::net::PortRange,
    /// Egress of bridged sandboxes (`--egress-*`); off unless `--egress-dns` is given.
    pub egress: EgressConfig,
}

// --- egress (issue 13): the `--egress-*` flags, one block --------------------------------

/// The default hub↔uplink link (`--egress-link`): a /30 of the CGNAT range, which every policy
/// denies anyway (`ALWAYS_DENIED`), at its very end where carrier equipment rarely sits.
pub const DEFAULT_EGRESS_LINK: &str = "100.127.255.252/30";

/// The `--egress-*` flags. The daemon passes its own flags of the same names through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressConfig {
    /// The network namespace the hub's uplink goes into (`--egress-uplink PATH`); `None`: the
    /// helper's own (the host's).
    pub uplink: Option<PathBuf>,
    /// The resolver the filter asks (`--egress-dns ADDR[:PORT]`); egress is on only with it.
    pub dns: Option<std::net::SocketAddrV4>,
    /// Always-denied ranges the operator lifts (`--egress-allow-range CIDR`, repeatable).
    pub allow_ranges: Vec<sandboxd_api::egress::Ipv4Net>,
    /// The hub↔uplink link (`--egress-link CIDR`, a /30 or /31): the uplink's end takes the
    /// first address, the hub's the second.
    pub link: sandboxd_api::egress::Ipv4Net,
}

impl EgressConfig {
    /// The uplink namespace's end of the link and the hub's end.
    pub fn link_addresses(&self) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
        let base = u32::from(self.link.network());
        let first = if self.link.prefix_len() == 31 { 0 } else { 1 };
        (
            std::net::Ipv4Addr::from(base + first),
            std::net::Ipv4Addr::from(base + first + 1),
        )
    }

    /// Parse one `--egress-*` flag's value into `self`; false when `flag` is not one of them.
    fn parse_flag(
        &mut self,
        flag: &str,
        value: &mut dyn FnMut() -> Result<String, ConfigError>,
    ) -> Result<bool, ConfigError> {
        let invalid = |v: String, why: &str| {
            ConfigError::InvalidValue(flag.to_owned(), format!("{v}: {why}"))
        };
        match flag {
            "--egress-uplink" => {
                let v = value()?;
                if !v.starts_with('/') {
                    return Err(invalid(v, "must be an absolute path"));
                }
                self.uplink = Some(PathBuf::from(v));
            }
            "--egress-dns" => {
                let v = value()?;
                let addr = match v.parse::<std::net::SocketAddrV4>() {
                    Ok(a) => a,
                    Err(_) => match v.parse::<std::net::Ipv4Addr>() {
                        Ok(a) => std::net::SocketAddrV4::new(a, 53),
                        Err(_) => return Err(invalid(v, "expected ADDR or ADDR:PORT (IPv4)")),
                    },
                };
                if addr.port() == 0 {
                    return Err(invalid(v, "the port must be 1-65535"));
                }
                self.dns = Some(addr);
            }
            "--egress-allow-range" => {
                let v = value()?;
                let net = v
                    .parse()
                    .map_err(|e: sandboxd_api::egress::EgressRuleError| {
                        invalid(v.clone(), &e.to_string())
                    })?;
                self.allow_ranges.push(net);
            }
            "--egress-link" => {
                let v = value()?;
                let net: sandboxd_api::egress::Ipv4Net =
                    v.parse()
                        .map_err(|e: sandboxd_api::egress::EgressRuleError| {
                            invalid(v.clone(), &e.to_string())
                        })?;
                if !(30..=31).contains(&net.prefix_len()) {
                    return Err(invalid(v, "the link must be a /30 or a /31"));
                }
                self.link = net;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl Default for EgressConfig {
    fn default() -> EgressConfig {
        EgressConfig {
            uplink: None,
            dns: None,
            allow_ranges: Vec::new(),
            link: DEFAULT_EGRESS_LINK
                .parse()
                .unwrap_or_else(|_| unreachable!("the default link parses")),
        }
    }
}

// --- end of egress -------------------------------------------------------------------------

/// Default cap on an image's unpacked size.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 8 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("missing value for {0}")]
    MissingValue(String),
    #[error("invalid value for {0}: {1}")]
    InvalidValue(String, String),
    #[error("unknown argument {0}")]
    UnknownArgument(String),
    #[error("--state-dir and --allow-uid are required")]
    Missing,
    #[error("--allow-gid is required when the helper runs as root (the daemon's primary group)")]
    MissingGid,
    #[error("uid ranges {base}..{end} overlap uid {uid} (root or the daemon's uid must never be mapped into a sandbox)")]
    Overlap { base: u64, end: u64, uid: u32 },
    #[error("uid ranges end past the largest uid ({0})")]
    TooLarge(u64),
}

impl Config {
    pub fn parse(args: impl Iterator<Item = String>, euid: u32) -> Result<Config, ConfigError> {
        let mut state_dir = None;
        let mut allow_uid = None;
        let mut allow_gid = None;
        let mut uid_base = 100_000_000u32;
        let mut uid_slots = 1024u32;
        let mut exit_with_stdin = false;
        let mut no_cgroups = false;
        let mut allowed_caps = Vec::new();
        let mut allow_nested_userns = false;
        let mut max_image_bytes = DEFAULT_MAX_IMAGE_BYTES;
        let mut net_subnet = None;
        let mut publish_ports = None;
        let mut egress = EgressConfig::default();
        let mut args = args.peekable();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .ok_or_else(|| ConfigError::MissingValue(flag.clone()))
            };
            let number = |v: String| {
                v.parse::<u32>()
                    .map_err(|_| ConfigError::InvalidValue(flag.clone(), v))
            };
            match flag.as_str() {
                "--state-dir" => state_dir = Some(PathBuf::from(value()?)),
                "--allow-uid" => allow_uid = Some(number(value()?)?),
                "--allow-gid" => allow_gid = Some(number(value()?)?),
                "--uid-base" => uid_base = number(value()?)?,
                "--uid-slots" => uid_slots = number(value()?)?,
                "--exit-with-stdin" => exit_with_stdin = true,
                "--no-cgroups" => no_cgroups = true,
                "--allow-nested-userns" => allow_nested_userns = true,
                "--max-image-bytes" => {
                    let v = value()?;
                    max_image_bytes = v
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| ConfigError::InvalidValue(flag.clone(), v))?;
                }
                "--net-subnet" => {
                    let v = value()?;
                    match sandboxd_protocol::net::Subnet::parse(&v) {
                        Ok(s) => net_subnet = Some(s),
                        Err(e) => {
                            return Err(ConfigError::InvalidValue(flag.clone(), e.to_string()))
                        }
                    }
                }
                "--publish-ports" => {
                    let v = value()?;
                    match sandboxd_protocol::net::PortRange::parse(&v) {
                        Ok(r) => publish_ports = Some(r),
                        Err(e) => {
                            return Err(ConfigError::InvalidValue(flag.clone(), e.to_string()))
                        }
                    }
                }
                "--allow-cap" => {
                    let name = value()?;
                    match sandboxd_protocol::capabilities::canonical(&name) {
                        Some(cap) => allowed_caps.push(cap),
                        None => return Err(ConfigError::InvalidValue("--allow-cap".into(), name)),
                    }
                }
                f if f.starts_with("--egress-") => {
                    if !egress.parse_flag(f, &mut value)? {
                        return Err(ConfigError::UnknownArgument(flag));
                    }
                }
                _ => return Err(ConfigError::UnknownArgument(flag)),
            }
        }
        let (Some(state_dir), Some(allow_uid)) = (state_dir, allow_uid) else {
            return Err(ConfigError::Missing);
        };
        if !state_dir.is_absolute() {
            return Err(ConfigError::InvalidValue(
                "--state-dir".into(),
                "must be an absolute path".into(),
            ));
        }
        let mode = if euid == 0 {
            Mode::Privileged
        } else {
            Mode::Rootless
        };
        let config = Config {
            state_dir,
            allow_uid,
            // Privileged: the daemon's primary group, which only the daemon knows (a gid
            // equal to its uid's number may be an unrelated group). Rootless: the helper's own
            // group, the only one it may chown to.
            allow_gid: match allow_gid {
                Some(gid) => gid,
                None if euid == 0 => return Err(ConfigError::MissingGid),
                None => nix::unistd::getegid().as_raw(),
            },
            mode,
            uid_base,
            uid_slots,
            exit_with_stdin,
            no_cgroups,
            allowed_caps,
            allow_nested_userns,
            max_image_bytes,
            net_subnet: match net_subnet {
                Some(s) => s,
                None => {
                    sandboxd_protocol::net::Subnet::parse(sandboxd_protocol::net::DEFAULT_SUBNET)
                        .map_err(|e| {
                            ConfigError::InvalidValue("--net-subnet".into(), e.to_string())
                        })?
                }
            },
            publish_ports: match publish_ports {
                Some(r) => r,
                None => sandboxd_protocol::net::PortRange::parse(
                    sandboxd_protocol::net::DEFAULT_PUBLISH_PORTS,
                )
                .map_err(|e| ConfigError::InvalidValue("--publish-ports".into(), e.to_string()))?,
            },
            egress,
        };
        if mode == Mode::Privileged {
            config.check_ranges()?;
        }
        Ok(config)
    }

    /// Every host id a privileged helper maps: the sandboxes' ranges, then one more, the image
    /// range (see `image_base`), as `first..end`.
    pub fn id_range(&self) -> (u64, u64) {
        let base = u64::from(self.uid_base);
        (
            base,
            base + (u64::from(self.uid_slots) + 1) * u64::from(UID_RANGE_SIZE),
        )
    }

    fn check_ranges(&self) -> Result<(), ConfigError> {
        let (base, end) = self.id_range();
        if end > u64::from(u32::MAX - 1) {
            return Err(ConfigError::TooLarge(end));
        }
        for uid in [0, self.allow_uid, self.allow_gid] {
            if (base..end).contains(&u64::from(uid)) {
                return Err(ConfigError::Overlap { base, end, uid });
            }
        }
        Ok(())
    }

    /// First host id of the image range, right after the last slot's: stored image files are
    /// owned by `image_base + id-in-the-image`, never by a real host user (and never by root).
    pub fn image_base(&self) -> u32 {
        self.uid_base + self.uid_slots * UID_RANGE_SIZE
    }

    /// First host id of a slot's range.
    pub fn slot_base(&self, slot: u32) -> u32 {
        self.uid_base + slot * UID_RANGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], euid: u32) -> Result<Config, ConfigError> {
        Config::parse(args.iter().map(|s| s.to_string()), euid)
    }

    #[test]
    fn privileged_ranges_never_cover_root_or_the_daemon() {
        let ok = parse(
            &[
                "--state-dir",
                "/s",
                "--allow-uid",
                "999",
                "--allow-gid",
                "995",
            ],
            0,
        )
        .unwrap();
        assert_eq!(ok.mode, Mode::Privileged);
        assert_eq!((ok.allow_uid, ok.allow_gid), (999, 995));
        assert!(matches!(
            parse(&["--state-dir", "/s", "--allow-uid", "999"], 0),
            Err(ConfigError::MissingGid)
        ));
        assert_eq!(ok.slot_base(2), 100_000_000 + 2 * 65536);
        assert!(matches!(
            parse(
                &[
                    "--state-dir",
                    "/s",
                    "--allow-uid",
                    "100000005",
                    "--allow-gid",
                    "5"
                ],
                0
            ),
            Err(ConfigError::Overlap { .. })
        ));
        assert!(matches!(
            parse(
                &[
                    "--state-dir",
                    "/s",
                    "--allow-uid",
                    "5",
                    "--allow-gid",
                    "5",
                    "--uid-base",
                    "0"
                ],
                0
            ),
            Err(ConfigError::Overlap { .. })
        ));
        assert!(parse(
            &[
                "--state-dir",
                "/s",
                "--allow-uid",
                "5",
                "--allow-gid",
                "5",
                "--uid-slots",
                "90000"
            ],
            0
        )
        .is_err());
    }

    #[test]
    fn egress_flags_parse_and_are_checked() {
        let c = parse(
            &["--state-dir", "/s", "--allow-uid", "9", "--allow-gid", "9"],
            0,
        )
        .unwrap();
        assert_eq!(c.egress, EgressConfig::default());
        assert_eq!(
            c.egress.link_addresses(),
            (
                "100.127.255.253".parse().unwrap(),
                "100.127.255.254".parse().unwrap()
            )
        );
        let c = parse(
            &[
                "--state-dir",
                "/s",
                "--allow-uid",
                "9",
                "--allow-gid",
                "9",
                "--egress-uplink",
                "/run/netns/x",
                "--egress-dns",
                "198.51.100.53",
                "--egress-allow-range",
                "10.1.0.0/16",
                "--egress-allow-range",
                "192.168.7.0/24",
                "--egress-link",
                "100.100.0.0/31",
            ],
            0,
        )
        .unwrap();
        assert_eq!(
            c.egress.uplink.as_deref(),
            Some(std::path::Path::new("/run/netns/x"))
        );
        assert_eq!(c.egress.dns, Some("198.51.100.53:53".parse().unwrap()));
        assert_eq!(c.egress.allow_ranges.len(), 2);
        assert_eq!(
            c.egress.link_addresses(),
            (
                "100.100.0.0".parse().unwrap(),
                "100.100.0.1".parse().unwrap()
            )
        );
        let c = parse(
            &[
                "--state-dir",
                "/s",
                "--allow-uid",
                "9",
                "--allow-gid",
                "9",
                "--egress-dns",
                "127.0.0.1:5353",
            ],
            0,
        )
        .unwrap();
        assert_eq!(c.egress.dns, Some("127.0.0.1:5353".parse().unwrap()));
        for bad in [
            ["--egress-uplink", "relative"],
            ["--egress-dns", "resolver.example"],
            ["--egress-dns", "1.2.3.4:0"],
            ["--egress-allow-range", "10.1.2.3/16"],
            ["--egress-link", "100.100.0.0/29"],
            ["--egress-nonsense", "x"],
        ] {
            let mut args = vec!["--state-dir", "/s", "--allow-uid", "9", "--allow-gid", "9"];
            assert!(parse(&args, 0).is_ok());
            args.extend(bad);
            assert!(
                matches!(
                    parse(&args, 0),
                    Err(ConfigError::InvalidValue(..) | ConfigError::UnknownArgument(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rejects_relative_state_dir_and_unknown_flags() {
        assert!(parse(&["--state-dir", "s", "--allow-uid", "1"], 1000).is_err());
        assert!(parse(&["--state-dir", "/s", "--allow-uid", "1", "--x"], 1000).is_err());
        assert_eq!(
            parse(&["--state-dir", "/s", "--allow-uid", "1000"], 1000)
                .unwrap()
                .mode,
            Mode::Rootless
        );
    }
}
