//! `Client::follow_logs` against a tiny fake daemon: resuming after drops, giving up, and errors.

use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use sandboxd_api::{EndReason, ErrorBody, ErrorCode, ErrorDetail, LogEnd};
use sandboxd_client::{Channel, Client, ClientError, LogEvent};

/// The output of the fake sandbox, as `(channel, bytes)` writes.
const OUTPUT: &[(u8, &[u8])] = &[
    (1, b"hello "),
    (2, b"warning\n"),
    (1, b"world\n"),
    (1, b"and more\n"),
];

/// How the fake daemon behaves on each connection.
#[derive(Clone, Copy)]
enum Script {
    /// Drop the first connection after this many bytes of output, then serve the rest.
    DropOnceAfter(u64),
    /// Accept the upgrade and drop at once, every time.
    AlwaysDrop,
}

#[derive(Clone)]
struct Fake {
    script: Script,
    /// The `offset` of every websocket request, in order.
    offsets: Arc<Mutex<Vec<u64>>>,
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    #[serde(default)]
    offset: u64,
}

async fn logs(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    Query(query): Query<LogsQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if id == "missing" {
        let body = ErrorBody {
            error: ErrorDetail {
                code: ErrorCode::NotFound,
                message: "no sandbox missing".into(),
                request_id: None,
            },
        };
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    let attempt = {
        let mut offsets = fake.offsets.lock().expect("lock");
        offsets.push(query.offset);
        offsets.len()
    };
    upgrade.on_upgrade(move |socket| serve(socket, fake.script, attempt, query.offset))
}

/// Sends the output from `offset` in the protocol's framing, cutting the connection where the
/// script says so.
async fn serve(mut socket: WebSocket, script: Script, attempt: usize, offset: u64) {
    let drop_at = match script {
        Script::AlwaysDrop => return,
        Script::DropOnceAfter(n) if attempt == 1 => Some(n),
        Script::DropOnceAfter(_) => None,
    };
    let mut position = 0u64;
    for &(channel, data) in OUTPUT {
        for &byte in data {
            // One byte per message makes every offset a possible cut.
            if position >= offset {
                if drop_at == Some(position) {
                    return;
                }
                let message = Message::Binary(vec![channel, byte].into());
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            position += 1;
        }
    }
    let end = LogEnd {
        exit_code: Some(3),
        signal: None,
        reason: Some(EndReason::Exited),
        offset: position,
    };
    let text = serde_json::to_string(&end).expect("json");
    let _ = socket.send(Message::Text(text.into())).await;
    let _ = socket.send(Message::Close(None)).await;
}

async fn start(script: Script) -> (Client, Arc<Mutex<Vec<u64>>>) {
    let fake = Fake {
        script,
        offsets: Arc::default(),
    };
    let offsets = fake.offsets.clone();
    let app = Router::new()
        .route("/v1/sandboxes/{id}/logs", get(logs))
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::new(&format!("http://{addr}")).expect("client");
    (client, offsets)
}

fn full_output(channel: u8) -> Vec<u8> {
    OUTPUT
        .iter()
        .filter(|(c, _)| *c == channel)
        .flat_map(|(_, d)| d.iter().copied())
        .collect()
}

/// Splits events into stdout bytes, stderr bytes and the final `LogEnd`.
async fn collect(client: &Client, id: &str, offset: u64) -> (Vec<u8>, Vec<u8>, Option<LogEnd>) {
    let (mut out, mut err, mut end) = (Vec::new(), Vec::new(), None);
    let mut events = std::pin::pin!(client.follow_logs(id, offset));
    while let Some(event) = events.next().await {
        match event.expect("no error") {
            LogEvent::Output {
                channel: Channel::Stdout,
                data,
            } => out.extend_from_slice(&data),
            LogEvent::Output {
                channel: Channel::Stderr,
                data,
            } => err.extend_from_slice(&data),
            LogEvent::End(e) => end = Some(e),
        }
    }
    (out, err, end)
}

#[tokio::test]
async fn resumes_from_the_bytes_already_received() {
    // Cut inside the stderr write, so the resumed stream must restart mid-chunk on the other channel.
    let (client, offsets) = start(Script::DropOnceAfter(9)).await;
    let (out, err, end) = collect(&client, "sbx1", 0).await;
    assert_eq!(out, full_output(1));
    assert_eq!(err, full_output(2));
    let end = end.expect("LogEnd");
    assert_eq!(end.exit_code, Some(3));
    assert_eq!(end.offset, 29);
    assert_eq!(*offsets.lock().expect("lock"), [0, 9]);
}

#[tokio::test]
async fn starts_at_the_requested_offset() {
    let (client, offsets) = start(Script::DropOnceAfter(20)).await;
    let (out, err, end) = collect(&client, "sbx1", 14).await;
    assert_eq!(out, b"world\nand more\n");
    assert!(err.is_empty());
    assert!(end.is_some());
    assert_eq!(*offsets.lock().expect("lock"), [14, 20]);
}

#[tokio::test]
async fn gives_up_after_the_configured_reconnects() {
    let (client, offsets) = start(Script::AlwaysDrop).await;
    let client = client.with_log_reconnects(2);
    let events: Vec<_> = client.follow_logs("sbx1", 0).collect().await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].is_err(), "{events:?}");
    // One first attempt and two reconnects.
    assert_eq!(*offsets.lock().expect("lock"), [0, 0, 0]);
}

#[tokio::test]
async fn refused_upgrade_is_an_api_error_without_retries() {
    let (client, offsets) = start(Script::AlwaysDrop).await;
    let events: Vec<_> = client.follow_logs("missing", 0).collect().await;
    match events.as_slice() {
        [Err(e @ ClientError::Api { .. })] => {
            assert_eq!(e.status(), Some(404));
            assert_eq!(e.code(), Some(&ErrorCode::NotFound));
            assert_eq!(e.to_string(), "no sandbox missing");
        }
        other => panic!("expected one not_found error, got {other:?}"),
    }
    assert!(offsets.lock().expect("lock").is_empty());
}
