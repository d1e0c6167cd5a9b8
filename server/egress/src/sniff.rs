//! The server name a client presents in its first bytes: the TLS ClientHello's `server_name`
//! extension (SNI) or the HTTP/1.x `Host` header.
//!
//! Both parsers take the bytes read so far and say whether they found a name, found that there
//! is none, or need more bytes. They never allocate more than the name itself and never panic
//! on any input: the bytes come from the sandbox.

use std::str::FromStr;

use sandboxd_api::egress::{Destination, EgressRule};

/// TLS record content type `handshake`.
const TLS_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const CLIENT_HELLO: u8 = 1;
/// Extension type `server_name` (RFC 6066).
const EXT_SERVER_NAME: u16 = 0;
/// `NameType` `host_name` in a `ServerNameList`.
const HOST_NAME: u8 = 0;
/// Largest TLS record fragment (2^14) plus the expansion a ciphertext may add; a larger length
/// is not TLS.
const MAX_RECORD: usize = (1 << 14) + 2048;
/// Most headers an HTTP request may carry before the parser gives up looking for `Host`.
const MAX_HEADERS: usize = 128;

/// What the first bytes of a connection say about its server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// A valid DNS name, lower case, without a trailing dot.
    Name(String),
    /// The client speaks TLS or HTTP without a (valid) name, or speaks something else.
    NoName,
    /// Not enough bytes yet to tell.
    Incomplete,
}

/// The server name in `buf`, the first bytes a client sent.
pub fn server_name(buf: &[u8]) -> Sniff {
    match buf.first() {
        None => Sniff::Incomplete,
        Some(&TLS_HANDSHAKE) => tls_server_name(buf),
        Some(b) if b.is_ascii_uppercase() => http_host(buf),
        Some(_) => Sniff::NoName,
    }
}

/// A DNS name as the filter compares it (lower case, no trailing dot), or `None` when `s` is not
/// one (an address literal, a wildcard, a port, spaces...). The same validation as a name rule.
pub fn normalize_name(s: &str) -> Option<String> {
    if s.is_empty() || s.contains([':', '*', '/']) {
        return None;
    }
    match EgressRule::from_str(s) {
        Ok(EgressRule {
            destination: Destination::Name(name),
            port: None,
        }) => Some(name),
        _ => None,
    }
}

/// SNI from a ClientHello that may span several handshake records (it rarely does).
fn tls_server_name(buf: &[u8]) -> Sniff {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            return Sniff::Incomplete;
        };
        // TLS 1.0 to 1.3 all use record version 3.x.
        if header[0] != TLS_HANDSHAKE || header[1] != 3 {
            return Sniff::NoName;
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Sniff::NoName;
        }
        let start = pos + 5;
        let available = buf.len().saturating_sub(start).min(len);
        handshake.extend_from_slice(&buf[start..start + available]);
        if handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return Sniff::NoName;
            }
            let body_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if handshake.len() >= 4 + body_len {
                return match client_hello_sni(&handshake[4..4 + body_len]) {
                    Some(name) => Sniff::Name(name),
                    None => Sniff::NoName,
                };
            }
        }
        if available < len {
            return Sniff::Incomplete;
        }
        pos = start + len;
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked and a short input is `None`.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let n = self.u16()?;
        self.take(usize::from(n)).map(|buf| Reader { buf })
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The `host_name` of the `server_name` extension of a ClientHello body (RFC 8446 4.1.2).
fn client_hello_sni(body: &[u8]) -> Option<String> {
    let mut r = Reader { buf: body };
    r.take(2)?; // legacy_version
    r.take(32)?; // random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    if r.is_empty() {
        return None; // no extensions at all
    }
    let mut extensions = r.vec16()?;
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec16()?;
        if kind != EXT_SERVER_NAME {
            continue;
        }
        let mut list = data.vec16()?;
        while !list.is_empty() {
            let name_type = list.u8()?;
            let mut name = list.vec16()?;
            if name_type == HOST_NAME {
                let name = std::str::from_utf8(name.take(name.buf.len())?).ok()?;
                return normalize_name(name);
            }
        }
        return None;
    }
    None
}

