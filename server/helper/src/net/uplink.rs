//! The hub's way out (privileged mode, egress on): a veth pair from the hub into the uplink
//! namespace (`--egress-uplink`, the host's own by default), its addresses and routes, and the
//! two nftables tables that make the hub a transparent filter's home instead of a router.
//!
//! ```text
//!  hub netns                                       uplink netns
//!   brG / veX (sandboxes) ── nft: tcp → redirect ─▶ the filter (gateway:EGRESS_PORT)
//!   uplink0 HUB_ADDR/30 ── default route ──veth──▶ sbxup<hash> UPLINK_ADDR/30
//!                                                   nft: masquerade HUB_ADDR out of other links,
//!                                                   forward into sbxup only replies, input from
//!                                                   sbxup only replies or to a loopback address
//! ```
//!
//! The hub's table (`sandboxd_<hash>`, hash of the state directory):
//! * prerouting (filter, -150), for packets from a sandbox device (`br*`, `ve*`): to the
//!   sandbox subnet accept (the group, the gateway: DNS on :53, published ports' replies); TCP
//!   accept (the nat chain redirects it); anything else reject (ICMP port unreachable: fast);
//! * prerouting (nat, -100): TCP from a sandbox device to outside the subnet → redirect to the
//!   filter's port on the gateway (the original destination stays readable: `SO_ORIGINAL_DST`);
//! * input (filter, 0): from `uplink0` only replies (established, related);
//! * output (filter, 0): out of `uplink0` only packets of the filter's sockets (the daemon's
//!   uid) and replies.
//!
//! IP forwarding stays off in the hub: the filter terminates every TCP connection and opens its
//! own from the hub's link address, and nothing else leaves. UDP beyond DNS is refused.
//!
//! The uplink namespace's table (same name): postrouting masquerades the hub's link address
//! for traffic leaving by any other link; forward lets into `sbxup<hash>` only replies; input
//! from `sbxup<hash>` takes replies and new connections to addresses of the namespace's loopback
//! only (a test internet's servers live there), never to an address of another link (the
//! host's own addresses, when the uplink is the host). Forwarding is switched on for
//! `sbxup<hash>` alone (`conf/<link>/forwarding`): traffic from the hub may be routed on, and
//! whether the replies come back is the operator's forwarding setting of the outgoing link.
//!
//! Everything is created at helper start and reconciled by a restarted one (both links found:
//! kept; one found: replaced; tables replaced whole), and removed with the hub.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};

use sandboxd_api::egress::Ipv4Net;

use super::netlink::{Netlink, NetlinkError};
use super::nft::{self, matches as m, ChainType, Expr, Hook, Nft, NftError, Ruleset, Verdict};
use super::{inside, NetError};

