//! Router tests of the typed sessions: file transfers and archives on the fake helper's
//! in-memory files, execs and attach on its fake monitor. No root, no real helper.

use futures_util::{SinkExt, StreamExt};
use sandboxd_api::{AttachEnd, Exec, SandboxState};
use tokio_tungstenite::tungstenite::Message;

use super::*;
use crate::helper_client::FAKE_MAX_FILE;

/// A running sandbox named `name` on a fake monitor; its id.
async fn running(app: &TestApp, name: &str, extra: Value) -> uuid::Uuid {
    let mut body = json!({"name": name, "stdin": true});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, body) = app.create(body).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["state"], json!("running"));
    serde_json::from_value(body["id"].clone()).unwrap()
}

impl TestApp {
    /// How many transfers reached the helper.
    fn transfers(&self) -> usize {
        let requests = self.helper.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| matches!(r, sandboxd_protocol::wire::Request::Files(_)))
            .count()
    }

    /// A request and the whole response, headers included.
    async fn full(&self, req: Request<Body>) -> axum::response::Response<Vec<u8>> {
        let mut req = req;
        req.extensions_mut().insert(LocalPeer);
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes().to_vec();
        axum::response::Response::from_parts(parts, bytes)
    }

    /// The router on a loopback TCP port, every request as the local peer; its address.
    async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = self.router.clone().layer(axum::Extension(LocalPeer));
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }
}

#[tokio::test]
async fn files_go_in_come_out_and_are_deleted() {
    let app = test_app(FakeSpawn::Run).await;
    let id = running(&app, "f", json!({})).await;
    let uri = "/v1/sandboxes/f/files?path=/work/a.txt";

    let (status, body) = app
        .raw(
            Method::PUT,
            &format!("{uri}&mode=0600"),
            None,
            b"hello".to_vec(),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NO_CONTENT,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        app.helper.file(id, "/work/a.txt").as_deref(),
        Some(&b"hello"[..])
    );

    let resp = app
        .full(Request::get(uri).body(Body::empty()).unwrap())
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()[header::CONTENT_TYPE],
        "application/octet-stream"
    );
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "5");
    assert_eq!(resp.headers()[super::super::files::MODE_HEADER], "0600");
    assert_eq!(resp.body(), b"hello");

    // Bigger than a chunk: it streams through in pieces and comes back whole.
    let big: Vec<u8> = (0..600 * 1024).map(|i| (i % 251) as u8).collect();
    let (status, _) = app
        .raw(
            Method::PUT,
            "/v1/sandboxes/f/files?path=/work/big",
            None,
            big.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = app
        .raw(
            Method::GET,
            "/v1/sandboxes/f/files?path=/work/big",
            None,
            Vec::new(),
        )
        .await;
    assert_eq!((status, body.len()), (StatusCode::OK, big.len()));
    assert!(body == big, "the content changed on the way");

    let (status, _) = app.raw(Method::DELETE, uri, None, Vec::new()).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(app.helper.file(id, "/work/a.txt"), None);
    for method in [Method::GET, Method::DELETE] {
        let (status, body) = app.raw(method, uri, None, Vec::new()).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    }
}

