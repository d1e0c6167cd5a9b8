//! `/v1/images`: import (the request body is the archive, streamed to disk), list, get, delete.
//! Images belong to the caller's tenant.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use sandboxd_api::ImageList;
use serde::Deserialize;

use super::auth::Principal;
use super::extract::ApiQuery;
use super::{ApiError, AppState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    name: Option<String>,
}

pub async fn import(
    state: State<AppState>,
    principal: Extension<Principal>,
    params: ApiQuery<ImportParams>,
    body: Body,
) -> Response {
    match import_inner(state, principal, params, body).await {
        Ok(created) => created.into_response(),
        // An error may come before the body was read (a taken name, a bad query): close the
        // connection instead of leaving an unread upload in it.
        Err(e) => {
            let mut response = e.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

async fn import_inner(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    ApiQuery(params): ApiQuery<ImportParams>,
    body: Body,
) -> Result<impl IntoResponse, ApiError> {
    let name = params
        .name
        .ok_or_else(|| ApiError::invalid("name: the query parameter is required"))?;
    crate::validate::check_image_name(&name)?;
    let image = state
        .svc
        .import_image(&principal.tenant, &name, body.into_data_stream())
        .await?;
    // Image names are `[A-Za-z0-9_.:-]`: nothing to escape in a path.
    Ok(super::created(format!("/v1/images/{}", image.name), image))
}

pub async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<impl IntoResponse, ApiError> {
    let images = state.svc.images(&principal.tenant).await?;
    Ok(Json(ImageList { images }))
}

pub async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(state.svc.image(&principal.tenant, &name).await?))
}

pub async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.svc.delete_image(&principal.tenant, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