/// The hub's end of the uplink.
pub const HUB_LINK: &str = "uplink0";
/// The filter's TCP port on the gateway, where redirected connections arrive.
pub const FILTER_PORT: u16 = 15001;

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("opening the uplink namespace {path}")]
    Open {
        path: String,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{0} is not a network namespace")]
    NotANamespace(String),
    #[error("{step}")]
    Netlink {
        step: &'static str,
        #[source]
        source: NetlinkError,
    },
    #[error("{step}")]
    Nft {
        step: &'static str,
        #[source]
        source: NftError,
    },
    #[error("{0}")]
    Net(#[source] Box<NetError>),
}

impl From<NetError> for UplinkError {
    fn from(e: NetError) -> UplinkError {
        UplinkError::Net(Box::new(e))
    }
}

fn nl(step: &'static str) -> impl FnOnce(NetlinkError) -> UplinkError {
    move |source| UplinkError::Netlink { step, source }
}

fn nf(step: &'static str) -> impl FnOnce(NftError) -> UplinkError {
    move |source| UplinkError::Nft { step, source }
}

/// 40 bits of FNV-1a of `bytes`, as 10 hex digits.
fn fnv10(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

/// Names tied to one state directory, so that daemons sharing an uplink never collide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The uplink namespace's end of the pair (`sbxup` + 10 hex digits: 15 bytes, IFNAMSIZ).
    pub peer: String,
    /// The nftables table in the hub and in the uplink namespace.
    pub table: String,
}

impl Names {
    pub fn for_state_dir(state_dir: &std::path::Path) -> Names {
        let h = fnv10(state_dir.as_os_str().as_encoded_bytes());
        Names {
            peer: format!("sbxup{h}"),
            table: format!("sandboxd_{h}"),
        }
    }
}

/// What the hub's table needs to know.
#[derive(Debug, Clone)]
pub struct HubRules {
    pub subnet: Ipv4Net,
    pub filter_port: u16,
    /// The filter's uid (the daemon's): only its sockets open connections out of `uplink0`.
    pub filter_uid: u32,
}

/// The hub's ruleset (see the module documentation).
pub fn hub_ruleset(table: &str, rules: &HubRules) -> Ruleset {
    let mut rs = Ruleset::new(table);
    rs.base_chain("prerouting", Hook::Prerouting, -150, ChainType::Filter);
    rs.chain("from_sandbox");
    rs.base_chain("redirect", Hook::Prerouting, -100, ChainType::Nat);
    rs.base_chain("input", Hook::Input, 0, ChainType::Filter);
    rs.base_chain("output", Hook::Output, 0, ChainType::Filter);
    for prefix in SANDBOX_DEVICE_PREFIXES {
        rs.rule(
            "prerouting",
            &[m::iifname_prefix(prefix)],
            Expr::Verdict(Verdict::Jump("from_sandbox".into())),
        );
        rs.rule(
            "redirect",
            &[
                m::iifname_prefix(prefix),
                m::daddr_in(rules.subnet, false),
                m::l4proto(TCP),
            ],
            Expr::Redirect(rules.filter_port),
        );
    }
    rs.rule(
        "from_sandbox",
        &[m::daddr_in(rules.subnet, true)],
        Expr::Verdict(Verdict::Accept),
    );
    rs.rule(
        "from_sandbox",
        &[m::l4proto(TCP)],
        Expr::Verdict(Verdict::Accept),
    );
    rs.rule("from_sandbox", &[], Expr::Reject { tcp_reset: false });
    rs.rule(
        "input",
        &[
            m::iifname(HUB_LINK),
            m::ct_state(nft::CT_ESTABLISHED | nft::CT_RELATED),
        ],
        Expr::Verdict(Verdict::Accept),
    );
    rs.rule(
        "input",
        &[m::iifname(HUB_LINK)],
        Expr::Verdict(Verdict::Drop),
    );
    // Out of the uplink: the filter's own connections and replies, nothing else of the hub's.
    rs.rule(
        "output",
        &[m::oifname(HUB_LINK, true), m::skuid(rules.filter_uid)],
        Expr::Verdict(Verdict::Accept),
    );
    rs.rule(
        "output",
        &[
            m::oifname(HUB_LINK, true),
            m::ct_state(nft::CT_ESTABLISHED | nft::CT_RELATED),
        ],
        Expr::Verdict(Verdict::Accept),
    );
    rs.rule(
        "output",
        &[m::oifname(HUB_LINK, true)],
        Expr::Verdict(Verdict::Drop),
    );
    rs
}

/// Hub devices sandboxes are behind: group bridges and the veths of sandboxes without a group.
const SANDBOX_DEVICE_PREFIXES: [&str; 2] = ["br", "ve"];
const TCP: u8 = 6;

/// The uplink namespace's ruleset (see the module documentation). `local` are the addresses of
/// the namespace's links other than loopback (and the link's own end): never a destination.
pub fn uplink_ruleset(table: &str, peer: &str, hub_addr: Ipv4Addr, local: &[Ipv4Addr]) -> Ruleset {
    let mut rs = Ruleset::new(table);
    rs.base_chain("postrouting", Hook::Postrouting, 100, ChainType::Nat);
    rs.base_chain("forward", Hook::Forward, 0, ChainType::Filter);
    rs.base_chain("input", Hook::Input, 0, ChainType::Filter);
    rs.rule(
        "postrouting",
        &[m::saddr(hub_addr), m::oifname(peer, false)],
        Expr::Masquerade,
    );
    let replies = m::ct_state(nft::CT_ESTABLISHED | nft::CT_RELATED);
    rs.rule(
        "forward",
        &[m::oifname(peer, true), replies.clone()],
        Expr::Verdict(Verdict::Accept),
    );
    rs.rule(
        "forward",
        &[m::oifname(peer, true)],
        Expr::Verdict(Verdict::Drop),
    );
    rs.rule(
        "input",
        &[m::iifname(peer), replies],
        Expr::Verdict(Verdict::Accept),
    );
    for addr in local {
        rs.rule(
            "input",
            &[m::iifname(peer), m::daddr(*addr)],
            Expr::Verdict(Verdict::Drop),
        );
    }
    rs
}

/// The uplink as set up: what teardown needs.
pub struct Uplink {
    pub names: Names,
    /// The uplink namespace.
    pub ns: OwnedFd,
    /// The uplink namespace's own addresses on links other than loopback, when set up.
    pub uplink_local: Vec<Ipv4Addr>,
}

/// Open the uplink namespace: `path`, or the helper's own.
pub fn open_uplink(path: Option<&std::path::Path>, host: &OwnedFd) -> Result<OwnedFd, UplinkError> {
    let Some(path) = path else {
        return host.try_clone().map_err(|e| UplinkError::Open {
            path: "the helper's own namespace".into(),
            source: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EBADF)),
        });
    };
    let shown = path.display().to_string();
    let fd = crate::sys::open(
        path,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| UplinkError::Open {
        path: shown.clone(),
        source,
    })?;
    let is_ns = nix::sys::statfs::fstatfs(&fd)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
    if !is_ns {
        return Err(UplinkError::NotANamespace(shown));
    }
    Ok(fd)
}

