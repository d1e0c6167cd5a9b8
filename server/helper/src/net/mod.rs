//! Sandbox networking (privileged mode): network namespaces owned by the host's user namespace,
//! the hub with one bridge per group, veth pairs, addresses, routes and published ports.
//!
//! ```text
//!  host netns ──(nothing)──        hub netns (one per daemon, <state>/helper/hub.net)
//!  127.0.0.1:H ◀── forwarder ──▶   brXXXX (group A, gateway .1)  brYYYY (group B)  veZZZZ (.1)
//!                                    │ veXXXX      │ veXXXX           │ veXXXX          │
//!                                  eth0 A1       eth0 A2          eth0 B1   eth0 (no group)
//! ```
//!
//! Isolation is by construction, without a firewall rule: the host's network namespace is never
//! connected to a sandbox (so its loopback services and the daemon's API are out of reach),
//! groups are different bridges, and the hub forwards nothing (`ip_forward` 0). Every sandbox
//! network namespace is created here, by root of the host's user namespace, so the sandbox (root
//! only of its own user namespace) has no CAP_NET_ADMIN over it: it cannot add an address or a
//! route, or take another sandbox's address.
//!
//! With egress (`--egress-dns`), the hub also gets an uplink pair, one nftables table (TCP from
//! sandbox devices redirected to the filter, anything else beyond the subnet rejected) and the
//! filter process (`uplink.rs`, `nft.rs`, `filter.rs`); the hub still routes nothing.
//!
//! Order for a bridged sandbox (`prepare`): bind the published ports on the host (a conflict
//! fails first, before anything else exists); create the namespace and set its sysctls; bring
//! `lo` up; make sure the group's bridge exists in the hub; create the veth pair with the
//! sandbox's end directly in its namespace (without a group, the hub's end gets the gateway
//! instead of a bridge); address, `eth0` up, default route. Teardown deletes
//! the hub's end of the pair (if the namespace's end has not taken it away already) and every
//! bridge left without a port.

pub mod etc;
pub mod filter;
pub mod forward;
mod netlink;
pub mod nft;
pub mod uplink;

use std::ffi::CStr;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;
use sandboxd_protocol::wire::{self, PortMapping};
use uuid::Uuid;

use crate::config::Config;
use crate::validate::ValidSpawn;
pub use forward::Forward;
use netlink::{Netlink, NetlinkError};

/// The file in `<state>/helper/` the hub's namespace is bound to, so that a restarted helper
/// finds it again (the bridges and the veths of running sandboxes live there).
pub const HUB_FILE: &str = "hub.net";
/// The sandbox's end of its veth pair.
const SANDBOX_IFACE: &str = "eth0";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("host port {0} is already in use")]
    PortInUse(u16),
    #[error("binding host port {port}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("{step}")]
    Sys {
        step: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("writing {0}")]
    Sysctl(&'static str, #[source] std::io::Error),
    #[error("netlink")]
    Netlink(#[from] NetlinkError),
    #[error("bridged networking is not available: {0}")]
    Unavailable(String),
}

fn sys_err(step: &'static str) -> impl FnOnce(nix::errno::Errno) -> NetError {
    move |source| NetError::Sys { step, source }
}

/// What the helper holds for networking.
pub struct Network {
    /// The helper's own (the host's) network namespace, to come back to.
    host: OwnedFd,
    /// Privileged mode: the helper makes every sandbox's network namespace.
    privileged: bool,
    /// The hub (privileged mode), or why there is none.
    hub: Result<OwnedFd, String>,
    /// `<state>/helper`, where the hub is bound.
    helper_dir: Option<OwnedFd>,
    /// Egress (privileged mode with `--egress-dns`): the uplink and the filter, or why not.
    egress: Result<Egress, String>,
    /// The `--egress-*` flags, as `GET /v1/info` shows them.
    egress_flags: crate::config::EgressConfig,
}

/// The egress side of the hub, as set up at start.
struct Egress {
    uplink: uplink::Uplink,
    /// The filter's configuration, without its descriptors (bound at each start).
    filter: sandboxd_protocol::egress::FilterConfig,
    daemon_gid: u32,
}

/// A new sandbox's network, handed to its monitor.
pub struct SandboxNet {
    /// The sandbox's network namespace; init is cloned into it.
    pub netns: OwnedFd,
    /// Published ports, when there are any.
    pub forward: Option<Forward>,
}

impl SandboxNet {
    /// The ports as bound.
    pub fn ports(&self) -> Vec<PortMapping> {
        self.forward
            .iter()
            .flat_map(|f| f.listeners.iter())
            .map(|(l, sandbox)| PortMapping {
                sandbox: *sandbox,
                host: l.local_addr().map(|a| a.port()).unwrap_or(0),
            })
            .collect()
    }
}

/// Run `f` inside the network namespace `ns`, then return to `host` whatever happened.
fn inside<T>(
    ns: BorrowedFd<'_>,
    host: BorrowedFd<'_>,
    f: impl FnOnce() -> Result<T, NetError>,
) -> Result<T, NetError> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).map_err(sys_err("entering a namespace"))?;
    let result = f();
    if let Err(e) = nix::sched::setns(host, CloneFlags::CLONE_NEWNET) {
        // The helper must never serve another request from the wrong namespace.
        eprintln!("sandboxd-helper: cannot return to the host's network namespace: {e}");
        std::process::exit(1);
    }
    result
}