#[tokio::test]
async fn refused_transfers_answer_with_the_workers_reason() {
    let app = test_app(FakeSpawn::Run).await;
    let id = running(&app, "r", json!({})).await;
    // A path or mode a client gets wrong is a 400 before the helper hears of it.
    let before = app.transfers();
    for uri in [
        "/v1/sandboxes/r/files?path=work/a",
        "/v1/sandboxes/r/files?path=/work/a&mode=9",
        "/v1/sandboxes/r/archive?path=/work&mode=0644",
    ] {
        let (status, body) = app.raw(Method::PUT, uri, None, b"x".to_vec()).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    }
    assert_eq!(app.transfers(), before);
    // The worker stops reading part-way: its verdict is the answer, and nothing is kept.
    let (status, body) = app
        .raw(
            Method::PUT,
            "/v1/sandboxes/r/files?path=/work/huge",
            None,
            vec![7u8; FAKE_MAX_FILE + 1],
        )
        .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_request");
    assert_eq!(app.helper.file(id, "/work/huge"), None);
    assert_eq!(app.transfers(), before + 1);
    // No such sandbox: 404 before any transfer.
    let (status, body) = app
        .raw(
            Method::GET,
            "/v1/sandboxes/nope/files?path=/work/a",
            None,
            Vec::new(),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(app.transfers(), before + 1);
}

#[tokio::test]
async fn archives_go_in_and_come_out_as_tar() {
    let app = test_app(FakeSpawn::Run).await;
    running(&app, "a", json!({})).await;
    let tar = b"not really a tar, the fake keeps bytes".to_vec();
    let (status, _) = app
        .raw(
            Method::PUT,
            "/v1/sandboxes/a/archive?path=/work/d",
            None,
            tar.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let resp = app
        .full(
            Request::get("/v1/sandboxes/a/archive?path=/work/d")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/x-tar");
    assert_eq!(resp.body(), &tar);
    let (status, body) = app
        .raw(
            Method::GET,
            "/v1/sandboxes/a/archive?path=/work/e",
            None,
            Vec::new(),
        )
        .await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn an_exec_runs_and_its_output_is_logged() {
    let app = test_app(FakeSpawn::Run).await;
    running(&app, "e", json!({})).await;
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes/e/execs",
            Some(json!({"command": ["echo", "hi"]})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let exec: Exec = serde_json::from_value(body).unwrap();
    let logs = format!("/v1/sandboxes/e/execs/{}/logs?follow=true", exec.id);
    let (status, out) = app.raw(Method::GET, &logs, None, Vec::new()).await;
    assert_eq!(
        (status, out.as_slice()),
        (StatusCode::OK, &b"echo hi\n"[..])
    );
    let (status, body) = app
        .json(
            Method::GET,
            &format!("/v1/sandboxes/e/execs/{}", exec.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let done: Exec = serde_json::from_value(body).unwrap();
    assert_eq!(
        (done.state, done.exit_code),
        (SandboxState::Exited, Some(0))
    );
    let (status, body) = app.json(Method::GET, "/v1/sandboxes/e/execs", None).await;
    assert_eq!(
        (status, body["items"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(1))
    );

    // Bad requests and unknown execs.
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes/e/execs",
            Some(json!({"command": []})),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (status, body) = app
        .json(
            Method::GET,
            &format!("/v1/sandboxes/e/execs/{}", uuid::Uuid::new_v4()),
            None,
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    // A sandbox that has ended runs no exec.
    let (status, _) = app.json(Method::POST, "/v1/sandboxes/e/kill", None).await;
    assert_eq!(status, StatusCode::OK);
    let id = exec.sandbox_id;
    app.svc.wait(id).await.unwrap();
    let (status, body) = app
        .json(
            Method::POST,
            "/v1/sandboxes/e/execs",
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(
        (status, code_of(&body)),
        (StatusCode::CONFLICT, "not_running")
    );
}

/// Read an attach websocket to its end: the stdout bytes (however the messages cut them) and the
/// end.
async fn read_to_end<S>(ws: &mut S) -> (Vec<u8>, AttachEnd)
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let mut out = Vec::new();
    while let Some(msg) = ws.next().await {
        match msg.unwrap() {
            Message::Binary(b) => match b.split_first() {
                Some((1, data)) => out.extend_from_slice(data),
                _ => panic!("not a stdout message: {b:?}"),
            },
            Message::Text(t) => return (out, serde_json::from_str(t.as_str()).unwrap()),
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the websocket ended without an AttachEnd");
}

/// A running sandbox `name` with a `cat` exec that has stdin, and the router served: its address
/// and the exec's attach URL.
async fn attachable_cat(app: &TestApp, name: &str) -> (std::net::SocketAddr, String) {
    running(app, name, json!({})).await;
    let (status, body) = app
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{name}/execs"),
            Some(json!({"command": ["cat"], "stdin": true})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let exec: Exec = serde_json::from_value(body).unwrap();
    let addr = app.serve().await;
    let url = format!("ws://{addr}/v1/sandboxes/{name}/execs/{}/attach", exec.id);
    (addr, url)
}

#[tokio::test]
async fn attach_carries_stdin_and_streams_output_until_the_exec_ends() {
    let app = test_app(FakeSpawn::Run).await;
    let (_, url) = attachable_cat(&app, "at").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url.clone()).await.unwrap();

    // A second connection may read, but not own stdin.
    match tokio_tungstenite::connect_async(url.clone()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::CONFLICT);
            let body: ErrorBody = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
            assert_eq!(body.error.code.as_str(), "stdin_busy");
        }
        other => panic!("{other:?}"),
    }
    let (mut reader, _) = tokio_tungstenite::connect_async(format!("{url}?stdin=false"))
        .await
        .unwrap();

    ws.send(Message::Binary(b"\x00hello ".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Text(r#"{"resize":{"cols":100,"rows":30}}"#.into()))
        .await
        .unwrap();
    ws.send(Message::Binary(b"\x00world".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Text(r#"{"close_stdin":true}"#.into()))
        .await
        .unwrap();
    let (out, end) = read_to_end(&mut ws).await;
    assert_eq!(out, b"hello world");
    assert_eq!((end.exit_code, end.offset), (Some(0), 11));
    let (out, end) = read_to_end(&mut reader).await;
    assert_eq!((out.as_slice(), end.offset), (&b"hello world"[..], 11));

    // Reattaching after the end replays from any offset and ends at once.
    let (mut again, _) = tokio_tungstenite::connect_async(format!("{url}?offset=6&stdin=false"))
        .await
        .unwrap();
    let (out, end) = read_to_end(&mut again).await;
    assert_eq!((out.as_slice(), end.exit_code), (&b"world"[..], Some(0)));
}

#[tokio::test]
async fn attach_refuses_bad_messages_and_stdin_the_exec_does_not_have() {
    let app = test_app(FakeSpawn::Run).await;
    let (addr, url) = attachable_cat(&app, "bad").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::Binary(b"\x01not stdin".to_vec().into()))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1007),
        other => panic!("{other:?}"),
    }
    // The main command of a sandbox without stdin has none to give.
    running(&app, "nostdin", json!({"stdin": false})).await;
    let url = format!("ws://{addr}/v1/sandboxes/nostdin/attach?stdin=true");
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::CONFLICT);
            let body: ErrorBody = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
            assert_eq!(body.error.code.as_str(), "no_stdin");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn attach_to_the_main_command_feeds_its_stdin() {
    let app = test_app(FakeSpawn::Run).await;
    let id = running(&app, "main", json!({})).await;
    let addr = app.serve().await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/sandboxes/main/attach"))
            .await
            .unwrap();
    ws.send(Message::Binary(b"\x00typed".to_vec().into()))
        .await
        .unwrap();
    // The output arrives through the log; the end once the sandbox is killed.
    match ws.next().await {
        Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], b"\x01typed"),
        other => panic!("{other:?}"),
    }
    let (status, _) = app
        .json(
            Method::POST,
            "/v1/sandboxes/main/kill",
            Some(json!({"signal": "TERM"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (out, end) = read_to_end(&mut ws).await;
    assert_eq!((out.as_slice(), end.offset), (&b""[..], 5));
    assert_eq!(end.exit_code, Some(128 + 15));
    assert_eq!(
        app.svc.wait(id).await.unwrap().signal.as_deref(),
        Some("SIGTERM")
    );
}
