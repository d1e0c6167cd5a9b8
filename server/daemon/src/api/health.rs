//! The routes anyone may call: `GET /healthz` (the daemon is up and answering), `GET /readyz`
//! (it can serve: the database and the helper answer) and `GET /version`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use super::AppState;

/// How long `/readyz` waits for each of the database and the helper.
const READY_WITHIN: Duration = Duration::from_secs(2);

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 `{"status": "ready", ...}` when both answer, else 503 `{"status": "not_ready", ...}`
/// naming the one that did not (its detail goes to the log, not to an unauthenticated caller).
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (db, helper) = state.svc.readiness(READY_WITHIN).await;
    let word = |r: &Result<(), String>, what: &str| match r {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(error = %e, "readyz: the {what} does not answer");
            "unavailable"
        }
    };
    let body = json!({
        "status": if db.is_ok() && helper.is_ok() { "ready" } else { "not_ready" },
        "database": word(&db, "database"),
        "helper": word(&helper, "helper"),
    });
    let status = if db.is_ok() && helper.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// The daemon's version and the API's.
pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION"), "api": "v1"}))
}
