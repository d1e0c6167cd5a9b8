//! `/v1/sandboxes/{id}/execs`: start, list and get execs; read their output (plain or
//! websocket, like the sandbox's logs); attach to them over a websocket.
//!
//! Attach websocket (`.../execs/{exec_id}/attach?offset=N&stdin=B`): the server sends binary
//! messages `[channel][data]` (1 stdout, 2 stderr) from `offset` on, then one text message
//! [`AttachEnd`] (`{"exit_code": N, ...}`) and a close. The client sends binary messages
//! `[0][data]` for stdin and text messages `{"resize": {"cols": C, "rows": R}}` or
//! `{"close_stdin": true}`. Any number of connections may read; one at a time owns stdin (409
//! `stdin_busy` for a second). Closing the websocket never ends the process.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use sandboxd_api::{CreateExec, Exec, ExecList};
use serde::Deserialize;

use super::auth::Principal;
use super::extract::{ApiJson, ApiQuery, IdOrName};
use super::logs::{plain_body, wants_websocket, LogParams};
use super::relay::{relay, Incoming, Last, Target};
use super::{ApiError, AppState};
use crate::logs::{read_logs, ReadOptions};
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
    Ok(super::created(
        format!("/v1/sandboxes/{}/execs/{}", exec.sandbox_id, exec.id),
        exec,
    ))
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
                // As before the relay was shared: input is checked like an attach's.
                relay(
                    state,
                    Target::Exec(exec.sandbox_id, exec.id),
                    opts,
                    Incoming::Attach(None),
                    socket,
                    Last::LogEnd,
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
    let session = state.svc.attach_exec(&exec, stdin).await?;
    let target = Target::Exec(exec.sandbox_id, exec.id);
    Ok(attached(state, upgrade, target, params.offset, session))
}

/// Upgrade to an attach websocket: `target`'s output from `offset` on, input to `session`.
fn attached(
    state: AppState,
    upgrade: WebSocketUpgrade,
    target: Target,
    offset: u64,
    session: Option<AttachSession>,
) -> Response {
    let opts = ReadOptions {
        offset,
        channel: None,
        follow: true,
        split_channels: true,
    };
    upgrade
        .max_message_size(MAX_INCOMING)
        .on_upgrade(move |socket| {
            relay(
                state,
                target,
                opts,
                Incoming::Attach(session),
                socket,
                Last::AttachEnd,
            )
        })
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
    let session = state.svc.attach_main(&sandbox, stdin).await?;
    let target = Target::Main(sandbox.id);
    Ok(attached(state, upgrade, target, params.offset, session))
}
