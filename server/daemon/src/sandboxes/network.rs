//! A sandbox's network as the daemon handles it: whether this host offers the mode, the address
//! from the helper's subnet (allocated in the store), the group's members for /etc/hosts, and
//! what the sandbox object shows.

use sandboxd_api::{CreateSandbox, NetworkInfo, NetworkMode, PortSpec};
use sandboxd_protocol::net::Subnet;
use sandboxd_protocol::wire::{NetworkPeer, PortMapping, SpawnNetwork};
use uuid::Uuid;

use super::{SandboxError, Service};
use crate::helper_client;

impl Service {
    /// The helper's subnet, when it offers bridge mode (asked once).
    async fn bridge_subnet(&self) -> Result<Option<Subnet>, SandboxError> {
        self.net_subnet
            .get_or_try_init(|| async {
                let info = helper_client::info(&*self.helper).await?;
                let bridged = info.network_modes.iter().any(|m| m == "bridge");
                Ok::<_, SandboxError>(
                    info.network_subnet
                        .filter(|_| bridged)
                        .and_then(|s| Subnet::parse(&s).ok()),
                )
            })
            .await
            .copied()
    }

    /// 422 before anything is stored when this host cannot give the sandbox its network.
    pub(super) async fn check_network(&self, spec: &CreateSandbox) -> Result<(), SandboxError> {
        let bridged = spec
            .network
            .as_ref()
            .is_some_and(|n| n.mode == NetworkMode::Bridge);
        if bridged && self.bridge_subnet().await?.is_none() {
            return Err(SandboxError::NetworkUnavailable(
                "network.mode bridge needs the privileged helper (start sandboxd as root); \
                 this daemon runs rootless and no user-mode network stack (pasta, slirp4netns) \
                 is supported"
                    .into(),
            ));
        }
        let range = self.policy.publish_ports;
        for p in spec.network.iter().flat_map(|n| n.ports.iter()) {
            if p.host != 0 && !range.contains(p.host) {
                return Err(SandboxError::PortNotAllowed(format!(
                    "network.ports: host port {} is outside this daemon's publish range {range} \
                     (leave it 0 to get a free port of the range; an operator sets the range \
                     with --publish-ports)",
                    p.host
                )));
            }
        }
        Ok(())
    }

    /// Record the network of a `creating` sandbox and say what the helper must set up: for
    /// bridge mode the lowest free address of the subnet and the group's live members.
    pub(super) async fn assign_network(
        &self,
        id: Uuid,
        spec: &CreateSandbox,
    ) -> Result<(NetworkInfo, Option<SpawnNetwork>), SandboxError> {
        let requested = spec.network.clone().unwrap_or_default();
        if requested.mode == NetworkMode::None {
            let info = NetworkInfo::default();
            self.store.set_network(id, &info).await?;
            return Ok((info, None));
        }
        let subnet = self.bridge_subnet().await?.ok_or_else(|| {
            SandboxError::NetworkUnavailable("bridge mode is not available".into())
        })?;
        let (first, last) = subnet.host_range();
        let index = self
            .store
            .assign_net_index(id, first, last)
            .await?
            .ok_or(SandboxError::NoAddress)?;
        let address = subnet.host(index).ok_or(SandboxError::NoAddress)?;
        let peers = match &requested.group {
            Some(group) => self
                .store
                .group_members(group, id)
                .await?
                .into_iter()
                .filter_map(|(hostname, address)| {
                    Some(NetworkPeer {
                        hostname,
                        address: address.parse().ok()?,
                    })
                })
                .collect(),
            None => Vec::new(),
        };
        let info = NetworkInfo {
            mode: NetworkMode::Bridge,
            group: requested.group.clone(),
            address: Some(address.to_string()),
            gateway: Some(subnet.gateway().to_string()),
            ports: requested.ports.clone(),
            egress: None,
        };
        self.store.set_network(id, &info).await?;
        // Before the sandbox starts: its first connection already finds its policy.
        self.push_policy(id, address).await?;
        let spawn = SpawnNetwork {
            group: requested.group,
            address,
            peers,
            ports: requested
                .ports
                .iter()
                .map(|p| PortMapping {
                    sandbox: p.sandbox,
                    host: p.host,
                })
                .collect(),
        };
        Ok((info, Some(spawn)))
    }

    /// Record the published ports as the helper bound them.
    pub(super) async fn record_ports(
        &self,
        id: Uuid,
        mut info: NetworkInfo,
        bound: &[PortMapping],
    ) -> Result<(), SandboxError> {
        if bound.is_empty() {
            return Ok(());
        }
        info.ports = bound
            .iter()
            .map(|p| PortSpec {
                sandbox: p.sandbox,
                host: p.host,
            })
            .collect();
        self.store.set_network(id, &info).await?;
        Ok(())
    }
}
