//! A test-made "internet": a network namespace of the test's own with DNS, HTTP, HTTPS and echo
//! servers on documentation addresses, to hand to a daemon as `--egress-uplink` and
//! `--egress-dns`. Nothing here ever sends a packet outside that namespace.
//!
//! ```text
//!  netns sbxnet-<pid>-<n> (bound at /run/netns/<name>, as `ip netns add` does), lo up, with:
//!    198.51.100.53  DNS :53 (UDP and TCP): the A records the test sets, NXDOMAIN otherwise
//!    203.0.113.10   HTTP :80, HTTPS :443 (certificates of a test CA for the registered names)
//!    203.0.113.20   TCP echo :7 and :853, UDP echo :7, HTTP :80 and :8080
//! ```
//!
//! Every server counts what it received per local `address:port` (a TCP connection accepted, a
//! UDP datagram), so a test can assert that nothing arrived. HTTP answers one line,
//! `host=<Host header> path=<path> scheme=<http|https> sni=<server name or -> local=<addr:port>`,
//! or, for `GET /bytes/N`, N bytes of `x` (throughput measurements).
//!
//! The servers run on one thread that entered the namespace before binding (a socket stays in
//! the namespace it was created in); dropping the [`TestInternet`] stops them and removes the
//! namespace, and with it whatever a daemon left inside.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

/// The DNS server's address.
pub const DNS: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// The web server's address (HTTP :80, HTTPS :443).
pub const WEB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The second server's address (TCP echo :7 and :853, UDP echo :7, HTTP :80 and :8080).
pub const OTHER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// The echo ports of [`OTHER`].
pub const ECHO_PORTS: [u16; 2] = [7, 853];
/// The HTTP ports of [`OTHER`].
pub const OTHER_HTTP_PORTS: [u16; 2] = [80, 8080];
/// Time-to-live of every answer.
pub const TTL: u32 = 60;
/// Largest `/bytes/N` the web servers send.
const MAX_BYTES: u64 = 1 << 30;

/// Where every connection and datagram arrived, by local address and port.
type Counters = Arc<Mutex<HashMap<SocketAddrV4, u64>>>;

/// The shared state the servers read: records and certificates the test registers.
struct Zone {
    /// (name or `*.suffix`, address), lower case, no trailing dot.
    records: Mutex<Vec<(String, Ipv4Addr)>>,
    /// Names (or `*.suffix`) the HTTPS server has a certificate for.
    certs: Mutex<HashMap<String, Arc<rustls::sign::CertifiedKey>>>,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

/// See the module documentation.
pub struct TestInternet {
    name: String,
    path: PathBuf,
    zone: Arc<Zone>,
    counters: Counters,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip tool runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Does `name` fall under `pattern` (an exact name, or `*.suffix`: strictly below it)?
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name.len() > suffix.len() && name.ends_with(&format!(".{suffix}")),
        None => pattern == name,
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestInternet {
    /// Create the namespace, its addresses and its servers. Panics if any step fails.
    pub fn new() -> TestInternet {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sbxnet-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let path = PathBuf::from(format!("/run/netns/{name}"));
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        for addr in [DNS, WEB, OTHER] {
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "lo",
            ]);
        }

        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("sandboxd test CA {name}"),
        );
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let zone = Arc::new(Zone {
            records: Mutex::new(Vec::new()),
            certs: Mutex::new(HashMap::new()),
            ca,
            ca_key,
        });
        let counters: Counters = Arc::default();

        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (path, zone, counters) = (path.clone(), zone.clone(), counters.clone());
            std::thread::spawn(move || {
                let bound = bind_all(&path);
                let sockets = match bound {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the test internet's runtime");
                rt.block_on(async move {
                    serve_all(sockets, zone, counters, ready_tx, stopped).await;
                });
            })
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("test internet {name}: {e}"),
            Err(_) => panic!("test internet {name}: the server thread died"),
        }
        TestInternet {
            name,
            path,
            zone,
            counters,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The namespace's name (`ip -n NAME ...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, for `--egress-uplink`.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The DNS server, for `--egress-dns`.
    pub fn dns(&self) -> SocketAddrV4 {
        SocketAddrV4::new(DNS, 53)
    }

    /// Answer `name` (or, with `*.suffix`, every name strictly below suffix) with `addr`, and
    /// give the HTTPS server a certificate for it. Several calls for one name add addresses.
    pub fn add_a(&self, name: &str, addr: Ipv4Addr) {
        let name = normalize(name);
        self.zone
            .records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.clone(), addr));
        self.add_cert(&name);
    }

    /// Give the HTTPS server a certificate for `name` (`*.suffix` for a wildcard) without a
    /// DNS record.
    pub fn add_cert(&self, name: &str) {
        let name = normalize(name);
        let mut certs = self.zone.certs.lock().unwrap_or_else(|e| e.into_inner());
        if certs.contains_key(&name) {
            return;
        }
        let key = rcgen::KeyPair::generate().expect("server key");
        let params = rcgen::CertificateParams::new(vec![name.clone()]).expect("server params");
        let cert = params
            .signed_by(&key, &self.zone.ca, &self.zone.ca_key)
            .expect("server certificate");
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).expect("signing key");
        certs.insert(
            name,
            Arc::new(rustls::sign::CertifiedKey::new(
                vec![cert.der().clone()],
                signing,
            )),
        );
    }

    /// The test CA's certificate (PEM), for a sandbox's trust store.
    pub fn ca_pem(&self) -> String {
        self.zone.ca.pem()
    }

    /// Connections (TCP) or datagrams (UDP) received on `addr` so far.
    pub fn received(&self, addr: SocketAddrV4) -> u64 {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters.get(&addr).copied().unwrap_or(0)
    }

    /// Everything received on every server except the DNS server.
    pub fn received_except_dns(&self) -> u64 {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        counters
            .iter()
            .filter(|(a, _)| *a.ip() != DNS)
            .map(|(_, n)| n)
            .sum()
    }

    /// Everything received, per address and port.
    pub fn counters(&self) -> HashMap<SocketAddrV4, u64> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Run `f` on a thread inside the namespace (a client there reaches the servers over the
    /// namespace's own loopback).
    pub fn inside<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path.clone();
        std::thread::spawn(move || {
            enter(&path).expect("entering the test internet");
            f()
        })
        .join()
        .expect("the thread inside the test internet panicked")
    }

    /// `ip -n NAME ARGS...`, its standard output (panics if it fails).
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("the ip tool runs");
        assert!(
            out.status.success(),
            "ip -n {} {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The names of the namespace's links.
    pub fn links(&self) -> Vec<String> {
        links_in(&self.path)
    }

    /// The names of the namespace's nftables tables (family `ip`).
    pub fn nft_tables(&self) -> Vec<String> {
        nft_tables(&self.path)
    }
}

