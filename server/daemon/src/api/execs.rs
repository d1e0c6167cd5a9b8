//! `/v1/sandboxes/{id}/execs`: start, list and get execs; read their output (plain or
//! websocket, like the sandbox's logs); attach to them over a websocket.
//!
//! Attach websocket (`.../execs/{exec_id}/attach?offset=N&stdin=B`): the server sends binary
//! messages `[channel][data]` (1 stdout, 2 stderr) from `offset` on, then one text message
//! [`AttachEnd`] (`{"exit_code": N, ...}`) and a close. The client sends binary messages
//! `[0][data]` for stdin and text messages `{"resize": {"cols": C, "rows": R}}` or
//! `{"close_stdin": true}`. Any number of connections may read; one at a time owns stdin (409
//! `stdin_busy` for a second). Closing the websocket never ends the process.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use sandboxd_api::{AttachControl, AttachEnd, CreateExec, Exec, ExecList, LogEnd, CHANNEL_STDIN};
use serde::Deserialize;

use super::auth::Principal;
use super::extract::{ApiJson, ApiQuery, IdOrName};
use super::logs::{plain_body, wants_websocket, LogParams};
use super::{ApiError, AppState};
use crate::logs::{read_logs, LogEvent, ReadOptions};
use crate::sandboxes::{AttachSession, ExecError};
use crate::validate::check_exec;

/// Largest message an attach websocket accepts (stdin is cut into frames of 64 KiB).
const MAX_INCOMING: usize = 1024 * 1024;

fn path_error(r: axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::invalid(r.body_text())
}

pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiJson(body): ApiJson<CreateExec>,
) -> Result<impl IntoResponse, ApiError> {
    check_exec(&body)?;
    let exec = state.svc.create_exec(&principal.scope(), &id, body).await?;
    Ok((StatusCode::CREATED, Json(exec)))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
) -> Result<Json<ExecList>, ApiError> {
    let items = state.svc.execs(&principal.scope(), &id).await?;
    Ok(Json(ExecList { items }))
}

async fn find(
    state: &AppState,
    principal: &Principal,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<Exec, ApiError> {
    let Path((id, exec)) = path.map_err(path_error)?;
    Ok(state.svc.exec(&principal.scope(), &id, &exec).await?)
}

pub async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Exec>, ApiError> {
    Ok(Json(find(&state, &principal, path).await?))
}

/// `GET .../execs/{exec_id}/logs`: the same API as a sandbox's logs.
pub async fn logs(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    ApiQuery(params): ApiQuery<LogParams>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let websocket = wants_websocket(&headers);
    let opts = params.read_options(websocket)?;
    let exec = find(&state, &principal, path).await?;
    if websocket {
        let upgrade = upgrade.map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
        return Ok(upgrade
            .max_message_size(64 * 1024)
            .on_upgrade(move |socket| {
                session(
                    state,
                    Target::Exec(exec.sandbox_id, exec.id),
                    opts,
                    None,
                    socket,
                    true,
                )
            }));
    }
    let dir = state.svc.exec_dir(exec.sandbox_id, exec.id);
    Ok(plain_body(read_logs(
        dir,
        opts,
        state.svc.subscribe_exec(exec.id),
    )))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachParams {
    #[serde(default)]
    offset: u64,
    /// Own stdin (the default when the exec has stdin).
    stdin: Option<bool>,
    #[serde(default, rename = "ticket")]
    _ticket: Option<String>,
}

/// `GET .../execs/{exec_id}/attach` (websocket only).
pub async fn attach(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    ApiQuery(params): ApiQuery<AttachParams>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let exec = find(&state, &principal, path).await?;
    let upgrade = upgrade.map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
    let stdin = params.stdin.unwrap_or(exec.spec.stdin);
    if stdin && !exec.spec.stdin {
        return Err(ExecError::NoStdin.into());
    }
    // Ask the monitor before upgrading, so that a taken stdin is a plain 409.
    let conn = state.svc.attach_exec(&exec, stdin).await?;
    let opts = ReadOptions {
        offset: params.offset,
        channel: None,
        follow: true,
        split_channels: true,
    };
    Ok(upgrade
        .max_message_size(MAX_INCOMING)
        .on_upgrade(move |socket| {
            session(
                state,
                Target::Exec(exec.sandbox_id, exec.id),
                opts,
                conn,
                socket,
                false,
            )
        }))
}

/// `GET /v1/sandboxes/{id}/attach` (websocket only): the same protocol for the main command.
pub async fn attach_main(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<AttachParams>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let sandbox = state.svc.find(&principal.scope(), &id).await?;
    let upgrade = upgrade.map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
    let stdin = params.stdin.unwrap_or(sandbox.spec.stdin);
    let conn = state.svc.attach_main(&sandbox, stdin).await?;
    let opts = ReadOptions {
        offset: params.offset,
        channel: None,
        follow: true,
        split_channels: true,
    };
    Ok(upgrade
        .max_message_size(MAX_INCOMING)
        .on_upgrade(move |socket| {
            session(state, Target::Main(sandbox.id), opts, conn, socket, false)
        }))
}

/// Whose output a websocket streams.
enum Target {
    /// An exec: (sandbox id, exec id).
    Exec(uuid::Uuid, uuid::Uuid),
    /// The sandbox's main command.
    Main(uuid::Uuid),
}

impl Target {
    fn dir(&self, state: &AppState) -> sandboxd_protocol::layout::SandboxDir {
        match self {
            Target::Exec(s, e) => state.svc.exec_dir(*s, *e),
            Target::Main(id) => state.svc.dir(*id),
        }
    }

    fn exit(&self, state: &AppState) -> Option<tokio::sync::watch::Receiver<bool>> {
        match self {
            Target::Exec(_, e) => state.svc.subscribe_exec(*e),
            Target::Main(id) => state.svc.subscribe(*id),
        }
    }

    /// Exit code and signal, once final.
    async fn end(&self, state: &AppState) -> (Option<i32>, Option<String>) {
        match self {
            Target::Exec(s, e) => {
                let row = state.svc.exec_row(*s, *e).await.ok().flatten();
                (
                    row.as_ref().and_then(|e| e.exit_code),
                    row.and_then(|e| e.signal),
                )
            }
            Target::Main(id) => {
                let row = state.svc.sandbox(*id).await.ok().flatten();
                (
                    row.as_ref().and_then(|s| s.exit_code),
                    row.and_then(|s| s.signal),
                )
            }
        }
    }
}

type Sink = SplitSink<WebSocket, Message>;

async fn close(sink: &mut Sink, code: u16, reason: &str) {
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.to_owned().into(),
        })))
        .await;
}