/// Create (or reconcile) the uplink and both tables.
pub fn setup(
    hub: &OwnedFd,
    host: &OwnedFd,
    uplink_ns: OwnedFd,
    names: Names,
    link: Ipv4Net,
    addresses: (Ipv4Addr, Ipv4Addr),
    rules: &HubRules,
) -> Result<Uplink, UplinkError> {
    let (up_addr, hub_addr) = addresses;
    let hub_nl = inside(hub.as_fd(), host.as_fd(), || Ok(Netlink::connect_here()?))?;
    let up_nl = inside(uplink_ns.as_fd(), host.as_fd(), || {
        Ok(Netlink::connect_here()?)
    })?;
    // 1. The pair: both ends found are kept (a restarted helper), a lone end is replaced.
    let hub_end = hub_nl.index(HUB_LINK).map_err(nl("finding uplink0"))?;
    let up_end = up_nl
        .index(&names.peer)
        .map_err(nl("finding the uplink's end"))?;
    if hub_end.is_none() || up_end.is_none() {
        hub_nl
            .delete(HUB_LINK)
            .map_err(nl("removing a lone uplink0"))?;
        up_nl
            .delete(&names.peer)
            .map_err(nl("removing a lone uplink end"))?;
        hub_nl
            .add_veth(HUB_LINK, None, &names.peer, uplink_ns.as_fd())
            .map_err(nl("creating the uplink pair"))?;
    }
    // 2. Addresses, links up, the hub's default route.
    let hub_end = hub_nl
        .index(HUB_LINK)
        .map_err(nl("finding uplink0"))?
        .ok_or(UplinkError::Netlink {
            step: "finding the new uplink0",
            source: NetlinkError::Runtime(std::io::Error::from_raw_os_error(libc::ENODEV)),
        })?;
    let up_end = up_nl
        .index(&names.peer)
        .map_err(nl("finding the uplink's end"))?
        .ok_or(UplinkError::Netlink {
            step: "finding the new uplink end",
            source: NetlinkError::Runtime(std::io::Error::from_raw_os_error(libc::ENODEV)),
        })?;
    hub_nl
        .ensure_address(hub_end, hub_addr, link.prefix_len())
        .map_err(nl("addressing uplink0"))?;
    hub_nl.set_up(hub_end).map_err(nl("bringing uplink0 up"))?;
    up_nl
        .ensure_address(up_end, up_addr, link.prefix_len())
        .map_err(nl("addressing the uplink's end"))?;
    up_nl
        .set_up(up_end)
        .map_err(nl("bringing the uplink's end up"))?;
    hub_nl
        .replace_default_route(up_addr)
        .map_err(nl("routing the hub through the uplink"))?;
    // 3. The uplink namespace: forwarding for this link alone, its addresses, its table.
    let peer = names.peer.clone();
    inside(uplink_ns.as_fd(), host.as_fd(), || {
        let name = format!("/proc/sys/net/ipv4/conf/{peer}/forwarding");
        std::fs::write(&name, "1").map_err(|e| NetError::Sysctl("conf/<uplink>/forwarding", e))
    })?;
    let lo = up_nl.index("lo").map_err(nl("finding the uplink's lo"))?;
    let mut uplink_local: Vec<Ipv4Addr> = up_nl
        .addresses()
        .map_err(nl("listing the uplink namespace's addresses"))?
        .into_iter()
        .filter(|(index, _, _)| Some(*index) != lo)
        .map(|(_, a, _)| a)
        .collect();
    uplink_local.sort();
    uplink_local.dedup();
    let mut up_nft = inside(uplink_ns.as_fd(), host.as_fd(), || {
        Nft::connect_here().map_err(|e| NetError::Unavailable(crate::error::error_chain(&e)))
    })?;
    up_nft
        .replace(&uplink_ruleset(
            &names.table,
            &names.peer,
            hub_addr,
            &uplink_local,
        ))
        .map_err(nf("writing the uplink namespace's table"))?;
    // 4. The hub's table.
    let mut hub_nft = inside(hub.as_fd(), host.as_fd(), || {
        Nft::connect_here().map_err(|e| NetError::Unavailable(crate::error::error_chain(&e)))
    })?;
    hub_nft
        .replace(&hub_ruleset(&names.table, rules))
        .map_err(nf("writing the hub's table"))?;
    Ok(Uplink {
        names,
        ns: uplink_ns,
        uplink_local,
    })
}

