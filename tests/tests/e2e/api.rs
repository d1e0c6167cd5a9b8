//! The HTTP API from outside: status codes, the error shape, the sandbox object, listing and
//! pagination, and robustness against bad requests.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use sandboxd_api::{EndReason, Sandbox, SandboxList, SandboxState};
use sandboxd_tests::{require_e2e, Daemon, Mode};
use serde_json::{json, Value};

/// Requests that must each be refused with a status, in the one error shape.
fn bad_create_bodies() -> Vec<(&'static str, String, u16)> {
    let big_arg = "x".repeat(1024 * 1024 + 16);
    vec![
        ("malformed JSON", r#"{"command": ["true""#.to_string(), 400),
        ("not an object", r#"["true"]"#.to_string(), 400),
        (
            "unknown top-level field",
            r#"{"command":["true"],"bogus":1}"#.to_string(),
            400,
        ),
        (
            "unknown field in limits",
            r#"{"command":["true"],"limits":{"memory_bytes":1}}"#.to_string(),
            400,
        ),
        ("missing command", r#"{}"#.to_string(), 400),
        ("empty command", r#"{"command":[]}"#.to_string(), 400),
        (
            "NUL byte in an argument",
            r#"{"command":["echo","a\u0000b"]}"#.to_string(),
            400,
        ),
        (
            "NUL byte in the program",
            r#"{"command":["ech\u0000o"]}"#.to_string(),
            400,
        ),
        (
            "env name starting with a digit",
            r#"{"command":["true"],"env":{"1A":"x"}}"#.to_string(),
            400,
        ),
        (
            "env name with a dash",
            r#"{"command":["true"],"env":{"A-B":"x"}}"#.to_string(),
            400,
        ),
        (
            "env name with =",
            r#"{"command":["true"],"env":{"A=B":"x"}}"#.to_string(),
            400,
        ),
        (
            "empty env name",
            r#"{"command":["true"],"env":{"":"x"}}"#.to_string(),
            400,
        ),
        (
            "relative cwd",
            r#"{"command":["true"],"cwd":"work"}"#.to_string(),
            400,
        ),
        (
            "cwd with ..",
            r#"{"command":["true"],"cwd":"/work/../etc"}"#.to_string(),
            400,
        ),
        (
            "name with a space",
            r#"{"command":["true"],"name":"a b"}"#.to_string(),
            400,
        ),
        (
            "name starting with a dash",
            r#"{"command":["true"],"name":"-a"}"#.to_string(),
            400,
        ),
        (
            "empty name",
            r#"{"command":["true"],"name":""}"#.to_string(),
            400,
        ),
        (
            "name that is a UUID",
            r#"{"command":["true"],"name":"0b9e3f0e-8a5e-4a35-9e53-3f1c6b7b1a2c"}"#.to_string(),
            400,
        ),
        (
            "name too long",
            format!(r#"{{"command":["true"],"name":"{}"}}"#, "a".repeat(64)),
            400,
        ),
        (
            "hostname with !",
            r#"{"command":["true"],"hostname":"bad!host"}"#.to_string(),
            400,
        ),
        (
            "hostname starting with -",
            r#"{"command":["true"],"hostname":"-host"}"#.to_string(),
            400,
        ),
        (
            "timeout 0",
            r#"{"command":["true"],"limits":{"timeout_secs":0}}"#.to_string(),
            400,
        ),
        (
            "command is a string",
            r#"{"command":"true"}"#.to_string(),
            400,
        ),
        (
            "body over 1 MiB",
            format!(r#"{{"command":["echo","{big_arg}"]}}"#),
            413,
        ),
    ]
}

fn assert_bad_creates_refused(daemon: &Daemon) {
    for (what, body, status) in bad_create_bodies() {
        let reply = daemon
            .request("POST", "/v1/sandboxes")
            .json_text(&body)
            .send();
        reply.assert_error(status, what);
    }
    let reply = daemon
        .request("POST", "/v1/sandboxes")
        .header("content-type", "text/plain")
        .body(br#"{"command":["true"]}"#.to_vec())
        .send();
    reply.assert_error(415, "Content-Type: text/plain");
}

#[test]
fn bad_create_requests_are_refused_with_the_error_shape() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    assert_bad_creates_refused(&daemon);
    // None of them created anything.
    let list: SandboxList = daemon.get("/v1/sandboxes").parse();
    assert!(
        list.items.is_empty(),
        "refused requests created sandboxes: {list:?}"
    );
}

#[test]
fn unknown_ids_names_routes_and_methods() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let random = uuid::Uuid::new_v4().to_string();
    for path in [
        format!("/v1/sandboxes/{random}"),
        format!("/v1/sandboxes/{random}/logs"),
        "/v1/sandboxes/no-such-name".to_string(),
        "/v1/sandboxes/no-such-name/logs".to_string(),
    ] {
        daemon
            .request("GET", &path)
            .send()
            .assert_error(404, &format!("GET {path}"));
    }
    for path in [
        format!("/v1/sandboxes/{random}/wait"),
        format!("/v1/sandboxes/{random}/kill"),
        "/v1/sandboxes/no-such-name/wait".to_string(),
        "/v1/sandboxes/no-such-name/kill".to_string(),
    ] {
        daemon
            .request("POST", &path)
            .json_text("{}")
            .send()
            .assert_error(404, &format!("POST {path}"));
    }
    for path in [
        format!("/v1/sandboxes/{random}"),
        "/v1/sandboxes/no-such-name".to_string(),
    ] {
        daemon
            .request("DELETE", &path)
            .send()
            .assert_error(404, &format!("DELETE {path}"));
    }
    for path in ["/v1/nothing", "/v2/sandboxes", "/", "/v1/sandboxes/x/y/z"] {
        daemon
            .request("GET", path)
            .send()
            .assert_error(404, &format!("GET {path}"));
    }
    for (method, path) in [
        ("PUT", "/v1/sandboxes"),
        ("DELETE", "/v1/sandboxes"),
        ("POST", "/healthz"),
        ("DELETE", "/v1/info"),
        ("PUT", "/v1/sandboxes/x"),
        ("GET", "/v1/sandboxes/x/kill"),
        ("GET", "/v1/sandboxes/x/wait"),
        ("POST", "/v1/sandboxes/x/logs"),
    ] {
        daemon
            .request(method, path)
            .send()
            .assert_error(405, &format!("{method} {path}"));
    }
}

#[test]
fn name_conflict_kill_conflict_and_bad_signal() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let running = daemon.create(json!({"command": ["sleep", "100"], "name": "taken"}));
    daemon
        .request("POST", "/v1/sandboxes")
        .json_text(r#"{"command":["true"],"name":"taken"}"#)
        .send()
        .assert_error(409, "name taken");

    let id = running.id.to_string();
    for signal in [
        r#"{"signal":"SIGFOO"}"#,
        r#"{"signal":"FOO"}"#,
        r#"{"signal":"999"}"#,
        r#"{"signal":""}"#,
    ] {
        daemon
            .request("POST", &format!("/v1/sandboxes/{id}/kill"))
            .json_text(signal)
            .send()
            .assert_error(400, &format!("kill with {signal}"));
    }
    daemon
        .request("POST", &format!("/v1/sandboxes/{id}/kill"))
        .json_text(r#"{"sig":"TERM"}"#)
        .send()
        .assert_error(400, "kill with an unknown field");
    // The refused kills did nothing.
    assert_eq!(daemon.sandbox(&id).state, SandboxState::Running);

    let (exited, _) = daemon.run(&["true"]);
    daemon
        .request("POST", &format!("/v1/sandboxes/{}/kill", exited.id))
        .json_text("{}")
        .send()
        .assert_error(409, "kill of an exited sandbox");
    daemon
        .request("POST", &format!("/v1/sandboxes/{}/kill", exited.id))
        .send()
        .assert_error(409, "kill (empty body) of an exited sandbox");

    // The name is free again once its sandbox is deleted.
    assert_eq!(daemon.delete(&format!("/v1/sandboxes/{id}")).status, 204);
    let again = daemon.create(json!({"command": ["true"], "name": "taken"}));
    assert_eq!(again.name.as_deref(), Some("taken"));
}

#[test]
fn healthz_openapi_and_info_privileged() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let health = daemon.request("GET", "/healthz").send();
    assert_eq!(health.status, 200, "{}", health.body);
    assert_eq!(health.json()["status"], "ok", "{}", health.body);

    let openapi = daemon.request("GET", "/openapi.yaml").send();
    assert_eq!(openapi.status, 200);
    assert!(openapi.body.contains("/v1/sandboxes"), "{}", openapi.body);
    assert!(
        openapi.body.starts_with("openapi:"),
        "{}",
        &openapi.body[..openapi.body.len().min(200)]
    );

    check_info(&daemon, "privileged");
}

#[test]
fn info_rootless() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Rootless);
    check_info(&daemon, "rootless");
}

fn check_info(daemon: &Daemon, mode: &str) {
    let reply = daemon.request("GET", "/v1/info").send();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let info: sandboxd_api::Info = serde_json::from_str(&reply.body).expect("Info JSON");
    assert_eq!(info.mode, mode, "{}", reply.body);
    assert!(info.user_namespaces, "{}", reply.body);
    let namespaces: HashSet<&str> = info.namespaces.iter().map(String::as_str).collect();
    let expected: HashSet<&str> = ["user", "pid", "mount", "uts", "ipc", "net", "cgroup"].into();
    assert_eq!(namespaces, expected, "{}", reply.body);
    assert_eq!(info.namespaces.len(), 7, "{}", reply.body);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert_eq!(
        info.cgroup.version,
        cgroup_version(&mountinfo),
        "{}",
        reply.body
    );
}

/// The cgroup layout of this host as /proc/self/mountinfo shows it.
fn cgroup_version(mountinfo: &str) -> &'static str {
    let mut v1 = false;
    let mut v2_anywhere = false;
    let mut v2_at_root = false;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let mount_point = fields.get(4).copied().unwrap_or_default();
        match fields.get(dash + 1).copied() {
            Some("cgroup") => v1 = true,
            Some("cgroup2") => {
                v2_anywhere = true;
                if mount_point == "/sys/fs/cgroup" {
                    v2_at_root = true;
                }
            }
            _ => {}
        }
    }
    match (v2_at_root, v1, v2_anywhere) {
        (true, _, _) => "v2",
        (false, true, true) => "hybrid",
        (false, true, false) => "v1",
        (false, false, true) => "v2",
        (false, false, false) => "none",
    }
}

#[test]
fn sandbox_object_and_state_transitions() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let spec = json!({
        "command": ["sh", "-c", "sleep 2; echo done"],
        "name": "shape-1",
        "labels": {"team": "core", "tier": "test"},
        "env": {"FOO": "bar"},
        "cwd": "/tmp",
        "limits": {"timeout_secs": 300},
    });
    let reply = daemon
        .request("POST", "/v1/sandboxes")
        .json_text(&spec.to_string())
        .send();
    assert_eq!(reply.status, 201, "{}", reply.body);
    let raw = reply.json();
    for field in [
        "id",
        "name",
        "state",
        "exit_code",
        "signal",
        "reason",
        "error",
        "hostname",
        "created_at",
        "started_at",
        "finished_at",
        "labels",
        "spec",
    ] {
        assert!(
            raw.get(field).is_some(),
            "required field {field} missing: {raw}"
        );
    }
    let created: Sandbox = serde_json::from_value(raw.clone()).expect("Sandbox JSON");
    assert_eq!(created.name.as_deref(), Some("shape-1"));
    assert_eq!(created.labels.get("team").map(String::as_str), Some("core"));
    assert_eq!(created.labels.get("tier").map(String::as_str), Some("test"));
    assert_eq!(created.spec.command, ["sh", "-c", "sleep 2; echo done"]);
    assert_eq!(created.spec.env.get("FOO").map(String::as_str), Some("bar"));
    assert_eq!(created.spec.cwd.as_deref(), Some("/tmp"));
    assert_eq!(created.spec.name.as_deref(), Some("shape-1"));
    assert_eq!(created.spec.limits.timeout_secs, Some(300));
    assert_eq!(
        created.hostname, "shape-1",
        "the hostname defaults to a valid name"
    );
    assert_eq!(created.exit_code, None);
    assert_eq!(created.reason, None);
    assert_eq!(created.finished_at, None);

    let id = created.id.to_string();
    let running = daemon.sandbox(&id);
    assert_eq!(running.state, SandboxState::Running, "{running:?}");
    let started = running
        .started_at
        .expect("a running sandbox has started_at");
    assert!(running.created_at <= started, "{running:?}");
    assert_eq!(running.finished_at, None);
    assert!(
        running.init_pid.is_some(),
        "a running sandbox shows its init pid: {running:?}"
    );

    let by_name = daemon.sandbox("shape-1");
    assert_eq!(by_name.id, created.id);

    let done = daemon.wait("shape-1");
    assert_eq!(done.id, created.id);
    assert_eq!(
        done.state,
        SandboxState::Exited,
        "{done:?}\n{}",
        daemon.log()
    );
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.signal, None);
    assert_eq!(done.reason, Some(EndReason::Exited));
    assert_eq!(done.error, None);
    let finished = done.finished_at.expect("finished_at once exited");
    assert!(done.created_at <= done.started_at.expect("started_at"));
    assert!(done.started_at.expect("started_at") <= finished, "{done:?}");
    assert_eq!(
        done.started_at, running.started_at,
        "started_at does not change"
    );
    assert_eq!(
        done.created_at, created.created_at,
        "created_at does not change"
    );
    assert_eq!(daemon.sandbox(&id), daemon.sandbox("shape-1"));
    assert_eq!(daemon.logs(&id, ""), b"done\n");

    // Without a name, the hostname is derived from the id.
    let (anonymous, out) = daemon.run(&["hostname"]);
    let expected = format!("sbx-{}", &anonymous.id.simple().to_string()[..8]);
    assert_eq!(anonymous.hostname, expected);
    assert_eq!(out, format!("{expected}\n"));
    assert_eq!(anonymous.name, None);
}

