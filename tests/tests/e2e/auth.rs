//! Authentication and tenants: bearer tokens on every route (checked against openapi.yaml),
//! tenant isolation, quotas, the admin-only token API and single-use websocket tickets.

use std::time::Duration;

use sandboxd_tests::{read_websocket, require_e2e, Daemon, Mode, Reply};
use serde_json::{json, Value};

/// Every (method, path template) of openapi.yaml.
fn openapi_routes() -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap().to_string();
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap().to_ascii_uppercase();
            if ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&method.as_str()) {
                routes.push((method, path.clone()));
            }
        }
    }
    assert!(
        routes.len() >= 10,
        "openapi.yaml has too few routes: {routes:?}"
    );
    routes
}

/// A path template with real values: a sandbox id, a token id, a tenant.
fn fill(template: &str, sandbox: &str, token_id: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let name = &rest[start + 1..end];
        let value = if template.starts_with("/v1/tokens") {
            token_id
        } else if name.contains("tenant") {
            "default"
        } else {
            sandbox
        };
        out.push_str(value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn assert_unauthorized(reply: &Reply, what: &str) {
    let code = reply.assert_error(401, what);
    assert_eq!(code, "unauthorized", "{what}: {}", reply.body);
}

#[test]
fn every_route_but_healthz_readyz_and_version_needs_a_valid_token() {
    require_e2e!();
    // Hundreds of refused credentials from one address: the per-address limit on failed
    // authentication (tested on its own below) is raised so that every answer is the 401.
    let d = Daemon::start_with(Mode::Privileged, &["--failed-auth-burst", "100000"]);
    assert!(d.token().is_some(), "the daemon wrote no admin.token");
    let sandbox = d.start_sandbox(&["sleep", "100"]);
    let victim = d.create_token_with("default", "user", None);
    let token_id = victim["id"].as_str().unwrap().to_string();
    let expired = d.create_token_with("default", "admin", Some(1));
    let revoked = d.create_token_with("default", "admin", None);
    let expired = expired["token"].as_str().unwrap().to_string();
    let revoked_id = revoked["id"].as_str().unwrap();
    let revoked = revoked["token"].as_str().unwrap().to_string();
    // The revoked token works until it is revoked.
    assert_eq!(
        d.request("GET", "/v1/info")
            .token(Some(&revoked))
            .send()
            .status,
        200
    );
    let reply = d
        .request("DELETE", &format!("/v1/tokens/{revoked_id}"))
        .send();
    assert_eq!(reply.status, 204, "revoke: {}", reply.body);
    std::thread::sleep(Duration::from_millis(2200));

    let cases: [(&str, Option<&str>); 4] = [
        ("no token", None),
        ("a bad token", Some("sbx_not-a-real-token")),
        ("an expired token", Some(&expired)),
        ("a revoked token", Some(&revoked)),
    ];
    let routes = openapi_routes();
    for (method, template) in &routes {
        let path = fill(template, &sandbox, &token_id);
        if matches!(template.as_str(), "/healthz" | "/readyz" | "/version") {
            let reply = d.request(method, &path).token(None).send();
            assert_eq!(
                reply.status, 200,
                "{template} needs no token: {}",
                reply.body
            );
            continue;
        }
        for (what, token) in cases {
            let reply = d
                .request(method, &path)
                .token(token)
                .json(&json!({}))
                .send();
            assert_unauthorized(&reply, &format!("{method} {path} with {what}"));
            if template.ends_with("/logs") {
                let status = d.websocket_as(&path, token).err();
                assert_eq!(status, Some(401), "websocket {path} with {what}");
            }
        }
    }
    // Nothing was touched by the refused requests.
    assert_eq!(d.sandbox(&sandbox).state.as_str(), "running");
    let tokens: Value = d.get("/v1/tokens").json();
    assert!(
        tokens["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == token_id.as_str()),
        "{tokens}"
    );
    // The admin token still works everywhere, and `GET /v1/tokens` never shows a secret.
    assert!(!tokens.to_string().contains(&expired), "{tokens}");
    assert!(!tokens.to_string().contains(d.token().unwrap()), "{tokens}");
}

fn id_of(reply: &Reply) -> String {
    assert_eq!(reply.status, 201, "create: {}", reply.body);
    reply.json()["id"].as_str().unwrap().to_string()
}

fn listed(d: &Daemon, token: Option<&str>) -> Vec<String> {
    let reply = d
        .request("GET", "/v1/sandboxes?limit=1000")
        .token(token)
        .send();
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_tenant_cannot_see_or_touch_another_tenants_sandboxes() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let a = d.create_token("team-a", "user");
    let b = d.create_token("team-b", "user");
    let create = |token: &str, name: &str| {
        d.request("POST", "/v1/sandboxes")
            .token(Some(token))
            .json(&json!({"command": ["sh", "-c", "echo secret; sleep 100"], "name": name}))
            .send()
    };
    let b_id = id_of(&create(&b, "b-box"));
    let a_id = id_of(&create(&a, "a-box"));
    let a = Some(a.as_str());
    for target in [b_id.as_str(), "b-box"] {
        for (method, path, body) in [
            ("GET", format!("/v1/sandboxes/{target}"), json!({})),
            ("GET", format!("/v1/sandboxes/{target}/stats"), json!({})),
            ("GET", format!("/v1/sandboxes/{target}/logs"), json!({})),
            ("POST", format!("/v1/sandboxes/{target}/kill"), json!({})),
            ("POST", format!("/v1/sandboxes/{target}/wait"), json!({})),
            (
                "POST",
                format!("/v1/sandboxes/{target}/extend"),
                json!({"ttl_secs": 60}),
            ),
            ("DELETE", format!("/v1/sandboxes/{target}"), json!({})),
        ] {
            let reply = d.request(method, &path).token(a).json(&body).send();
            let code = reply.assert_error(404, &format!("team-a {method} {path}"));
            assert_eq!(code, "not_found");
        }
        let ws = d.websocket_as(&format!("/v1/sandboxes/{target}/logs"), a);
        assert_eq!(ws.err(), Some(404), "team-a websocket on {target}");
    }
    // B's sandbox is untouched and B still sees it; lists never cross tenants; admin sees both.
    let b = Some(b.as_str());
    let reply = d
        .request("GET", &format!("/v1/sandboxes/{b_id}"))
        .token(b)
        .send();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["state"], "running");
    assert_eq!(listed(&d, a), vec![a_id.clone()]);
    assert_eq!(listed(&d, b), vec![b_id.clone()]);
    let all = listed(&d, d.token());
    assert!(all.contains(&a_id) && all.contains(&b_id), "{all:?}");
    for state in ["running", "exited"] {
        let reply = d
            .request("GET", &format!("/v1/sandboxes?state={state}"))
            .token(a)
            .send();
        assert!(!reply.body.contains(&b_id), "{}", reply.body);
    }
    // The owner can stream its own logs.
    let ws = d.websocket_as(&format!("/v1/sandboxes/{b_id}/logs"), b);
    assert!(ws.is_ok(), "team-b's own websocket");
}

#[test]
fn a_tenant_cannot_exceed_its_sandbox_quota() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let reply = d
        .request("PUT", "/v1/tenants/team-q/quota")
        .json_text(r#"{"max_sandboxes":1}"#)
        .send();
    assert!(
        reply.status / 100 == 2,
        "set quota: {} {}",
        reply.status,
        reply.body
    );
    let q = d.create_token("team-q", "user");
    let q = Some(q.as_str());
    let spec = json!({"command": ["sleep", "100"]});
    let first = id_of(
        &d.request("POST", "/v1/sandboxes")
            .token(q)
            .json(&spec)
            .send(),
    );
    let reply = d
        .request("POST", "/v1/sandboxes")
        .token(q)
        .json(&spec)
        .send();
    let code = reply.assert_error(429, "second live sandbox over a quota of 1");
    assert_eq!(code, "quota_exceeded");
    // Another tenant is not limited by team-q's quota.
    d.start_sandbox(&["sleep", "100"]);
    let reply = d
        .request("DELETE", &format!("/v1/sandboxes/{first}?force=true"))
        .token(q)
        .json(&json!({}))
        .send();
    if reply.status == 409 {
        d.request("POST", &format!("/v1/sandboxes/{first}/kill"))
            .token(q)
            .json(&json!({}))
            .send();
        d.request("POST", &format!("/v1/sandboxes/{first}/wait"))
            .token(q)
            .json(&json!({}))
            .send();
        let reply = d
            .request("DELETE", &format!("/v1/sandboxes/{first}"))
            .token(q)
            .json(&json!({}))
            .send();
        assert!(
            reply.status / 100 == 2,
            "delete: {} {}",
            reply.status,
            reply.body
        );
    } else {
        assert!(
            reply.status / 100 == 2,
            "delete: {} {}",
            reply.status,
            reply.body
        );
    }
    id_of(
        &d.request("POST", "/v1/sandboxes")
            .token(q)
            .json(&spec)
            .send(),
    );
}

#[test]
fn only_admins_manage_tokens_and_quotas() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let user = d.create_token("team-u", "user");
    let other = d.create_token_with("team-u", "user", None);
    let other_id = other["id"].as_str().unwrap();
    let user = Some(user.as_str());
    for (method, path, body) in [
        (
            "POST",
            "/v1/tokens".to_string(),
            json!({"tenant": "team-u", "role": "admin"}),
        ),
        (
            "POST",
            "/v1/tokens".to_string(),
            json!({"tenant": "team-u", "role": "user"}),
        ),
        ("GET", "/v1/tokens".to_string(), json!({})),
        ("DELETE", format!("/v1/tokens/{other_id}"), json!({})),
        (
            "PUT",
            "/v1/tenants/team-u/quota".to_string(),
            json!({"max_sandboxes": 100}),
        ),
    ] {
        let reply = d.request(method, &path).token(user).json(&body).send();
        let code = reply.assert_error(403, &format!("user {method} {path}"));
        assert_eq!(code, "forbidden");
    }
    // The other token was not revoked.
    let other = other["token"].as_str().unwrap();
    assert_eq!(
        d.request("GET", "/v1/info")
            .token(Some(other))
            .send()
            .status,
        200
    );
    // The user can still do its ordinary work.
    let reply = d
        .request("POST", "/v1/sandboxes?wait=true")
        .token(user)
        .json(&json!({"command": ["true"]}))
        .send();
    assert_eq!(reply.status, 201, "{}", reply.body);
}

/// A ticket for the websocket routes of `sandbox`, minted with `token`.
fn ticket_for(d: &Daemon, token: Option<&str>, sandbox: &str) -> Reply {
    d.request("POST", "/v1/tickets")
        .token(token)
        .json(&json!({ "sandbox": sandbox }))
        .send()
}

fn ticket(d: &Daemon, token: Option<&str>, sandbox: &str) -> String {
    let reply = ticket_for(d, token, sandbox);
    assert_eq!(reply.status, 200, "ticket: {}", reply.body);
    let json = reply.json();
    assert!(json["expires_at"].is_string(), "{json}");
    json["ticket"].as_str().unwrap().to_string()
}

#[test]
fn a_websocket_ticket_works_once() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let (sandbox, _) = d.run(&["echo", "through a ticket"]);
    let path = format!("/v1/sandboxes/{}/logs", sandbox.id);
    let t = ticket(&d, d.token(), &sandbox.id.to_string());
    let ws = d
        .websocket_as(&format!("{path}?ticket={t}"), None)
        .unwrap_or_else(|status| panic!("a fresh ticket was refused with {status}"));
    let log = read_websocket(ws);
    assert_eq!(log.bytes(None), b"through a ticket\n");
    let again = d.websocket_as(&format!("{path}?ticket={t}"), None);
    assert_eq!(again.err(), Some(401), "a ticket is single use");
    let bogus = d.websocket_as(&format!("{path}?ticket=nope"), None);
    assert_eq!(bogus.err(), Some(401), "a made-up ticket");
    // A ticket is not a bearer token for plain HTTP.
    let t = ticket(&d, d.token(), &sandbox.id.to_string());
    let reply = d
        .request("GET", &format!("{path}?ticket={t}"))
        .token(None)
        .send();
    assert_ne!(reply.status, 200, "a ticket opened a plain HTTP route");
    // Another tenant cannot get a ticket for this tenant's sandbox.
    let other = d.create_token("team-t", "user");
    let reply = ticket_for(&d, Some(&other), &sandbox.id.to_string());
    reply.assert_error(404, "another tenant's sandbox");
}