/// Stream an exec's output from the log and, when attached, pass stdin and resizes on to the
/// attach session, until the exec has ended and everything was sent. Input and output run
/// independently: a client that reads slowly never holds up its stdin, and the reverse.
async fn session(
    state: AppState,
    target: Target,
    opts: ReadOptions,
    monitor: Option<AttachSession>,
    socket: WebSocket,
    log_end: bool,
) {
    let mut rx = read_logs(target.dir(&state), opts, target.exit(&state));
    let (mut sink, incoming) = socket.split();
    // The input side says why the connection must close (or ends: the client went away).
    let (close_tx, mut close_rx) = tokio::sync::mpsc::channel::<(u16, &'static str)>(1);
    let mut input = tokio::spawn(forward_input(incoming, monitor, close_tx));
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(Ok(LogEvent::Data { channel, data })) => {
                    let mut msg = Vec::with_capacity(1 + data.len());
                    msg.push(channel);
                    msg.extend_from_slice(&data);
                    if sink.send(Message::Binary(msg.into())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(LogEvent::End { offset })) => {
                    let (exit_code, signal) = target.end(&state).await;
                    let text = if log_end {
                        serde_json::to_string(&LogEnd { exit_code, signal, reason: None, offset })
                    } else {
                        serde_json::to_string(&AttachEnd { exit_code, signal, offset })
                    };
                    if sink.send(Message::Text(text.unwrap_or_default().into())).await.is_ok() {
                        close(&mut sink, close_code::NORMAL, "").await;
                        // Give the client a moment to answer the close frame.
                        let _ = tokio::time::timeout(Duration::from_secs(2), &mut input).await;
                    }
                    break;
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "reading logs for an attach failed");
                    close(&mut sink, close_code::ERROR, "reading the log failed").await;
                    break;
                }
                None => break,
            },
            why = close_rx.recv() => {
                if let Some((code, reason)) = why {
                    close(&mut sink, code, reason).await;
                }
                break;
            }
        }
    }
    // Dropping the attach session releases stdin; the process goes on.
    input.abort();
}

/// What one client message asks of the attached process.
enum Input {
    Stdin(Vec<u8>),
    Control(AttachControl),
}

/// Pass the client's messages on to the attach session until the client goes away.
async fn forward_input(
    mut incoming: futures_util::stream::SplitStream<WebSocket>,
    mut monitor: Option<AttachSession>,
    close_tx: tokio::sync::mpsc::Sender<(u16, &'static str)>,
) {
    while let Some(msg) = incoming.next().await {
        let input = match msg {
            Err(_) | Ok(Message::Close(_)) => return,
            Ok(Message::Binary(data)) => match data.split_first() {
                Some((&CHANNEL_STDIN, payload)) => Input::Stdin(payload.to_vec()),
                _ => {
                    let why = "binary messages must start with channel 0 (stdin)";
                    let _ = close_tx.send((close_code::INVALID, why)).await;
                    return;
                }
            },
            Ok(Message::Text(text)) => match serde_json::from_str::<AttachControl>(text.as_str()) {
                Ok(control) => Input::Control(control),
                Err(_) => {
                    let why = "text messages must be {\"resize\":{\"cols\":C,\"rows\":R}} or {\"close_stdin\":true}";
                    let _ = close_tx.send((close_code::INVALID, why)).await;
                    return;
                }
            },
            Ok(_) => continue,
        };
        // Without an attach session (a reader, or the process ended) input goes nowhere.
        if let Some(session) = monitor.as_mut() {
            let sent = match input {
                Input::Stdin(data) => session.send_stdin(&data).await,
                Input::Control(control) => {
                    let mut sent = Ok(());
                    if let Some(size) = control.resize {
                        sent = session.resize(size.cols, size.rows).await;
                    }
                    if sent.is_ok() && control.close_stdin == Some(true) {
                        sent = session.close_stdin().await;
                    }
                    sent
                }
            };
            if sent.is_err() {
                // The process ended: its end arrives through the log.
                monitor = None;
            }
        }
    }
}