/// The `Host` of an HTTP/1.x request, without its port.
fn http_host(buf: &[u8]) -> Sniff {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        // The headers end with an empty line; until then Host may still come.
        Ok(httparse::Status::Partial) => return Sniff::Incomplete,
        Err(_) => return Sniff::NoName,
    }
    let Some(host) = request
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
    else {
        return Sniff::NoName;
    };
    let Ok(host) = std::str::from_utf8(host.value) else {
        return Sniff::NoName;
    };
    let host = host.trim();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    match normalize_name(host) {
        Some(name) => Sniff::Name(name),
        None => Sniff::NoName,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    /// A real ClientHello, written by rustls for `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("a name");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), server).expect("a client connection");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("write to a vec");
        out
    }

    #[test]
    fn sni_from_a_rustls_client_hello() {
        let hello = client_hello("Registry.NPMJS.org");
        assert_eq!(
            server_name(&hello),
            Sniff::Name("registry.npmjs.org".into())
        );
    }

    #[test]
    fn every_prefix_of_a_client_hello_is_incomplete() {
        let hello = client_hello("pypi.org");
        for n in 0..hello.len() {
            assert_eq!(server_name(&hello[..n]), Sniff::Incomplete, "prefix {n}");
        }
        // Bytes after the ClientHello (0-RTT data, say) do not matter.
        let mut more = hello.clone();
        more.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(server_name(&more), Sniff::Name("pypi.org".into()));
    }

    #[test]
    fn a_client_hello_split_over_two_records() {
        let hello = client_hello("files.pythonhosted.org");
        let handshake = &hello[5..];
        let (a, b) = handshake.split_at(40);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[22, 3, 1]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            server_name(&split),
            Sniff::Name("files.pythonhosted.org".into())
        );
        assert_eq!(server_name(&split[..50]), Sniff::Incomplete);
    }

    #[test]
    fn an_address_as_server_name_is_no_name() {
        // rustls sends no SNI for an address.
        let hello = client_hello("203.0.113.7");
        assert_eq!(server_name(&hello), Sniff::NoName);
    }

    #[test]
    fn broken_tls_is_no_name_and_never_panics() {
        let hello = client_hello("pypi.org");
        // Not a handshake record, an SSLv2-style header, a zero length.
        assert_eq!(server_name(&[23, 3, 3, 0, 5, 1, 2, 3, 4, 5]), Sniff::NoName);
        assert_eq!(server_name(&[22, 2, 0, 0, 5]), Sniff::NoName);
        assert_eq!(server_name(&[22, 3, 1, 0, 0]), Sniff::NoName);
        // A ServerHello instead of a ClientHello.
        let mut server_hello = hello.clone();
        server_hello[5] = 2;
        assert_eq!(server_name(&server_hello), Sniff::NoName);
        // Every single-byte corruption parses to something without panicking.
        for i in 5..hello.len() {
            let mut bad = hello.clone();
            bad[i] ^= 0xff;
            let _ = server_name(&bad);
        }
        // A handshake length that claims more than the record holds, then the record ends.
        let mut short = vec![22, 3, 1, 0, 4, 1, 0, 0, 200];
        assert_eq!(server_name(&short), Sniff::Incomplete);
        short.extend_from_slice(&[21, 3, 1, 0, 2, 2, 40]);
        assert_eq!(server_name(&short), Sniff::NoName);
    }

    #[test]
    fn http_host_without_port_lower_case() {
        let check = |req: &str, want: Sniff| assert_eq!(server_name(req.as_bytes()), want, "{req}");
        check(
            "GET /simple/ HTTP/1.1\r\nHost: PyPI.org\r\nAccept: */*\r\n\r\n",
            Sniff::Name("pypi.org".into()),
        );
        check(
            "POST / HTTP/1.0\r\nhost: example.com:8080\r\n\r\nbody",
            Sniff::Name("example.com".into()),
        );
        check(
            "GET / HTTP/1.1\r\nHost: example.com.\r\n\r\n",
            Sniff::Name("example.com".into()),
        );
        check("GET / HTTP/1.1\r\nHost: 203.0.113.7\r\n\r\n", Sniff::NoName);
        check(
            "GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
            Sniff::NoName,
        );
        check("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", Sniff::NoName);
        check("GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", Sniff::NoName);
        check("GET / HTTP/1.1\r\nHost: example.com\r\n", Sniff::Incomplete);
        check("GE", Sniff::Incomplete);
        check("SSH-2.0-OpenSSH_9.2\r\n", Sniff::NoName);
        check("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Sniff::NoName);
        assert_eq!(server_name(&[0, 1, 2]), Sniff::NoName);
    }

    #[test]
    fn names_are_normalized_like_rules() {
        assert_eq!(normalize_name("PyPI.org."), Some("pypi.org".into()));
        assert_eq!(normalize_name("a_b.example"), Some("a_b.example".into()));
        for bad in [
            "",
            "1.2.3.4",
            "*.x.org",
            "x.org:443",
            "-x.org",
            "x..org",
            "a/b",
        ] {
            assert_eq!(normalize_name(bad), None, "{bad}");
        }
    }
}