impl Default for TestInternet {
    fn default() -> TestInternet {
        TestInternet::new()
    }
}

impl Drop for TestInternet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Unbinding the namespace ends it (and every link in it) once no socket or process
        // holds it any more; the servers' sockets closed with their runtime.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn enter(path: &std::path::Path) -> Result<(), String> {
    let ns = std::fs::File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("setns {}: {e}", path.display()))
}

struct Sockets {
    dns_udp: std::net::UdpSocket,
    dns_tcp: std::net::TcpListener,
    /// (listener, TLS?)
    http: Vec<(std::net::TcpListener, bool)>,
    echo_tcp: Vec<std::net::TcpListener>,
    echo_udp: std::net::UdpSocket,
}

/// Enter the namespace (this thread stays there) and bind every server socket.
fn bind_all(path: &std::path::Path) -> Result<Sockets, String> {
    enter(path)?;
    let tcp = |addr: Ipv4Addr, port: u16| {
        let l = std::net::TcpListener::bind(SocketAddrV4::new(addr, port))
            .map_err(|e| format!("binding {addr}:{port}: {e}"))?;
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok::<_, String>(l)
    };
    let udp = |addr: Ipv4Addr, port: u16| {
        let s = std::net::UdpSocket::bind(SocketAddrV4::new(addr, port))
            .map_err(|e| format!("binding udp {addr}:{port}: {e}"))?;
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok::<_, String>(s)
    };
    let mut http = vec![(tcp(WEB, 80)?, false), (tcp(WEB, 443)?, true)];
    for port in OTHER_HTTP_PORTS {
        http.push((tcp(OTHER, port)?, false));
    }
    Ok(Sockets {
        dns_udp: udp(DNS, 53)?,
        dns_tcp: tcp(DNS, 53)?,
        http,
        echo_tcp: ECHO_PORTS
            .iter()
            .map(|p| tcp(OTHER, *p))
            .collect::<Result<_, _>>()?,
        echo_udp: udp(OTHER, 7)?,
    })
}

fn count(counters: &Counters, local: Option<SocketAddr>) {
    if let Some(SocketAddr::V4(a)) = local {
        *counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(a)
            .or_default() += 1;
    }
}

