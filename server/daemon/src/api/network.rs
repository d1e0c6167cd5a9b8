//! `/v1/sandboxes/{id}/network`: replace the egress policy (`PATCH`) and list the denials.

use axum::extract::State;
use axum::{Extension, Json};
use sandboxd_api::{EgressDenialList, NetworkInfo, NetworkUpdate};
use serde::Deserialize;

use super::auth::Principal;
use super::extract::{ApiJson, ApiQuery, IdOrName};
use super::{ApiError, AppState};
use crate::sandboxes::MAX_DENIALS_LISTED;

const DEFAULT_DENIALS: u32 = 100;

pub async fn patch(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiJson(body): ApiJson<NetworkUpdate>,
) -> Result<Json<NetworkInfo>, ApiError> {
    body.egress
        .check_size()
        .map_err(|e| ApiError::invalid(format!("egress: {e}")))?;
    let info = state
        .svc
        .set_egress(&principal.scope(), &id, body.egress)
        .await?;
    Ok(Json(info))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenialParams {
    limit: Option<u32>,
}

pub async fn denials(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<DenialParams>,
) -> Result<Json<EgressDenialList>, ApiError> {
    let limit = params.limit.unwrap_or(DEFAULT_DENIALS);
    if !(1..=MAX_DENIALS_LISTED).contains(&limit) {
        return Err(ApiError::invalid(format!(
            "limit: must be between 1 and {MAX_DENIALS_LISTED}"
        )));
    }
    let items = state
        .svc
        .egress_denials(&principal.scope(), &id, limit)
        .await?;
    Ok(Json(EgressDenialList { items }))
}