impl Uplink {
    /// Remove the pair (its other end goes with it) and both tables. Logs, never fails.
    pub fn teardown(&self, hub: &OwnedFd, host: &OwnedFd) {
        let result = (|| -> Result<(), UplinkError> {
            let hub_nl = inside(hub.as_fd(), host.as_fd(), || Ok(Netlink::connect_here()?))?;
            hub_nl.delete(HUB_LINK).map_err(nl("deleting uplink0"))?;
            let mut hub_nft = inside(hub.as_fd(), host.as_fd(), || {
                Nft::connect_here()
                    .map_err(|e| NetError::Unavailable(crate::error::error_chain(&e)))
            })?;
            hub_nft
                .delete_table(&self.names.table)
                .map_err(nf("deleting the hub's table"))?;
            let up_nl = inside(self.ns.as_fd(), host.as_fd(), || {
                Ok(Netlink::connect_here()?)
            })?;
            up_nl
                .delete(&self.names.peer)
                .map_err(nl("deleting the uplink's end"))?;
            let mut up_nft = inside(self.ns.as_fd(), host.as_fd(), || {
                Nft::connect_here()
                    .map_err(|e| NetError::Unavailable(crate::error::error_chain(&e)))
            })?;
            up_nft
                .delete_table(&self.names.table)
                .map_err(nf("deleting the uplink namespace's table"))?;
            Ok(())
        })();
        if let Err(e) = result {
            eprintln!(
                "sandboxd-helper: removing the uplink: {}",
                crate::error::error_chain(&e)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_differ_per_state_dir() {
        let a = Names::for_state_dir(std::path::Path::new("/var/lib/sandboxd"));
        let b = Names::for_state_dir(std::path::Path::new("/tmp/other"));
        assert_eq!(a.peer.len(), 15);
        assert!(a.table.starts_with("sandboxd_"));
        assert_ne!(a, b);
        assert_eq!(
            a,
            Names::for_state_dir(std::path::Path::new("/var/lib/sandboxd"))
        );
    }

    #[test]
    fn the_hub_redirects_tcp_from_both_device_kinds() {
        let rs = hub_ruleset(
            "t",
            &HubRules {
                subnet: "10.88.0.0/16".parse().unwrap(),
                filter_port: FILTER_PORT,
                filter_uid: 999,
            },
        );
        let redirects: Vec<_> = rs.rules.iter().filter(|(c, _)| c == "redirect").collect();
        assert_eq!(redirects.len(), 2);
        assert!(redirects
            .iter()
            .all(|(_, e)| e.last() == Some(&Expr::Redirect(FILTER_PORT))));
        // The last word for anything else from a sandbox is a reject, never a silent drop.
        let last = rs.rules.iter().rfind(|(c, _)| c == "from_sandbox").unwrap();
        assert_eq!(last.1, vec![Expr::Reject { tcp_reset: false }]);
    }
}
