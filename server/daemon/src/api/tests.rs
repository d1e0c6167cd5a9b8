//! Handler tests: the router on a fake helper and a temporary database, driven with `oneshot`.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use http_body_util::BodyExt;
use sandboxd_api::{ErrorBody, Sandbox, SandboxList, SandboxState};
use sandboxd_protocol::wire::{Mode, SpawnLimits};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::auth::LocalPeer;
use super::{app, routes, AppState};
use crate::helper_client::{FakeHelper, FakeSpawn};
use crate::lifetime::FakeClock;
use crate::limits::LimitPolicy;
use crate::sandboxes::Service;
use crate::store::Store;

struct TestApp {
    router: axum::Router,
    svc: Arc<Service>,
    helper: Arc<FakeHelper>,
    clock: Arc<FakeClock>,
    _dir: tempfile::TempDir,
}

/// A service on `helper` with a fake clock that starts at the wall clock's now.
fn service(
    store: &Store,
    helper: Arc<FakeHelper>,
    dir: &std::path::Path,
    policy: LimitPolicy,
) -> (Arc<Service>, Arc<FakeClock>) {
    let clock = FakeClock::at(crate::now_unix_ms());
    let svc = Service::new(store.clone(), helper, clock.clone(), dir, 4, policy);
    (svc, clock)
}

fn app_state(store: &Store, svc: &Arc<Service>) -> AppState {
    let auth = Arc::new(crate::auth::Auth::new(store.clone(), svc.clock()));
    AppState::new(Arc::clone(svc), auth)
}

async fn test_app(spawn: FakeSpawn) -> TestApp {
    test_app_with(spawn, &["memory", "cpus", "pids"], LimitPolicy::default()).await
}

async fn test_app_with(spawn: FakeSpawn, enforceable: &[&str], policy: LimitPolicy) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("sandboxd.db")).await.unwrap();
    let helper = FakeHelper::with_limits(dir.path(), Mode::Privileged, spawn, enforceable);
    let (svc, clock) = service(&store, helper.clone(), dir.path(), policy);
    svc.check_host_limits().await.unwrap();
    svc.start_reaper();
    TestApp {
        router: app(app_state(&store, &svc)),
        svc,
        helper,
        clock,
        _dir: dir,
    }
}

impl TestApp {
    /// Send a request; one without an `Authorization` header goes as the daemon's own user over
    /// the unix socket ([`LocalPeer`]: admin of tenant `default`).
    async fn send(&self, mut req: Request<Body>) -> (StatusCode, Vec<u8>) {
        if !req.headers().contains_key(header::AUTHORIZATION) {
            req.extensions_mut().insert(LocalPeer);
        }
        self.send_unauthenticated(req).await
    }

    /// Send a request exactly as given.
    async fn send_unauthenticated(&self, req: Request<Body>) -> (StatusCode, Vec<u8>) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, body)
    }

    async fn json(&self, method: Method, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let (status, bytes) = self.send(req.body(body).unwrap()).await;
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, value)
    }

    async fn raw(
        &self,
        method: Method,
        uri: &str,
        ct: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(ct) = ct {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        self.send(req.body(Body::from(body)).unwrap()).await
    }
}

/// The response is the API's error shape with this status and code.
fn assert_error(status: StatusCode, body: &[u8], want_status: StatusCode, want_code: &str) {
    let err: ErrorBody = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not an error body: {}", String::from_utf8_lossy(body)));
    assert_eq!(
        (status, err.error.code.as_str()),
        (want_status, want_code),
        "{}",
        err.error.message
    );
}

