//! How requests reach the router: TCP (plain on loopback, TLS with rustls elsewhere) and the local
//! unix socket `<state-dir>/api.sock`, plus the layers every request passes at the edge (CORS,
//! Host/Origin checks, the per-client burst limit).
//!
//! Connections are served by hyper's HTTP/1.1 server directly (not `axum::serve`) so that the
//! limits that must hold per connection, not per handler, can be set: at most
//! [`MAX_HEADER_BYTES`] of request head (431 beyond), the head read within
//! [`ConnLimits::header_read`], a TLS handshake within [`ConnLimits::handshake`], and a
//! keep-alive connection closed after [`ConnLimits::idle`] without a request in flight. A request
//! in flight (a log follower, a `wait`, a websocket) is never cut by these.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderName, HeaderValue, Method, Request};
use axum::Router;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::api::auth::LocalPeer;
use crate::api::guard::{self, RequestGuard};
pub use crate::api::limits::MAX_HEADER_BYTES;
use crate::api::limits::{self, RateLimiter};

/// File name of the local API socket in the state directory.
pub const API_SOCKET: &str = "api.sock";

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("--listen {0} requires --tls-cert and --tls-key (plain HTTP is served on loopback addresses only)")]
    PlainBeyondLoopback(SocketAddr),
    #[error("--tls-cert and --tls-key go together")]
    TlsHalf,
    #[error("reading {what} {path}")]
    ReadPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("building the TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("--cors-origin '*' is not allowed: name each dashboard origin (scheme://host[:port])")]
    CorsWildcard,
    #[error("--cors-origin {0:?} is not an origin (expected scheme://host[:port])")]
    CorsOrigin(String),
    #[error("--rate-limit-per-sec must be a positive number (got {0})")]
    RateLimit(f64),
    #[error("binding the local API socket {path}")]
    BindUnix {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Plain HTTP is only for loopback: anything else needs TLS.
pub fn check_listen(addr: SocketAddr, tls: bool) -> Result<(), TransportError> {
    if tls || addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(TransportError::PlainBeyondLoopback(addr))
    }
}

/// The TLS acceptor for `--tls-cert` and `--tls-key` (PEM; the key PKCS#8, PKCS#1 or SEC1),
/// with the `ring` provider, TLS 1.2 and 1.3, HTTP/1.1 by ALPN. Call it before dropping
/// privileges so that the key may be readable by root only.
pub fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, TransportError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TransportError::ReadPem {
            what: "certificate",
            path: cert.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TransportError::NoCertificate(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TransportError::ReadPem {
        what: "private key",
        path: key.to_owned(),
        source,
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TransportError::Tls)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TransportError::Tls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Checked `--cors-origin` values: never `*`, each `scheme://host[:port]`.
pub fn cors_origins(origins: &[String]) -> Result<Vec<String>, TransportError> {
    origins
        .iter()
        .map(|o| {
            let o = o.trim().trim_end_matches('/').to_ascii_lowercase();
            if o == "*" {
                return Err(TransportError::CorsWildcard);
            }
            let valid = o.split_once("://").is_some_and(|(scheme, rest)| {
                !scheme.is_empty() && !rest.is_empty() && !rest.contains(['/', '*', '?', '#', ' '])
            }) && HeaderValue::from_str(&o).is_ok();
            if valid {
                Ok(o)
            } else {
                Err(TransportError::CorsOrigin(o))
            }
        })
        .collect()
}

/// CORS for the configured dashboard origins; `None` (no CORS headers at all) without any.
/// Credentials (cookies) are never allowed: the API authenticates with `Authorization`.
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let values: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(values))
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static(crate::api::request_id::HEADER),
            ])
            // A dashboard may read what the API answers beside the body.
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                HeaderName::from_static(crate::api::request_id::HEADER),
                HeaderName::from_static("x-sandbox-file-mode"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// What the edge layers need.
#[derive(Debug, Clone, Default)]
pub struct Edge {
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
    /// Checked with [`cors_origins`]; also allowed by the Origin check.
    pub cors_origins: Vec<String>,
    /// `(per second, burst)`; `None` for no burst limit.
    pub rate_limit: Option<(f64, u32)>,
}

/// The application as served: CORS outermost (so that refusals carry CORS headers too), then
/// the Host/Origin guard, then the burst limit, then the API.
pub fn edge(app: Router, edge: &Edge) -> Router {
    let mut app = app;
    if let Some((per_sec, burst)) = edge.rate_limit {
        app = limits::rate_limit(app, Arc::new(RateLimiter::new(per_sec, burst)));
    }
    let mut origins = edge.allowed_origins.clone();
    origins.extend(edge.cors_origins.iter().cloned());
    app = guard::protect(app, RequestGuard::new(&edge.allowed_hosts, &origins));
    // The Host/Origin guard's and the burst limit's refusals get a request id as well (the
    // app's own pass then keeps the one set here).
    app = app.layer(axum::middleware::from_fn(crate::api::request_id::layer));
    match cors_layer(&edge.cors_origins) {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// Per-connection time limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Time to receive a request's head once one is due.
    pub header_read: Duration,
    /// A keep-alive connection without a request in flight for this long is closed.
    pub idle: Duration,
    /// Time for a TLS handshake.
    pub handshake: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            handshake: Duration::from_secs(10),
        }
    }
}

/// Serve `app` on TCP (TLS when `tls` is set) until `shutdown` turns true, then wait for the
/// open connections to finish their requests.
pub async fn serve_tcp(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => { accept_failed(e).await; continue; }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let peer = Peer::Tcp(addr);
            match tls {
                None => serve_conn(stream, app, peer, limits, shutdown).await,
                Some(tls) => match tokio::time::timeout(limits.handshake, tls.accept(stream)).await
                {
                    Ok(Ok(stream)) => serve_conn(stream, app, peer, limits, shutdown).await,
                    Ok(Err(e)) => tracing::debug!(%addr, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                },
            }
        });
    }
    while conns.join_next().await.is_some() {}
}

