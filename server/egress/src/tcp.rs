//! Every TCP connection a sandbox opens beyond its group: the hub's nftables rule redirects it
//! to the filter's listening socket. The filter decides it (see `policy`), then either resets
//! it at once (`SO_LINGER` 0: the client sees a reset, never a silent timeout) or connects to
//! the original destination itself, from the hub through its uplink, and copies both ways,
//! counting bytes.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::rr::Name;
use sandboxd_api::egress::{DenialReason, EgressDenial, Verdict};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::control::Events;
use crate::dns::{Resolution, Upstream};
use crate::policy::{self, Decision, Limits, Stats, Table};
use crate::shared::{is_transient, lock_table, Throttle};
use crate::sniff::{self, Sniff};
use crate::sys;

/// Most bytes read from a client before its server name is decided.
pub const PEEK_MAX: usize = 16 * 1024;
/// Longest wait for the client's first bytes; past it the address rules decide.
pub const PEEK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for them when the connection is denied whatever name it presents (no address
/// rule allows the destination and no name resolved to it): the name only makes the denial's
/// reason and record precise, and a client that waits for the server to speak first must not
/// wait long for its reset.
pub const PEEK_TIMEOUT_DENIED: Duration = Duration::from_millis(500);
/// Longest wait for the destination to accept; past it the client is reset.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Copy buffer per direction and connection: with the peek buffer, a connection holds at most
/// about 50 KiB of the filter's memory.
const COPY_BUF: usize = 16 * 1024;
/// At most one log line per this period for what a sandbox can repeat at will.
const LOG_PERIOD: Duration = Duration::from_secs(10);
/// Most connections the filter holds at once, all sandboxes together (each is two descriptors).
pub const MAX_CONNECTIONS: usize = 8192;

/// The TCP side's shared state.
pub struct Tcp {
    pub table: Arc<Mutex<Table>>,
    pub events: Arc<Events>,
    pub limits: Arc<Limits>,
    pub slots: Arc<Semaphore>,
    pub over_limit: Throttle,
    pub upstream: Arc<Upstream>,
}

/// Close `s` with a reset rather than a FIN.
fn reset(s: TcpStream) {
    if let Err(e) = s.set_zero_linger() {
        tracing::debug!(error = %e, "SO_LINGER 0");
    }
    drop(s);
}

impl Tcp {
    /// Accept connections for ever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "tcp accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                if let Some(suppressed) = self.over_limit.allow(LOG_PERIOD) {
                    tracing::warn!(%peer, suppressed, "too many connections; reset");
                }
                reset(stream);
                continue;
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                this.handle(stream, peer).await;
                drop(slot);
            });
        }
    }

    async fn handle(&self, mut stream: TcpStream, peer: SocketAddr) {
        let SocketAddr::V4(peer) = peer else {
            return reset(stream);
        };
        let src = *peer.ip();
        let dest = match sys::original_dst(&stream) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, %src, "no original destination; reset");
                return reset(stream);
            }
        };
        let found = lock_table(&self.table).get(src).map(|e| {
            let reachable = e.resolved_any(*dest.ip(), Instant::now())
                || e.policy.check_address(*dest.ip(), dest.port()) == Verdict::Allow;
            (e.id, Arc::clone(&e.policy), Arc::clone(&e.stats), reachable)
        });
        let Some((id, policy, stats, reachable)) = found else {
            tracing::debug!(%src, %dest, "connection from an address without a policy; reset");
            return reset(stream);
        };
        let Some(_active) = stats.enter() else {
            if let Some(suppressed) = self.over_limit.allow(LOG_PERIOD) {
                tracing::warn!(sandbox = %id, suppressed, "too many connections for one sandbox; reset");
            }
            stats.add(&stats.connections_denied, 1);
            self.report(id, dest, None, DenialReason::NotAllowed);
            return reset(stream);
        };
        if self.limits.is_private(*dest.ip()) {
            stats.add(&stats.connections_denied, 1);
            self.report(id, dest, None, DenialReason::PrivateRange);
            return reset(stream);
        }
        let mut first = Vec::new();
        let name = if policy::name_matters(&policy, *dest.ip(), dest.port()) {
            let wait = if reachable {
                PEEK_TIMEOUT
            } else {
                PEEK_TIMEOUT_DENIED
            };
            match peek(&mut stream, &mut first, wait).await {
                Ok(name) => name,
                Err(e) => {
                    tracing::debug!(error = %e, %src, %dest, "client gone before deciding");
                    return reset(stream);
                }
            }
        } else {
            None
        };
        if let Some(name) = &name {
            self.resolve_if_needed(src, id, name, dest).await;
        }
        let decision = lock_table(&self.table).decide_connection(
            src,
            id,
            *dest.ip(),
            dest.port(),
            name.clone(),
            Instant::now(),
        );
        match decision {
            Decision::Denied(reason) => {
                self.report(id, dest, name, reason);
                reset(stream);
            }
            Decision::Allowed { conn_id, cut } => {
                tracing::debug!(sandbox = %id, %dest, name = name.as_deref().unwrap_or(""), "allowed");
                relay(stream, dest, first, &stats, &cut).await;
                lock_table(&self.table).finish(src, conn_id);
            }
        }
    }

    /// If only a resolution of `name` to `dest` is missing for the connection to be allowed,
    /// ask the upstream now and remember its answer.
    async fn resolve_if_needed(&self, src: Ipv4Addr, id: Uuid, name: &str, dest: SocketAddrV4) {
        let needed = lock_table(&self.table)
            .get(src)
            .filter(|e| e.id == id)
            .is_some_and(|e| e.needs_resolving(name, *dest.ip(), dest.port(), Instant::now()));
        if !needed {
            return;
        }
        let Ok(fqdn) = Name::from_ascii(format!("{name}.")) else {
            return;
        };
        match self.upstream.resolve(&fqdn, &self.limits).await {
            Ok(Resolution::Addresses { kept, ttl, .. }) => {
                if let Some(e) = lock_table(&self.table).get_mut(src).filter(|e| e.id == id) {
                    e.remember(name, &kept, Duration::from_secs(ttl.into()), Instant::now());
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, name, "resolving a presented name"),
        }
    }

    fn report(&self, id: Uuid, dest: SocketAddrV4, name: Option<String>, reason: DenialReason) {
        // Denials go to the daemon as events; the log has them at debug level only, so that a
        // sandbox cannot fill the host's disk by being denied.
        tracing::debug!(sandbox = %id, %dest, name = name.as_deref().unwrap_or(""), ?reason, "connection denied");
        self.events.denied(
            id,
            EgressDenial {
                at: time::OffsetDateTime::now_utc(),
                protocol: "tcp".into(),
                address: Some(*dest.ip()),
                port: Some(dest.port()),
                name,
                reason,
            },
        );
    }
}

