//! The sandboxes' resolver: answers names their policy allows (asking the upstream resolver
//! for A records), NXDOMAIN for the rest, and remembers what it answered so that the TCP side
//! can check a connection's server name against the addresses the name resolved to.
//!
//! * A name the policy may resolve, type A: the upstream's A records (CNAME chains flattened
//!   into the asked name), minus any in a private range (DNS rebinding: recorded as
//!   `private_range`), TTL capped at [`MAX_TTL`]. Upstream failure or silence: SERVFAIL within
//!   [`UPSTREAM_TIMEOUT`].
//! * The same name, any other type (AAAA, HTTPS, MX...): NOERROR without data. Sandboxes have
//!   no IPv6, and clients fall back to A at once.
//! * A name the policy does not allow (or a question from an address without a policy):
//!   NXDOMAIN, and a `Denied` event (`dns`, `not_allowed`) for the sandbox.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use sandboxd_api::egress::{DenialReason, EgressDenial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::control::Events;
use crate::policy::{Limits, Table};
use crate::shared::{is_transient, lock_table, Throttle};
use crate::sniff::normalize_name;

/// Longest TTL the filter gives (and remembers a resolution for).
pub const MAX_TTL: u32 = 300;
/// How long the upstream has to answer before the sandbox gets SERVFAIL.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// When the question is sent again over UDP if no answer came.
const RETRANSMIT_AFTER: Duration = Duration::from_millis(700);
/// Questions in flight to the upstream at once; past it SERVFAIL at once.
pub const MAX_INFLIGHT: usize = 256;
/// Most addresses in one answer (keeps every answer far below 512 bytes).
pub const MAX_ANSWERS: usize = 16;
/// At most one log line per this period for upstream failures and overload.
const LOG_PERIOD: Duration = Duration::from_secs(10);
/// The EDNS payload size the filter offers (the common "DNS flag day" value).
const EDNS_PAYLOAD: u16 = 1232;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("build the upstream question")]
    Encode(#[source] hickory_proto::ProtoError),
    #[error("ask the upstream resolver")]
    Upstream(#[source] std::io::Error),
    #[error("the upstream resolver did not answer in time")]
    Timeout,
    #[error("the upstream resolver's answer over TCP is malformed")]
    BadTcpAnswer,
    #[error("too many questions in flight to the upstream resolver")]
    Busy,
}

/// What the upstream's answer comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    NxDomain,
    Failed(ResponseCode),
    Addresses {
        /// Addresses the sandbox may be given.
        kept: Vec<Ipv4Addr>,
        /// Addresses dropped because they are in a private range.
        dropped: Vec<Ipv4Addr>,
        /// Seconds, capped at [`MAX_TTL`].
        ttl: u32,
    },
}

/// The upstream resolver, shared by the resolver and the TCP side (which asks it itself when a
/// connection names a host the sandbox did not resolve through the filter, or not recently).
pub struct Upstream {
    pub addr: SocketAddrV4,
    inflight: Semaphore,
}

impl Upstream {
    pub fn new(addr: SocketAddrV4) -> Upstream {
        Upstream {
            addr,
            inflight: Semaphore::new(MAX_INFLIGHT),
        }
    }

    /// What `name` resolves to, private addresses set apart.
    pub async fn resolve(&self, name: &Name, limits: &Limits) -> Result<Resolution, DnsError> {
        let _permit = self.inflight.try_acquire().map_err(|_| DnsError::Busy)?;
        let answer = ask_upstream(self.addr, name).await?;
        Ok(resolution(&answer, name, limits))
    }
}

/// The resolver's shared state.
pub struct Dns {
    pub table: Arc<Mutex<Table>>,
    pub events: Arc<Events>,
    pub limits: Arc<Limits>,
    pub upstream: Arc<Upstream>,
    pub failures: Throttle,
}

