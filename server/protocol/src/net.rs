//! The subnet bridged sandboxes take their addresses from, and the names of their interfaces.
//!
//! Shared by the daemon (which allocates addresses and persists them) and the helper (which
//! checks every address it is sent against its own copy of the subnet).

use std::net::Ipv4Addr;

/// The default subnet of bridged sandboxes. Each daemon's bridges live in a network namespace
/// of their own (the "hub"), so daemons never see each other's addresses and may share it.
pub const DEFAULT_SUBNET: &str = "10.88.0.0/16";

/// An IPv4 subnet in CIDR form whose first host address is the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: u32,
    prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("{0:?} is not an IPv4 subnet in CIDR form (like 10.88.0.0/16)")]
    Syntax(String),
    #[error("the prefix length must be between 8 and 28, not {0}")]
    Prefix(u8),
    #[error("{0} has host bits set; the network address is {1}")]
    HostBits(String, Ipv4Addr),
}

impl Subnet {
    pub fn parse(s: &str) -> Result<Subnet, SubnetError> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| SubnetError::Syntax(s.to_owned()))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| SubnetError::Syntax(s.to_owned()))?;
        let prefix_len: u8 = len.parse().map_err(|_| SubnetError::Syntax(s.to_owned()))?;
        if !(8..=28).contains(&prefix_len) {
            return Err(SubnetError::Prefix(prefix_len));
        }
        let mask = u32::MAX << (32 - prefix_len);
        let network = u32::from(addr);
        if network & !mask != 0 {
            return Err(SubnetError::HostBits(
                s.to_owned(),
                Ipv4Addr::from(network & mask),
            ));
        }
        Ok(Subnet {
            network,
            prefix_len,
        })
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Number of addresses, network and broadcast included.
    pub fn size(&self) -> u32 {
        1u32 << (32 - self.prefix_len)
    }

    /// The gateway: the first host address, held by every bridge in the hub.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    /// Host number `index` of the subnet, if it may be given to a sandbox (not the network,
    /// the gateway or the broadcast address).
    pub fn host(&self, index: u32) -> Option<Ipv4Addr> {
        (2..self.size() - 1)
            .contains(&index)
            .then(|| Ipv4Addr::from(self.network + index))
    }

    /// Smallest and largest host number a sandbox may get.
    pub fn host_range(&self) -> (u32, u32) {
        (2, self.size() - 2)
    }

    /// Whether `addr` may be a sandbox's address in this subnet.
    pub fn is_sandbox_address(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        a.wrapping_sub(self.network) < self.size() && self.host(a - self.network).is_some()
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.network), self.prefix_len)
    }
}

/// Group names: 1-63 of `[a-z0-9_.-]`, starting with a letter or digit.
pub fn valid_group(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
}

/// FNV-1a, 48 bits, as 12 hex digits (the same hash names the helper's cgroups).
fn fnv12(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:012x}", hash & 0xffff_ffff_ffff)
}

/// The bridge of a group in the hub (`br` and 12 hex digits: 14 bytes, within IFNAMSIZ). A
/// sandbox without a group has no bridge: its veth's hub end holds the gateway.
pub fn bridge_name(group: &str) -> String {
    format!("br{}", fnv12(format!("group:{group}").as_bytes()))
}

