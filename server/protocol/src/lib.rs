//! What the unprivileged daemon and the privileged helper say to each other, and the files they share.
//!
//! * [`wire`]: the request/response enums of the helper socket and their framing.
//! * [`layout`]: the per-sandbox directory the helper creates and the daemon reads.
//! * [`status`]: the exit record a monitor writes when its sandbox ends.
//! * [`logindex`]: the record format that says which bytes of the output log came from which stream.
//! * [`capabilities`]: capability names and the default bounding set.
//! * [`files`]: paths a client may name in a sandbox, and the chunked streams of file transfers.
//! * [`control`]: the line protocol of a monitor's control socket (kill, exit notification).
//! * [`exec`]: execs in a running sandbox: their control lines, attach frames and exit record.
//! * [`net`]: the subnet of bridged sandboxes and the names of their interfaces.
//! * [`rules`]: host names, environment entries, digests and signals, parsed the same on both sides.
//!
//! Nothing here performs I/O beyond encoding and decoding; both sides bring their own sockets.

pub mod capabilities;
pub mod control;
pub mod egress;
pub mod exec;
pub mod files;
pub mod layout;
pub mod logindex;
pub mod net;
pub mod rules;
pub mod status;
pub mod wire;