/// Bind the local API socket: a stale socket file is removed first, the new one is made 0600.
pub fn bind_unix(path: &Path) -> Result<UnixListener, TransportError> {
    let err = |source| TransportError::BindUnix {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
        Ok(_) => {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    // Until this chmod the socket may be reachable by others: the peer check covers that window.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serve `app` on the local socket to `allowed_uid` and root only (SO_PEERCRED, checked on
/// accept); every request carries the [`LocalPeer`] extension.
pub async fn serve_unix(
    listener: UnixListener,
    app: Router,
    allowed_uid: u32,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => { accept_failed(e).await; continue; }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            _ = stopped(&mut shutdown) => break,
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == allowed_uid || cred.uid() == 0 => {}
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "refused a local API connection from another user"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a local connection's credentials");
                continue;
            }
        }
        let app = app.clone();
        let shutdown = shutdown.clone();
        conns.spawn(serve_conn(stream, app, Peer::Local, limits, shutdown));
    }
    while conns.join_next().await.is_some() {}
}

async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn accept_failed(e: std::io::Error) {
    // EMFILE and friends: back off instead of spinning.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[derive(Debug, Clone, Copy)]
enum Peer {
    Tcp(SocketAddr),
    Local,
}

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last_end: Mutex<Instant>,
}

impl Activity {
    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        self.last_end.lock().ok().map(|t| t.elapsed())
    }
}

struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(Arc::clone(a))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.last_end.lock() {
            *t = Instant::now();
        }
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that counts as "in flight" until hyper has sent it all (or dropped it).
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn serve_conn<I>(
    io: I,
    app: Router,
    peer: Peer,
    limits: ConnLimits,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last_end: Mutex::new(Instant::now()),
    });
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let in_flight = InFlight::start(&activity);
            match peer {
                Peer::Tcp(addr) => {
                    req.extensions_mut().insert(ConnectInfo(addr));
                }
                Peer::Local => {
                    req.extensions_mut().insert(LocalPeer);
                }
            }
            let app = app.clone();
            async move {
                let resp = app.oneshot(req.map(Body::new)).await?;
                Ok::<_, std::convert::Infallible>(resp.map(|inner| Tracked {
                    inner,
                    _in_flight: in_flight,
                }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut closing = false;
    let tick = (limits.idle / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                break;
            }
            _ = stopped(&mut shutdown), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(tick), if !closing => {
                if activity.idle_for().is_some_and(|d| d >= limits.idle) {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::Extension;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn who(local: Option<Extension<LocalPeer>>) -> &'static str {
        if local.is_some() {
            "local"
        } else {
            "remote"
        }
    }

    fn test_app() -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/who", get(who))
    }

    /// Send raw bytes, read until the server closes (or 5 s pass).
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &[u8]) -> String {
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    const GET_WHO: &[u8] = b"GET /who HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

    async fn tcp_server(
        tls: Option<TlsAcceptor>,
        limits: ConnLimits,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve_tcp(listener, test_app(), tls, limits, rx));
        (addr, tx)
    }

    #[test]
    fn plain_http_only_on_loopback() {
        check_listen("127.0.0.1:4280".parse().unwrap(), false).unwrap();
        check_listen("[::1]:4280".parse().unwrap(), false).unwrap();
        check_listen("0.0.0.0:4280".parse().unwrap(), true).unwrap();
        let e = check_listen("0.0.0.0:4280".parse().unwrap(), false).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("--listen 0.0.0.0:4280 requires --tls-cert and --tls-key"));
    }

    #[test]
    fn cors_origins_are_checked() {
        assert!(matches!(
            cors_origins(&["*".into()]),
            Err(TransportError::CorsWildcard)
        ));
        assert!(cors_origins(&["dash.example".into()]).is_err());
        assert!(cors_origins(&["https://dash.example/path".into()]).is_err());
        assert_eq!(
            cors_origins(&["https://Dash.example:8443/".into()]).unwrap(),
            ["https://dash.example:8443"]
        );
    }

    #[tokio::test]
    async fn cors_headers_only_for_configured_origins() {
        let origin = "https://dash.example:8443";
        let preflight = || {
            Request::builder()
                .method(Method::OPTIONS)
                .uri("/who")
                .header(header::ORIGIN, origin)
                .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
                .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization")
                .body(Body::empty())
                .unwrap()
        };
        let plain = edge(test_app(), &Edge::default());
        let r = plain.oneshot(preflight()).await.unwrap();
        assert!(r
            .headers()
            .keys()
            .all(|k| !k.as_str().starts_with("access-control-")));

        let cfg = Edge {
            cors_origins: cors_origins(&[origin.into()]).unwrap(),
            ..Edge::default()
        };
        let app = edge(test_app(), &cfg);
        let r = app.clone().oneshot(preflight()).await.unwrap();
        let h = r.headers();
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], origin);
        assert!(h[header::ACCESS_CONTROL_ALLOW_METHODS]
            .to_str()
            .unwrap()
            .contains("DELETE"));
        assert!(h.get(header::ACCESS_CONTROL_ALLOW_CREDENTIALS).is_none());
        // A CORS origin passes the Origin check on state-changing requests; others do not.
        let post = |o: &str| {
            Request::builder()
                .method(Method::POST)
                .uri("/nowhere")
                .header(header::ORIGIN, o)
                .body(Body::empty())
                .unwrap()
        };
        let r = app.clone().oneshot(post(origin)).await.unwrap();
        assert_ne!(r.status(), axum::http::StatusCode::FORBIDDEN);
        assert_eq!(r.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], origin);
        let r = app.oneshot(post("https://evil.example")).await.unwrap();
        assert_eq!(r.status(), axum::http::StatusCode::FORBIDDEN);
        assert!(r
            .headers()
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .is_none());
    }

    #[tokio::test]
    async fn unix_socket_serves_the_owner_with_local_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(API_SOCKET);
        std::fs::write(&path, "").unwrap();
        assert!(bind_unix(&path).is_err(), "a regular file is not replaced");
        std::fs::remove_file(&path).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // a stale socket
        let listener = bind_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let uid = nix::unistd::geteuid().as_raw();
        let (tx, rx) = watch::channel(false);
        let server = tokio::spawn(serve_unix(
            listener,
            test_app(),
            uid,
            ConnLimits::default(),
            rx,
        ));
        let s = tokio::net::UnixStream::connect(&path).await.unwrap();
        let resp = exchange(s, GET_WHO).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(resp.ends_with("local"), "{resp}");
        tx.send_replace(true);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn unix_socket_refuses_other_users() {
        // Served: `allowed` and root. Probed: the test's uid if it is not root (then
        // `allowed` is another uid), else a process running as nobody, with the socket made
        // world-writable so that only the SO_PEERCRED check can refuse it.
        let uid = nix::unistd::geteuid().as_raw();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(API_SOCKET);
        let listener = bind_unix(&path).unwrap();
        let allowed = if uid == 0 { 4242 } else { uid + 1 };
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve_unix(
            listener,
            test_app(),
            allowed,
            ConnLimits::default(),
            rx,
        ));
        let resp = if uid != 0 {
            let s = tokio::net::UnixStream::connect(&path).await.unwrap();
            exchange(s, GET_WHO).await
        } else {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
            let script = "import socket,sys\n\
                s=socket.socket(socket.AF_UNIX)\n\
                s.connect(sys.argv[1])\n\
                print('connected')\n\
                try:\n  s.sendall(b'GET /who HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); d=s.recv(100)\n\
                except OSError:\n  d=b''\n\
                print(d)\n";
            use std::os::unix::process::CommandExt;
            #[allow(
                clippy::disallowed_methods,
                reason = "the test connects as another user from a separate process"
            )]
            let mut cmd = std::process::Command::new("python3");
            cmd.arg("-c").arg(script).arg(&path).uid(65534).gid(65534);
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await
                .unwrap()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            let out = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.starts_with("connected"), "{out} {err}");
            out.replace("connected\n", "").replace("b''\n", "")
        };
        assert_eq!(resp, "", "closed without an answer");
    }

    #[tokio::test]
    async fn tcp_requests_are_not_local() {
        let (addr, _tx) = tcp_server(None, ConnLimits::default()).await;
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = exchange(s, GET_WHO).await;
        assert!(resp.ends_with("remote"), "{resp}");
        // A client cannot claim to be local with a header.
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = exchange(
            s,
            b"GET /who HTTP/1.1\r\nHost: localhost\r\nLocalPeer: 1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(resp.ends_with("remote"), "{resp}");
    }

    #[tokio::test]
    async fn oversized_headers_get_431() {
        let (addr, _tx) = tcp_server(None, ConnLimits::default()).await;
        let big = format!(
            "GET /who HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES + 1)
        );
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = exchange(s, big.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
        // Headers just under the limit are fine.
        let ok = format!(
            "GET /who HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "a".repeat(MAX_HEADER_BYTES - 200)
        );
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = exchange(s, ok.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    #[tokio::test]
    async fn slow_headers_and_idle_connections_are_closed() {
        let limits = ConnLimits {
            header_read: Duration::from_millis(300),
            idle: Duration::from_millis(300),
            handshake: Duration::from_millis(300),
        };
        let (addr, _tx) = tcp_server(None, limits).await;
        // A head that never ends.
        let start = Instant::now();
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = exchange(s, b"GET /who HTTP/1.1\r\nHost: local").await;
        assert!(start.elapsed() < Duration::from_secs(3));
        // A keep-alive connection left idle after its request.
        let start = Instant::now();
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = exchange(s, b"GET /who HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn requests_in_flight_outlive_the_idle_limit() {
        let limits = ConnLimits {
            header_read: Duration::from_millis(200),
            idle: Duration::from_millis(200),
            handshake: Duration::from_millis(200),
        };
        let app = Router::new()
            .route(
                "/wait",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    "waited"
                }),
            )
            .route(
                "/follow",
                get(|| async {
                    let chunks = futures_util::stream::unfold(0u8, |n| async move {
                        if n == 4 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        Some((Ok::<_, std::io::Error>(format!("chunk{n};")), n + 1))
                    });
                    Body::from_stream(chunks)
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(false);
        tokio::spawn(serve_tcp(listener, app, None, limits, rx));
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = exchange(s, b"GET /wait HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert!(resp.ends_with("waited"), "{resp}");
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = exchange(s, b"GET /follow HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        assert!(resp.contains("chunk3;"), "{resp}");
    }

    #[tokio::test]
    async fn tls_serves_https() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_path, cert.cert.pem()).unwrap();
        std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
        assert!(load_tls(&key_path, &cert_path).is_err());
        let acceptor = load_tls(&cert_path, &key_path).unwrap();
        let (addr, _tx) = tcp_server(Some(acceptor), ConnLimits::default()).await;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let resp = exchange(tls, GET_WHO).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        // Plain HTTP on the TLS port gets nothing.
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let resp = exchange(s, GET_WHO).await;
        assert!(!resp.contains("200 OK"), "{resp}");
    }
}