async fn serve_all(
    sockets: Sockets,
    zone: Arc<Zone>,
    counters: Counters,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let started = (|| -> std::io::Result<()> {
        let dns_udp = tokio::net::UdpSocket::from_std(sockets.dns_udp)?;
        tasks.spawn(dns_udp_server(dns_udp, zone.clone(), counters.clone()));
        let dns_tcp = tokio::net::TcpListener::from_std(sockets.dns_tcp)?;
        tasks.spawn(accept_loop(dns_tcp, counters.clone(), {
            let zone = zone.clone();
            move |stream| dns_tcp_conn(stream, zone.clone())
        }));
        let tls = tls_config(zone.clone());
        for (l, is_tls) in sockets.http {
            let l = tokio::net::TcpListener::from_std(l)?;
            let tls = is_tls.then(|| tls.clone());
            tasks.spawn(accept_loop(l, counters.clone(), move |stream| {
                http_conn(stream, tls.clone())
            }));
        }
        for l in sockets.echo_tcp {
            let l = tokio::net::TcpListener::from_std(l)?;
            tasks.spawn(accept_loop(l, counters.clone(), echo_conn));
        }
        let echo_udp = tokio::net::UdpSocket::from_std(sockets.echo_udp)?;
        tasks.spawn(udp_echo(echo_udp, counters.clone()));
        Ok(())
    })();
    let _ = ready.send(started.map_err(|e| e.to_string()));
    let _ = stopped.await;
    tasks.shutdown().await;
}

fn tls_config(zone: Arc<Zone>) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Certs(zone)));
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The HTTPS server's certificates: the exact name first, else a wildcard covering it.
struct Certs(Arc<Zone>);

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certs")
    }
}

impl rustls::server::ResolvesServerCert for Certs {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let name = normalize(hello.server_name()?);
        let certs = self.0.certs.lock().unwrap_or_else(|e| e.into_inner());
        certs.get(&name).cloned().or_else(|| {
            certs
                .iter()
                .find(|(pattern, _)| pattern.starts_with("*.") && name_matches(pattern, &name))
                .map(|(_, c)| c.clone())
        })
    }
}

async fn accept_loop<F, Fut>(listener: tokio::net::TcpListener, counters: Counters, handler: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        count(&counters, local);
        conns.spawn(handler(stream));
        while conns.try_join_next().is_some() {}
    }
}

async fn echo_conn(mut stream: tokio::net::TcpStream) {
    let (mut r, mut w) = stream.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

async fn udp_echo(socket: tokio::net::UdpSocket, counters: Counters) {
    let local = socket.local_addr().ok();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        count(&counters, local);
        let _ = socket.send_to(&buf[..n], peer).await;
    }
}

/// One HTTP/1.1 request, answered and closed.
async fn http_conn(stream: tokio::net::TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let result = tokio::time::timeout(Duration::from_secs(30), async {
        match tls {
            None => http_exchange(stream, "http", None, &local).await,
            Some(acceptor) => {
                let tls = acceptor.accept(stream).await?;
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                http_exchange(tls, "https", sni, &local).await
            }
        }
    })
    .await;
    drop(result);
}

async fn http_exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    scheme: &str,
    sni: Option<String>,
    local: &str,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("")
        .to_owned();
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "-".to_owned());
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let n = n.min(MAX_BYTES);
        let header = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(header.as_bytes()).await?;
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..k]).await?;
            left -= k as u64;
        }
    } else {
        let body = format!(
            "host={host} path={path} scheme={scheme} sni={} local={local}\n",
            sni.as_deref().unwrap_or("-")
        );
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(reply.as_bytes()).await?;
    }
    stream.flush().await?;
    stream.shutdown().await
}

/// The answer to one DNS query (None: not a query we answer at all).
fn dns_answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::{rdata::A, RData, Record, RecordType};
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    let Some(question) = request.queries.first().cloned() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response.to_vec().ok();
    };
    response.add_query(question.clone());
    if request.metadata.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return response.to_vec().ok();
    }
    let name = normalize(&question.name().to_ascii());
    let records = zone.records.lock().unwrap_or_else(|e| e.into_inner());
    let matching: Vec<Ipv4Addr> = {
        let exact: Vec<Ipv4Addr> = records
            .iter()
            .filter(|(p, _)| *p == name)
            .map(|(_, a)| *a)
            .collect();
        if exact.is_empty() {
            records
                .iter()
                .filter(|(p, _)| p.starts_with("*.") && name_matches(p, &name))
                .map(|(_, a)| *a)
                .collect()
        } else {
            exact
        }
    };
    if matching.is_empty() {
        response.metadata.response_code = ResponseCode::NXDomain;
    } else if question.query_type() == RecordType::A {
        for addr in matching {
            response.add_answer(Record::from_rdata(
                question.name().clone(),
                TTL,
                RData::A(A(addr)),
            ));
        }
    }
    // A known name asked for another type: NOERROR with no data.
    response.to_vec().ok()
}

