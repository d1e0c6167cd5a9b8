//! `GET /v1/sandboxes/{id}/logs`: the output as raw bytes (optionally followed), or, with a
//! websocket upgrade, as binary messages `[channel][data]` ending with a `LogEnd` text message.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use sandboxd_api::{LogEnd, CHANNEL_STDERR, CHANNEL_STDOUT};
use serde::Deserialize;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::auth::Principal;
use super::extract::{ApiQuery, IdOrName};
use super::{ApiError, AppState};
use crate::logs::{read_logs, LogEvent, ReadOptions};

/// Largest message a log websocket accepts from the client (it has nothing to say).
const MAX_INCOMING: usize = 64 * 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    #[serde(default)]
    offset: u64,
    stream: Option<String>,
    #[serde(default)]
    follow: bool,
    /// A websocket ticket (`POST /v1/tickets`); checked by the authentication layer.
    #[serde(default, rename = "ticket")]
    _ticket: Option<String>,
}

impl LogParams {
    /// How to read: a websocket always follows and keeps the channels apart; a plain body
    /// follows on request and carries the bytes only. 400 for a `stream` other than stdout or
    /// stderr.
    pub(super) fn read_options(&self, websocket: bool) -> Result<ReadOptions, ApiError> {
        let channel = match self.stream.as_deref() {
            None => None,
            Some("stdout") => Some(CHANNEL_STDOUT),
            Some("stderr") => Some(CHANNEL_STDERR),
            Some(_) => return Err(ApiError::invalid("stream: must be stdout or stderr")),
        };
        Ok(ReadOptions {
            offset: self.offset,
            channel,
            follow: websocket || self.follow,
            split_channels: websocket,
        })
    }
}

pub(super) fn wants_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A plain response of the output's bytes, as `read_logs` delivers them.
pub(super) fn plain_body(rx: mpsc::Receiver<std::io::Result<LogEvent>>) -> Response {
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await? {
            Ok(LogEvent::Data { data, .. }) => Some((Ok::<Bytes, std::io::Error>(data), rx)),
            Ok(LogEvent::End { .. }) => None,
            Err(e) => {
                tracing::error!(error = %e, "reading logs failed");
                Some((Err(e), rx))
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(body),
    )
        .into_response()
}

pub async fn logs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<LogParams>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let websocket = wants_websocket(&headers);
    let opts = params.read_options(websocket)?;
    let sandbox = state.svc.find(&principal.scope(), &id).await?;
    let id = sandbox.id;
    if websocket {
        let upgrade = upgrade.map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
        return Ok(upgrade
            .max_message_size(MAX_INCOMING)
            .on_upgrade(move |socket| stream_websocket(state, id, opts, socket)));
    }
    Ok(plain_body(read_logs(
        state.svc.dir(id),
        opts,
        state.svc.subscribe(id),
    )))
}

async fn stream_websocket(state: AppState, id: Uuid, opts: ReadOptions, socket: WebSocket) {
    let mut rx = read_logs(state.svc.dir(id), opts, state.svc.subscribe(id));
    let (mut sink, mut incoming) = socket.split();
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(Ok(LogEvent::Data { channel, data })) => {
                    let mut msg = Vec::with_capacity(1 + data.len());
                    msg.push(channel);
                    msg.extend_from_slice(&data);
                    if sink.send(Message::Binary(msg.into())).await.is_err() {
                        return;
                    }
                }
                Some(Ok(LogEvent::End { offset })) => {
                    let sandbox = state.svc.sandbox(id).await.ok().flatten();
                    let end = LogEnd {
                        exit_code: sandbox.as_ref().and_then(|s| s.exit_code),
                        signal: sandbox.as_ref().and_then(|s| s.signal.clone()),
                        reason: sandbox.as_ref().and_then(|s| s.reason),
                        offset,
                    };
                    let text = serde_json::to_string(&end).unwrap_or_default();
                    if sink.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: close_code::NORMAL,
                            reason: "".into(),
                        })))
                        .await;
                    break;
                }
                Some(Err(e)) => {
                    tracing::error!(%id, error = %e, "reading logs failed");
                    let _ = sink
                        .send(Message::Close(Some(CloseFrame {
                            code: close_code::ERROR,
                            reason: "reading the log failed".into(),
                        })))
                        .await;
                    break;
                }
                None => return,
            },
            msg = incoming.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    // Give the client a moment to answer the close frame, completing the closing handshake.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(msg)) = incoming.next().await {
            if matches!(msg, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}