#[tokio::test]
async fn create_get_wait_list_delete() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes?wait=true",
            Some(json!({"command": ["echo", "hi"], "name": "web", "labels": {"team": "a"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let sb: Sandbox = serde_json::from_value(body).unwrap();
    assert_eq!(sb.state, SandboxState::Exited);
    assert_eq!(sb.exit_code, Some(0));
    assert_eq!(sb.hostname, "web");
    assert_eq!(sb.host_uid, Some(100_000_000));
    assert_eq!(sb.init_pid, Some(4242));

    let (status, body) = app.json(Method::GET, "/v1/sandboxes/web", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], json!(sb.id));
    let (status, body) = app
        .json(Method::POST, &format!("/v1/sandboxes/{}/wait", sb.id), None)
        .await;
    assert_eq!(
        (status, body["state"].clone()),
        (StatusCode::OK, json!("exited"))
    );

    for _ in 0..2 {
        let (status, _) = app
            .json(
                Method::POST,
                "/v1/sandboxes",
                Some(json!({"command": ["true"]})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (status, body) = app.json(Method::GET, "/v1/sandboxes?limit=2", None).await;
    assert_eq!(status, StatusCode::OK);
    let page: SandboxList = serde_json::from_value(body).unwrap();
    assert_eq!(page.items.len(), 2);
    let cursor = page.next_cursor.unwrap();
    let (_, body) = app
        .json(
            Method::GET,
            &format!("/v1/sandboxes?limit=2&cursor={cursor}"),
            None,
        )
        .await;
    let page: SandboxList = serde_json::from_value(body).unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].id, sb.id);
    assert!(page.next_cursor.is_none());
    let (_, body) = app
        .json(Method::GET, "/v1/sandboxes?label=team=a&state=exited", None)
        .await;
    assert_eq!(body["items"].as_array().unwrap().len(), 1);

    let (status, body) = app.json(Method::POST, "/v1/sandboxes/web/kill", None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("not_running"))
    );

    let (status, _) = app.json(Method::DELETE, "/v1/sandboxes/web", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = app
        .raw(
            Method::DELETE,
            &format!("/v1/sandboxes/{}", sb.id),
            None,
            vec![],
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

/// method, uri, content type, body, expected status, expected code.
type Case = (
    Method,
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    StatusCode,
    &'static str,
);

#[tokio::test]
async fn client_mistakes_get_the_error_shape() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let json_ct = Some("application/json");
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/sandboxes",
            json_ct,
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/sandboxes",
            json_ct,
            br#"{"command":["x"],"bogus":1}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/sandboxes",
            json_ct,
            br#"{"command":"x"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/sandboxes",
            json_ct,
            br#"{"command":[]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::POST,
            "/v1/sandboxes",
            json_ct,
            vec![b' '; 2 * 1024 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/v1/sandboxes",
            Some("text/plain"),
            br#"{"command":["x"]}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/sandboxes",
            None,
            br#"{"command":["x"]}"#.to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/sandboxes?wait=maybe",
            json_ct,
            br#"{"command":["x"]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/sandboxes/00000000-0000-0000-0000-000000000000",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/sandboxes/nope",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/sandboxes/nope/logs",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::POST,
            "/v1/sandboxes/nope/wait",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/sandboxes?state=sleeping",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/sandboxes?limit=0",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/sandboxes?cursor=zzz",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::GET,
            "/v1/sandboxes?label=novalue",
            None,
            vec![],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            Method::PUT,
            "/v1/sandboxes",
            None,
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/v1/sandboxes/x/kill",
            None,
            vec![],
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            Method::GET,
            "/v2/nothing",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/",
            None,
            vec![],
            StatusCode::NOT_FOUND,
            "not_found",
        ),
    ];
    for (method, uri, ct, body, want_status, want_code) in cases {
        let (status, got) = app.raw(method.clone(), uri, ct, body).await;
        assert_error(status, &got, want_status, want_code);
    }
}

#[tokio::test]
async fn names_conflict_and_signals_are_checked() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let create = json!({"command": ["true"], "name": "dup"});
    let (status, _) = app
        .json(Method::POST, "/v1/sandboxes", Some(create.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = app.json(Method::POST, "/v1/sandboxes", Some(create)).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("conflict"))
    );
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes/dup/kill",
            Some(json!({"signal": "SIGSEGV"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_request"))
    );
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes/dup/kill",
            Some(json!({"sig": "TERM"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn spawn_failures_are_500_and_recorded() {
    let app = test_app(FakeSpawn::Fail).await;
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"], "name": "f"})),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::INTERNAL_SERVER_ERROR, json!("spawn_failed"))
    );
    // The answer says what failed (a client printing only it, like sbx run, shows the cause).
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("fake setup failure"), "{message}");
    let (_, body) = app.json(Method::GET, "/v1/sandboxes/f", None).await;
    assert_eq!(body["state"], json!("failed"));
    assert_eq!(body["reason"], json!("spawn_failed"));
    assert_eq!(body["error"], json!("fake setup failure"));
    // The uid slot is free again: four more creations fit in the four slots... and fail alike.
    let (status, _) = app
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn info_health_and_logs() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (status, body) = app.json(Method::GET, "/healthz", None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = app.json(Method::GET, "/v1/info", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["mode"], json!("privileged"));
    assert_eq!(body["network_modes"], json!(["none", "bridge"]));
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes?wait=true",
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = body["id"].as_str().unwrap().to_owned();
    let (status, bytes) = app
        .raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/logs?follow=true"),
            None,
            vec![],
        )
        .await;
    assert_eq!((status, bytes), (StatusCode::OK, vec![]));
    let (status, body) = app
        .raw(
            Method::GET,
            &format!("/v1/sandboxes/{id}/logs?stream=both"),
            None,
            vec![],
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
}

/// (method, path) pairs of the spec, with `{param}` kept as written.
fn spec_routes() -> BTreeSet<(String, String)> {
    let doc: serde_yaml::Value = serde_yaml::from_str(super::OPENAPI_YAML).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if ["get", "post", "put", "delete", "patch", "head", "options"].contains(&method) {
                out.insert((method.to_uppercase(), path.as_str().unwrap().to_owned()));
            }
        }
    }
    out
}

#[tokio::test]
async fn openapi_and_router_agree() {
    let spec = spec_routes();
    let table: BTreeSet<(String, String)> = routes()
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    assert_eq!(spec, table, "openapi.yaml and routes() differ");

    // Every route in the spec reaches a handler, not the 404/405 fallbacks.
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    for (method, path) in &spec {
        let uri = path.replace("{id}", "fallback-probe");
        let req = Request::builder()
            .method(method.as_str())
            .uri(&uri)
            .body(Body::empty())
            .unwrap();
        let (status, body) = app.send(req).await;
        if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
            let err: ErrorBody = serde_json::from_slice(&body).unwrap();
            assert!(
                err.error.code.as_str() != "method_not_allowed"
                    && err.error.message != "no such route",
                "{method} {uri} hit a fallback"
            );
        }
    }
}

#[tokio::test]
async fn websocket_streams_backlog_then_log_end() {
    use futures_util::StreamExt;
    use sandboxd_protocol::logindex::Record;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("sandboxd.db")).await.unwrap();
    let helper = FakeHelper::new(dir.path(), Mode::Rootless, FakeSpawn::ExitAtOnce);
    let (svc, _clock) = service(&store, helper, dir.path(), LimitPolicy::default());
    let valid = crate::validate::ValidCreate::parse(
        serde_json::from_value(json!({"command": ["true"]})).unwrap(),
    )
    .unwrap();
    let sb = svc.create("default", valid, true).await.unwrap();
    // Write output in the monitor's format: bytes first, then the index record.
    let sdir = svc.dir(sb.id);
    let mut log = Vec::new();
    let mut idx = Vec::new();
    for (ch, data) in [(1u8, &b"ab"[..]), (1, b"cd"), (2, b"E"), (1, b"f")] {
        log.extend_from_slice(data);
        idx.extend_from_slice(
            &Record {
                channel: ch,
                len: data.len() as u32,
            }
            .encode(),
        );
    }
    std::fs::write(sdir.output_log(), &log).unwrap();
    std::fs::write(sdir.output_index(), &idx).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = app_state(&store, &svc);
    // Browsers cannot set headers on a websocket: a single-use ticket in the query instead.
    let (_, secret) = state
        .auth
        .create_token("default", sandboxd_api::Role::User, None)
        .await
        .unwrap();
    let principal = state.auth.check_token(&secret).await.unwrap().unwrap();
    let target = crate::auth::TicketTarget {
        id: sb.id.to_string(),
        name: None,
    };
    let (ticket, _) = state.auth.issue_ticket(principal, target).unwrap();
    let router = app(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    let plain = format!("ws://{addr}/v1/sandboxes/{}/logs?offset=1", sb.id);
    match tokio_tungstenite::connect_async(plain.clone()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("{other:?}"),
    }
    let url = format!("{plain}&ticket={ticket}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url.clone()).await.unwrap();
    // Used up.
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("{other:?}"),
    }
    let mut got = Vec::new();
    while let Some(msg) = ws.next().await {
        match msg.unwrap() {
            Message::Binary(b) => got.push(b.to_vec()),
            Message::Text(t) => got.push(t.as_bytes().to_vec()),
            Message::Close(frame) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1000));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(got[0], b"\x01bcd");
    assert_eq!(got[1], b"\x02E");
    assert_eq!(got[2], b"\x01f");
    let end: sandboxd_api::LogEnd = serde_json::from_slice(&got[3]).unwrap();
    assert_eq!(end.offset, 6);
    assert_eq!(end.exit_code, Some(0));
    assert_eq!(got.len(), 4);
}

impl TestApp {
    /// The limits of the last `Spawn` the fake helper received.
    fn last_spawn_limits(&self) -> SpawnLimits {
        let requests = self.helper.requests.lock().unwrap();
        requests
            .iter()
            .rev()
            .find_map(|r| match r {
                sandboxd_protocol::wire::Request::Spawn(s) => Some(s.limits),
                _ => None,
            })
            .expect("no spawn request")
    }

    /// POST /v1/sandboxes with these `limits` (and other top-level fields).
    async fn create(&self, extra: Value) -> (StatusCode, Value) {
        let mut body = json!({"command": ["true"]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        self.json(Method::POST, "/v1/sandboxes", Some(body)).await
    }
}

fn code_of(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn malformed_limits_are_400() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    for extra in [
        json!({"limits": {"memory_bytes": 1000}}),
        json!({"limits": {"cpus": 0}}),
        json!({"limits": {"cpus": 2000}}),
        json!({"limits": {"pids": 0}}),
        json!({"limits": {"output_bytes": 10}}),
        json!({"limits": {"memory": 10}}),
        json!({"ttl_secs": 0}),
        json!({"remove_after_exit_secs": 0}),
        json!({"ttl_secs": 400_000_000u64}),
    ] {
        let (status, body) = app.create(extra.clone()).await;
        assert_eq!(
            (status, code_of(&body)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{extra}: {body}"
        );
    }
}

#[tokio::test]
async fn limits_above_maxima_are_422_naming_the_limit() {
    let policy = LimitPolicy {
        max_memory: Some(4 << 30),
        max_cpus: Some(2.0),
        max_pids: Some(100),
        max_output_bytes: 1 << 20,
        default_output_bytes: 1 << 20,
        max_timeout_secs: Some(60),
        max_ttl_secs: Some(3600),
        ..LimitPolicy::default()
    };
    let app = test_app_with(FakeSpawn::ExitAtOnce, &["memory", "cpus", "pids"], policy).await;
    let (status, body) = app
        .create(json!({"limits": {"memory_bytes": 10u64 << 30}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(code_of(&body), "limit_exceeded");
    assert_eq!(
        body["error"]["message"],
        json!("limits.memory_bytes: 10737418240 is above this daemon's maximum of 4294967296")
    );
    for (extra, field) in [
        (json!({"limits": {"cpus": 4}}), "limits.cpus"),
        (json!({"limits": {"pids": 101}}), "limits.pids"),
        (
            json!({"limits": {"output_bytes": 2 << 20}}),
            "limits.output_bytes",
        ),
        (
            json!({"limits": {"timeout_secs": 61}}),
            "limits.timeout_secs",
        ),
        (json!({"ttl_secs": 3601}), "ttl_secs"),
    ] {
        let (status, body) = app.create(extra.clone()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{extra}: {body}");
        assert_eq!(code_of(&body), "limit_exceeded");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(field), "{msg}");
    }
    // Nothing was created by the refused requests.
    let (_, body) = app.json(Method::GET, "/v1/sandboxes", None).await;
    assert_eq!(body["items"], json!([]));
    // At the maximum is fine, and the limits reach the helper.
    let (status, body) = app
        .create(json!({"limits": {"memory_bytes": 4u64 << 30, "cpus": 0.5, "pids": 100}}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        app.last_spawn_limits(),
        SpawnLimits {
            memory_bytes: Some(4 << 30),
            cpu_millis: Some(500),
            pids: Some(100),
            output_bytes: 1 << 20,
            disk_bytes: None,
        }
    );
}

#[tokio::test]
async fn unenforceable_limits_are_422_and_defaults_only_apply_where_enforceable() {
    let policy = LimitPolicy {
        default_memory: Some(256 << 20),
        default_cpus: Some(1.0),
        ..LimitPolicy::default()
    };
    // This host enforces cpus only.
    let app = test_app_with(FakeSpawn::ExitAtOnce, &["cpus"], policy.clone()).await;
    let (_, info) = app.json(Method::GET, "/v1/info", None).await;
    assert_eq!(info["limits"], json!(["cpus"]));
    for (extra, field) in [
        (
            json!({"limits": {"memory_bytes": 1u64 << 30}}),
            "limits.memory_bytes",
        ),
        (json!({"limits": {"pids": 10}}), "limits.pids"),
        (
            json!({"limits": {"disk_bytes": 1u64 << 30}}),
            "limits.disk_bytes",
        ),
    ] {
        let (status, body) = app.create(extra.clone()).await;
        assert_eq!(
            (status, code_of(&body)),
            (StatusCode::UNPROCESSABLE_ENTITY, "limit_unenforceable"),
            "{extra}: {body}"
        );
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(field), "{msg}");
    }
    let (status, body) = app.create(json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        app.last_spawn_limits(),
        SpawnLimits {
            memory_bytes: None,
            cpu_millis: Some(1000),
            pids: None,
            output_bytes: 64 << 20,
            disk_bytes: None,
        }
    );
    assert_eq!(
        body["spec"]["limits"],
        json!({"cpus": 1.0, "output_bytes": 64 << 20})
    );

    // Where everything is enforceable, every default applies and shows in the spec.
    let app = test_app_with(FakeSpawn::ExitAtOnce, &["memory", "cpus", "pids"], policy).await;
    let (status, body) = app.create(json!({"limits": {"pids": 7}})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        app.last_spawn_limits(),
        SpawnLimits {
            memory_bytes: Some(256 << 20),
            cpu_millis: Some(1000),
            pids: Some(7),
            output_bytes: 64 << 20,
            disk_bytes: None,
        }
    );
    assert_eq!(body["spec"]["limits"]["memory_bytes"], json!(256 << 20));
    // disk_bytes is never enforceable in host mode.
    let (status, body) = app
        .create(json!({"limits": {"disk_bytes": 1u64 << 30}}))
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "limit_unenforceable")
    );
}

#[tokio::test]
async fn stats_live_and_after_exit() {
    // Ended: the figures status.json recorded, stored in the database.
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes?wait=true",
            Some(json!({"command": ["true"], "name": "done"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["output_truncated"], json!(false));
    let (status, body) = app
        .json(Method::GET, "/v1/sandboxes/done/stats", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let stats: sandboxd_api::Stats = serde_json::from_value(body).unwrap();
    assert_eq!(stats.memory_peak_bytes, Some(2 << 20));
    assert_eq!(stats.cpu_usec, Some(1234));
    assert_eq!(stats.pids_peak, Some(3));
    assert_eq!(stats.disk_bytes, Some(4096));
    assert!(!stats.output_truncated);
    let (status, body) = app
        .json(Method::GET, "/v1/sandboxes/nope/stats", None)
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "not_found")
    );

    // Running: asked of the helper.
    let app = test_app(FakeSpawn::Run).await;
    let (status, body) = app.create(json!({"name": "live"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["state"], json!("running"));
    let (status, body) = app
        .json(Method::GET, "/v1/sandboxes/live/stats", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["memory_bytes"], json!(1 << 20));
    assert!(app
        .helper
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| matches!(r, sandboxd_protocol::wire::Request::Stats { .. })));
    let (status, _) = app.json(Method::DELETE, "/v1/sandboxes/live", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn extend_is_validated() {
    let policy = LimitPolicy {
        max_ttl_secs: Some(3600),
        ..LimitPolicy::default()
    };
    let app = test_app_with(FakeSpawn::ExitAtOnce, &[], policy).await;
    let (status, _) = app.create(json!({"name": "e"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let extend = |body: Value| {
        let app = &app;
        async move {
            app.json(Method::POST, "/v1/sandboxes/e/extend", Some(body))
                .await
        }
    };
    let (status, body) = extend(json!({"ttl_secs": 0})).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (status, body) = extend(json!({"ttl": 10})).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (status, body) = extend(json!({})).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (status, body) = extend(json!({"ttl_secs": 3601})).await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "limit_exceeded")
    );
    let (status, body) = extend(json!({"ttl_secs": 3600})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["name"], json!("e"));
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes/nope/extend",
            Some(json!({"ttl_secs": 10})),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "not_found")
    );
}

/// Poll (in the test only) until `GET` answers 404; generous bound.
async fn gone_within(app: &TestApp, name: &str, secs: u64) -> bool {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        let (status, _) = app
            .json(Method::GET, &format!("/v1/sandboxes/{name}"), None)
            .await;
        if status == StatusCode::NOT_FOUND {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// After a reaper pass at the clock's current time: `name` is neither being removed nor gone.
async fn survives_a_reaper_pass(app: &TestApp, name: &str) {
    app.svc.reap_due().await.unwrap();
    let (status, body) = app
        .json(Method::GET, &format!("/v1/sandboxes/{name}"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{name} is gone: {body}");
    let id: uuid::Uuid = serde_json::from_value(body["id"].clone()).unwrap();
    assert!(!app.svc.is_reaping(id), "{name} is being removed");
}

/// The reaper on a fake clock: deadlines pass when the test advances it, never in real time.
#[tokio::test]
async fn reaper_removes_after_exit_and_on_ttl() {
    use std::time::Duration;
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (status, body) = app
        .create(json!({"name": "rm", "remove_after_exit_secs": 1}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id: uuid::Uuid = serde_json::from_value(body["id"].clone()).unwrap();
    app.svc.wait(id).await.unwrap();
    let (status, body) = app.create(json!({"name": "keep"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A millisecond early: nothing happens.
    app.clock.advance(Duration::from_millis(999));
    survives_a_reaper_pass(&app, "rm").await;
    app.clock.advance(Duration::from_millis(1));
    assert!(
        gone_within(&app, "rm", 15).await,
        "remove_after_exit did not remove"
    );
    survives_a_reaper_pass(&app, "keep").await;

    // A running sandbox whose TTL runs out is killed with reason `ttl`, then deleted.
    let app = test_app(FakeSpawn::Run).await;
    let (status, body) = app.create(json!({"name": "t", "ttl_secs": 1})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id: uuid::Uuid = serde_json::from_value(body["id"].clone()).unwrap();
    app.clock.advance(Duration::from_millis(999));
    survives_a_reaper_pass(&app, "t").await;
    app.clock.advance(Duration::from_millis(1));
    let ended = tokio::time::timeout(Duration::from_secs(15), app.svc.wait(id))
        .await
        .expect("ttl did not end the sandbox");
    // The row may already be gone when the waiter reads it; if not, the reason is `ttl`.
    if let Ok(sb) = ended {
        assert_eq!(sb.reason, Some(sandboxd_api::EndReason::Ttl));
    }
    assert!(gone_within(&app, "t", 15).await, "ttl did not delete");

    // /extend pushes a TTL out; the sandbox survives its original deadline.
    let (status, _) = app.create(json!({"name": "x", "ttl_secs": 1})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = app
        .json(
            Method::POST,
            "/v1/sandboxes/x/extend",
            Some(json!({"ttl_secs": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    app.clock.advance(Duration::from_millis(1500));
    survives_a_reaper_pass(&app, "x").await;
    let (status, body) = app.json(Method::GET, "/v1/sandboxes/x", None).await;
    assert_eq!(
        (status, body["state"].clone()),
        (StatusCode::OK, json!("running"))
    );
    // ... until the extended deadline.
    app.clock.advance(Duration::from_secs(3600));
    assert!(
        gone_within(&app, "x", 15).await,
        "the extended ttl did not delete"
    );
}

impl TestApp {
    /// A request with `Authorization: Bearer <token>` (or none), never as the local peer.
    async fn as_token(
        &self,
        token: Option<&str>,
        method: Method,
        uri: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = match body {
            Some(b) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let resp = self
            .router
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            assert!(resp.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .unwrap()
                .starts_with("Bearer"));
        }
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, value)
    }

    /// Create a token as the local admin; returns (id, secret).
    async fn token(&self, tenant: &str, role: &str, ttl: Option<u64>) -> (String, String) {
        let mut body = json!({"tenant": tenant, "role": role});
        if let Some(t) = ttl {
            body["ttl_secs"] = json!(t);
        }
        let (status, body) = self.json(Method::POST, "/v1/tokens", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let created: sandboxd_api::TokenCreated = serde_json::from_value(body).unwrap();
        (created.id, created.token)
    }
}

#[tokio::test]
async fn requests_need_a_valid_token() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (revoked_id, revoked) = app.token("default", "admin", None).await;
    let (status, _) = app
        .json(Method::DELETE, &format!("/v1/tokens/{revoked_id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, expired) = app.token("default", "admin", Some(1)).await;
    app.clock.advance(std::time::Duration::from_millis(1100));
    let (_, good) = app.token("default", "admin", None).await;
    let sample = [
        (Method::GET, "/v1/info"),
        (Method::GET, "/openapi.yaml"),
        (Method::GET, "/v1/sandboxes"),
        (Method::POST, "/v1/sandboxes"),
        (Method::GET, "/v1/sandboxes/x/logs"),
        (Method::DELETE, "/v1/sandboxes/x"),
        (Method::GET, "/v1/tokens"),
        (Method::POST, "/v1/tickets"),
        (Method::GET, "/no/such/route"),
    ];
    let bogus = "sbx_0000000000000000000000000000000000000000000000000000000000000000";
    for (method, uri) in &sample {
        for token in [
            None,
            Some("garbage"),
            Some(bogus),
            Some(&*revoked),
            Some(&*expired),
        ] {
            let (status, body) = app.as_token(token, method.clone(), uri, None).await;
            assert_eq!(
                (status, code_of(&body)),
                (StatusCode::UNAUTHORIZED, "unauthorized"),
                "{method} {uri} {token:?}"
            );
        }
    }
    let (status, _) = app.as_token(None, Method::GET, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .as_token(Some(&good), Method::GET, "/v1/info", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    // A ticket is no substitute for a token outside a websocket upgrade.
    let (status, created) = app
        .as_token(
            Some(&good),
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, ticket) = app
        .as_token(
            Some(&good),
            Method::POST,
            "/v1/tickets",
            Some(json!({"sandbox": created["id"]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ticket}");
    let t = ticket["ticket"].as_str().unwrap();
    let (status, _) = app
        .as_token(
            None,
            Method::GET,
            &format!("/v1/sandboxes?ticket={t}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn token_api_is_for_admins() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (user_id, user) = app.token("a", "user", Some(3600)).await;
    let (_, admin) = app.token("default", "admin", None).await;
    for (method, uri, body) in [
        (Method::GET, "/v1/tokens", None),
        (
            Method::POST,
            "/v1/tokens",
            Some(json!({"tenant": "a", "role": "admin"})),
        ),
        (Method::DELETE, "/v1/tokens/x", None),
        (
            Method::PUT,
            "/v1/tenants/a/quota",
            Some(json!({"max_sandboxes": 100})),
        ),
    ] {
        let (status, body) = app.as_token(Some(&user), method, uri, body).await;
        assert_eq!(
            (status, code_of(&body)),
            (StatusCode::FORBIDDEN, "forbidden")
        );
    }
    let (status, body) = app
        .as_token(Some(&admin), Method::GET, "/v1/tokens", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let list: sandboxd_api::TokenList = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(list.items.len(), 2);
    assert!(!body.to_string().contains(&user), "a secret was listed");
    let (status, body) = app
        .as_token(
            Some(&admin),
            Method::POST,
            "/v1/tokens",
            Some(json!({"tenant": "bad tenant", "role": "user"})),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (status, _) = app
        .as_token(Some(&admin), Method::DELETE, "/v1/tokens/nope", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = app
        .as_token(Some(&user), Method::GET, "/v1/sandboxes", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app
        .as_token(
            Some(&admin),
            Method::DELETE,
            &format!("/v1/tokens/{user_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app
        .as_token(Some(&user), Method::GET, "/v1/sandboxes", None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn tenants_see_only_their_sandboxes() {
    let app = test_app(FakeSpawn::Run).await;
    let (_, a) = app.token("a", "user", None).await;
    let (_, b) = app.token("b", "user", None).await;
    let (status, body) = app
        .as_token(
            Some(&a),
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["sleep", "1"], "name": "mine"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    for key in [id.as_str(), "mine"] {
        for (method, uri, body) in [
            (Method::GET, format!("/v1/sandboxes/{key}"), None),
            (Method::POST, format!("/v1/sandboxes/{key}/wait"), None),
            (Method::POST, format!("/v1/sandboxes/{key}/kill"), None),
            (Method::GET, format!("/v1/sandboxes/{key}/logs"), None),
            (Method::GET, format!("/v1/sandboxes/{key}/stats"), None),
            (
                Method::POST,
                format!("/v1/sandboxes/{key}/extend"),
                Some(json!({"ttl_secs": 60})),
            ),
            (Method::DELETE, format!("/v1/sandboxes/{key}"), None),
        ] {
            let (status, body) = app.as_token(Some(&b), method.clone(), &uri, body).await;
            assert_eq!(
                (status, code_of(&body)),
                (StatusCode::NOT_FOUND, "not_found"),
                "{method} {uri}"
            );
            assert_eq!(body["error"]["message"], json!("no such sandbox"));
        }
    }
    for (token, tenant, want) in [(&b, "", 0), (&b, "?tenant=a", 0), (&a, "", 1)] {
        let (_, body) = app
            .as_token(
                Some(token),
                Method::GET,
                &format!("/v1/sandboxes{tenant}"),
                None,
            )
            .await;
        assert_eq!(body["items"].as_array().unwrap().len(), want, "{tenant}");
    }
    // The admin sees everything and may filter by tenant.
    let (_, body) = app.json(Method::GET, "/v1/sandboxes?tenant=b", None).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 0);
    let (_, body) = app.json(Method::GET, "/v1/sandboxes?tenant=a", None).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    let (status, _) = app
        .as_token(
            Some(&a),
            Method::GET,
            &format!("/v1/sandboxes/{id}/stats"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Names are unique per tenant: another tenant may use the same one.
    let (status, body) = app
        .as_token(
            Some(&b),
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"], "name": "mine"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn quotas_answer_429() {
    let app = test_app(FakeSpawn::Run).await;
    let (_, a) = app.token("a", "user", None).await;
    let (status, body) = app
        .json(
            Method::PUT,
            "/v1/tenants/a/quota",
            Some(json!({"max_sandboxes": 2, "max_memory_bytes": 300u64 << 20})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["max_sandboxes"], json!(2));
    let create = |mem: Option<u64>| {
        let mut body = json!({"command": ["sleep", "9"]});
        if let Some(m) = mem {
            body["limits"] = json!({"memory_bytes": m});
        }
        body
    };
    // No daemon --max-memory: a memory quota needs a memory limit.
    let (status, body) = app
        .as_token(Some(&a), Method::POST, "/v1/sandboxes", Some(create(None)))
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::UNPROCESSABLE_ENTITY, "memory_limit_required")
    );
    let (status, _) = app
        .as_token(
            Some(&a),
            Method::POST,
            "/v1/sandboxes",
            Some(create(Some(200 << 20))),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = app
        .as_token(
            Some(&a),
            Method::POST,
            "/v1/sandboxes",
            Some(create(Some(200 << 20))),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded")
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("memory"));
    let (status, _) = app
        .as_token(
            Some(&a),
            Method::POST,
            "/v1/sandboxes",
            Some(create(Some(100 << 20))),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = app
        .as_token(
            Some(&a),
            Method::POST,
            "/v1/sandboxes",
            Some(create(Some(1 << 20))),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded")
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("live sandboxes"));
    // Other tenants are not affected.
    let (status, _) = app.create(json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn created_sandboxes_start_once_and_bad_file_paths_never_reach_the_helper() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes?wait=true",
            Some(json!({"command": ["true"], "start": false})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["state"], "created");
    let id = body["id"].as_str().unwrap().to_string();
    // The helper prepared a directory and started nothing.
    assert!(app
        .helper
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| matches!(r, sandboxd_protocol::wire::Request::Prepare(_))));
    // Waiting on a sandbox that nothing runs in answers at once.
    let (status, body) = app
        .json(Method::POST, &format!("/v1/sandboxes/{id}/wait"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "created");
    let (status, body) = app
        .json(Method::GET, "/v1/sandboxes?state=created", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["items"].as_array().unwrap().len(), 1);

    for (method, uri) in [
        (
            Method::GET,
            format!("/v1/sandboxes/{id}/files?path=relative"),
        ),
        (
            Method::GET,
            format!("/v1/sandboxes/{id}/files?path=/work/../etc"),
        ),
        (Method::GET, format!("/v1/sandboxes/{id}/files")),
        (
            Method::PUT,
            format!("/v1/sandboxes/{id}/files?path=/etc/passwd"),
        ),
        (
            Method::PUT,
            format!("/v1/sandboxes/{id}/files?path=/work/a&mode=6755"),
        ),
        (Method::PUT, format!("/v1/sandboxes/{id}/archive?path=/tmp")),
        (
            Method::DELETE,
            format!("/v1/sandboxes/{id}/files?path=/work"),
        ),
        (
            Method::GET,
            format!("/v1/sandboxes/{id}/archive?path=/work&mode=0644"),
        ),
    ] {
        let req = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .body(Body::empty())
            .unwrap();
        let (status, body) = app.send(req).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert!(!app
        .helper
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| matches!(r, sandboxd_protocol::wire::Request::Files(_))));

    let (status, body) = app
        .json(Method::POST, &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(body["state"], "created");
    let (status, body) = app
        .json(Method::POST, &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["code"], "not_created");
    // The start rebuilt the same request from the stored spec, marked as prepared.
    let spawned: Vec<_> = app
        .helper
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| match r {
            sandboxd_protocol::wire::Request::Spawn(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(spawned.len(), 1);
    assert!(spawned[0].prepared);
    assert_eq!(spawned[0].command, vec!["true".to_string()]);

    // A created sandbox can be deleted without ever running.
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"], "start": false})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let other = body["id"].as_str().unwrap().to_string();
    let req = Request::builder()
        .method(Method::DELETE)
        .uri(format!("/v1/sandboxes/{other}"))
        .body(Body::empty())
        .unwrap();
    let (status, _) = app.send(req).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn images_import_name_use_and_delete_with_409_in_use() {
    use sha2::Digest;
    let policy = LimitPolicy {
        max_image_bytes: 1 << 20,
        ..LimitPolicy::default()
    };
    let t = test_app_with(
        FakeSpawn::ExitAtOnce,
        &["memory", "cpus", "pids", "disk"],
        policy,
    )
    .await;
    let body = vec![7u8; 300_000];
    let (status, bytes) = t
        .raw(Method::POST, "/v1/images?name=base:1", None, body.clone())
        .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let image: sandboxd_api::Image = serde_json::from_slice(&bytes).unwrap();
    let digest = hex::encode(sha2::Sha256::digest(&body));
    assert_eq!(image.digest, format!("sha256:{digest}"));
    assert_eq!((image.archive_bytes, image.in_use_by), (300_000, 0));
    // Same name again, a missing or bad name, an empty or oversized body.
    for (uri, body, want, code) in [
        (
            "/v1/images?name=base:1",
            vec![1u8; 10],
            StatusCode::CONFLICT,
            "image_exists",
        ),
        (
            "/v1/images",
            vec![1u8; 10],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/images?name=-x",
            vec![1u8; 10],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
        (
            "/v1/images?name=empty",
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "bad_image",
        ),
        (
            "/v1/images?name=big",
            vec![0u8; 2 << 20],
            StatusCode::PAYLOAD_TOO_LARGE,
            "image_too_large",
        ),
    ] {
        let (status, bytes) = t.raw(Method::POST, uri, None, body).await;
        assert_eq!(status, want, "{uri}: {}", String::from_utf8_lossy(&bytes));
        let err: ErrorBody = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(err.error.code.as_str(), code, "{uri}");
    }
    // No upload is left behind.
    let uploads = t.svc.state_dir().join("uploads");
    assert_eq!(std::fs::read_dir(uploads).unwrap().count(), 0);

    // A sandbox from the image: the helper gets the digest; the image is in use until deleted.
    let (status, sandbox) = t
        .create(json!({"rootfs": {"image": "base:1", "readonly": true}, "limits": {"disk_bytes": 64 << 20}}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    let spawn = t
        .helper
        .requests
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find_map(|r| match r {
            sandboxd_protocol::wire::Request::Spawn(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(spawn.rootfs_image.as_deref(), Some(digest.as_str()));
    assert!(spawn.rootfs_readonly);
    assert_eq!(spawn.limits.disk_bytes, Some(64 << 20));
    let (_, got) = t.json(Method::GET, "/v1/images/base:1", None).await;
    assert_eq!(got["in_use_by"], 1);
    let (status, err) = t.json(Method::DELETE, "/v1/images/base:1", None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(err["error"]["code"], "image_in_use");
    let id = sandbox["id"].as_str().unwrap();
    let (status, _) = t
        .json(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = t.json(Method::DELETE, "/v1/images/base:1", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(t.helper.requests.lock().unwrap().iter().any(|r| matches!(
        r,
        sandboxd_protocol::wire::Request::DeleteImage { digest: d } if *d == digest
    )));
    let (status, list) = t.json(Method::GET, "/v1/images", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["images"], json!([]));
    // An unknown image, and a disk limit where the host cannot enforce one.
    let (status, err) = t.create(json!({"rootfs": {"image": "base:1"}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["error"]["code"], "unknown_image");
    let t = test_app(FakeSpawn::ExitAtOnce).await;
    let (status, err) = t.create(json!({"limits": {"disk_bytes": 64 << 20}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["error"]["code"], "limit_unenforceable");
    let (status, _) = t.create(json!({"limits": {"disk_bytes": 1 << 20}})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn network_requests_are_checked_allocated_and_shown() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    for bad in [
        json!({"mode": "bridge", "group": "Not A Group"}),
        json!({"mode": "none", "group": "g"}),
        json!({"mode": "none", "ports": [{"sandbox": 80}]}),
        json!({"mode": "bridge", "ports": [{"sandbox": 80, "host": 80}]}),
        json!({"mode": "bridge", "ports": [{"sandbox": 0}]}),
        json!({"mode": "bridge", "ports": [{"sandbox": 80}, {"sandbox": 80, "host": 2000}]}),
        json!({"mode": "host"}),
        json!({"mode": "bridge", "dns": "1.1.1.1"}),
    ] {
        let (status, body) = app
            .json(
                Method::POST,
                "/v1/sandboxes",
                Some(json!({"command": ["true"], "network": bad})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    // Well-formed, but outside the daemon's publish range (default 32768-60999): 422.
    for port in [6379, 32767, 61000] {
        let (status, body) = app
            .json(
                Method::POST,
                "/v1/sandboxes",
                Some(json!({"command": ["true"], "network": {
                    "mode": "bridge", "ports": [{"sandbox": 80, "host": port}]}})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{port}: {body}");
        assert_eq!(body["error"]["code"], "port_not_allowed");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("32768-60999"), "{message}");
    }
    let bridged = json!({"command": ["true"], "network": {
        "mode": "bridge", "group": "web", "ports": [{"sandbox": 8080, "host": 0}]}});
    for _ in 0..2 {
        let (status, body) = app
            .json(
                Method::POST,
                "/v1/sandboxes?wait=true",
                Some(bridged.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        // The first ended before the second came: its address was free again.
        assert_eq!(
            body["network"],
            json!({"mode": "bridge", "group": "web", "address": "10.88.0.2",
                   "gateway": "10.88.0.1", "ports": [{"sandbox": 8080, "host": 40000}]})
        );
    }
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes?wait=true",
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        body["network"],
        json!({"mode": "none", "group": null, "address": null, "gateway": null, "ports": []})
    );

    // Rootless: bridge mode is a clear 422 and nothing is stored.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("sandboxd.db")).await.unwrap();
    let helper = FakeHelper::new(dir.path(), Mode::Rootless, FakeSpawn::ExitAtOnce);
    let (svc, clock) = service(&store, helper.clone(), dir.path(), LimitPolicy::default());
    let rootless = TestApp {
        router: super::app(app_state(&store, &svc)),
        svc,
        helper,
        clock,
        _dir: dir,
    };
    let (status, body) = rootless
        .json(Method::POST, "/v1/sandboxes", Some(bridged))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], json!("network_unavailable"));
    assert!(store.ids().await.unwrap().is_empty());
}

mod egress;
mod sessions;

/// Send `req` (as the local admin unless it has a token) and keep the headers.
async fn send_with_headers(
    app: &TestApp,
    mut req: Request<Body>,
    local: bool,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    if local {
        req.extensions_mut().insert(LocalPeer);
    }
    let resp = app.router.clone().oneshot(req).await.unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, headers, body)
}

fn post_json(uri: &str, body: &Value) -> Request<Body> {
    Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

#[tokio::test]
async fn every_answer_has_a_request_id_echoed_when_valid_and_in_error_bodies() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let get = |id: Option<&str>| {
        let mut req = Request::builder().uri("/v1/sandboxes/none");
        if let Some(id) = id {
            req = req.header("x-request-id", id);
        }
        req.body(Body::empty()).unwrap()
    };
    // A client's valid id is echoed, in the header and in the error body.
    let (status, headers, body) = send_with_headers(&app, get(Some("trace-42.a:b")), true).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-request-id"], "trace-42.a:b");
    assert_eq!(body["error"]["request_id"], "trace-42.a:b");
    // None, or an unusable one: a fresh id (32 hex digits), different each time.
    let mut seen = BTreeSet::new();
    for given in [None, Some("has space"), Some("")] {
        let (_, headers, body) = send_with_headers(&app, get(given), true).await;
        let id = headers["x-request-id"].to_str().unwrap().to_owned();
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{id}"
        );
        assert_eq!(body["error"]["request_id"], id.as_str());
        assert!(seen.insert(id));
    }
    // Refusals of the authentication layer and successes carry it too.
    let (status, headers, body) = send_with_headers(&app, get(Some("no-token")), false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["x-request-id"], "no-token");
    assert_eq!(body["error"]["request_id"], "no-token");
    let req = Request::builder()
        .uri("/v1/info")
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = send_with_headers(&app, req, true).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains_key("x-request-id"));
    assert!(body.get("error").is_none());
}

#[tokio::test]
async fn version_and_readyz_need_no_token() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    for (uri, want) in [
        (
            "/version",
            json!({"version": env!("CARGO_PKG_VERSION"), "api": "v1"}),
        ),
        (
            "/readyz",
            json!({"status": "ready", "database": "ok", "helper": "ok"}),
        ),
    ] {
        let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
        let (status, _, body) = send_with_headers(&app, req, false).await;
        assert_eq!((status, body), (StatusCode::OK, want), "{uri}");
    }
    // Everything else still needs one.
    let req = Request::builder()
        .uri("/v1/info")
        .body(Body::empty())
        .unwrap();
    let (status, _, _) = send_with_headers(&app, req, false).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn every_201_names_its_resource_in_location() {
    let app = test_app(FakeSpawn::Run).await;
    let (status, headers, sandbox) = send_with_headers(
        &app,
        post_json("/v1/sandboxes", &json!({"command": ["sleep", "9"]})),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_owned();
    assert_eq!(
        headers[header::LOCATION],
        format!("/v1/sandboxes/{id}").as_str()
    );
    let (status, headers, exec) = send_with_headers(
        &app,
        post_json(
            &format!("/v1/sandboxes/{id}/execs"),
            &json!({"command": ["true"]}),
        ),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{exec}");
    let location = format!("/v1/sandboxes/{id}/execs/{}", exec["id"].as_str().unwrap());
    assert_eq!(headers[header::LOCATION], location.as_str());
    // The location answers.
    let (status, _) = app.json(Method::GET, &location, None).await;
    assert_eq!(status, StatusCode::OK);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/images?name=base:1")
        .body(Body::from(vec![1u8; 100]))
        .unwrap();
    let (status, headers, image) = send_with_headers(&app, req, true).await;
    assert_eq!(status, StatusCode::CREATED, "{image}");
    assert_eq!(headers[header::LOCATION], "/v1/images/base:1");
    let (status, headers, token) = send_with_headers(
        &app,
        post_json("/v1/tokens", &json!({"tenant": "t", "role": "user"})),
        true,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let location = format!("/v1/tokens/{}", token["id"].as_str().unwrap());
    assert_eq!(headers[header::LOCATION], location.as_str());
    let (status, _) = app.json(Method::DELETE, &location, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn wait_takes_a_condition_and_a_timeout() {
    let app = test_app(FakeSpawn::Run).await;
    let (status, sandbox) = app
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["sleep", "9"], "name": "w"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    let app = &app;
    let wait = |query: &'static str| async move {
        let uri = format!("/v1/sandboxes/w/wait?{query}");
        app.json(Method::POST, &uri, None).await
    };
    // Running already: `running` answers at once; `exited` runs out of time.
    let (status, body) = wait("condition=running&timeout=5").await;
    assert_eq!(
        (status, body["state"].as_str()),
        (StatusCode::OK, Some("running"))
    );
    let (status, body) = wait("timeout=0").await;
    assert_error(
        status,
        body.to_string().as_bytes(),
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
    );
    let (status, body) = wait("condition=removed&timeout=0").await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
    for bad in [
        "condition=paused",
        "timeout=3601",
        "timeout=-1",
        "timeout=soon",
        "other=1",
    ] {
        let (status, body) = app
            .json(Method::POST, &format!("/v1/sandboxes/w/wait?{bad}"), None)
            .await;
        assert_error(
            status,
            body.to_string().as_bytes(),
            StatusCode::BAD_REQUEST,
            "invalid_request",
        );
    }
    // `removed` answers once the sandbox is deleted, with it as last seen.
    let removed = {
        let router = app.router.clone();
        tokio::spawn(async move {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri("/v1/sandboxes/w/wait?condition=removed&timeout=30")
                .body(Body::empty())
                .unwrap();
            req.extensions_mut().insert(LocalPeer);
            let resp = router.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (status, _) = app.json(Method::DELETE, "/v1/sandboxes/w", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = removed.await.unwrap();
    assert_eq!(
        (status, body["name"].as_str()),
        (StatusCode::OK, Some("w")),
        "{body}"
    );
}

#[tokio::test]
async fn expires_at_shows_the_ttl_deadline_and_moves_with_extend() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (status, sandbox) = app
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"], "ttl_secs": 600})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{sandbox}");
    let sandbox: Sandbox = serde_json::from_value(sandbox).unwrap();
    let expires = sandbox.expires_at.expect("a ttl gives expires_at");
    let lifetime = expires - sandbox.created_at;
    assert!(
        (599..=601).contains(&lifetime.whole_seconds()),
        "{lifetime}"
    );
    let (status, extended) = app
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{}/extend", sandbox.id),
            Some(json!({"ttl_secs": 3600})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{extended}");
    let extended: Sandbox = serde_json::from_value(extended).unwrap();
    assert!(extended.expires_at.unwrap() > expires + time::Duration::seconds(2000));
    let (_, plain) = app
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert!(plain["expires_at"].is_null(), "{plain}");
}

#[tokio::test]
async fn image_quotas_answer_429_and_the_reserve_507() {
    let app = test_app(FakeSpawn::ExitAtOnce).await;
    let (status, body) = app
        .json(
            Method::PUT,
            "/v1/tenants/default/quota",
            Some(json!({"max_images": 2, "max_image_bytes": 100})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["max_images"].clone(), body["max_image_bytes"].clone()),
        (json!(2), json!(100))
    );
    let (_, body) = app
        .json(Method::GET, "/v1/tenants/default/quota", None)
        .await;
    assert_eq!(body["max_image_bytes"], json!(100));
    let import = |name: &str, len: usize| {
        let uri = format!("/v1/images?name={name}");
        let app = &app;
        async move { app.raw(Method::POST, &uri, None, vec![b'x'; len]).await }
    };
    // The fake stores an image of its upload's size: 60 of the 100 bytes.
    let (status, body) = import("a", 60).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    // 60 more would cross 100: stopped while unpacking (the cap the helper got was 40).
    let (status, body) = import("b", 60).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
    );
    let message = String::from_utf8_lossy(&body).into_owned();
    for part in ["max_image_bytes", "at most 100", "60 are in use"] {
        assert!(message.contains(part), "{part}: {message}");
    }
    let caps: Vec<Option<u64>> = app
        .helper
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| match r {
            sandboxd_protocol::wire::Request::ImportImage { max_bytes, .. } => Some(*max_bytes),
            _ => None,
        })
        .collect();
    assert_eq!(caps.last(), Some(&Some(40)), "{caps:?}");
    let (status, _) = import("b", 40).await;
    assert_eq!(status, StatusCode::CREATED);
    // Two images: the count is full, refused before any upload.
    let (status, body) = import("c", 1).await;
    assert_error(
        status,
        &body,
        StatusCode::TOO_MANY_REQUESTS,
        "quota_exceeded",
    );
    let message = String::from_utf8_lossy(&body).into_owned();
    assert!(
        message.contains("max_images") && message.contains("at most 2"),
        "{message}"
    );
    let (_, list) = app.json(Method::GET, "/v1/images", None).await;
    assert_eq!(list["images"].as_array().map(Vec::len), Some(2), "{list}");

    // Down to the free-space reserve: imports, creates and starts are 507, deletes work.
    let (status, created) = app
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"], "start": false})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    app.svc
        .set_min_free_space(crate::storage::Reserve::Percent(100.0));
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["error"]["code"], json!("insufficient_storage"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--min-free-space"),
        "{body}"
    );
    let id = created["id"].as_str().unwrap();
    let (status, _) = app
        .json(Method::POST, &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
    app.json(Method::PUT, "/v1/tenants/default/quota", Some(json!({})))
        .await;
    let (status, body) = import("d", 1).await;
    assert_error(
        status,
        &body,
        StatusCode::INSUFFICIENT_STORAGE,
        "insufficient_storage",
    );
    let (status, _) = app.json(Method::DELETE, "/v1/images/a", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app
        .json(Method::DELETE, &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    app.svc
        .set_min_free_space(crate::storage::Reserve::Bytes(0));
    let (status, _) = import("d", 1).await;
    assert_eq!(status, StatusCode::CREATED);
}
