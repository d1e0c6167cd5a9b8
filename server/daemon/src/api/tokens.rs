//! `/v1/tokens` and `/v1/tenants/{tenant}/quota` (admin only), and `/v1/tickets` (anyone
//! authenticated).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use sandboxd_api::{CreateTicket, CreateToken, Quota, Ticket, TokenCreated, TokenInfo, TokenList};
use time::OffsetDateTime;

use super::auth::Principal;
use super::extract::ApiJson;
use super::{ApiError, AppState};
use crate::auth::{valid_tenant, StoredQuota, StoredToken, TicketTarget};

/// Longest token lifetime accepted: ten years.
const MAX_TOKEN_TTL_SECS: u64 = 10 * 366 * 24 * 3600;

fn time_of(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn info(t: StoredToken) -> TokenInfo {
    TokenInfo {
        id: t.id,
        tenant: t.tenant,
        role: t.role,
        created_at: time_of(t.created_at_ms),
        expires_at: t.expires_at_ms.map(time_of),
        revoked_at: t.revoked_at_ms.map(time_of),
    }
}

fn check_tenant(tenant: &str) -> Result<(), ApiError> {
    if valid_tenant(tenant) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "tenant: 1 to 64 characters among A-Z a-z 0-9 . _ -",
        ))
    }
}

fn internal(e: impl std::error::Error + 'static) -> ApiError {
    ApiError::internal(&e)
}

pub async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<impl IntoResponse, ApiError> {
    principal.require_admin()?;
    check_tenant(&body.tenant)?;
    let ttl = match body.ttl_secs {
        None => None,
        Some(s) if (1..=MAX_TOKEN_TTL_SECS).contains(&s) => Some(Duration::from_secs(s)),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "ttl_secs: must be between 1 and {MAX_TOKEN_TTL_SECS}"
            )))
        }
    };
    let (token, secret) = state
        .auth
        .create_token(&body.tenant, body.role, ttl)
        .await
        .map_err(internal)?;
    tracing::info!(id = %token.id, tenant = %token.tenant, role = token.role.as_str(),
        by = ?principal.token_id, "token created");
    Ok(super::created(
        format!("/v1/tokens/{}", token.id),
        TokenCreated {
            id: token.id,
            token: secret,
            tenant: token.tenant,
            role: token.role,
            expires_at: token.expires_at_ms.map(time_of),
        },
    ))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<TokenList>, ApiError> {
    principal.require_admin()?;
    let tokens = state.auth.tokens().await.map_err(internal)?;
    Ok(Json(TokenList {
        items: tokens.into_iter().map(info).collect(),
    }))
}

pub async fn revoke(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    principal.require_admin()?;
    let done = state.auth.revoke_token(&id).await.map_err(internal)?;
    if !done {
        return Err(ApiError::not_found("no such token"));
    }
    tracing::info!(%id, by = ?principal.token_id, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}

fn to_i64(field: &str, v: Option<u64>) -> Result<Option<i64>, ApiError> {
    v.map(|n| i64::try_from(n).map_err(|_| ApiError::invalid(format!("{field}: too large"))))
        .transpose()
}

pub async fn put_quota(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(tenant): Path<String>,
    ApiJson(body): ApiJson<Quota>,
) -> Result<Json<Quota>, ApiError> {
    principal.require_admin()?;
    check_tenant(&tenant)?;
    if body.tenant.as_deref().is_some_and(|t| t != tenant) {
        return Err(ApiError::invalid("tenant: differs from the path"));
    }
    let quota = StoredQuota {
        max_sandboxes: to_i64("max_sandboxes", body.max_sandboxes)?,
        max_memory_bytes: to_i64("max_memory_bytes", body.max_memory_bytes)?,
        max_images: to_i64("max_images", body.max_images)?,
        max_image_bytes: to_i64("max_image_bytes", body.max_image_bytes)?,
    };
    state
        .auth
        .set_quota(&tenant, &quota)
        .await
        .map_err(internal)?;
    Ok(Json(Quota {
        tenant: Some(tenant),
        max_sandboxes: body.max_sandboxes,
        max_memory_bytes: body.max_memory_bytes,
        max_images: body.max_images,
        max_image_bytes: body.max_image_bytes,
    }))
}

/// `GET /v1/tenants/{tenant}/quota`: an admin reads any tenant's quota, a user only its own
/// (another tenant's answers 404, like everything of other tenants).
pub async fn get_quota(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(tenant): Path<String>,
) -> Result<Json<Quota>, ApiError> {
    check_tenant(&tenant)?;
    if !principal.is_admin() && principal.tenant != tenant {
        return Err(ApiError::not_found("no such tenant"));
    }
    let quota = state.auth.quota(&tenant).await.map_err(internal)?;
    let to_u64 = |v: Option<i64>| v.and_then(|n| u64::try_from(n).ok());
    Ok(Json(Quota {
        tenant: Some(tenant),
        max_sandboxes: to_u64(quota.max_sandboxes),
        max_memory_bytes: to_u64(quota.max_memory_bytes),
        max_images: to_u64(quota.max_images),
        max_image_bytes: to_u64(quota.max_image_bytes),
    }))
}

/// `POST /v1/tickets`: a ticket for the websocket routes of one sandbox the caller can see (404
/// for any other, like everywhere).
pub async fn ticket(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiJson(body): ApiJson<CreateTicket>,
) -> Result<Json<Ticket>, ApiError> {
    let sandbox = state.svc.find(&principal.scope(), &body.sandbox).await?;
    let target = TicketTarget {
        id: sandbox.id.to_string(),
        name: sandbox.name,
    };
    let (ticket, ttl) = state
        .auth
        .issue_ticket(principal, target)
        .map_err(internal)?;
    Ok(Json(Ticket {
        ticket,
        expires_at: OffsetDateTime::now_utc() + ttl,
    }))
}
