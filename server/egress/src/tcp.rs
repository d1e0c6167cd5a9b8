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
/// Copy buffer per direction and connection, at first: a read that fills it doubles it, up to
/// [`COPY_BUF_MAX`], so that a bulk transfer needs fewer system calls while most connections
/// (a request, an answer) hold little memory. At most about 150 KiB per connection.
const COPY_BUF: usize = 8 * 1024;
const COPY_BUF_MAX: usize = 64 * 1024;
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
        if n == buf.len() && buf.len() < COPY_BUF_MAX {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// The address a listener should be reached at, for logs.
pub fn describe(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| Ipv4Addr::UNSPECIFIED.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::Ordering;

    /// A connected pair on loopback: (the client's end, the filter's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn peek_reads_until_the_name_and_keeps_the_bytes() {
        let (mut client, mut filter) = pair().await;
        let req = b"GET / HTTP/1.1\r\nHost: pypi.org\r\n\r\n";
        client.write_all(&req[..10]).await.expect("write");
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.write_all(&req[10..]).await.expect("write");
            client
        });
        let mut buf = Vec::new();
        let name = peek(&mut filter, &mut buf, PEEK_TIMEOUT)
            .await
            .expect("peek");
        assert_eq!(name.as_deref(), Some("pypi.org"));
        assert_eq!(buf, req);
        drop(writer.await);
    }

    #[tokio::test]
    async fn peek_gives_up_after_its_wait_or_its_limit() {
        let (_client, mut filter) = pair().await;
        let start = Instant::now();
        let mut buf = Vec::new();
        let name = peek(&mut filter, &mut buf, Duration::from_millis(200))
            .await
            .expect("peek");
        assert_eq!(name, None);
        assert!(start.elapsed() >= Duration::from_millis(200));

        // A request line longer than the limit.
        let (mut client, mut filter) = pair().await;
        let mut long = b"GET /".to_vec();
        long.resize(PEEK_MAX + 100, b'a');
        let w = tokio::spawn(async move {
            let _ = client.write_all(&long).await;
            client
        });
        let mut buf = Vec::new();
        let name = peek(&mut filter, &mut buf, PEEK_TIMEOUT)
            .await
            .expect("peek");
        assert_eq!((name, buf.len()), (None, PEEK_MAX));
        drop(w.await);
    }

    #[tokio::test]
    async fn relay_counts_both_ways_and_a_cut_resets_the_client() {
        // The destination: an echo server.
        let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let SocketAddr::V4(dest) = echo.local_addr().expect("addr") else {
            panic!("v4")
        };
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.expect("accept");
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
        let (mut client, filter) = pair().await;
        let stats = Arc::new(Stats::default());
        let cut = CancellationToken::new();
        let relay_task = {
            let (stats, cut) = (Arc::clone(&stats), cut.clone());
            tokio::spawn(async move { relay(filter, dest, b"first".to_vec(), &stats, &cut).await })
        };
        let mut got = [0u8; 5];
        client
            .read_exact(&mut got)
            .await
            .expect("read the first bytes back");
        assert_eq!(&got, b"first");
        let data = vec![1u8; 200_000];
        client.write_all(&data).await.expect("write");
        let mut back = vec![0u8; data.len()];
        client.read_exact(&mut back).await.expect("read back");
        assert_eq!(back, data);
        assert_eq!(stats.bytes_out.load(Ordering::Relaxed), 200_005);
        assert_eq!(stats.bytes_in.load(Ordering::Relaxed), 200_005);
        cut.cancel();
        relay_task.await.expect("relay ends");
        let mut b = [0u8; 1];
        let r = client.read(&mut b).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_destination_resets_the_client() {
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let SocketAddr::V4(dest) = closed.local_addr().expect("addr") else {
            panic!("v4")
        };
        drop(closed);
        let (mut client, filter) = pair().await;
        relay(
            filter,
            dest,
            Vec::new(),
            &Stats::default(),
            &CancellationToken::new(),
        )
        .await;
        let mut b = [0u8; 1];
        let r = client.read(&mut b).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }
}