async fn dns_udp_server(socket: tokio::net::UdpSocket, zone: Arc<Zone>, counters: Counters) {
    let local = socket.local_addr().ok();
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        count(&counters, local);
        if let Some(answer) = dns_answer(&zone, &buf[..n]) {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

async fn dns_tcp_conn(mut stream: tokio::net::TcpStream, zone: Arc<Zone>) {
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let len = stream.read_u16().await? as usize;
            let mut query = vec![0u8; len];
            stream.read_exact(&mut query).await?;
            let Some(answer) = dns_answer(&zone, &query) else {
                return Ok::<(), std::io::Error>(());
            };
            stream.write_u16(answer.len() as u16).await?;
            stream.write_all(&answer).await?;
        }
    })
    .await;
}

/// A blocking DNS A query to `server` from wherever the caller is (tests: inside a namespace
/// of their own). Returns the response code and the addresses.
pub fn query_a(server: SocketAddrV4, name: &str) -> std::io::Result<(String, Vec<Ipv4Addr>)> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    let qname = Name::from_ascii(name).map_err(|e| invalid(e.to_string()))?;
    message.add_query(Query::query(qname, RecordType::A));
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.send_to(
        &message.to_vec().map_err(|e| invalid(e.to_string()))?,
        server,
    )?;
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf)?;
    let answer = Message::from_vec(&buf[..n]).map_err(|e| invalid(e.to_string()))?;
    let addrs = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Ok((format!("{:?}", answer.metadata.response_code), addrs))
}

/// A blocking HTTP GET over plain TCP from wherever the caller is; the whole reply.
pub fn http_get(addr: SocketAddrV4, host: &str, path: &str) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// A blocking HTTPS GET with `server_name` as SNI and Host, trusting only `ca_pem`.
pub fn https_get(
    addr: SocketAddrV4,
    server_name: &str,
    path: &str,
    ca_pem: &str,
) -> std::io::Result<String> {
    let other = |e: String| std::io::Error::other(e);
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes())
        .map_err(|e: rustls::pki_types::pem::Error| other(e.to_string()))?;
    roots.add(ca).map_err(|e| other(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| other(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
        .map_err(|e| other(e.to_string()))?;
    let conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| other(e.to_string()))?;
    let tcp = std::net::TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    match tls.read_to_string(&mut reply) {
        Ok(_) => Ok(reply),
        // A server closing without close_notify after a complete reply.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !reply.is_empty() => Ok(reply),
        Err(e) => Err(e),
    }
}

/// The names of the nftables tables of the `ip` family in the network namespace `ns` (a file
/// like `/run/netns/NAME` or a hub's bind mount), by a netlink dump from a thread inside it.
pub fn nft_tables(ns: &std::path::Path) -> Vec<String> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter(&ns).expect("entering the namespace");
        list_tables().expect("listing nftables tables")
    })
    .join()
    .expect("the listing thread panicked")
}

fn list_tables() -> std::io::Result<Vec<String>> {
    use nix::sys::socket::{
        bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    // nlmsghdr (GETTABLE of nftables, REQUEST|DUMP) + nfgenmsg (family ip).
    let mut msg = Vec::new();
    msg.extend_from_slice(&20u32.to_ne_bytes());
    msg.extend_from_slice(&((10u16 << 8) | 1).to_ne_bytes());
    msg.extend_from_slice(&(0x1u16 | 0x300).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[2, 0, 0, 0]);
    send(fd.as_raw_fd(), &msg, MsgFlags::empty())?;
    let mut names = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        let mut rest = &buf[..n];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < 16 || len > rest.len() {
                return Err(std::io::Error::other("a malformed netlink message"));
            }
            match ty {
                3 => return Ok(names),
                2 => {
                    let errno = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
                    if errno != 0 {
                        return Err(std::io::Error::from_raw_os_error(-errno));
                    }
                }
                _ => {
                    let mut attrs = &rest[20..len];
                    while attrs.len() >= 4 {
                        let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                        let aty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x7fff;
                        if alen < 4 || alen > attrs.len() {
                            break;
                        }
                        if aty == 1 {
                            let name = attrs[4..alen].split(|b| *b == 0).next().unwrap_or(&[]);
                            names.push(String::from_utf8_lossy(name).into_owned());
                        }
                        attrs = attrs.get((alen + 3) & !3..).unwrap_or(&[]);
                    }
                }
            }
            rest = rest.get((len + 3) & !3..).unwrap_or(&[]);
        }
    }
}

