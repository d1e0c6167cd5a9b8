//! The real `sandboxd-egress` binary between a "sandbox" and an "internet", all inside a network
//! namespace each test creates: documentation addresses on its `lo` (198.51.100.2 is the
//! sandbox, 198.51.100.1 its gateway where the filter answers DNS, 198.51.100.53 the upstream
//! resolver, 203.0.113.10 and .20 web servers), an nftables rule that redirects the sandbox's
//! TCP to the filter as the hub's does, and the control socket driven by the test as the
//! daemon would drive it. The filter runs as `nobody` without capabilities.
//!
//! Needs root (a network namespace, nftables, port 53) and the `nft` binary (installed with
//! apt-get when missing). Skipped otherwise, unless `SANDBOXD_E2E_REQUIRE=1`. Never sends a
//! packet outside the namespace it made.

#![allow(clippy::unwrap_used)] // Test code: a panic is the failure report.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use sandboxd_api::egress::{DenialReason, EgressCounters, EgressPolicy};
use sandboxd_protocol::egress::{FilterConfig, FilterEvent, FilterRequest, SandboxPolicy};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket, UnixStream};
use uuid::Uuid;

const SANDBOX: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// A source in the sandboxes' subnet without a policy.
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 3);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
const WEB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const WEB2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// In the filter's `denied` list (the host's own address, say).
const HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);
const SUBNET: &str = "198.51.100.0/28";
/// How fast a denial must reach the client.
const FAST: Duration = Duration::from_millis(1500);
const NOBODY: u32 = 65534;

/// Serializes every spawn: the filter's descriptors are inheritable only while it is spawned,
/// and no other child may be started then.
static SPAWN: Mutex<()> = Mutex::new(());

fn spawn_lock() -> std::sync::MutexGuard<'static, ()> {
    SPAWN.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) {
    let _g = spawn_lock();
    let mut c = Command::new(cmd);
    c.args(args).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{cmd} {args:?}: {status}");
}

