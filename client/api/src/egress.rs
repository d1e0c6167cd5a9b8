//! Egress policies: which destinations outside its group a bridged sandbox may reach.
//!
//! One rule type, parsed once ([`EgressRule::from_str`]) and shared by every side: the daemon
//! validates `network.egress` with it (a 400/422 names the rule), `sbx run --egress` parses its
//! flags with it, and the egress filter in the hub decides each connection with
//! [`EgressPolicy::check_name`] and [`EgressPolicy::check_address`]. On the wire a rule is a
//! string (`"pypi.org"`, `"*.npmjs.org:443"`, `"203.0.113.7"`, `"198.51.100.0/24:53"`, `"*"`).
//!
//! Ranges that are never reachable whatever the rules say (loopback, RFC 1918, link-local,
//! CGNAT, multicast, ...) are [`always_denied`]; the operator lifts one per range.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest DNS name a rule may carry (RFC 1035: 253 characters in text form).
pub const MAX_NAME: usize = 253;
/// Most rules in one policy (`allow` and `deny` together).
pub const MAX_RULES: usize = 256;

/// Why a rule or a policy is refused; the message reads after the rule (`"x": ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressRuleError {
    #[error("{0:?}: a rule is a name (pypi.org), a wildcard name (*.npmjs.org), an IPv4 address or CIDR (203.0.113.7, 198.51.100.0/24), each with an optional :PORT, or \"*\"")]
    Syntax(String),
    #[error("{0:?}: IPv6 destinations are not supported (sandboxes have IPv4 only)")]
    Ipv6(String),
    #[error("{0:?}: the port must be 1-65535")]
    Port(String),
    #[error("{0:?}: the prefix length must be 0-32")]
    Prefix(String),
    #[error("{0:?}: has host bits set; the network address is {1}")]
    HostBits(String, Ipv4Addr),
    #[error("{0:?}: a name must be dot-separated labels of 1-63 letters, digits or '-' (at most {MAX_NAME} bytes)")]
    Name(String),
    #[error("a policy has at most {MAX_RULES} rules")]
    TooMany,
}

/// An IPv4 network in CIDR form (`198.51.100.0/24`); a plain address is a `/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl Ipv4Net {
    /// `network/prefix_len`, refused when host bits are set.
    pub fn new(network: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Net> {
        if prefix_len > 32 || u32::from(network) & !mask(prefix_len) != 0 {
            return None;
        }
        Some(Ipv4Net {
            network,
            prefix_len,
        })
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix_len) == u32::from(self.network)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for Ipv4Net {
    type Err = EgressRuleError;

    fn from_str(s: &str) -> Result<Ipv4Net, EgressRuleError> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| EgressRuleError::Syntax(s.to_owned()))?;
        let prefix_len = match len {
            None => 32,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| EgressRuleError::Prefix(s.to_owned()))?,
        };
        Ipv4Net::new(addr, prefix_len).ok_or_else(|| {
            EgressRuleError::HostBits(
                s.to_owned(),
                Ipv4Addr::from(u32::from(addr) & mask(prefix_len)),
            )
        })
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

/// What a rule matches, before its optional port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Destination {
    /// `*`: every destination outside the always-denied ranges.
    Any,
    /// An exact DNS name, lower case, without a trailing dot.
    Name(String),
    /// `*.suffix`: every name strictly below `suffix` (not `suffix` itself), lower case.
    Wildcard(String),
    /// An address or a network.
    Net(Ipv4Net),
}

/// One rule of an egress policy: a destination and, optionally, the one port it covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EgressRule {
    pub destination: Destination,
    pub port: Option<u16>,
}