impl Dns {
    /// Answer questions on `sock` for ever.
    pub async fn serve(self: Arc<Self>, sock: UdpSocket) -> std::io::Result<()> {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, src) = match sock.recv_from(&mut buf).await {
                Ok(r) => r,
                // An ICMP error for an earlier reply, or memory short for a moment: nothing to
                // do with the next question.
                Err(e) if is_transient(&e) || e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::debug!(error = %e, "dns receive");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let SocketAddr::V4(src) = src else { continue };
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                tracing::debug!(%src, "unparsable dns message ignored");
                continue;
            };
            if req.message_type != MessageType::Query {
                continue;
            }
            let this = Arc::clone(&self);
            let sock = Arc::clone(&sock);
            tokio::spawn(async move {
                let reply = this.respond(&req, *src.ip()).await;
                match reply.to_vec() {
                    Ok(bytes) => {
                        if let Err(e) = sock.send_to(&bytes, src).await {
                            tracing::debug!(error = %e, %src, "dns reply not sent");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "dns reply not encoded"),
                }
            });
        }
    }

    /// The reply to `req` from the sandbox at `src`.
    pub async fn respond(&self, req: &Message, src: Ipv4Addr) -> Message {
        let query = match question(req) {
            Ok(q) => q.clone(),
            Err(code) => return reply(req, code),
        };
        let asked = query.name().to_ascii();
        let asked = asked.trim_end_matches('.').to_ascii_lowercase();
        let sandbox = lock_table(&self.table)
            .get(src)
            .map(|e| (e.id, Arc::clone(&e.policy)));
        let Some((id, policy)) = sandbox else {
            tracing::debug!(%src, name = %asked, "dns question from an address without a policy");
            return reply(req, ResponseCode::NXDomain);
        };
        let Some(name) = normalize_name(&asked).filter(|n| policy.may_resolve(n)) else {
            // Clients ask A and AAAA (and again on retry): one record per name and burst.
            let first = lock_table(&self.table)
                .get_mut(src)
                .filter(|e| e.id == id)
                .is_some_and(|e| e.first_dns_denial(&asked, Instant::now()));
            if first {
                self.denied(id, &asked, None, DenialReason::NotAllowed);
            }
            return reply(req, ResponseCode::NXDomain);
        };
        if query.query_type() != RecordType::A {
            return reply(req, ResponseCode::NoError);
        }
        let resolved = match self.upstream.resolve(query.name(), &self.limits).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(suppressed) = self.failures.allow(LOG_PERIOD) {
                    tracing::warn!(error = %e, name = %name, suppressed, "upstream dns failed; SERVFAIL");
                }
                return reply(req, ResponseCode::ServFail);
            }
        };
        match resolved {
            Resolution::NxDomain => reply(req, ResponseCode::NXDomain),
            Resolution::Failed(code) => {
                tracing::debug!(name = %name, ?code, "upstream dns refused; SERVFAIL");
                reply(req, ResponseCode::ServFail)
            }
            Resolution::Addresses { kept, dropped, ttl } => {
                if let Some(first) = dropped.first() {
                    tracing::debug!(name = %name, address = %first, "dns answer in a private range dropped");
                    self.denied(id, &name, Some(*first), DenialReason::PrivateRange);
                }
                if let Some(e) = lock_table(&self.table).get_mut(src).filter(|e| e.id == id) {
                    e.remember(
                        &name,
                        &kept,
                        Duration::from_secs(ttl.into()),
                        Instant::now(),
                    );
                }
                answer_with(req, &kept, ttl)
            }
        }
    }

    fn denied(&self, id: uuid::Uuid, name: &str, address: Option<Ipv4Addr>, reason: DenialReason) {
        self.events.denied(
            id,
            EgressDenial {
                at: time::OffsetDateTime::now_utc(),
                protocol: "dns".into(),
                address,
                port: None,
                name: Some(name.to_owned()),
                reason,
            },
        );
    }
}

/// The one question of a standard query, or the error code for anything else.
fn question(req: &Message) -> Result<&Query, ResponseCode> {
    if req.op_code != OpCode::Query {
        return Err(ResponseCode::NotImp);
    }
    match req.queries.as_slice() {
        [q] if q.query_class() == DNSClass::IN => Ok(q),
        [_] => Err(ResponseCode::NotImp),
        _ => Err(ResponseCode::FormErr),
    }
}