/// The hub's end of a sandbox's veth pair (`ve` and the id's first 12 hex digits).
pub fn veth_name(id: uuid::Uuid) -> String {
    format!("ve{}", &id.simple().to_string()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_hand_out_only_host_addresses() {
        let s = Subnet::parse("10.88.0.0/16").unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 88, 0, 1));
        assert_eq!(s.host(2), Some(Ipv4Addr::new(10, 88, 0, 2)));
        assert_eq!(s.host(1), None);
        assert_eq!(s.host(65535), None);
        assert_eq!(s.host_range(), (2, 65534));
        assert!(s.is_sandbox_address(Ipv4Addr::new(10, 88, 255, 254)));
        assert!(!s.is_sandbox_address(Ipv4Addr::new(10, 88, 0, 1)));
        assert!(!s.is_sandbox_address(Ipv4Addr::new(10, 89, 0, 2)));
        assert!(!s.is_sandbox_address(Ipv4Addr::new(10, 87, 255, 255)));
        assert!(Subnet::parse("10.88.0.1/16").is_err());
        assert!(Subnet::parse("10.88.0.0/30").is_err());
        assert!(Subnet::parse("10.88.0.0").is_err());
        assert_eq!(s.to_string(), "10.88.0.0/16");
    }

    #[test]
    fn interface_names_fit_ifnamsiz_and_groups_are_checked() {
        let id = uuid::Uuid::new_v4();
        assert_eq!(bridge_name("web").len(), 14);
        assert_ne!(bridge_name("web"), bridge_name("db"));
        assert_eq!(veth_name(id).len(), 14);
        assert!(valid_group("ci-42.db_x"));
        assert!(!valid_group("-x"));
        assert!(!valid_group("Web"));
        assert!(!valid_group(""));
        assert!(!valid_group(&"a".repeat(64)));
    }
}

/// The default range of published host ports: inside Linux's default ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), where no well-known service listens.
pub const DEFAULT_PUBLISH_PORTS: &str = "32768-60999";

/// The host ports sandboxes may publish (`--publish-ports LOW-HIGH`, inclusive). A requested
/// port outside it is refused; an unspecified one (0) is chosen inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("{0:?} is not a port range of the form LOW-HIGH (like 32768-60999)")]
    Syntax(String),
    #[error(
        "the port range {0}-{1} is empty or starts below 1024 (the host's own services' ports)"
    )]
    Bounds(u16, u16),
}

impl PortRange {
    pub fn parse(s: &str) -> Result<PortRange, PortRangeError> {
        let syntax = || PortRangeError::Syntax(s.to_owned());
        let (low, high) = s.trim().split_once('-').ok_or_else(syntax)?;
        let low: u16 = low.trim().parse().map_err(|_| syntax())?;
        let high: u16 = high.trim().parse().map_err(|_| syntax())?;
        if low < 1024 || high < low {
            return Err(PortRangeError::Bounds(low, high));
        }
        Ok(PortRange { low, high })
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    /// Number of ports in the range.
    pub fn len(&self) -> u32 {
        u32::from(self.high) - u32::from(self.low) + 1
    }

    /// Never true: a parsed range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `n`-th port of the range counting from `start` and wrapping around (`start` is taken
    /// modulo the range's length), for trying every port once from a random place.
    pub fn nth_from(&self, start: u32, n: u32) -> u16 {
        let offset = (start.wrapping_add(n)) % self.len();
        // The offset is below len() <= 65536 - 1024, so this stays within low..=high.
        u16::try_from(u32::from(self.low) + offset).unwrap_or(self.high)
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

#[cfg(test)]
mod port_range_tests {
    use super::*;

    #[test]
    fn ranges_parse_and_wrap() {
        let r = PortRange::parse(DEFAULT_PUBLISH_PORTS).unwrap();
        assert_eq!((r.low, r.high, r.len()), (32768, 60999, 28232));
        assert!(r.contains(32768) && r.contains(60999) && !r.contains(6379));
        assert_eq!(r.to_string(), "32768-60999");
        let small = PortRange::parse("40000-40002").unwrap();
        let all: Vec<u16> = (0..3).map(|n| small.nth_from(7, n)).collect();
        assert_eq!(all, vec![40001, 40002, 40000]);
        assert_eq!(PortRange::parse("5000-5000").unwrap().len(), 1);
        for bad in ["", "1-2", "80-90", "5000", "6000-5000", "a-b", "2000-70000"] {
            assert!(PortRange::parse(bad).is_err(), "{bad}");
        }
    }
}