fn have_nft() -> bool {
    Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the tests can run here; panics instead of skipping under SANDBOXD_E2E_REQUIRE=1.
fn can_run() -> bool {
    static NFT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let root = nix::unistd::geteuid().is_root();
    let nft = root
        && *NFT.get_or_init(|| {
            if !have_nft() {
                eprintln!("nft is missing: apt-get install -y nftables");
                let apt = |args: &[&str]| {
                    Command::new("apt-get")
                        .args(args)
                        .env("DEBIAN_FRONTEND", "noninteractive")
                        .stdout(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                };
                // A fresh machine may have no package lists yet.
                if !apt(&["install", "-y", "-q", "nftables"]) {
                    apt(&["update", "-q"]);
                    apt(&["install", "-y", "-q", "nftables"]);
                }
            }
            have_nft()
        });
    if root && nft {
        return true;
    }
    let why = if root {
        "the nft binary (apt-get install nftables)"
    } else {
        "root"
    };
    if std::env::var("SANDBOXD_E2E_REQUIRE").as_deref() == Ok("1") {
        panic!("SANDBOXD_E2E_REQUIRE=1 but the filter tests need {why}");
    }
    eprintln!("skipping: the filter tests need {why}");
    false
}

/// Run `body` on a thread of its own inside a new network namespace with the test's
/// addresses, on a current-thread runtime (every socket it makes is in that namespace).
fn in_netns<F, Fut>(body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let t = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        run("ip", &["link", "set", "lo", "up"], None);
        for a in [SANDBOX, STRANGER, GATEWAY, RESOLVER, WEB, WEB2, HOST] {
            run(
                "ip",
                &["addr", "add", &format!("{a}/32"), "dev", "lo"],
                None,
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(body());
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

/// The filter under test, with the test's "daemon" end of its control socket.
struct Filter {
    child: Child,
    control: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn inheritable(fd: &impl AsFd, yes: bool) {
    let flags = if yes {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd.as_fd().as_raw_fd(), FcntlArg::F_SETFD(flags)).expect("F_SETFD");
}

impl Filter {
    /// Bind the three sockets as the helper does, redirect the sandboxes' TCP to the first,
    /// and start the filter as `nobody`.
    async fn start() -> Filter {
        let tcp = std::net::TcpListener::bind("0.0.0.0:0").expect("bind tcp");
        let port = tcp.local_addr().unwrap().port();
        let dns = std::net::UdpSocket::bind(SocketAddrV4::new(GATEWAY, 53)).expect("bind dns");
        let dir = std::env::temp_dir().join(format!("egress-test-{}", Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let control_path = dir.join("egress.sock");
        let control = std::os::unix::net::UnixListener::bind(&control_path).expect("bind control");
        run(
            "nft",
            &["-f", "-"],
            Some(&format!(
                "table ip sbxtest {{\n chain out {{\n  type nat hook output priority -100; policy accept;\n  ip saddr {SUBNET} meta l4proto tcp redirect to :{port}\n }}\n}}\n"
            )),
        );
        let config = FilterConfig {
            tcp_fd: tcp.as_raw_fd(),
            dns_fd: dns.as_raw_fd(),
            control_fd: control.as_raw_fd(),
            upstream_dns: SocketAddrV4::new(RESOLVER, 53),
            subnet: SUBNET.parse().unwrap(),
            lifted: vec![],
            denied: vec![format!("{HOST}/32").parse().unwrap()],
            daemon_uid: 0,
        };
        let child = {
            let _g = spawn_lock();
            for fd in [tcp.as_fd(), dns.as_fd(), control.as_fd()] {
                inheritable(&fd, true);
            }
            let child = Command::new(filter_binary())
                .arg("--config")
                .arg(serde_json::to_string(&config).unwrap())
                .env("SANDBOXD_EGRESS_LOG", "debug")
                .uid(NOBODY)
                .gid(NOBODY)
                .stdin(Stdio::null())
                .spawn()
                .expect("spawn sandboxd-egress");
            for fd in [tcp.as_fd(), dns.as_fd(), control.as_fd()] {
                inheritable(&fd, false);
            }
            child
        };
        // The child holds its own copies; the test keeps none of the listening ends.
        drop((tcp, dns, control));
        Filter {
            child,
            control: control_path,
            _dir: TempDir(dir),
        }
    }

    /// A field of the filter's `/proc/<pid>/status`.
    fn status(&self, field: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or_else(|| panic!("no {field} in the filter's status"))
            .trim()
            .to_owned()
    }

    async fn daemon(&self) -> Daemon {
        let s = UnixStream::connect(&self.control)
            .await
            .expect("connect control");
        let (r, w) = s.into_split();
        let mut d = Daemon {
            lines: BufReader::new(r).lines(),
            w,
        };
        match d.next().await {
            FilterEvent::Ready { version } => assert_eq!(version, 1),
            other => panic!("first line {other:?}"),
        }
        d
    }
}

struct Daemon {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Daemon {
    async fn send(&mut self, req: &FilterRequest) {
        let mut line = serde_json::to_string(req).unwrap();
        line.push('\n');
        self.w.write_all(line.as_bytes()).await.unwrap();
    }

    async fn set(&mut self, id: Uuid, policy: &str) {
        self.send(&FilterRequest::Set(sp(id, policy))).await;
    }

    async fn next(&mut self) -> FilterEvent {
        let line = tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("an event within 10 s")
            .expect("read control")
            .expect("control still open");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    /// Skip events until `f` picks one.
    async fn until<T>(&mut self, mut f: impl FnMut(&FilterEvent) -> Option<T>) -> T {
        loop {
            let ev = self.next().await;
            if let Some(t) = f(&ev) {
                return t;
            }
        }
    }

    async fn denial(&mut self, id: Uuid) -> sandboxd_api::egress::EgressDenial {
        self.until(|ev| match ev {
            FilterEvent::Denied { sandbox, denial } if *sandbox == id => Some(denial.clone()),
            _ => None,
        })
        .await
    }

    async fn counters(
        &mut self,
        id: Uuid,
        want: impl Fn(&EgressCounters) -> bool,
    ) -> EgressCounters {
        self.until(|ev| match ev {
            FilterEvent::Counters { sandbox, counters } if *sandbox == id && want(counters) => {
                Some(*counters)
            }
            _ => None,
        })
        .await
    }
}

fn sp(id: Uuid, policy: &str) -> SandboxPolicy {
    let policy: EgressPolicy = serde_json::from_str(policy).unwrap();
    SandboxPolicy {
        sandbox: id,
        address: SANDBOX,
        policy,
    }
}

// ---- the test's internet ----

/// Answers A questions: allowed.example and *.wild.example → WEB, other.example → WEB2,
/// rebind.example → 127.0.0.1, alias.example → CNAME allowed.example; NXDOMAIN otherwise.
async fn dns_server() {
    let sock = UdpSocket::bind(SocketAddrV4::new(RESOLVER, 53))
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.id, q.op_code);
            r.metadata.recursion_desired = q.recursion_desired;
            r.add_queries(q.queries.clone());
            let qname = q.queries[0].name().clone();
            let asked = qname.to_ascii().to_ascii_lowercase();
            let a = |n: Name, ip: Ipv4Addr| Record::from_rdata(n, 60, RData::A(A(ip)));
            match asked.as_str() {
                "allowed.example." => {
                    r.add_answer(a(qname, WEB));
                }
                s if s.ends_with(".wild.example.") => {
                    r.add_answer(a(qname, WEB));
                }
                "other.example." => {
                    r.add_answer(a(qname, WEB2));
                }
                "rebind.example." => {
                    r.add_answer(a(qname, Ipv4Addr::LOCALHOST));
                }
                "alias.example." => {
                    let target = Name::from_ascii("allowed.example.").unwrap();
                    r.add_answer(Record::from_rdata(
                        qname,
                        60,
                        RData::CNAME(CNAME(target.clone())),
                    ));
                    r.add_answer(a(target, WEB));
                }
                _ => r.metadata.response_code = ResponseCode::NXDomain,
            }
            sock.send_to(&r.to_vec().unwrap(), from).await.unwrap();
        }
    });
}

/// HTTP/1.1 on `addr`: answers `served by <addr> for <host>` and closes.
async fn http_server(addr: SocketAddrV4) {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&req);
                let host = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Host: "))
                    .unwrap_or("")
                    .to_owned();
                let body = format!("served by {} for {host}", addr.ip());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
}

/// Echoes every byte back on `addr`.
async fn echo_server(addr: SocketAddrV4) {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

struct Tls {
    client: Arc<rustls::ClientConfig>,
}

/// TLS on `addr` with a certificate for allowed.example signed by a test CA: answers
/// `tls from <addr>` after the handshake.
async fn tls_server(addr: SocketAddrV4) -> Tls {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["allowed.example".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    let _ = tls
                        .write_all(format!("tls from {}", addr.ip()).as_bytes())
                        .await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    Tls {
        client: Arc::new(client),
    }
}

/// The whole internet of a test.
async fn internet() -> Tls {
    dns_server().await;
    for ip in [WEB, WEB2] {
        http_server(SocketAddrV4::new(ip, 80)).await;
    }
    echo_server(SocketAddrV4::new(WEB, 7000)).await;
    tls_server(SocketAddrV4::new(WEB, 443)).await
}

// ---- the sandbox's side ----

async fn connect_from(src: Ipv4Addr, dest: SocketAddrV4) -> io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::V4(SocketAddrV4::new(src, 0)))?;
    s.connect(SocketAddr::V4(dest)).await
}

async fn http_get(dest: SocketAddrV4, host: &str) -> io::Result<String> {
    let mut s = connect_from(SANDBOX, dest).await?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

async fn tls_get(tls: &Tls, dest: SocketAddrV4, name: &str) -> io::Result<String> {
    let s = connect_from(SANDBOX, dest).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
    let server = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut tls = connector.connect(server, s).await?;
    let mut out = String::new();
    tls.read_to_string(&mut out).await?;
    Ok(out)
}

/// Ask the filter (at the gateway) from the sandbox's address.
async fn resolve(name: &str, ty: RecordType) -> Message {
    let s = UdpSocket::bind(SocketAddrV4::new(SANDBOX, 0))
        .await
        .unwrap();
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
    s.send_to(&q.to_vec().unwrap(), SocketAddrV4::new(GATEWAY, 53))
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
        .await
        .expect("a dns answer within 5 s")
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.id, q.id);
    r
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(A(a)) => Some(*a),
            _ => None,
        })
        .collect()
}

/// The operation failed with a reset, fast.
async fn assert_reset<T: std::fmt::Debug>(what: &str, op: impl Future<Output = io::Result<T>>) {
    let start = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), op)
        .await
        .unwrap_or_else(|_| panic!("{what}: no reset within 10 s"));
    let took = start.elapsed();
    match r {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: want a reset, got {other:?}"),
    }
    assert!(took < FAST, "{what}: the reset took {took:?}");
}

#[test]
fn names_over_http_and_tls_forged_names_and_denials() {
    if !can_run() {
        return;
    }
    in_netns(|| async {
        let tls = internet().await;
        let filter = Filter::start().await;
        let mut d = filter.daemon().await;
        // It serves as nobody, without any capability, under its own seccomp filter.
        assert_eq!(filter.status("Uid:"), "65534\t65534\t65534\t65534");
        assert_eq!(filter.status("CapEff:"), "0000000000000000");
        assert_eq!(filter.status("NoNewPrivs:"), "1");
        assert_eq!(filter.status("Seccomp:"), "2");
        let id = Uuid::new_v4();
        d.send(&FilterRequest::Sync {
            sandboxes: vec![sp(id, r#"{"allow":["allowed.example","*.wild.example"]}"#)],
        })
        .await;
        d.counters(id, |c| *c == EgressCounters::default()).await;

        // DNS: allowed names resolve (a CNAME is flattened), AAAA has no data, others NXDOMAIN.
        assert_eq!(
            addresses(&resolve("allowed.example.", RecordType::A).await),
            [WEB]
        );
        assert_eq!(
            addresses(&resolve("x.wild.example.", RecordType::A).await),
            [WEB]
        );
        let aaaa = resolve("allowed.example.", RecordType::AAAA).await;
        assert_eq!(aaaa.response_code, ResponseCode::NoError);
        assert!(aaaa.answers.is_empty());
        let other = resolve("other.example.", RecordType::A).await;
        assert_eq!(other.response_code, ResponseCode::NXDomain);
        let denial = d.denial(id).await;
        assert_eq!(
            (
                denial.protocol.as_str(),
                denial.name.as_deref(),
                denial.reason
            ),
            ("dns", Some("other.example"), DenialReason::NotAllowed)
        );

        // HTTP by Host, TLS by server name (the handshake goes through to the real server).
        let body = http_get(SocketAddrV4::new(WEB, 80), "allowed.example")
            .await
            .unwrap();
        assert!(
            body.ends_with("served by 203.0.113.10 for allowed.example"),
            "{body}"
        );
        let body = http_get(SocketAddrV4::new(WEB, 80), "x.wild.example:80")
            .await
            .unwrap();
        assert!(body.ends_with("for x.wild.example:80"), "{body}");
        let body = tls_get(&tls, SocketAddrV4::new(WEB, 443), "allowed.example")
            .await
            .unwrap();
        assert_eq!(body, "tls from 203.0.113.10");

        // A forged server name toward an address the name did not resolve to.
        assert_reset(
            "forged SNI",
            tls_get(&tls, SocketAddrV4::new(WEB2, 443), "allowed.example"),
        )
        .await;
        let denial = d.denial(id).await;
        assert_eq!(
            (
                denial.protocol.as_str(),
                denial.address,
                denial.port,
                denial.name.as_deref(),
                denial.reason
            ),
            (
                "tcp",
                Some(WEB2),
                Some(443),
                Some("allowed.example"),
                DenialReason::NameMismatch
            )
        );
        assert_reset(
            "forged Host",
            http_get(SocketAddrV4::new(WEB2, 80), "allowed.example"),
        )
        .await;
        assert_eq!(d.denial(id).await.reason, DenialReason::NameMismatch);

        // Not allowed: a name no rule covers, and a client that sends nothing.
        assert_reset(
            "name not allowed",
            http_get(SocketAddrV4::new(WEB2, 80), "other.example"),
        )
        .await;
        let denial = d.denial(id).await;
        assert_eq!(
            (denial.name.as_deref(), denial.reason),
            (Some("other.example"), DenialReason::NotAllowed)
        );
        let silent = connect_from(SANDBOX, SocketAddrV4::new(WEB2, 22))
            .await
            .unwrap();
        assert_reset("silent client", async move {
            let mut silent = silent;
            let mut b = [0u8; 1];
            silent.read(&mut b).await
        })
        .await;
        let denial = d.denial(id).await;
        assert_eq!(
            (denial.address, denial.port, denial.name, denial.reason),
            (Some(WEB2), Some(22), None, DenialReason::NotAllowed)
        );

        // Totals: 3 allowed (HTTP twice, TLS), 4 denied (DNS denials are events only).
        d.counters(id, |c| {
            c.connections_allowed == 3 && c.connections_denied == 4
        })
        .await;
    });
}

#[test]
fn private_ranges_rebinding_and_strangers() {
    if !can_run() {
        return;
    }
    in_netns(|| async {
        let _tls = internet().await;
        let filter = Filter::start().await;
        // Only the daemon's uid may use the control socket: another gets no Ready line.
        std::fs::set_permissions(
            &filter.control,
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let out = {
            let _g = spawn_lock();
            Command::new("python3")
                .args([
                    "-c",
                    "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); \
                     s.settimeout(5); print(repr(s.recv(100)))",
                ])
                .arg(&filter.control)
                .uid(NOBODY)
                .gid(NOBODY)
                .output()
                .expect("python3")
        };
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b''");
        let mut d = filter.daemon().await;
        let id = Uuid::new_v4();
        d.send(&FilterRequest::Sync {
            sandboxes: vec![sp(id, r#"{"allow":["*"]}"#)],
        })
        .await;
        d.counters(id, |_| true).await;

        // "*" reaches public addresses, by name or not.
        let body = http_get(SocketAddrV4::new(WEB2, 80), "whatever.example")
            .await
            .unwrap();
        assert!(
            body.ends_with("served by 203.0.113.20 for whatever.example"),
            "{body}"
        );
        assert_eq!(
            addresses(&resolve("alias.example.", RecordType::A).await),
            [WEB]
        );

        // ... but never loopback, the sandboxes' own subnet, or a denied address.
        for dest in [Ipv4Addr::LOCALHOST, GATEWAY, HOST] {
            assert_reset(
                &format!("{dest}"),
                http_get(SocketAddrV4::new(dest, 80), "whatever.example"),
            )
            .await;
            let denial = d.denial(id).await;
            assert_eq!(
                (denial.address, denial.reason),
                (Some(dest), DenialReason::PrivateRange)
            );
        }

        // DNS rebinding: a name that resolves to loopback gets no address.
        let r = resolve("rebind.example.", RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let denial = d.denial(id).await;
        assert_eq!(
            (denial.protocol.as_str(), denial.address, denial.reason),
            ("dns", Some(Ipv4Addr::LOCALHOST), DenialReason::PrivateRange)
        );

        // A source without a policy is reset, and records nothing (it has no sandbox). The
        // reset may come before connect() returns (the filter reads nothing first).
        assert_reset("stranger", async {
            let mut s = connect_from(STRANGER, SocketAddrV4::new(WEB2, 80)).await?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x.example\r\n\r\n")
                .await?;
            let mut b = [0u8; 1];
            s.read(&mut b).await
        })
        .await;

        // Remove: the sandbox's next connection is reset like a stranger's.
        d.send(&FilterRequest::Remove { sandbox: id }).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_reset(
            "removed",
            http_get(SocketAddrV4::new(WEB2, 80), "whatever.example"),
        )
        .await;
    });
}

#[test]
fn counters_add_up_and_a_policy_change_cuts_an_open_connection() {
    if !can_run() {
        return;
    }
    in_netns(|| async {
        let _tls = internet().await;
        let filter = Filter::start().await;
        let mut d = filter.daemon().await;
        let id = Uuid::new_v4();
        d.send(&FilterRequest::Sync {
            sandboxes: vec![sp(
                id,
                r#"{"allow":["allowed.example:7000","other.example"]}"#,
            )],
        })
        .await;
        d.counters(id, |_| true).await;
        assert_eq!(
            addresses(&resolve("allowed.example.", RecordType::A).await),
            [WEB]
        );

        // An echo connection named by its first bytes, then 1 MiB each way.
        let mut s = connect_from(SANDBOX, SocketAddrV4::new(WEB, 7000))
            .await
            .unwrap();
        let hello = b"GET / HTTP/1.1\r\nHost: allowed.example\r\n\r\n";
        s.write_all(hello).await.unwrap();
        let mut back = vec![0u8; hello.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, hello);
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = hello.len() as u64;
        for _ in 0..16 {
            s.write_all(&chunk).await.unwrap();
            let mut got = vec![0u8; chunk.len()];
            s.read_exact(&mut got).await.unwrap();
            assert_eq!(got, chunk);
            sent += chunk.len() as u64;
        }
        let c = d
            .counters(id, |c| c.bytes_out == sent && c.bytes_in == sent)
            .await;
        assert_eq!(c.connections_allowed, 1);
        assert_eq!(c.connections_denied, 0);

        // A Set that keeps the rule keeps the connection.
        d.set(id, r#"{"allow":["other.example","allowed.example:7000"]}"#)
            .await;
        s.write_all(b"still").await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"still");

        // A Set without it cuts the open connection at once, with a record.
        let start = Instant::now();
        d.set(id, r#"{"allow":["other.example"]}"#).await;
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("the cut within 5 s");
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "want a reset, got {r:?}"
        );
        assert!(start.elapsed() < FAST, "the cut took {:?}", start.elapsed());
        let denial = d.denial(id).await;
        assert_eq!(
            (
                denial.address,
                denial.port,
                denial.name.as_deref(),
                denial.reason
            ),
            (
                Some(WEB),
                Some(7000),
                Some("allowed.example"),
                DenialReason::NotAllowed
            )
        );
        // New connections follow the new policy too.
        assert_reset("after the cut", async {
            let mut s = connect_from(SANDBOX, SocketAddrV4::new(WEB, 7000)).await?;
            s.write_all(hello).await?;
            let mut b = [0u8; 1];
            s.read(&mut b).await
        })
        .await;

        // A new daemon connection replaces the old one and gets every sandbox's totals after
        // its Sync (the bytes survived the policy change).
        let mut d2 = filter.daemon().await;
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = d.lines.next_line().await {}
        })
        .await;
        assert!(closed.is_ok(), "the replaced daemon connection stays open");
        d2.send(&FilterRequest::Sync {
            sandboxes: vec![sp(id, r#"{"allow":["other.example"]}"#)],
        })
        .await;
        let c = d2.counters(id, |_| true).await;
        assert_eq!((c.bytes_out, c.bytes_in), (sent + 5, sent + 5));
        assert_eq!((c.connections_allowed, c.connections_denied), (1, 1));
    });
}

/// The filter binary where `nobody` may execute it: a copy in a 0755 directory of its own (a
/// checkout under /root, which is 0700, is out of its reach).
fn filter_binary() -> &'static std::path::Path {
    use std::os::unix::fs::PermissionsExt;
    static COPY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sandboxd-egress-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the binary's directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let bin = dir.join("sandboxd-egress");
        std::fs::copy(env!("CARGO_BIN_EXE_sandboxd-egress"), &bin).expect("copy sandboxd-egress");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        bin
    })
}