/// A reply to `req` without answers.
pub fn reply(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(req.id, req.op_code);
    m.metadata.recursion_desired = req.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = code;
    if let Ok(q) = question(req) {
        m.add_query(q.clone());
    }
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// A NOERROR reply with `addrs` as A records of the asked name.
pub fn answer_with(req: &Message, addrs: &[Ipv4Addr], ttl: u32) -> Message {
    let mut m = reply(req, ResponseCode::NoError);
    if let Ok(q) = question(req) {
        for addr in addrs.iter().take(MAX_ANSWERS) {
            m.add_answer(Record::from_rdata(
                q.name().clone(),
                ttl,
                RData::A(A(*addr)),
            ));
        }
    }
    m
}

/// What the upstream's `answer` to a question for `name` (type A) gives.
pub fn resolution(answer: &Message, name: &Name, limits: &Limits) -> Resolution {
    match answer.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Resolution::NxDomain,
        code => return Resolution::Failed(code),
    }
    // Follow the CNAME chain from the asked name (at most a few links).
    let mut chain = vec![name.to_lowercase()];
    let mut ttl = MAX_TTL;
    for _ in 0..8 {
        let mut grew = false;
        for r in &answer.answers {
            if let RData::CNAME(target) = &r.data {
                let target = target.0.to_lowercase();
                if chain.contains(&r.name.to_lowercase()) && !chain.contains(&target) {
                    chain.push(target);
                    ttl = ttl.min(r.ttl);
                    grew = true;
                }
            }
        }
        if !grew {
            break;
        }
    }
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for r in &answer.answers {
        if let RData::A(A(addr)) = &r.data {
            if !chain.contains(&r.name.to_lowercase()) {
                continue;
            }
            ttl = ttl.min(r.ttl);
            let list = if limits.is_private(*addr) {
                &mut dropped
            } else {
                &mut kept
            };
            if !list.contains(addr) {
                list.push(*addr);
            }
        }
    }
    kept.truncate(MAX_ANSWERS);
    Resolution::Addresses { kept, dropped, ttl }
}

/// The question the filter sends upstream for `name`.
fn upstream_question(name: &Name) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name.clone(), RecordType::A));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    m.set_edns(edns);
    m
}

/// Is `answer` the reply to `question`?
fn answers(answer: &Message, question: &Message) -> bool {
    answer.id == question.id
        && answer.message_type == MessageType::Response
        && answer.queries == question.queries
}

/// Ask `upstream` for the A records of `name`: UDP (sent again once), TCP if the answer was
/// truncated, all within [`UPSTREAM_TIMEOUT`].
pub async fn ask_upstream(upstream: SocketAddrV4, name: &Name) -> Result<Message, DnsError> {
    let q = upstream_question(name);
    let bytes = q.to_vec().map_err(DnsError::Encode)?;
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(DnsError::Upstream)?;
    sock.connect(upstream).await.map_err(DnsError::Upstream)?;
    let mut buf = vec![0u8; 4096];
    let mut resend = tokio::time::Instant::now() + RETRANSMIT_AFTER;
    sock.send(&bytes).await.map_err(DnsError::Upstream)?;
    loop {
        let wait = resend.min(deadline);
        match tokio::time::timeout_at(wait, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let Ok(answer) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if !answers(&answer, &q) {
                    continue;
                }
                if answer.truncation {
                    return ask_tcp(upstream, &q, &bytes, deadline).await;
                }
                return Ok(answer);
            }
            // ECONNREFUSED from an earlier send: nobody listens there. Fail now, not later.
            Ok(Err(e)) => return Err(DnsError::Upstream(e)),
            Err(_) if tokio::time::Instant::now() >= deadline => return Err(DnsError::Timeout),
            Err(_) => {
                sock.send(&bytes).await.map_err(DnsError::Upstream)?;
                resend = deadline;
            }
        }
    }
}

