//! Router tests of egress: `network.egress` on create, `PATCH /network`, denials, counters and
//! `/v1/info`, against a fake filter (a unix socket peer at `<state>/helper/egress.sock` that
//! speaks the control protocol). No root, no real filter.

use std::time::Duration;

use sandboxd_protocol::egress::{EgressStatus, FilterEvent, FilterRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use super::*;
use crate::limits::EgressTenants;

/// The filter's side of the control socket: each accepted connection says `ready`, and its
/// requests come out of `requests`; `events` go to the daemon on the latest connection.
struct FakeFilter {
    requests: mpsc::UnboundedReceiver<(usize, FilterRequest)>,
    events: mpsc::UnboundedSender<FilterEvent>,
    /// Closes the current connection (the daemon reconnects).
    cut: mpsc::UnboundedSender<()>,
}

impl FakeFilter {
    fn bind(state_dir: &std::path::Path) -> FakeFilter {
        let dir = state_dir.join("helper");
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("egress.sock")).unwrap();
        let (req_tx, requests) = mpsc::unbounded_channel();
        let (events, mut ev_rx) = mpsc::unbounded_channel::<FilterEvent>();
        let (cut, mut cut_rx) = mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                n += 1;
                let (read, mut write) = stream.into_split();
                let ready = serde_json::to_string(&FilterEvent::Ready { version: 1 }).unwrap();
                write
                    .write_all(format!("{ready}\n").as_bytes())
                    .await
                    .unwrap();
                let mut lines = BufReader::new(read).lines();
                loop {
                    tokio::select! {
                        line = lines.next_line() => match line {
                            Ok(Some(line)) => {
                                let req: FilterRequest = serde_json::from_str(&line).unwrap();
                                let _ = req_tx.send((n, req));
                            }
                            _ => break,
                        },
                        ev = ev_rx.recv() => {
                            let line = serde_json::to_string(&ev.unwrap()).unwrap();
                            write.write_all(format!("{line}\n").as_bytes()).await.unwrap();
                        }
                        _ = cut_rx.recv() => break,
                    }
                }
            }
        });
        FakeFilter {
            requests,
            events,
            cut,
        }
    }

    /// The next request the daemon sends, with the number of its connection.
    async fn next(&mut self) -> (usize, FilterRequest) {
        tokio::time::timeout(Duration::from_secs(10), self.requests.recv())
            .await
            .expect("no request reached the fake filter")
            .unwrap()
    }
}

/// A test app whose helper reports egress `available` (with a fake filter when it does).
async fn egress_app(
    available: bool,
    tenants: EgressTenants,
    spawn: FakeSpawn,
) -> (TestApp, Option<FakeFilter>, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("sandboxd.db")).await.unwrap();
    let helper = FakeHelper::with_limits(dir.path(), Mode::Privileged, spawn, &["memory"]);
    *helper.egress.lock().unwrap() = if available {
        EgressStatus {
            available: true,
            ..Default::default()
        }
    } else {
        EgressStatus {
            available: false,
            reason: Some("no --egress-dns was given".into()),
            ..Default::default()
        }
    };
    let filter = available.then(|| FakeFilter::bind(dir.path()));
    let policy = LimitPolicy {
        egress_tenants: tenants,
        ..LimitPolicy::default()
    };
    let (svc, clock) = service(&store, helper.clone(), dir.path(), policy);
    svc.check_host_limits().await.unwrap();
    svc.start_egress().await.unwrap();
    let app = TestApp {
        router: app(app_state(&store, &svc)),
        svc,
        helper,
        clock,
        _dir: dir,
    };
    (app, filter, store)
}

fn bridged(egress: Value) -> Value {
    json!({"name": "e", "network": {"mode": "bridge", "egress": egress}})
}

