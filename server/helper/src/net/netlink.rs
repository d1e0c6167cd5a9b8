//! Link, address and route work over rtnetlink, in whichever network namespace the connection
//! was opened in.
//!
//! rtnetlink is asynchronous; the helper is not. Each [`Netlink`] owns a current-thread tokio
//! runtime (no worker or blocking threads: the helper must stay single-threaded so that forking
//! it stays sound) and blocks on each request. A netlink socket belongs to the network namespace
//! its creator was in when it was created, so opening a connection while inside a namespace and
//! leaving again gives a handle on that namespace from the outside.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("starting the netlink runtime")]
    Runtime(#[source] std::io::Error),
    #[error("opening a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("{step}")]
    Request {
        step: String,
        #[source]
        source: rtnetlink::Error,
    },
}

fn request(step: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let step = step.into();
    move |source| NetlinkError::Request { step, source }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io().raw_os_error(),
        _ => None,
    }
}

/// A netlink connection to one network namespace.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Connect to the network namespace the calling thread is in now.
    pub fn connect_here() -> Result<Netlink, NetlinkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetlinkError::Runtime)?;
        let (connection, handle, _) = {
            let _entered = rt.enter();
            rtnetlink::new_connection().map_err(NetlinkError::Socket)?
        };
        rt.spawn(connection);
        Ok(Netlink { rt, handle })
    }

    /// The index of the link called `name`, if there is one.
    pub fn index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        self.rt.block_on(async {
            let found = self
                .handle
                .link()
                .get()
                .match_name(name.to_owned())
                .execute()
                .try_next()
                .await;
            match found {
                Ok(link) => Ok(link.map(|l| l.header.index)),
                Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(None),
                Err(e) => Err(request(format!("looking up {name}"))(e)),
            }
        })
    }

    pub fn set_up(&self, index: u32) -> Result<(), NetlinkError> {
        self.rt.block_on(async {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(request(format!("bringing link {index} up")))
        })
    }

    /// The bridge called `name`, created (with `gateway/prefix_len`, up) if it does not exist.
    pub fn ensure_bridge(
        &self,
        name: &str,
        gateway: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<u32, NetlinkError> {
        let index = match self.index(name)? {
            Some(i) => i,
            None => {
                self.rt.block_on(async {
                    self.handle
                        .link()
                        .add(LinkBridge::new(name).build())
                        .execute()
                        .await
                        .map_err(request(format!("creating bridge {name}")))
                })?;
                self.index(name)?.ok_or_else(|| NetlinkError::Request {
                    step: format!("finding the new bridge {name}"),
                    source: rtnetlink::Error::RequestFailed,
                })?
            }
        };
        // Also for an existing bridge: a crash may have come between its creation and this.
        self.rt.block_on(async {
            match self
                .handle
                .address()
                .add(index, IpAddr::V4(gateway), prefix_len)
                .execute()
                .await
            {
                Err(e) if errno_of(&e) == Some(libc::EEXIST) => Ok(()),
                other => other.map_err(request(format!("adding {gateway} to {name}"))),
            }
        })?;
        self.set_up(index)?;
        Ok(index)
    }

    /// A veth pair: `name` here, up, attached to `bridge` if given; its peer `peer_name`
    /// created directly in the namespace `peer_ns` (never moved there afterwards).
    pub fn add_veth(
        &self,
        name: &str,
        bridge: Option<u32>,
        peer_name: &str,
        peer_ns: BorrowedFd<'_>,
    ) -> Result<(), NetlinkError> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name.to_owned())
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let mut message = LinkVeth::new(name, peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .up();
        if let Some(bridge) = bridge {
            message = message.controller(bridge);
        }
        let message = message.build();
        self.rt.block_on(async {
            self.handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(request(format!("creating veth {name}")))
        })
    }

    pub fn add_address(
        &self,
        index: u32,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        self.rt.block_on(async {
            self.handle
                .address()
                .add(index, IpAddr::V4(address), prefix_len)
                .execute()
                .await
                .map_err(request(format!("adding address {address}/{prefix_len}")))
        })
    }

    pub fn default_route(&self, gateway: Ipv4Addr) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .build();
        self.rt.block_on(async {
            self.handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(request(format!("adding the default route via {gateway}")))
        })
    }

    /// Like [`Netlink::add_address`], but an address already there is no error.
    pub fn ensure_address(
        &self,
        index: u32,
        address: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetlinkError> {
        match self.add_address(index, address, prefix_len) {
            Err(NetlinkError::Request { source, .. })
                if errno_of(&source) == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// The default route via `gateway`, replacing any other default route.
    pub fn replace_default_route(&self, gateway: Ipv4Addr) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .build();
        self.rt.block_on(async {
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(request(format!("setting the default route via {gateway}")))
        })
    }

    /// A host route to `address` out of the link `index`, from `source`, replacing any other
    /// route to that address.
    pub fn replace_host_route(
        &self,
        address: Ipv4Addr,
        index: u32,
        source: Ipv4Addr,
    ) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(address, 32)
            .output_interface(index)
            .pref_source(source)
            .scope(rtnetlink::packet_route::route::RouteScope::Link)
            .build();
        self.rt.block_on(async {
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(request(format!("routing {address} to link {index}")))
        })
    }

    /// Every IPv4 address of this namespace: (link index, address, prefix length).
    pub fn addresses(&self) -> Result<Vec<(u32, Ipv4Addr, u8)>, NetlinkError> {
        use rtnetlink::packet_route::address::AddressAttribute;
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut stream = self.handle.address().get().execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(request("listing addresses"))?
            {
                for attr in &msg.attributes {
                    if let AddressAttribute::Local(IpAddr::V4(a)) = attr {
                        out.push((msg.header.index, *a, msg.header.prefix_len));
                    }
                }
            }
            Ok(out)
        })
    }

    /// Delete the link `name`; false if it did not exist.
    pub fn delete(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(index) = self.index(name)? else {
            return Ok(false);
        };
        self.rt.block_on(async {
            match self.handle.link().del(index).execute().await {
                Ok(()) => Ok(true),
                Err(e) if errno_of(&e) == Some(libc::ENODEV) => Ok(false),
                Err(e) => Err(request(format!("deleting {name}"))(e)),
            }
        })
    }

    /// Every link: (index, name, kind, index of its bridge).
    pub fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        self.rt.block_on(async {
            let mut links = Vec::new();
            let mut stream = self.handle.link().get().execute();
            while let Some(msg) = stream.try_next().await.map_err(request("listing links"))? {
                let mut link = Link {
                    index: msg.header.index,
                    name: String::new(),
                    kind: None,
                    controller: None,
                };
                for attr in msg.attributes {
                    match attr {
                        LinkAttribute::IfName(n) => link.name = n,
                        LinkAttribute::Controller(c) => link.controller = Some(c),
                        LinkAttribute::LinkInfo(infos) => {
                            for info in infos {
                                if let LinkInfo::Kind(k) = info {
                                    link.kind = Some(k);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                links.push(link);
            }
            Ok(links)
        })
    }

    /// Delete every bridge that has no port left; returns the names deleted.
    pub fn remove_empty_bridges(&self) -> Result<Vec<String>, NetlinkError> {
        let links = self.links()?;
        let mut removed = Vec::new();
        for bridge in links.iter().filter(|l| l.kind == Some(InfoKind::Bridge)) {
            if !links.iter().any(|l| l.controller == Some(bridge.index)) {
                self.delete(&bridge.name)?;
                removed.push(bridge.name.clone());
            }
        }
        Ok(removed)
    }
}

/// What [`Netlink::links`] reports of a link.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
}