async fn ask_tcp(
    upstream: SocketAddrV4,
    q: &Message,
    bytes: &[u8],
    deadline: tokio::time::Instant,
) -> Result<Message, DnsError> {
    let exchange = async {
        let mut s = TcpStream::connect(upstream)
            .await
            .map_err(DnsError::Upstream)?;
        let len = u16::try_from(bytes.len()).map_err(|_| DnsError::BadTcpAnswer)?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(bytes);
        s.write_all(&out).await.map_err(DnsError::Upstream)?;
        let n = s.read_u16().await.map_err(DnsError::Upstream)?;
        let mut buf = vec![0u8; usize::from(n)];
        s.read_exact(&mut buf).await.map_err(DnsError::Upstream)?;
        let answer = Message::from_vec(&buf).map_err(|_| DnsError::BadTcpAnswer)?;
        if !answers(&answer, q) {
            return Err(DnsError::BadTcpAnswer);
        }
        Ok(answer)
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| DnsError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    use hickory_proto::rr::rdata::{AAAA, CNAME};
    use sandboxd_api::egress::EgressPolicy;
    use sandboxd_protocol::egress::SandboxPolicy;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("a name")
    }

    fn ask(n: &str, ty: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(n), ty));
        m
    }

    fn limits() -> Limits {
        Limits {
            subnet: Some("198.51.100.0/28".parse().expect("net")),
            ..Limits::default()
        }
    }

    fn a(n: &str, ttl: u32, addr: [u8; 4]) -> Record {
        Record::from_rdata(name(n), ttl, RData::A(A(Ipv4Addr::from(addr))))
    }

    fn upstream_answer(records: Vec<Record>) -> Message {
        let q = ask("www.example.org.", RecordType::A);
        let mut m = reply(&q, ResponseCode::NoError);
        for r in records {
            m.add_answer(r);
        }
        m
    }

    #[test]
    fn cname_chains_are_followed_and_private_answers_dropped() {
        let chain = upstream_answer(vec![
            Record::from_rdata(
                name("www.example.org."),
                600,
                RData::CNAME(CNAME(name("cdn.example.net."))),
            ),
            a("cdn.example.net.", 120, [203, 0, 113, 10]),
            a("cdn.example.net.", 120, [127, 0, 0, 1]),
            a("unrelated.example.", 5, [203, 0, 113, 99]),
            Record::from_rdata(
                name("cdn.example.net."),
                5,
                RData::AAAA(AAAA("2001:db8::1".parse().expect("v6"))),
            ),
        ]);
        assert_eq!(
            resolution(&chain, &name("WWW.example.org."), &limits()),
            Resolution::Addresses {
                kept: vec![Ipv4Addr::new(203, 0, 113, 10)],
                dropped: vec![Ipv4Addr::new(127, 0, 0, 1)],
                ttl: 120,
            }
        );
        let long = upstream_answer(vec![a("www.example.org.", 86400, [203, 0, 113, 10])]);
        assert!(matches!(
            resolution(&long, &name("www.example.org."), &limits()),
            Resolution::Addresses { ttl: MAX_TTL, .. }
        ));
        let q = ask("x.example.", RecordType::A);
        assert_eq!(
            resolution(
                &reply(&q, ResponseCode::NXDomain),
                &name("x.example."),
                &limits()
            ),
            Resolution::NxDomain
        );
        assert_eq!(
            resolution(
                &reply(&q, ResponseCode::Refused),
                &name("x.example."),
                &limits()
            ),
            Resolution::Failed(ResponseCode::Refused)
        );
    }

    #[test]
    fn replies_keep_the_question_and_id() {
        let q = ask("pypi.org.", RecordType::A);
        let r = answer_with(&q, &[Ipv4Addr::new(203, 0, 113, 10)], 60);
        let r = Message::from_vec(&r.to_vec().expect("encode")).expect("decode");
        assert_eq!(r.id, q.id);
        assert_eq!(r.message_type, MessageType::Response);
        assert_eq!(r.queries, q.queries);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, 60);
        assert_eq!(
            r.answers[0].data,
            RData::A(A(Ipv4Addr::new(203, 0, 113, 10)))
        );
        let many: Vec<Ipv4Addr> = (0..40).map(|i| Ipv4Addr::new(203, 0, 113, i)).collect();
        let r = answer_with(&q, &many, 60);
        assert_eq!(r.answers.len(), MAX_ANSWERS);
        assert!(r.to_vec().expect("encode").len() <= 512);
    }

    fn resolver(upstream: SocketAddrV4) -> (Dns, uuid::Uuid) {
        let id = uuid::Uuid::new_v4();
        let mut table = Table::default();
        let policy: EgressPolicy =
            serde_json::from_str(r#"{"allow":["pypi.org"]}"#).expect("policy");
        table.set(SandboxPolicy {
            sandbox: id,
            address: Ipv4Addr::new(198, 51, 100, 2),
            policy,
        });
        let dns = Dns {
            table: Arc::new(Mutex::new(table)),
            events: Arc::default(),
            limits: Arc::new(limits()),
            upstream: Arc::new(Upstream::new(upstream)),
            failures: Throttle::default(),
        };
        (dns, id)
    }

    /// A one-shot upstream on loopback answering `records` for the first question it gets.
    async fn fake_upstream(records: Vec<Record>) -> SocketAddrV4 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let SocketAddr::V4(addr) = sock.local_addr().expect("addr") else {
            panic!("v4")
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let (n, from) = sock.recv_from(&mut buf).await.expect("recv");
            let q = Message::from_vec(&buf[..n]).expect("question");
            let mut r = reply(&q, ResponseCode::NoError);
            for rec in records {
                r.add_answer(rec);
            }
            sock.send_to(&r.to_vec().expect("encode"), from)
                .await
                .expect("send");
        });
        addr
    }

    const SRC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

    #[tokio::test]
    async fn allowed_names_are_resolved_and_remembered() {
        let upstream = fake_upstream(vec![a("pypi.org.", 30, [203, 0, 113, 10])]).await;
        let (dns, _) = resolver(upstream);
        let r = dns.respond(&ask("PYPI.org.", RecordType::A), SRC).await;
        assert_eq!(r.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        let t = lock_table(&dns.table);
        let e = t.get(SRC).expect("entry");
        assert!(e.resolved("pypi.org", Ipv4Addr::new(203, 0, 113, 10), Instant::now()));
    }

    #[tokio::test]
    async fn other_names_types_and_sources() {
        let (dns, id) = resolver(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9));
        // Not allowed: NXDOMAIN and a denial.
        let r = dns.respond(&ask("evil.org.", RecordType::A), SRC).await;
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        let events = dns.events_for_test();
        assert!(matches!(events.as_slice(),
            [sandboxd_protocol::egress::FilterEvent::Denied { sandbox, denial }]
            if *sandbox == id && denial.protocol == "dns" && denial.name.as_deref() == Some("evil.org")
                && denial.reason == DenialReason::NotAllowed));
        // The same name again (AAAA, a retry): NXDOMAIN, no second record.
        let r = dns.respond(&ask("evil.org.", RecordType::AAAA), SRC).await;
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        assert!(dns.events_for_test().is_empty());
        // AAAA of an allowed name: no data, nothing asked upstream, no denial.
        let r = dns.respond(&ask("pypi.org.", RecordType::AAAA), SRC).await;
        assert_eq!(r.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert!(dns.events_for_test().is_empty());
        // An address without a policy.
        let r = dns
            .respond(
                &ask("pypi.org.", RecordType::A),
                Ipv4Addr::new(198, 51, 100, 9),
            )
            .await;
        assert_eq!(r.response_code, ResponseCode::NXDomain);
    }

    #[tokio::test]
    async fn a_silent_upstream_is_servfail_in_time() {
        // A socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let SocketAddr::V4(addr) = silent.local_addr().expect("addr") else {
            panic!("v4")
        };
        let (dns, _) = resolver(addr);
        let start = Instant::now();
        let r = dns.respond(&ask("pypi.org.", RecordType::A), SRC).await;
        assert_eq!(r.response_code, ResponseCode::ServFail);
        let took = start.elapsed();
        assert!(
            took >= UPSTREAM_TIMEOUT && took < UPSTREAM_TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
        drop(silent);
    }

    #[tokio::test]
    async fn a_refusing_upstream_is_servfail_at_once() {
        let closed = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let SocketAddr::V4(addr) = closed.local_addr().expect("addr") else {
            panic!("v4")
        };
        drop(closed);
        let (dns, _) = resolver(addr);
        let start = Instant::now();
        let r = dns.respond(&ask("pypi.org.", RecordType::A), SRC).await;
        assert_eq!(r.response_code, ResponseCode::ServFail);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_rebinding_answer_is_dropped_and_recorded() {
        let upstream = fake_upstream(vec![a("pypi.org.", 30, [127, 0, 0, 1])]).await;
        let (dns, id) = resolver(upstream);
        let r = dns.respond(&ask("pypi.org.", RecordType::A), SRC).await;
        assert_eq!(r.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert!(matches!(dns.events_for_test().as_slice(),
            [sandboxd_protocol::egress::FilterEvent::Denied { sandbox, denial }]
            if *sandbox == id && denial.reason == DenialReason::PrivateRange
                && denial.address == Some(Ipv4Addr::LOCALHOST)));
    }

    impl Dns {
        fn events_for_test(&self) -> Vec<sandboxd_protocol::egress::FilterEvent> {
            self.events.take()
        }
    }
}