/// Poll `uri` until `done` holds of its body (events are stored asynchronously).
async fn eventually(app: &TestApp, uri: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..200 {
        let (status, body) = app.json(Method::GET, uri, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if done(&body) {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{uri} never got there");
}

#[tokio::test]
async fn policies_reach_the_filter_and_its_events_reach_the_api() {
    let (app, filter, store) = egress_app(true, EgressTenants::All, FakeSpawn::Run).await;
    let mut filter = filter.unwrap();
    // The first thing on a connection is the whole set: none yet.
    assert_eq!(
        filter.next().await,
        (1, FilterRequest::Sync { sandboxes: vec![] })
    );
    let (status, info) = app.json(Method::GET, "/v1/info", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["egress"]["available"], json!(true));

    let (status, body) = app
        .create(bridged(
            json!({"allow": ["pypi.org", "*.pythonhosted.org"], "deny": ["203.0.113.9"]}),
        ))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["network"]["egress"],
        json!({"allow": ["pypi.org", "*.pythonhosted.org"], "deny": ["203.0.113.9"]})
    );
    let id: uuid::Uuid = serde_json::from_value(body["id"].clone()).unwrap();
    let address: std::net::Ipv4Addr = body["network"]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    match filter.next().await {
        (1, FilterRequest::Set(p)) => {
            assert_eq!((p.sandbox, p.address), (id, address));
            assert_eq!(p.policy.allow.len(), 2);
            assert_eq!(p.policy.deny[0].to_string(), "203.0.113.9");
        }
        other => panic!("expected a set, got {other:?}"),
    }
    let (_, info) = app.json(Method::GET, "/v1/info", None).await;
    assert_eq!(info["egress"]["connected"], json!(true));

    // Before any report, the counters are zero; a sandbox without a policy has none.
    let (status, stats) = app.json(Method::GET, "/v1/sandboxes/e/stats", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["egress"]["connections_allowed"], json!(0));

    // Denials and counters from the filter are stored and shown.
    for (port, reason) in [(443, "name_mismatch"), (80, "not_allowed")] {
        let denial = serde_json::from_value(json!({
            "at": "2026-12-03T18:00:00Z", "protocol": "tcp", "address": "203.0.113.20",
            "port": port, "name": "pypi.org", "reason": reason
        }))
        .unwrap();
        filter
            .events
            .send(FilterEvent::Denied {
                sandbox: id,
                denial,
            })
            .unwrap();
    }
    filter
        .events
        .send(FilterEvent::Counters {
            sandbox: id,
            counters: sandboxd_api::egress::EgressCounters {
                connections_allowed: 3,
                connections_denied: 2,
                bytes_out: 700,
                bytes_in: 9000,
            },
        })
        .unwrap();
    let denials = eventually(&app, "/v1/sandboxes/e/network/denials", |b| {
        b["items"].as_array().is_some_and(|i| i.len() == 2)
    })
    .await;
    // Newest first.
    assert_eq!(denials["items"][0]["reason"], json!("not_allowed"));
    assert_eq!(denials["items"][1]["reason"], json!("name_mismatch"));
    assert_eq!(denials["items"][1]["address"], json!("203.0.113.20"));
    let (_, one) = app
        .json(Method::GET, "/v1/sandboxes/e/network/denials?limit=1", None)
        .await;
    assert_eq!(one["items"].as_array().unwrap().len(), 1);
    for bad in ["limit=0", "limit=1001", "limit=x", "what=1"] {
        let (status, body) = app
            .json(
                Method::GET,
                &format!("/v1/sandboxes/e/network/denials?{bad}"),
                None,
            )
            .await;
        assert_error_json(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    }
    let stats = eventually(&app, "/v1/sandboxes/e/stats", |b| {
        b["egress"]["bytes_in"] == json!(9000)
    })
    .await;
    assert_eq!(stats["egress"]["connections_allowed"], json!(3));
    assert_eq!(stats["egress"]["connections_denied"], json!(2));
    assert_eq!(stats["egress"]["bytes_out"], json!(700));

    // PATCH replaces the policy: pushed at once and shown.
    let (status, body) = app
        .json(
            Method::PATCH,
            "/v1/sandboxes/e/network",
            Some(json!({"egress": {"allow": ["*"]}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["egress"], json!({"allow": ["*"]}));
    assert_eq!(body["address"], json!(address.to_string()));
    match filter.next().await {
        (1, FilterRequest::Set(p)) => assert_eq!(p.policy.allow[0].to_string(), "*"),
        other => panic!("expected a set, got {other:?}"),
    }
    let (_, shown) = app.json(Method::GET, "/v1/sandboxes/e", None).await;
    assert_eq!(shown["network"]["egress"], json!({"allow": ["*"]}));
    // The request's own spec is kept as it was sent.
    assert_eq!(
        shown["spec"]["network"]["egress"]["allow"],
        json!(["pypi.org", "*.pythonhosted.org"])
    );
    for (bad, code) in [
        (
            json!({"egress": {"allow": ["http://pypi.org"]}}),
            "invalid_request",
        ),
        (json!({"egress": {"allow": ["::1"]}}), "invalid_request"),
        (json!({"egress": {"alow": []}}), "invalid_request"),
        (json!({"group": "g"}), "invalid_request"),
        (json!({}), "invalid_request"),
    ] {
        let (status, body) = app
            .json(Method::PATCH, "/v1/sandboxes/e/network", Some(bad.clone()))
            .await;
        assert_error_json(status, &body, StatusCode::BAD_REQUEST, code);
    }
    let many: Vec<String> = (0..300).map(|i| format!("h{i}.example")).collect();
    let (status, body) = app
        .json(
            Method::PATCH,
            "/v1/sandboxes/e/network",
            Some(json!({"egress": {"allow": many}})),
        )
        .await;
    assert_error_json(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    let (status, body) = app
        .json(
            Method::PATCH,
            "/v1/sandboxes/nope/network",
            Some(json!({"egress": {"allow": []}})),
        )
        .await;
    assert_error_json(status, &body, StatusCode::NOT_FOUND, "not_found");

    // The filter goes away and comes back: the daemon reconnects and syncs the policy in
    // force (the patched one).
    filter.cut.send(()).unwrap();
    match filter.next().await {
        (2, FilterRequest::Sync { sandboxes }) => {
            assert_eq!(sandboxes.len(), 1);
            assert_eq!(sandboxes[0].sandbox, id);
            assert_eq!(sandboxes[0].address, address);
            assert_eq!(sandboxes[0].policy.allow[0].to_string(), "*");
        }
        other => panic!("expected a sync on a new connection, got {other:?}"),
    }

    // The sandbox ends: the filter is told; an ended sandbox's policy cannot change.
    let (status, _) = app.json(Method::POST, "/v1/sandboxes/e/kill", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        filter.next().await,
        (2, FilterRequest::Remove { sandbox: id })
    );
    eventually(&app, "/v1/sandboxes/e", |b| b["state"] == json!("exited")).await;
    let (status, body) = app
        .json(
            Method::PATCH,
            "/v1/sandboxes/e/network",
            Some(json!({"egress": {"allow": []}})),
        )
        .await;
    assert_error_json(status, &body, StatusCode::CONFLICT, "not_running");
    // The final counters stay readable until the sandbox is deleted, and go with it.
    let (_, stats) = app.json(Method::GET, "/v1/sandboxes/e/stats", None).await;
    assert_eq!(stats["egress"]["bytes_in"], json!(9000));
    let (status, _) = app.json(Method::DELETE, "/v1/sandboxes/e", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = app
        .json(Method::GET, "/v1/sandboxes/e/network/denials", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(store.egress_policy(id).await.unwrap(), None);
    assert!(store.egress_denials(id, 1000).await.unwrap().is_empty());
    assert_eq!(store.egress_counters(id).await.unwrap(), None);
}

#[tokio::test]
async fn a_created_sandbox_gets_its_patched_policy_when_it_starts() {
    let (app, filter, _) = egress_app(true, EgressTenants::All, FakeSpawn::Run).await;
    let mut filter = filter.unwrap();
    assert!(matches!(filter.next().await.1, FilterRequest::Sync { .. }));
    let mut body = bridged(json!({"allow": ["pypi.org"]}));
    body["start"] = json!(false);
    let (status, body) = app.create(body).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = app
        .json(
            Method::PATCH,
            "/v1/sandboxes/e/network",
            Some(json!({"egress": {"allow": ["203.0.113.0/24:443"]}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mode"], json!("bridge"));
    assert_eq!(body["egress"], json!({"allow": ["203.0.113.0/24:443"]}));
    let (status, body) = app.json(Method::POST, "/v1/sandboxes/e/start", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    match filter.next().await {
        (_, FilterRequest::Set(p)) => {
            assert_eq!(p.policy.allow[0].to_string(), "203.0.113.0/24:443")
        }
        other => panic!("expected a set, got {other:?}"),
    }
}

#[tokio::test]
async fn egress_is_refused_where_it_cannot_be_had() {
    // A helper without egress: 422 with its reason, on create and on PATCH.
    let (app, _, _) = egress_app(false, EgressTenants::All, FakeSpawn::Run).await;
    let (status, info) = app.json(Method::GET, "/v1/info", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["egress"]["available"], json!(false));
    assert_eq!(info["egress"]["reason"], json!("no --egress-dns was given"));
    let (status, body) = app.create(bridged(json!({"allow": ["*"]}))).await;
    assert_error_json(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "egress_unavailable",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no --egress-dns was given"),
        "{body}"
    );
    // Nothing was kept of the refused request; without egress, bridge mode works as before.
    let (status, body) = app
        .create(json!({"name": "e", "network": {"mode": "bridge"}}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(body["network"].get("egress").is_none(), "{body}");
    let (_, stats) = app.json(Method::GET, "/v1/sandboxes/e/stats", None).await;
    assert_eq!(stats["egress"], Value::Null);
    let (status, body) = app
        .json(
            Method::PATCH,
            "/v1/sandboxes/e/network",
            Some(json!({"egress": {"allow": ["*"]}})),
        )
        .await;
    assert_error_json(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "egress_unavailable",
    );

    // Egress outside bridge mode names the fix.
    let (app, _, _) = egress_app(true, EgressTenants::All, FakeSpawn::Run).await;
    let (status, body) = app
        .create(json!({"network": {"egress": {"allow": ["*"]}}}))
        .await;
    assert_error_json(
        status,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "egress_unavailable",
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("\"bridge\""),
        "{body}"
    );
    let (status, body) = app
        .create(json!({"network": {"mode": "bridge", "egress": {"allow": ["pypi.org/simple"]}}}))
        .await;
    assert_error_json(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pypi.org/simple"),
        "{body}"
    );

    // A tenant the operator did not allow: 403; another one may.
    let (app, _, _) =
        egress_app(true, EgressTenants::Only(vec!["ci".into()]), FakeSpawn::Run).await;
    let (_, token) = app.token("dev", "user", None).await;
    let (status, body) = app
        .as_token(
            Some(&token),
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"], "network": {"mode": "bridge", "egress": {"allow": ["*"]}}})),
        )
        .await;
    assert_error_json(status, &body, StatusCode::FORBIDDEN, "egress_not_allowed");
    let (_, token) = app.token("ci", "user", None).await;
    let (status, body) = app
        .as_token(
            Some(&token),
            Method::POST,
            "/v1/sandboxes",
            Some(json!({"command": ["true"], "network": {"mode": "bridge", "egress": {"allow": ["*"]}}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

fn assert_error_json(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!((status, code_of(body)), (want, code), "{body}");
}