/// The names of the links of the network namespace `ns` (a file), by `ip` run inside it.
pub fn links_in(ns: &std::path::Path) -> Vec<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["ip", "-o", "link", "show"])
        .output()
        .expect("nsenter runs");
    assert!(
        out.status.success(),
        "ip link in {}: {}",
        ns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_names_strictly_below() {
        assert!(name_matches("*.example.org", "a.example.org"));
        assert!(name_matches("*.example.org", "a.b.example.org"));
        assert!(!name_matches("*.example.org", "example.org"));
        assert!(!name_matches("*.example.org", "badexample.org"));
        assert!(name_matches("example.org", "example.org"));
    }

    /// The servers answer from inside the namespace, count what arrived, and everything is
    /// gone after the drop.
    #[test]
    fn the_test_internet_serves_and_leaves_nothing() {
        if !crate::can_run() {
            return;
        }
        let net = TestInternet::new();
        net.add_a("www.example.test", WEB);
        net.add_a("*.wild.test", OTHER);
        net.add_cert("tls-only.test");
        assert!(net.links().contains(&"lo".to_owned()));
        assert!(net.nft_tables().is_empty());
        let dns = net.dns();
        let ca = net.ca_pem();
        let (www, wild, apex, nx, http, https, other, echo) = net.inside(move || {
            let echo = (|| {
                let mut s = std::net::TcpStream::connect(SocketAddrV4::new(OTHER, 7))?;
                s.write_all(b"ping")?;
                s.shutdown(std::net::Shutdown::Write)?;
                let mut back = String::new();
                s.read_to_string(&mut back)?;
                Ok::<_, std::io::Error>(back)
            })();
            (
                query_a(dns, "WWW.example.test.").unwrap(),
                query_a(dns, "a.b.wild.test").unwrap(),
                query_a(dns, "wild.test").unwrap(),
                query_a(dns, "nothing.test").unwrap(),
                http_get(SocketAddrV4::new(WEB, 80), "www.example.test", "/a/b").unwrap(),
                https_get(SocketAddrV4::new(WEB, 443), "tls-only.test", "/s", &ca).unwrap(),
                http_get(SocketAddrV4::new(OTHER, 8080), "x", "/bytes/5").unwrap(),
                echo.unwrap(),
            )
        });
        assert_eq!(www, ("NoError".to_owned(), vec![WEB]));
        assert_eq!(wild, ("NoError".to_owned(), vec![OTHER]));
        assert_eq!(apex.0, "NXDomain");
        assert_eq!(nx, ("NXDomain".to_owned(), vec![]));
        assert!(
            http.ends_with(
                "host=www.example.test path=/a/b scheme=http sni=- local=203.0.113.10:80\n"
            ),
            "{http}"
        );
        assert!(
            https.ends_with("host=tls-only.test path=/s scheme=https sni=tls-only.test local=203.0.113.10:443\n"),
            "{https}"
        );
        assert!(other.ends_with("\r\n\r\nxxxxx"), "{other}");
        assert_eq!(echo, "ping");
        // A name without a certificate gets no TLS handshake.
        let ca = net.ca_pem();
        let refused =
            net.inside(move || https_get(SocketAddrV4::new(WEB, 443), "unknown.test", "/", &ca));
        assert!(refused.is_err());
        assert_eq!(net.received(SocketAddrV4::new(DNS, 53)), 4);
        assert_eq!(net.received(SocketAddrV4::new(WEB, 80)), 1);
        assert_eq!(net.received(SocketAddrV4::new(WEB, 443)), 2);
        assert_eq!(net.received(SocketAddrV4::new(OTHER, 8080)), 1);
        assert_eq!(net.received(SocketAddrV4::new(OTHER, 7)), 1);
        assert_eq!(net.received(SocketAddrV4::new(OTHER, 853)), 0);
        assert_eq!(net.received_except_dns(), 5);
        let path = net.path().to_owned();
        drop(net);
        assert!(!path.exists(), "{} is left", path.display());
    }
}