impl EgressRule {
    /// Does the rule cover a connection to `name` on `port`? Only name and wildcard rules
    /// (and `*`) match names.
    pub fn matches_name(&self, name: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        let name = name.trim_end_matches('.');
        match &self.destination {
            Destination::Any => true,
            Destination::Name(n) => n.eq_ignore_ascii_case(name),
            Destination::Wildcard(suffix) => {
                name.len() > suffix.len() + 1
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                    && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            Destination::Net(_) => false,
        }
    }

    /// Does the rule cover a connection to `addr` on `port`? Only address rules (and `*`)
    /// match addresses.
    pub fn matches_address(&self, addr: Ipv4Addr, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        match &self.destination {
            Destination::Any => true,
            Destination::Net(net) => net.contains(addr),
            Destination::Name(_) | Destination::Wildcard(_) => false,
        }
    }

    /// Is this a name (or wildcard, or `*`) rule, one that lets DNS answer names?
    pub fn is_name_rule(&self) -> bool {
        !matches!(self.destination, Destination::Net(_))
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
        // A name made only of digits and dots would read as an address.
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

impl FromStr for EgressRule {
    type Err = EgressRuleError;

    fn from_str(s: &str) -> Result<EgressRule, EgressRuleError> {
        let text = s.trim();
        if text.is_empty() || text.contains("://") {
            return Err(EgressRuleError::Syntax(s.to_owned()));
        }
        if text.starts_with('[') || text.matches(':').count() > 1 {
            return Err(EgressRuleError::Ipv6(s.to_owned()));
        }
        let (dest, port) = match text.rsplit_once(':') {
            Some((d, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| EgressRuleError::Port(s.to_owned()))?;
                (d, Some(port))
            }
            None => (text, None),
        };
        let destination = if dest == "*" {
            Destination::Any
        } else if let Some(suffix) = dest.strip_prefix("*.") {
            let suffix = suffix.trim_end_matches('.').to_ascii_lowercase();
            if !valid_name(&suffix) {
                return Err(EgressRuleError::Name(s.to_owned()));
            }
            Destination::Wildcard(suffix)
        } else if dest
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
        {
            Destination::Net(dest.parse().map_err(|e| match e {
                EgressRuleError::Syntax(_) => EgressRuleError::Syntax(s.to_owned()),
                EgressRuleError::Prefix(_) => EgressRuleError::Prefix(s.to_owned()),
                EgressRuleError::HostBits(_, n) => EgressRuleError::HostBits(s.to_owned(), n),
                other => other,
            })?)
        } else {
            let name = dest.trim_end_matches('.').to_ascii_lowercase();
            if !valid_name(&name) {
                return Err(EgressRuleError::Name(s.to_owned()));
            }
            Destination::Name(name)
        };
        Ok(EgressRule { destination, port })
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.destination {
            Destination::Any => f.write_str("*")?,
            Destination::Name(n) => f.write_str(n)?,
            Destination::Wildcard(s) => write!(f, "*.{s}")?,
            Destination::Net(net) if net.prefix_len() == 32 => write!(f, "{}", net.network())?,
            Destination::Net(net) => write!(f, "{net}")?,
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl Serialize for EgressRule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EgressRule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `network.egress` of a bridged sandbox. No policy at all means no egress: nothing beyond the
/// sandbox's group. `deny` wins over `allow`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    #[serde(default)]
    pub allow: Vec<EgressRule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<EgressRule>,
}

/// What the policy says of one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Matched a `deny` rule, or no `allow` rule.
    Deny,
}

impl EgressPolicy {
    /// Refuse a policy with more than [`MAX_RULES`] rules.
    pub fn check_size(&self) -> Result<(), EgressRuleError> {
        if self.allow.len() + self.deny.len() > MAX_RULES {
            return Err(EgressRuleError::TooMany);
        }
        Ok(())
    }

    /// The verdict on a connection (or a DNS question) for `name` on `port`, by name rules
    /// alone. The filter must still check that the address it connects to is one it resolved
    /// for that name, and is not [`always_denied`].
    pub fn check_name(&self, name: &str, port: u16) -> Verdict {
        if self.deny.iter().any(|r| r.matches_name(name, port)) {
            return Verdict::Deny;
        }
        if self.allow.iter().any(|r| r.matches_name(name, port)) {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }

    /// May DNS answer `name` at all (some name rule allows it on some port)? Port-specific
    /// denials are decided at connection time.
    pub fn may_resolve(&self, name: &str) -> bool {
        let denied_on_every_port = self
            .deny
            .iter()
            .any(|r| r.port.is_none() && r.matches_name(name, 0));
        !denied_on_every_port
            && self
                .allow
                .iter()
                .any(|r| r.is_name_rule() && r.matches_name(name, r.port.unwrap_or(0)))
    }

    /// The verdict on a connection to `addr` on `port`, by address rules alone (and `*`).
    /// An address `deny` rule also denies a named connection that lands on that address.
    pub fn check_address(&self, addr: Ipv4Addr, port: u16) -> Verdict {
        if self.denies_address(addr, port) {
            return Verdict::Deny;
        }
        if self.allow.iter().any(|r| r.matches_address(addr, port)) {
            Verdict::Allow
        } else {
            Verdict::Deny
        }
    }

    /// Does an address `deny` rule cover `addr:port`?
    pub fn denies_address(&self, addr: Ipv4Addr, port: u16) -> bool {
        self.deny.iter().any(|r| r.matches_address(addr, port))
    }
}

/// Why the filter refused a connection or a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenialReason {
    /// No `allow` rule covers it, or a `deny` rule does.
    NotAllowed,
    /// The destination is in an always-denied range (loopback, private, link-local, ...).
    PrivateRange,
    /// The TLS server name or HTTP Host names a host that did not resolve to the address the
    /// connection was made to.
    NameMismatch,
}

/// One refused connection or DNS question of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressDenial {
    /// RFC 3339 time of the denial.
    #[serde(with = "time::serde::rfc3339")]
    pub at: time::OffsetDateTime,
    /// `tcp`, `udp` or `dns`.
    pub protocol: String,
    /// The destination address (absent for a DNS question that was answered NXDOMAIN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The name asked for (DNS) or presented (TLS server name, HTTP Host), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub reason: DenialReason,
}

/// Per-sandbox egress counters, totals since the sandbox was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressCounters {
    pub connections_allowed: u64,
    pub connections_denied: u64,
    /// Bytes from the sandbox to its destinations.
    pub bytes_out: u64,
    /// Bytes from the destinations to the sandbox.
    pub bytes_in: u64,
}

/// A range no rule opens unless the operator lifts it, with the name shown in docs and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedRange {
    pub net: Ipv4Net,
    pub what: &'static str,
}

const fn range(a: u8, b: u8, c: u8, d: u8, prefix_len: u8, what: &'static str) -> DeniedRange {
    DeniedRange {
        net: Ipv4Net {
            network: Ipv4Addr::new(a, b, c, d),
            prefix_len,
        },
        what,
    }
}

/// Destinations denied whatever a policy says: the IANA special-purpose ranges a sandbox has no
/// business reaching. Besides these the filter denies the host's own addresses, the daemon's
/// API and other groups, which depend on the host and are checked there.
pub const ALWAYS_DENIED: &[DeniedRange] = &[
    range(0, 0, 0, 0, 8, "\"this\" network"),
    range(10, 0, 0, 0, 8, "private (RFC 1918)"),
    range(100, 64, 0, 0, 10, "shared address space (CGNAT)"),
    range(127, 0, 0, 0, 8, "loopback"),
    range(169, 254, 0, 0, 16, "link-local (cloud metadata included)"),
    range(172, 16, 0, 0, 12, "private (RFC 1918)"),
    range(192, 0, 0, 0, 24, "IETF protocol assignments"),
    range(192, 168, 0, 0, 16, "private (RFC 1918)"),
    range(198, 18, 0, 0, 15, "benchmarking"),
    range(224, 0, 0, 0, 4, "multicast"),
    range(240, 0, 0, 0, 4, "reserved and broadcast"),
];

/// The always-denied range `addr` is in, unless one of `lifted` (operator-set) covers it.
pub fn always_denied(addr: Ipv4Addr, lifted: &[Ipv4Net]) -> Option<&'static DeniedRange> {
    if lifted.iter().any(|n| n.contains(addr)) {
        return None;
    }
    ALWAYS_DENIED.iter().find(|r| r.net.contains(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> EgressRule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn policy(allow: &[&str], deny: &[&str]) -> EgressPolicy {
        EgressPolicy {
            allow: allow.iter().map(|s| rule(s)).collect(),
            deny: deny.iter().map(|s| rule(s)).collect(),
        }
    }

    #[test]
    fn rules_parse_and_print_back() {
        for s in [
            "pypi.org",
            "*.npmjs.org",
            "203.0.113.7",
            "198.51.100.0/24",
            "pypi.org:443",
            "*.npmjs.org:443",
            "203.0.113.7:53",
            "198.51.100.0/24:80",
            "*",
            "*:443",
        ] {
            assert_eq!(rule(s).to_string(), s);
        }
        assert_eq!(rule("PyPI.org.").to_string(), "pypi.org");
        assert_eq!(rule("203.0.113.7/32").to_string(), "203.0.113.7");
    }

    #[test]
    fn bad_rules_say_why() {
        let err = |s: &str| s.parse::<EgressRule>().unwrap_err();
        assert!(matches!(err(""), EgressRuleError::Syntax(_)));
        assert!(matches!(err("2001:db8::1"), EgressRuleError::Ipv6(_)));
        assert!(matches!(err("[2001:db8::1]:443"), EgressRuleError::Ipv6(_)));
        assert!(matches!(err("pypi.org:0"), EgressRuleError::Port(_)));
        assert!(matches!(err("pypi.org:70000"), EgressRuleError::Port(_)));
        assert!(matches!(err("pypi.org:http"), EgressRuleError::Port(_)));
        assert!(matches!(err("10.0.0.0/33"), EgressRuleError::Prefix(_)));
        assert!(matches!(
            err("198.51.100.7/24"),
            EgressRuleError::HostBits(_, n) if n == Ipv4Addr::new(198, 51, 100, 0)
        ));
        assert!(matches!(err("300.1.1.1"), EgressRuleError::Syntax(_)));
        assert!(matches!(err("exa mple.org"), EgressRuleError::Name(_)));
        assert!(matches!(err("-bad.org"), EgressRuleError::Name(_)));
        assert!(matches!(err("*.*.org"), EgressRuleError::Name(_)));
        assert!(matches!(err("http://pypi.org"), EgressRuleError::Syntax(_)));
        assert!(matches!(err("pypi.org/simple"), EgressRuleError::Name(_)));
    }

    #[test]
    fn serde_is_the_string_form() {
        let p: EgressPolicy =
            serde_json::from_str(r#"{"allow":["pypi.org:443","*.x.org"],"deny":["10.0.0.0/8"]}"#)
                .unwrap();
        assert_eq!(p, policy(&["pypi.org:443", "*.x.org"], &["10.0.0.0/8"]));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"allow":["pypi.org:443","*.x.org"],"deny":["10.0.0.0/8"]}"#
        );
        let e = serde_json::from_str::<EgressPolicy>(r#"{"allow":["::1"]}"#).unwrap_err();
        assert!(e.to_string().contains("IPv6"), "{e}");
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"alow":[]}"#).is_err());
    }

    #[test]
    fn wildcards_match_strictly_below_their_suffix() {
        let r = rule("*.npmjs.org");
        assert!(r.matches_name("registry.npmjs.org", 443));
        assert!(r.matches_name("a.b.NPMJS.org.", 443));
        assert!(!r.matches_name("npmjs.org", 443));
        assert!(!r.matches_name("evilnpmjs.org", 443));
        assert!(!r.matches_address(Ipv4Addr::new(203, 0, 113, 7), 443));
    }

    #[test]
    fn ports_narrow_a_rule() {
        let r = rule("pypi.org:443");
        assert!(r.matches_name("pypi.org", 443));
        assert!(!r.matches_name("pypi.org", 80));
        let r = rule("198.51.100.0/24:53");
        assert!(r.matches_address(Ipv4Addr::new(198, 51, 100, 9), 53));
        assert!(!r.matches_address(Ipv4Addr::new(198, 51, 100, 9), 54));
        assert!(!r.matches_address(Ipv4Addr::new(198, 51, 101, 9), 53));
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = policy(&["*"], &["*.bad.org", "203.0.113.0/24:25"]);
        assert_eq!(p.check_name("x.bad.org", 443), Verdict::Deny);
        assert_eq!(p.check_name("good.org", 443), Verdict::Allow);
        assert!(!p.may_resolve("x.bad.org"));
        assert!(p.may_resolve("good.org"));
        let a = Ipv4Addr::new(203, 0, 113, 5);
        assert_eq!(p.check_address(a, 25), Verdict::Deny);
        assert_eq!(p.check_address(a, 443), Verdict::Allow);
    }

    #[test]
    fn no_rule_means_no_way_out() {
        let p = EgressPolicy::default();
        assert_eq!(p.check_name("pypi.org", 443), Verdict::Deny);
        assert_eq!(
            p.check_address(Ipv4Addr::new(203, 0, 113, 7), 443),
            Verdict::Deny
        );
        assert!(!p.may_resolve("pypi.org"));
        // Address rules do not make names resolvable.
        assert!(!policy(&["203.0.113.0/24"], &[]).may_resolve("pypi.org"));
        // A port-specific name rule still lets the name resolve.
        assert!(policy(&["pypi.org:443"], &[]).may_resolve("pypi.org"));
    }

    #[test]
    fn special_ranges_are_always_denied_unless_lifted() {
        for a in [
            "127.0.0.1",
            "10.88.0.1",
            "172.16.3.4",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.251",
            "255.255.255.255",
            "0.0.0.0",
        ] {
            assert!(always_denied(a.parse().unwrap(), &[]).is_some(), "{a}");
        }
        for a in ["198.51.100.53", "203.0.113.10", "192.0.2.1", "8.8.8.8"] {
            assert!(always_denied(a.parse().unwrap(), &[]).is_none(), "{a}");
        }
        let lifted = ["10.1.0.0/16".parse().unwrap()];
        assert!(always_denied(Ipv4Addr::new(10, 1, 2, 3), &lifted).is_none());
        assert!(always_denied(Ipv4Addr::new(10, 2, 2, 3), &lifted).is_some());
    }
}
