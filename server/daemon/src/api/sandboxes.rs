//! `/v1/sandboxes`: create, list, get, wait, kill, delete, stats and extend.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use base64::Engine;
use sandboxd_api::{
    CreateSandbox, ExtendRequest, KillRequest, Sandbox, SandboxList, SandboxState, Stats,
};
use serde::Deserialize;

use super::auth::Principal;
use super::extract::{ApiJson, ApiQuery, IdOrName, OptionalJson};
use super::{ApiError, AppState};
use crate::sandboxes::{ListQuery, WaitCondition};
use crate::validate::{check_lifetime, ValidCreate};

const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateParams {
    #[serde(default)]
    wait: bool,
}

pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(params): ApiQuery<CreateParams>,
    ApiJson(body): ApiJson<CreateSandbox>,
) -> Result<impl IntoResponse, ApiError> {
    let valid = ValidCreate::parse(body)?;
    let sandbox = state
        .svc
        .create(&principal.tenant, valid, params.wait)
        .await?;
    Ok(super::created(
        format!("/v1/sandboxes/{}", sandbox.id),
        principal.shown(sandbox),
    ))
}

/// `POST /wait?timeout=SECS&condition=exited|running|removed`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitParams {
    timeout: Option<u64>,
    condition: Option<String>,
}

/// The longest `timeout=` of a wait (an hour: longer waits loop).
pub const MAX_WAIT_SECS: u64 = 3600;

/// The cursor is the sequence number of the last row of the previous page, base64-encoded so
/// that clients treat it as opaque.
fn encode_cursor(seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("s{seq}"))
}

fn decode_cursor(cursor: &str) -> Option<i64> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    text.strip_prefix('s')?.parse().ok().filter(|n| *n > 0)
}

/// `state=`, `tenant=`, `label=key=value` (repeatable), `limit=`, `cursor=`.
fn list_query(params: Vec<(String, String)>) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        limit: DEFAULT_LIMIT,
        ..Default::default()
    };
    for (key, value) in params {
        match key.as_str() {
            "state" => {
                q.state = Some(SandboxState::parse(&value).ok_or_else(|| {
                    ApiError::invalid("state: must be created, creating, running, exited or failed")
                })?)
            }
            "tenant" => q.tenant = Some(value),
            "label" => {
                let (k, v) = value
                    .split_once('=')
                    .ok_or_else(|| ApiError::invalid("label: must be key=value"))?;
                q.labels.push((k.to_owned(), v.to_owned()));
            }
            "limit" => {
                q.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(format!("limit: must be between 1 and {MAX_LIMIT}"))
                    })?
            }
            "cursor" => {
                q.before_seq = Some(
                    decode_cursor(&value).ok_or_else(|| ApiError::invalid("cursor: invalid"))?,
                )
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    Ok(q)
}

pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(params): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<SandboxList>, ApiError> {
    let mut q = list_query(params)?;
    if !principal.is_admin() {
        // A user sees its own tenant only; asking for another finds nothing there.
        if q.tenant.as_deref().is_some_and(|t| t != principal.tenant) {
            return Ok(Json(SandboxList {
                items: Vec::new(),
                next_cursor: None,
            }));
        }
        q.tenant = Some(principal.tenant.clone());
    }
    let (items, next) = state.svc.list(&q).await?;
    Ok(Json(SandboxList {
        items: items.into_iter().map(|s| principal.shown(s)).collect(),
        next_cursor: next.map(encode_cursor),
    }))
}

pub async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
) -> Result<Json<Sandbox>, ApiError> {
    let sandbox = state.svc.find(&principal.scope(), &id).await?;
    Ok(Json(principal.shown(sandbox)))
}

/// Wait for a condition (`exited`, the default: a final state; `running`; `removed`). With
/// `timeout`, 408 `request_timeout` when it ran out first (the sandbox is as it was).
pub async fn wait(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<WaitParams>,
) -> Result<Json<Sandbox>, ApiError> {
    let condition = match params.condition.as_deref() {
        None | Some("exited") | Some("not-running") => WaitCondition::Exited,
        Some("running") => WaitCondition::Running,
        Some("removed") => WaitCondition::Removed,
        Some(_) => {
            return Err(ApiError::invalid(
                "condition: must be exited (or not-running), running or removed",
            ))
        }
    };
    let timeout = match params.timeout {
        None => None,
        Some(t) if t <= MAX_WAIT_SECS => Some(std::time::Duration::from_secs(t)),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "timeout: must be between 0 and {MAX_WAIT_SECS} seconds"
            )))
        }
    };
    let sandbox = state.svc.find(&principal.scope(), &id).await?;
    match state.svc.wait_for(sandbox.id, condition, timeout).await? {
        Some(sandbox) => Ok(Json(principal.shown(sandbox))),
        None => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            sandboxd_api::ErrorCode::RequestTimeout,
            "timeout: the sandbox did not meet the condition in time",
        )),
    }
}

pub async fn kill(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    OptionalJson(body): OptionalJson<KillRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    let sandbox = state
        .svc
        .kill(&principal.scope(), &id, body.signal.as_deref())
        .await?;
    Ok(Json(principal.shown(sandbox)))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
) -> Result<StatusCode, ApiError> {
    state.svc.delete(&principal.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn stats(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
) -> Result<Json<Stats>, ApiError> {
    Ok(Json(state.svc.stats(&principal.scope(), &id).await?))
}

pub async fn extend(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiJson(body): ApiJson<ExtendRequest>,
) -> Result<Json<Sandbox>, ApiError> {
    check_lifetime("ttl_secs", body.ttl_secs)?;
    let sandbox = state
        .svc
        .extend(&principal.scope(), &id, body.ttl_secs)
        .await?;
    Ok(Json(principal.shown(sandbox)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(decode_cursor("garbage!"), None);
        assert_eq!(decode_cursor(""), None);
    }
}