fn open_ns(path: &str) -> Result<OwnedFd, NetError> {
    crate::sys::open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(sys_err("opening a namespace"))
}

/// Write a sysctl of the network namespace the caller is in.
fn sysctl(name: &'static str, value: &str) -> Result<(), NetError> {
    std::fs::write(format!("/proc/sys/net/{name}"), value).map_err(|e| NetError::Sysctl(name, e))
}

/// An IPv6 sysctl: nothing to do on a kernel without IPv6.
fn sysctl_if_ipv6(name: &'static str, value: &str) -> Result<(), NetError> {
    match sysctl(name, value) {
        Err(NetError::Sysctl(_, e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Open the hub bound in `<state>/helper`, or create it.
fn open_hub(state: BorrowedFd<'_>, host: &OwnedFd) -> Result<(OwnedFd, OwnedFd), NetError> {
    let dir = crate::sys::openat(
        Some(state.as_raw_fd()),
        sandboxd_protocol::layout::HELPER_DIR,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(sys_err("opening the helper directory"))?;
    let path = format!("/proc/self/fd/{}/{HUB_FILE}", dir.as_raw_fd());
    let existing = open_ns(&path).ok().filter(|fd| {
        nix::sys::statfs::fstatfs(fd)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
    });
    let hub = match existing {
        Some(fd) => fd,
        None => create_hub(host, &dir, &path)?,
    };
    Ok((dir, hub))
}

impl Network {
    /// Open (or create) the hub in privileged mode; rootless, only remember the namespace.
    pub fn setup(state: BorrowedFd<'_>, config: &Config) -> Result<Network, NetError> {
        let host = open_ns("/proc/self/ns/net")?;
        let mut network = Network {
            host,
            privileged: config.mode == wire::Mode::Privileged,
            hub: Err("rootless mode has no privileged helper".into()),
            helper_dir: None,
            egress: Err(if config.egress.dns.is_none() {
                "egress is off: the daemon was started without --egress-dns".into()
            } else {
                "rootless mode has no egress filter yet".into()
            }),
            egress_flags: config.egress.clone(),
        };
        if !network.privileged {
            return Ok(network);
        }
        // Without a hub, sandboxes still get namespaces of the helper's making; only bridge
        // mode is unavailable (and `GET /v1/info` says so).
        match open_hub(state, &network.host) {
            Ok((dir, hub)) => {
                network.hub = Ok(hub);
                network.helper_dir = Some(dir);
            }
            Err(e) => {
                let why = crate::error::error_chain(&e);
                eprintln!("sandboxd-helper: bridge mode is unavailable: {why}");
                network.egress = Err(format!("bridge mode is unavailable: {why}"));
                network.hub = Err(why);
                return Ok(network);
            }
        }
        // The hub's loopback must be up for its own addresses (the gateways) to answer at all:
        // a sandbox connecting to a port of its gateway gets a reset, not a hang.
        // Reconcile: bridges whose every sandbox went while no helper ran.
        network.in_hub(|nl| {
            nl.set_up(nl.index("lo")?.unwrap_or(1))?;
            nl.remove_empty_bridges()?;
            Ok(())
        })?;
        // Bridged frames stay out of the hub's IP hooks (br_netfilter), so that its table sees
        // only what is routed to the hub itself.
        let hub = network
            .hub()?
            .try_clone_to_owned()
            .map_err(|e| NetError::Sysctl("hub", e))?;
        inside(hub.as_fd(), network.host.as_fd(), || {
            match std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "0") {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(NetError::Sysctl("bridge/bridge-nf-call-iptables", e))
                }
                _ => Ok(()),
            }
        })?;
        if config.egress.dns.is_some() {
            network.egress = network.setup_egress(config).map_err(|why| {
                eprintln!("sandboxd-helper: egress is unavailable: {why}");
                why
            });
        } else {
            network.remove_stale_egress(config);
        }
        Ok(network)
    }

    /// The uplink, both tables and the filter (see `uplink.rs`, `filter.rs`).
    fn setup_egress(&self, config: &Config) -> Result<Egress, String> {
        let chain = |e: &dyn std::error::Error| crate::error::error_chain(e);
        let hub = self.hub().map_err(|e| chain(&e))?;
        let hub = hub.try_clone_to_owned().map_err(|e| chain(&e))?;
        let dir = self
            .helper_dir
            .as_ref()
            .ok_or_else(|| "no helper directory".to_owned())?;
        let flags = &config.egress;
        let subnet: sandboxd_api::egress::Ipv4Net = config
            .net_subnet
            .to_string()
            .parse()
            .map_err(|e: sandboxd_api::egress::EgressRuleError| e.to_string())?;
        let uplink_ns =
            uplink::open_uplink(flags.uplink.as_deref(), &self.host).map_err(|e| chain(&e))?;
        let names = uplink::Names::for_state_dir(&config.state_dir);
        let addresses = flags.link_addresses();
        let up = uplink::setup(
            &hub,
            &self.host,
            uplink_ns,
            names,
            flags.link,
            addresses,
            &uplink::HubRules {
                subnet,
                filter_port: uplink::FILTER_PORT,
                filter_uid: config.allow_uid,
            },
        )
        .map_err(|e| chain(&e))?;
        // Never a destination: the host's own addresses (the helper's namespace; the uplink's
        // loopback addresses are not among them: a test internet serves from there), the link,
        // and the uplink namespace's addresses on its other links.
        let host_addresses = Netlink::connect_here()
            .and_then(|nl| nl.addresses())
            .map_err(|e| chain(&e))?;
        let mut denied: Vec<sandboxd_api::egress::Ipv4Net> = host_addresses
            .iter()
            .map(|(_, a, _)| *a)
            .chain(up.uplink_local.iter().copied())
            .filter_map(|a| sandboxd_api::egress::Ipv4Net::new(a, 32))
            .collect();
        denied.push(flags.link);
        denied.sort_by_key(|n| (u32::from(n.network()), n.prefix_len()));
        denied.dedup();
        let egress = Egress {
            filter: sandboxd_protocol::egress::FilterConfig {
                tcp_fd: -1,
                dns_fd: -1,
                control_fd: -1,
                upstream_dns: flags.dns.ok_or_else(|| "no --egress-dns".to_owned())?,
                subnet,
                lifted: flags.allow_ranges.clone(),
                denied,
                daemon_uid: config.allow_uid,
            },
            daemon_gid: config.allow_gid,
            uplink: up,
        };
        if let Err(e) = self.start_filter(&egress, &hub, dir) {
            egress.uplink.teardown(&hub, &self.host);
            return Err(e);
        }
        Ok(egress)
    }

    fn start_filter(&self, egress: &Egress, hub: &OwnedFd, dir: &OwnedFd) -> Result<bool, String> {
        filter::ensure(filter::FilterStart {
            helper_dir: dir.as_fd(),
            hub: hub.as_fd(),
            host: self.host.as_fd(),
            config: egress.filter.clone(),
            daemon_gid: egress.daemon_gid,
        })
        .map_err(|e| crate::error::error_chain(&e))
    }

    /// Egress is off now: stop a filter an earlier helper started, remove its link and table
    /// from the hub (the uplink namespace's end goes with the link).
    fn remove_stale_egress(&self, config: &Config) {
        let Some(dir) = &self.helper_dir else { return };
        filter::stop(dir.as_fd());
        let table = uplink::Names::for_state_dir(&config.state_dir).table;
        let result = self.in_hub(|nl| {
            nl.delete(uplink::HUB_LINK)?;
            Ok(())
        });
        let hub = self.hub().ok().map(|h| h.try_clone_to_owned());
        if let Some(Ok(hub)) = hub {
            let _ = inside(hub.as_fd(), self.host.as_fd(), || {
                nft::Nft::connect_here()
                    .and_then(|mut n| n.delete_table(&table))
                    .map_err(|e| NetError::Unavailable(crate::error::error_chain(&e)))
            });
        }
        if let Err(e) = result {
            eprintln!(
                "sandboxd-helper: removing a stale uplink: {}",
                crate::error::error_chain(&e)
            );
        }
    }

    /// Start the filter again if it died (called before requests that need it).
    pub fn ensure_egress(&self) {
        let (Ok(egress), Some(dir), Ok(hub)) = (&self.egress, &self.helper_dir, self.hub()) else {
            return;
        };
        let Ok(hub) = hub.try_clone_to_owned() else {
            return;
        };
        if let Err(why) = self.start_filter(egress, &hub, dir) {
            eprintln!("sandboxd-helper: restarting the egress filter: {why}");
        }
    }

    /// Whether bridged sandboxes get egress, for `GET /v1/info`.
    pub fn egress_status(&self) -> sandboxd_protocol::egress::EgressStatus {
        let reason = match (&self.egress, &self.helper_dir) {
            (Err(why), _) => Some(why.clone()),
            (Ok(_), Some(dir)) if !filter::running(dir.as_fd()) => {
                Some("the egress filter is not running".to_owned())
            }
            (Ok(_), _) => None,
        };
        sandboxd_protocol::egress::EgressStatus {
            available: reason.is_none(),
            reason,
            uplink: Some(
                self.egress_flags
                    .uplink
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "the host's network namespace".to_owned()),
            ),
            upstream_dns: self.egress_flags.dns,
        }
    }

    /// Network modes this helper offers.
    pub fn modes(&self) -> Vec<String> {
        let mut modes = vec!["none".to_owned()];
        if self.hub.is_ok() {
            modes.push("bridge".to_owned());
        }
        modes
    }

    fn hub(&self) -> Result<BorrowedFd<'_>, NetError> {
        self.hub
            .as_ref()
            .map(|fd| fd.as_fd())
            .map_err(|why| NetError::Unavailable(why.clone()))
    }

    /// Run `f` with a netlink connection to the hub.
    fn in_hub<T>(&self, f: impl FnOnce(&Netlink) -> Result<T, NetError>) -> Result<T, NetError> {
        let nl = inside(self.hub()?, self.host.as_fd(), || {
            Ok(Netlink::connect_here()?)
        })?;
        f(&nl)
    }

    /// The network namespace of a new sandbox, owned by the host's user namespace, with `lo` up
    /// and, when bridged, its veth, address and route. Rootless: `None` (init makes its own).
    pub fn prepare(&self, spawn: &ValidSpawn) -> Result<Option<SandboxNet>, NetError> {
        if !self.privileged {
            return match &spawn.network {
                None => Ok(None),
                Some(_) => Err(NetError::Unavailable("rootless mode".into())),
            };
        }
        // 1. Published ports, on the host's loopback: a conflict fails before anything exists.
        let mut listeners = Vec::new();
        if let Some(net) = &spawn.network {
            for p in &net.ports {
                let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, p.host))
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::AddrInUse => NetError::PortInUse(p.host),
                        _ => NetError::Bind {
                            port: p.host,
                            source: e,
                        },
                    })?;
                listeners.push((listener, p.sandbox));
            }
        }
        // 2. The namespace: unshare, keep a descriptor, configure it from inside, come back.
        nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(sys_err("unshare(CLONE_NEWNET)"))?;
        let created = open_ns("/proc/thread-self/ns/net").and_then(|netns| {
            let inner = (|| {
                // Root inside may bind any port and ping, as it would on a machine of its own.
                sysctl("ipv4/ip_unprivileged_port_start", "0")?;
                sysctl("ipv4/ping_group_range", "0 2147483647")?;
                if spawn.network.is_some() {
                    // eth0 gets no IPv6 address: no duplicate address detection, no router
                    // solicitations; `lo` keeps ::1.
                    sysctl_if_ipv6("ipv6/conf/default/disable_ipv6", "1")?;
                }
                Ok(Netlink::connect_here()?)
            })();
            inner.map(|nl| (netns, nl))
        });
        if let Err(e) = nix::sched::setns(self.host.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("sandboxd-helper: cannot return to the host's network namespace: {e}");
            std::process::exit(1);
        }
        let (netns, nl) = created?;
        // 3. Loopback.
        let lo = nl.index("lo")?.unwrap_or(1);
        nl.set_up(lo)?;
        let Some(net) = &spawn.network else {
            return Ok(Some(SandboxNet {
                netns,
                forward: None,
            }));
        };
        // 4. The group's bridge and the veth pair, then the sandbox's side.
        let hub = self.hub()?;
        let linked = self.in_hub(|hub_nl| {
            let device = match &net.bridge {
                Some(name) => {
                    let bridge = hub_nl.ensure_bridge(name, net.gateway, net.prefix_len)?;
                    hub_nl.add_veth(&net.veth, Some(bridge), SANDBOX_IFACE, netns.as_fd())?;
                    bridge
                }
                None => {
                    hub_nl.add_veth(&net.veth, None, SANDBOX_IFACE, netns.as_fd())?;
                    let veth = hub_nl.index(&net.veth)?.ok_or(NetError::Sys {
                        step: "finding the new veth",
                        source: nix::errno::Errno::ENODEV,
                    })?;
                    hub_nl.add_address(veth, net.gateway, net.prefix_len)?;
                    veth
                }
            };
            // With egress, the hub itself answers the sandbox (the filter's DNS replies and
            // accepted connections, resets, port unreachables): every device holds the gateway
            // and the subnet's route, so a host route names the one that leads to this sandbox.
            if self.egress.is_ok() {
                hub_nl.replace_host_route(net.address, device, net.gateway)?;
            }
            Ok(())
        });
        let configured = linked.and_then(|()| {
            let eth0 = nl.index(SANDBOX_IFACE)?.ok_or(NetError::Sys {
                step: "finding eth0",
                source: nix::errno::Errno::ENODEV,
            })?;
            nl.add_address(eth0, net.address, net.prefix_len)?;
            nl.set_up(eth0)?;
            nl.default_route(net.gateway)?;
            Ok(())
        });
        if let Err(e) = configured {
            self.teardown(spawn.id);
            return Err(e);
        }
        let forward = if listeners.is_empty() {
            None
        } else {
            Some(Forward {
                listeners,
                hub: hub
                    .try_clone_to_owned()
                    .map_err(|e| NetError::Sysctl("hub", e))?,
                device: net.hub_device().to_owned(),
                address: net.address,
            })
        };
        Ok(Some(SandboxNet { netns, forward }))
    }

    /// Remove what a sandbox left in the hub: its veth (usually gone with its namespace
    /// already) and every bridge without a port. Never fails a destroy: logs instead.
    pub fn teardown(&self, id: Uuid) {
        if self.hub.is_err() {
            return;
        }
        let result = self.in_hub(|nl| {
            nl.delete(&sandboxd_protocol::net::veth_name(id))?;
            nl.remove_empty_bridges()?;
            Ok(())
        });
        if let Err(e) = result {
            eprintln!(
                "sandboxd-helper: network teardown of {id}: {}",
                crate::error::error_chain(&e)
            );
        }
    }

    /// At exit: unbind the hub when no sandbox uses it any more (no veth in it).
    pub fn release_if_idle(&self) {
        let Some(dir) = &self.helper_dir else { return };
        let idle = self.in_hub(|nl| {
            let _ = nl.remove_empty_bridges();
            Ok(!nl.links()?.iter().any(|l| {
                l.kind == Some(rtnetlink::packet_route::link::InfoKind::Veth)
                    && l.name != uplink::HUB_LINK
            }))
        });
        if idle.unwrap_or(false) {
            // No sandbox left: the filter, the uplink and both tables go with the hub.
            if let (Ok(egress), Ok(hub)) = (&self.egress, self.hub()) {
                filter::stop(dir.as_fd());
                if let Ok(hub) = hub.try_clone_to_owned() {
                    egress.uplink.teardown(&hub, &self.host);
                }
            }
            let path = format!("/proc/self/fd/{}/{HUB_FILE}", dir.as_raw_fd());
            if nix::mount::umount2(path.as_str(), nix::mount::MntFlags::MNT_DETACH).is_ok() {
                let _ = nix::unistd::unlinkat(
                    Some(dir.as_raw_fd()),
                    HUB_FILE,
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
        }
    }
}

/// Create the hub: a network namespace bound to `<state>/helper/hub.net`, forwarding nothing.
fn create_hub(host: &OwnedFd, dir: &OwnedFd, path: &str) -> Result<OwnedFd, NetError> {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
    crate::sys::openat(
        Some(dir.as_raw_fd()),
        HUB_FILE,
        OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(0o400),
    )
    .map_err(sys_err("creating the hub's file"))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(sys_err("unshare(CLONE_NEWNET)"))?;
    let result = (|| -> Result<(), NetError> {
        const SELF_NS: &CStr = c"/proc/thread-self/ns/net";
        #[allow(
            clippy::disallowed_methods,
            reason = "pinning a network namespace is a bind mount of its nsfs file"
        )]
        nix::mount::mount(
            Some(SELF_NS),
            path,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys_err("binding the hub's namespace"))?;
        // Nothing is routed between bridges or anywhere else; replies to the forwarder come
        // back on the bridge they left by, whatever the reverse path says.
        sysctl("ipv4/ip_forward", "0")?;
        sysctl("ipv4/conf/all/rp_filter", "0")?;
        sysctl("ipv4/conf/default/rp_filter", "0")?;
        sysctl_if_ipv6("ipv6/conf/default/disable_ipv6", "1")?;
        sysctl_if_ipv6("ipv6/conf/all/disable_ipv6", "1")?;
        Ok(())
    })();
    if let Err(e) = nix::sched::setns(host.as_fd(), CloneFlags::CLONE_NEWNET) {
        eprintln!("sandboxd-helper: cannot return to the host's network namespace: {e}");
        std::process::exit(1);
    }
    result?;
    open_ns(path)
}
