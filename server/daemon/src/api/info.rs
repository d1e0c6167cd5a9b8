//! `GET /v1/info`: what this host can enforce.

use axum::extract::State;
use axum::Json;
use sandboxd_api::Info;

use super::{ApiError, AppState};

pub async fn info(State(state): State<AppState>) -> Result<Json<Info>, ApiError> {
    Ok(Json(state.svc.info().await?))
}