#[test]
fn rootless_create_and_get() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Rootless);
    let created = daemon.create(
        json!({"command": ["sh", "-c", "echo rootless"], "name": "rl", "labels": {"k": "v"}}),
    );
    let done = daemon.wait(&created.id.to_string());
    assert_eq!(done.state, SandboxState::Exited);
    assert_eq!(done.exit_code, Some(0));
    let by_name = daemon.sandbox("rl");
    assert_eq!(by_name.id, created.id);
    assert_eq!(by_name.labels.get("k").map(String::as_str), Some("v"));
    assert_eq!(daemon.logs("rl", ""), b"rootless\n");
}

fn list(daemon: &Daemon, query: &str) -> SandboxList {
    let reply = daemon
        .request("GET", &format!("/v1/sandboxes{query}"))
        .send();
    assert_eq!(reply.status, 200, "list {query}: {}", reply.body);
    serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("list {query}: {e}: {}", reply.body))
}

#[test]
fn list_order_filters_and_pagination() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let labels = [
        json!({"a": "1", "b": "2"}),
        json!({"a": "1", "b": "3"}),
        json!({"a": "2", "b": "2"}),
        json!({"a": "1"}),
        json!({}),
    ];
    let mut ids = Vec::new();
    for (i, labels) in labels.iter().enumerate() {
        // The first two keep running; the others exit at once.
        let command = if i < 2 {
            json!(["sleep", "100"])
        } else {
            json!(["true"])
        };
        let created = daemon.create(json!({"command": command, "labels": labels}));
        ids.push(created.id);
    }
    for id in &ids[2..] {
        daemon.wait(&id.to_string());
    }
    let newest_first: Vec<_> = ids.iter().rev().copied().collect();

    let all = list(&daemon, "");
    assert_eq!(
        all.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        newest_first
    );
    assert_eq!(all.next_cursor, None);
    for pair in all.items.windows(2) {
        assert!(
            pair[0].created_at >= pair[1].created_at,
            "not newest first: {pair:?}"
        );
    }

    let running = list(&daemon, "?state=running");
    assert_eq!(
        running.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![ids[1], ids[0]]
    );
    let exited = list(&daemon, "?state=exited");
    assert_eq!(
        exited.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![ids[4], ids[3], ids[2]]
    );
    assert!(list(&daemon, "?state=failed").items.is_empty());

    let a1 = list(&daemon, "?label=a=1");
    assert_eq!(
        a1.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![ids[3], ids[1], ids[0]]
    );
    let a1b2 = list(&daemon, "?label=a=1&label=b=2");
    assert_eq!(
        a1b2.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![ids[0]]
    );
    let b2_running = list(&daemon, "?label=b=2&state=exited");
    assert_eq!(
        b2_running.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![ids[2]]
    );
    assert!(list(&daemon, "?label=a=3").items.is_empty());
    assert!(list(&daemon, "?label=c=1").items.is_empty());

    // Pages of two: 2 + 2 + 1, no duplicates, no gaps, the last page has a null cursor.
    let mut seen = Vec::new();
    let mut query = "?limit=2".to_string();
    let mut pages = 0;
    loop {
        let reply = daemon
            .request("GET", &format!("/v1/sandboxes{query}"))
            .send();
        assert_eq!(reply.status, 200, "{query}: {}", reply.body);
        let raw = reply.json();
        assert!(
            raw.get("next_cursor").is_some(),
            "next_cursor must always be present: {raw}"
        );
        let page: SandboxList = serde_json::from_value(raw).expect("list JSON");
        pages += 1;
        assert!(
            pages <= 3,
            "more than three pages of two for five sandboxes"
        );
        assert!(
            page.items.len() <= 2,
            "limit=2 answered {} items",
            page.items.len()
        );
        seen.extend(page.items.iter().map(|s| s.id));
        match page.next_cursor {
            Some(cursor) => {
                assert_eq!(page.items.len(), 2, "a page before the last one is full");
                query = format!("?limit=2&cursor={}", urlencode(&cursor));
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen, newest_first,
        "pagination must yield every sandbox once, newest first"
    );

    // A cursor works together with filters.
    let first = list(&daemon, "?label=a=1&limit=1");
    assert_eq!(
        first.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![ids[3]]
    );
    let cursor = first.next_cursor.expect("more pages");
    let rest = list(
        &daemon,
        &format!("?label=a=1&limit=5&cursor={}", urlencode(&cursor)),
    );
    assert_eq!(
        rest.items.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![ids[1], ids[0]]
    );
    assert_eq!(rest.next_cursor, None);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn bad_list_queries() -> Vec<&'static str> {
    vec![
        "?state=sleeping",
        "?state=",
        "?limit=0",
        "?limit=1001",
        "?limit=-1",
        "?limit=abc",
        "?cursor=not-a-cursor",
        "?cursor=%00%01",
        "?label=novalue",
    ]
}

#[test]
fn bad_list_queries_are_refused() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    daemon.run(&["true"]);
    for query in bad_list_queries() {
        daemon
            .request("GET", &format!("/v1/sandboxes{query}"))
            .send()
            .assert_error(400, &format!("list {query}"));
    }
    assert_eq!(list(&daemon, "?limit=1000").items.len(), 1);
    assert_eq!(list(&daemon, "?limit=1").items.len(), 1);
}