/// Issue 12 finding 4: a ticket opens only a real websocket upgrade of its own sandbox's
/// websocket routes; never a plain route (an admin ticket once minted an admin token), never
/// another sandbox.
#[test]
fn a_ticket_opens_only_its_own_sandboxs_websocket() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let (mine, _) = d.run(&["echo", "mine"]);
    let (other, _) = d.run(&["echo", "other"]);
    let upgrade = |method: &str, path: &str| {
        d.request(method, path)
            .token(None)
            .header("Connection", "Upgrade")
            .header("Upgrade", "websocket")
            .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("Sec-WebSocket-Version", "13")
    };
    // An admin ticket on the token API, dressed as an upgrade.
    let t = ticket(&d, d.token(), &mine.id.to_string());
    let reply = upgrade("POST", &format!("/v1/tokens?ticket={t}"))
        .json(&json!({"tenant": "default", "role": "admin"}))
        .send();
    assert_eq!(
        reply.status, 401,
        "a ticket on POST /v1/tokens: {}",
        reply.body
    );
    let t = ticket(&d, d.token(), &mine.id.to_string());
    let reply = upgrade("GET", &format!("/v1/sandboxes/{}?ticket={t}", mine.id)).send();
    assert_eq!(
        reply.status, 401,
        "a ticket on GET /v1/sandboxes/ID: {}",
        reply.body
    );
    // `Upgrade: websocket` alone is no handshake.
    let t = ticket(&d, d.token(), &mine.id.to_string());
    let reply = d
        .request("GET", &format!("/v1/sandboxes/{}/logs?ticket={t}", mine.id))
        .token(None)
        .header("Upgrade", "websocket")
        .send();
    assert_eq!(reply.status, 401, "a half handshake: {}", reply.body);
    // Another sandbox's logs websocket.
    let t = ticket(&d, d.token(), &mine.id.to_string());
    let ws = d.websocket_as(&format!("/v1/sandboxes/{}/logs?ticket={t}", other.id), None);
    assert_eq!(ws.err(), Some(401), "a ticket on another sandbox");
    // Refused there, and used up: it no longer opens its own sandbox either.
    let ws = d.websocket_as(&format!("/v1/sandboxes/{}/logs?ticket={t}", mine.id), None);
    assert_eq!(
        ws.err(),
        Some(401),
        "a ticket tried on another sandbox is used up"
    );
    // Positive control: its own sandbox's logs websocket.
    let t = ticket(&d, d.token(), &mine.id.to_string());
    let ws = d
        .websocket_as(&format!("/v1/sandboxes/{}/logs?ticket={t}", mine.id), None)
        .unwrap_or_else(|status| panic!("the ticket's own sandbox refused it with {status}"));
    assert_eq!(read_websocket(ws).bytes(None), b"mine\n");
    // A ticket for an unknown sandbox is not issued.
    ticket_for(&d, d.token(), "no-such-sandbox").assert_error(404, "an unknown sandbox");
}

