//! `GET /v1/sandboxes/{id}/logs`: the output as raw bytes (optionally followed), or, with a
//! websocket upgrade, as binary messages `[channel][data]` ending with a `LogEnd` text message.

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use sandboxd_api::{CHANNEL_STDERR, CHANNEL_STDOUT};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::auth::Principal;
use super::extract::{ApiQuery, IdOrName};
use super::relay::{relay, Incoming, Last, Target};
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
            .on_upgrade(move |socket| {
                relay(
                    state,
                    Target::Main(id),
                    opts,
                    Incoming::Ignored,
                    socket,
                    Last::LogEnd,
                )
            }));
    }
    Ok(plain_body(read_logs(
        state.svc.dir(id),
        opts,
        state.svc.subscribe(id),
    )))
}