/// Read the client's first bytes into `buf` until they name a server, say there is none, fill
/// [`PEEK_MAX`], end, or `wait` passes.
async fn peek(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    wait: Duration,
) -> io::Result<Option<String>> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut chunk = vec![0u8; 4096];
    loop {
        match sniff::server_name(buf) {
            Sniff::Name(n) => return Ok(Some(n)),
            Sniff::NoName => return Ok(None),
            Sniff::Incomplete => {}
        }
        let room = PEEK_MAX - buf.len();
        if room == 0 {
            return Ok(None);
        }
        let want = room.min(chunk.len());
        let n = match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(r) => r?,
            Err(_) => return Ok(None),
        };
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connect to `dest`, send `first`, and copy both ways until both sides are done, the policy
/// cuts the connection, or either side fails (then both are reset).
async fn relay(
    mut client: TcpStream,
    dest: SocketAddrV4,
    first: Vec<u8>,
    stats: &Stats,
    cut: &CancellationToken,
) {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dest));
    let mut upstream = tokio::select! {
        r = connect => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, %dest, "destination refused; reset");
                return reset(client);
            }
            Err(_) => {
                tracing::debug!(%dest, "destination did not accept in time; reset");
                return reset(client);
            }
        },
        _ = cut.cancelled() => return reset(client),
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let result = tokio::select! {
        r = copy_both(&mut client, &mut upstream, first, stats) => r,
        _ = cut.cancelled() => Err(io::Error::other("cut by a policy change")),
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %dest, "connection ended by a reset");
        reset(client);
        reset(upstream);
    }
}

async fn copy_both(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    first: Vec<u8>,
    stats: &Stats,
) -> io::Result<()> {
    let (mut client_r, mut client_w) = client.split();
    let (mut up_r, mut up_w) = upstream.split();
    let out = async {
        if !first.is_empty() {
            up_w.write_all(&first).await?;
            stats.add(&stats.bytes_out, first.len() as u64);
        }
        drop(first);
        copy_counted(&mut client_r, &mut up_w, stats, Direction::Out).await
    };
    let back = copy_counted(&mut up_r, &mut client_w, stats, Direction::In);
    tokio::try_join!(out, back).map(|_| ())
}

#[derive(Clone, Copy)]
enum Direction {
    Out,
    In,
}

/// Copy until `r` ends, then shut `w` down for writing (a half-close passes through).
async fn copy_counted<R, W>(r: &mut R, w: &mut W, stats: &Stats, dir: Direction) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let counter = match dir {
        Direction::Out => &stats.bytes_out,
        Direction::In => &stats.bytes_in,
    };
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        stats.add(counter, n as u64);
    }
}

/// The address a listener should be reached at, for logs.
pub fn describe(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| Ipv4Addr::UNSPECIFIED.to_string())
}