/// Write raw bytes to the daemon's port, read whatever it answers (bounded by a timeout).
fn raw_exchange(daemon: &Daemon, bytes: &[u8], read: bool) {
    let mut stream = TcpStream::connect(&daemon.addr).unwrap_or_else(|e| {
        panic!(
            "the daemon no longer accepts connections ({e}); its log:\n{}",
            daemon.log()
        )
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = stream.write_all(bytes);
    if read {
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    }
}

#[test]
fn bad_requests_do_not_crash_or_hang_the_daemon() {
    require_e2e!();
    let daemon = Daemon::start(Mode::Privileged);
    let victim = daemon.create(json!({"command": ["sleep", "100"]}));
    let id = victim.id.to_string();
    for _ in 0..3 {
        assert_bad_creates_refused(&daemon);
        for query in bad_list_queries() {
            daemon
                .request("GET", &format!("/v1/sandboxes{query}"))
                .send()
                .assert_error(400, query);
        }
        daemon
            .request("POST", &format!("/v1/sandboxes/{id}/kill"))
            .json_text(r#"{"signal":"NOPE"}"#)
            .send()
            .assert_error(400, "bad signal");
        daemon
            .request("POST", &format!("/v1/sandboxes/{id}/kill"))
            .json_text("{not json")
            .send()
            .assert_error(400, "malformed kill body");
        daemon
            .request("GET", &format!("/v1/sandboxes/{id}/logs?offset=abc"))
            .send()
            .assert_error(400, "bad offset");
        daemon
            .request("GET", &format!("/v1/sandboxes/{id}/logs?stream=stdin"))
            .send()
            .assert_error(400, "bad stream");
    }
    // Garbage at the HTTP level: not HTTP at all, a truncated body, a huge header, a lying
    // websocket upgrade, a connection dropped at once.
    raw_exchange(&daemon, b"\x00\x01\x02 hello\r\n\r\n", true);
    raw_exchange(
        &daemon,
        b"POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"comm",
        false,
    );
    let mut huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 200_000));
    huge.extend(b"\r\n\r\n");
    raw_exchange(&daemon, &huge, true);
    raw_exchange(
        &daemon,
        format!(
            "GET /v1/sandboxes/{id}/logs HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        .as_bytes(),
        true,
    );
    raw_exchange(&daemon, b"", false);

    // Still healthy, the running sandbox is untouched, and a new sandbox runs.
    assert_eq!(daemon.get("/healthz").status, 200, "{}", daemon.log());
    assert_eq!(daemon.sandbox(&id).state, SandboxState::Running);
    assert_eq!(daemon.sh("echo still-fine"), "still-fine\n");
    let listed: Value = daemon.get("/v1/sandboxes").json();
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
}

/// Issue 12 finding 12 (API part): a sandbox's host details, `init_pid` (a host pid) and
/// `host_uid`, are shown to admin tokens only; a `user` token's sandbox objects omit them on
/// every route that returns one.
fn host_details_are_for_admins(mode: Mode) {
    let d = Daemon::start(mode);
    let user = d.create_token("default", "user");
    let created = d
        .request("POST", "/v1/sandboxes")
        .token(Some(&user))
        .json(&json!({"command": ["sleep", "30"]}))
        .send();
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let host_fields = ["init_pid", "host_uid"];
    let has_host_details = |v: &Value| host_fields.iter().any(|f| !v[*f].is_null());
    assert!(
        !has_host_details(&created.json()),
        "create: {}",
        created.body
    );
    // The admin (positive control) sees both while it runs.
    let admin = d.get(&format!("/v1/sandboxes/{id}"));
    assert_eq!(admin.status, 200, "{}", admin.body);
    for field in host_fields {
        assert!(
            admin.json()[field].is_u64(),
            "admin lacks {field}: {}",
            admin.body
        );
    }
    let get = d
        .request("GET", &format!("/v1/sandboxes/{id}"))
        .token(Some(&user))
        .send();
    assert_eq!(get.status, 200, "{}", get.body);
    assert!(!has_host_details(&get.json()), "get: {}", get.body);
    let list = d.request("GET", "/v1/sandboxes").token(Some(&user)).send();
    let items = list.json()["items"].as_array().unwrap().clone();
    assert!(!items.is_empty(), "{}", list.body);
    assert!(!items.iter().any(&has_host_details), "list: {}", list.body);
    let killed = d
        .request("POST", &format!("/v1/sandboxes/{id}/kill"))
        .token(Some(&user))
        .json(&json!({"signal": "SIGKILL"}))
        .send();
    assert_eq!(killed.status, 200, "{}", killed.body);
    assert!(!has_host_details(&killed.json()), "kill: {}", killed.body);
    let waited = d
        .request("POST", &format!("/v1/sandboxes/{id}/wait"))
        .token(Some(&user))
        .send();
    assert_eq!(waited.status, 200, "{}", waited.body);
    assert!(!has_host_details(&waited.json()), "wait: {}", waited.body);
}
sandboxd_tests::both_modes!(host_details_are_for_admins);

/// Issue 12 finding 2 (daemon side): the files the daemon writes at the top of its state
/// directory, the database (every tenant's specs with their env values, and the token table)
/// with its `-wal` and `-shm`, and `admin.token`, are private to the daemon's user after a
/// start and a sandbox run. Files below `sandboxes/` and `images/` are the helper's and the
/// images' (see the report of this change); they are listed on failure, not checked here.
fn state_files_are_private(mode: Mode) {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start(mode);
    d.run(&["sh", "-c", "echo secret-env=$SECRET"]);
    let mut open_files = Vec::new();
    for entry in std::fs::read_dir(&d.state_dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
            open_files.push(format!(
                "{} {:o}",
                entry.path().display(),
                meta.permissions().mode() & 0o7777
            ));
        }
    }
    for name in [
        "sandboxd.db",
        "sandboxd.db-wal",
        "sandboxd.db-shm",
        "admin.token",
    ] {
        let path = d.state_dir.join(name);
        assert!(path.exists(), "{} is missing", path.display());
    }
    // What lies deeper (the helper's logs and status, images) is reported, not asserted.
    let mut stack = vec![d.state_dir.clone()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.is_dir() && dir.starts_with(&d.state_dir) && !meta.file_type().is_symlink() {
                if !entry.path().ends_with("rootfs") && !entry.path().ends_with("work") {
                    stack.push(entry.path());
                }
            } else if meta.is_file() && meta.permissions().mode() & 0o044 != 0 && dir != d.state_dir
            {
                eprintln!(
                    "below the state directory, readable by group or others: {} {:o}",
                    entry.path().display(),
                    meta.permissions().mode() & 0o7777
                );
            }
        }
    }
    assert!(
        open_files.is_empty(),
        "files of the state directory readable beyond the daemon's user: {open_files:?}"
    );
}
sandboxd_tests::both_modes!(state_files_are_private);
