//! Who is asking: authentication of API requests.

/// Request extension present on every request that arrived over the local unix socket
/// (`<state-dir>/api.sock`) from the daemon's own uid or root (checked with SO_PEERCRED when the
/// connection was accepted). Inserted per connection by `transport.rs`; never set from anything
/// the client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPeer;