#[test]
fn sbx_manages_tokens() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let out = d.sbx(&[
        "token", "create", "--tenant", "team-c", "--role", "user", "--ttl", "30d",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!secret.is_empty() && !secret.contains(' '), "{secret:?}");
    assert_eq!(
        d.request("GET", "/v1/info")
            .token(Some(&secret))
            .send()
            .status,
        200
    );
    let out = d.sbx(&["token", "ls"]);
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success() && listing.contains("team-c"),
        "{listing}"
    );
    assert!(!listing.contains(&secret), "sbx token ls shows a secret");
    let id = listing
        .lines()
        .find(|l| l.contains("team-c"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let out = d.sbx(&["token", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        d.request("GET", "/v1/info")
            .token(Some(&secret))
            .send()
            .status,
        401
    );
    // A user token run through sbx sees only its tenant, and a bad one fails in one clear line.
    let mut cmd = std::process::Command::new(sandboxd_tests::binaries().join("sbx"));
    cmd.env("SANDBOXD_URL", &d.url)
        .env("SANDBOXD_TOKEN", "wrong");
    let out = d.sbx_command(cmd, &["ls"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a bad token worked");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("SANDBOXD_TOKEN"), "{err}");
}

#[test]
fn a_user_reads_its_own_quota_and_not_another_tenants() {
    sandboxd_tests::require_e2e!();
    let d = sandboxd_tests::Daemon::start(sandboxd_tests::Mode::Privileged);
    let resp = d
        .request("PUT", "/v1/tenants/team-a/quota")
        .json(&serde_json::json!({"max_sandboxes": 3}))
        .send();
    assert_eq!(resp.status, 200, "{}", resp.body);
    let user = d.create_token("team-a", "user");
    let own = d
        .request("GET", "/v1/tenants/team-a/quota")
        .token(Some(&user))
        .send();
    assert_eq!(own.status, 200, "{}", own.body);
    assert!(own.body.contains("\"max_sandboxes\":3"), "{}", own.body);
    let other = d
        .request("GET", "/v1/tenants/team-b/quota")
        .token(Some(&user))
        .send();
    assert_eq!(other.status, 404, "{}", other.body);
}

/// Issue 12 finding 10: sandbox names are unique per tenant. Two tenants both use `build-1`,
/// each sees its own by name, and neither learns of the other's; an admin naming it is told to
/// use the id.
#[test]
fn names_are_unique_per_tenant() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let a = d.create_token("team-a", "user");
    let b = d.create_token("team-b", "user");
    let create = |token: &str| {
        d.request("POST", "/v1/sandboxes?wait=true")
            .token(Some(token))
            .json(&json!({"name": "build-1", "command": ["true"]}))
            .send()
    };
    let made_a = create(&a);
    assert_eq!(made_a.status, 201, "tenant a: {}", made_a.body);
    let made_b = create(&b);
    assert_eq!(made_b.status, 201, "tenant b, same name: {}", made_b.body);
    let id_a = made_a.json()["id"].as_str().unwrap().to_string();
    let id_b = made_b.json()["id"].as_str().unwrap().to_string();
    assert_ne!(id_a, id_b);
    for (token, id) in [(&a, &id_a), (&b, &id_b)] {
        let got = d
            .request("GET", "/v1/sandboxes/build-1")
            .token(Some(token))
            .send();
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.json()["id"].as_str(), Some(id.as_str()), "{}", got.body);
    }
    // Within one tenant a name is still taken.
    create(&a).assert_error(409, "the same name twice in one tenant");
    // An admin naming it: two tenants use it, so it is ambiguous, never one picked at random.
    let code = d
        .request("GET", "/v1/sandboxes/build-1")
        .send()
        .assert_error(409, "an admin naming a shared name");
    assert_eq!(code, "ambiguous_name");
    // Once only one tenant uses it, the admin finds that one.
    let gone = d
        .request("DELETE", &format!("/v1/sandboxes/{id_b}"))
        .token(Some(&b))
        .send();
    assert_eq!(gone.status, 204, "{}", gone.body);
    let got = d.request("GET", "/v1/sandboxes/build-1").send();
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.json()["id"].as_str(), Some(id_a.as_str()));
}

/// A `GET /v1/info` with `token`, sent from the source address 127.0.0.2 (loopback accepts any
/// 127/8 source): another client address than the test's other requests. Returns the status.
fn info_from_127_0_0_2(d: &Daemon, token: &str) -> u16 {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let daemon: std::net::SocketAddrV4 = d.addr.parse().expect("the daemon's address is IPv4");
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 2, 0)).unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(daemon)).unwrap();
    let mut stream = std::net::TcpStream::from(fd);
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /v1/info HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        d.addr
    )
    .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"))
}

/// Issue 12 finding 11: failed authentication is limited per client address, not per
/// Authorization value, so rotating made-up tokens is no way around it; another address is not
/// affected.
#[test]
fn failed_authentication_is_limited_per_address() {
    require_e2e!();
    let d = Daemon::start(Mode::Privileged);
    let valid = d.token().expect("the admin token").to_string();
    let mut limited = None;
    for i in 0..50 {
        let bogus = format!("sbx_{i:064x}");
        let reply = d.request("GET", "/v1/info").token(Some(&bogus)).send();
        match reply.status {
            401 => {}
            429 => {
                limited = Some(reply);
                break;
            }
            other => panic!("bogus token {i}: {other} {}", reply.body),
        }
    }
    let reply = limited.expect("50 different bogus tokens from one address were never limited");
    assert_eq!(reply.assert_error(429, "failed auth"), "rate_limited");
    let retry: u64 = reply
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!(retry >= 1, "{retry}");
    // The address is held back whatever it sends, a valid token included...
    let same = d.request("GET", "/v1/info").token(Some(&valid)).send();
    assert_eq!(same.status, 429, "{}", same.body);
    // ...but another address, with a valid token, works (positive control).
    assert_eq!(info_from_127_0_0_2(&d, &valid), 200);
}
