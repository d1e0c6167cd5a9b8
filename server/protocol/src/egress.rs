//! The egress filter's two interfaces: its start-up configuration (written by the helper, which
//! starts it in the hub) and its control socket (spoken by the daemon).
//!
//! ```text
//!  daemon ──unix stream, one JSON object per line──▶ sandboxd-egress (in the hub, no capability)
//!         ◀── FilterEvent lines (ready, denied, counters)
//! ```
//!
//! The filter holds policies in memory only, keyed by the sandbox's address in the hub. The
//! daemon owns them (SQLite) and sends [`FilterRequest::Sync`] with every policy each time it
//! connects, so a restart of either side loses nothing; after that it sends `Set` and `Remove`
//! as sandboxes start, change and go. The filter buffers events (bounded) while no daemon is
//! connected. Counters are totals since the policy was first set, so a repeated value is
//! harmless and the daemon keeps the last one.

use std::net::{Ipv4Addr, SocketAddrV4};

use sandboxd_api::egress::{EgressCounters, EgressDenial, EgressPolicy, Ipv4Net};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the control protocol, sent in [`FilterEvent::Ready`].
pub const FILTER_PROTOCOL_VERSION: u32 = 1;
/// The control socket's file name in `<state>/helper/`.
pub const FILTER_SOCKET: &str = "egress.sock";
/// Longest line either side accepts; a longer one is a protocol error and closes the connection.
pub const MAX_LINE: usize = 256 * 1024;

/// How the helper starts the filter: this JSON is the filter's only argument after
/// `--config`. Descriptors are inherited, already bound by the helper inside the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Listening TCP socket every redirected sandbox connection arrives on (the original
    /// destination is `SO_ORIGINAL_DST`).
    pub tcp_fd: i32,
    /// UDP socket bound to the gateway's port 53: the sandboxes' resolver.
    pub dns_fd: i32,
    /// Listening unix socket for the daemon (`<state>/helper/egress.sock`).
    pub control_fd: i32,
    /// The resolver the filter asks, reached through the uplink (`--egress-dns`).
    pub upstream_dns: SocketAddrV4,
    /// The sandboxes' subnet: its gateway is the filter's own address, and no connection is
    /// made into it (other groups are reached through bridges, never through the filter).
    pub subnet: Ipv4Net,
    /// Always-denied ranges the operator lifted (`--egress-allow-range`).
    pub lifted: Vec<Ipv4Net>,
    /// Further destinations never reachable: the uplink namespace's own addresses (the host's,
    /// by default) and the daemon's API address.
    pub denied: Vec<Ipv4Net>,
    /// Only this uid may connect to the control socket (the daemon's), checked by
    /// `SO_PEERCRED`.
    pub daemon_uid: u32,
}

/// Whether this helper gives bridged sandboxes egress, as `GET /v1/info` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressStatus {
    pub available: bool,
    /// Why egress is not available (and what would make it so), when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The network namespace the hub's uplink is in (`--egress-uplink`; the host's own when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The resolver the filter asks (`--egress-dns`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_dns: Option<SocketAddrV4>,
}

/// One sandbox's policy, as the filter keys it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPolicy {
    pub sandbox: Uuid,
    /// The sandbox's address in the hub: the source of its connections.
    pub address: Ipv4Addr,
    pub policy: EgressPolicy,
}

/// Daemon → filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterRequest {
    /// The whole set of policies: every sandbox not listed loses its policy (and its open
    /// connections). Sent first on every connection.
    Sync { sandboxes: Vec<SandboxPolicy> },
    /// Set or replace one sandbox's policy; open connections it no longer allows are cut.
    Set(SandboxPolicy),
    /// The sandbox is gone: drop its policy and close its connections.
    Remove { sandbox: Uuid },
}

/// Filter → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case", deny_unknown_fields)]
pub enum FilterEvent {
    /// First line on every connection.
    Ready { version: u32 },
    /// A connection or DNS question was refused.
    Denied { sandbox: Uuid, denial: EgressDenial },
    /// A sandbox's totals changed (sent at most about once a second per sandbox, and for every
    /// sandbox after a `Sync`).
    Counters {
        sandbox: Uuid,
        counters: EgressCounters,
    },
    /// The last request could not be carried out (the connection stays open).
    Error { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let id = Uuid::nil();
        let policy: EgressPolicy =
            serde_json::from_str(r#"{"allow":["pypi.org:443"],"deny":["203.0.113.9"]}"#).unwrap();
        let reqs = [
            FilterRequest::Sync {
                sandboxes: vec![SandboxPolicy {
                    sandbox: id,
                    address: Ipv4Addr::new(10, 88, 0, 5),
                    policy: policy.clone(),
                }],
            },
            FilterRequest::Set(SandboxPolicy {
                sandbox: id,
                address: Ipv4Addr::new(10, 88, 0, 5),
                policy,
            }),
            FilterRequest::Remove { sandbox: id },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert!(!line.contains('\n'));
            assert_eq!(serde_json::from_str::<FilterRequest>(&line).unwrap(), r);
        }
        let set = serde_json::to_string(&FilterRequest::Remove { sandbox: id }).unwrap();
        assert_eq!(
            set,
            r#"{"op":"remove","sandbox":"00000000-0000-0000-0000-000000000000"}"#
        );
        let ev = FilterEvent::Counters {
            sandbox: id,
            counters: EgressCounters::default(),
        };
        let line = serde_json::to_string(&ev).unwrap();
        assert_eq!(serde_json::from_str::<FilterEvent>(&line).unwrap(), ev);
        assert!(serde_json::from_str::<FilterRequest>(r#"{"op":"nuke"}"#).is_err());
    }
}
