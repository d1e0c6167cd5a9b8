//! Extractors whose rejections use the API's error shape: a JSON body (content type checked,
//! size limited by the router's `DefaultBodyLimit`) and a query string.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// Largest request body accepted (413 beyond).
pub const MAX_BODY: usize = 1024 * 1024;

/// A JSON request body.
pub struct ApiJson<T>(pub T);

/// Like [`ApiJson`], but an empty body (with any or no content type) gives `T::default()`.
pub struct OptionalJson<T>(pub T);

fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

async fn body_bytes<S: Send + Sync>(
    req: Request,
    state: &S,
) -> Result<(HeaderMap, Bytes), ApiError> {
    let headers = req.headers().clone();
    // A body (at most 1 MiB) must arrive within BODY_TIMEOUT: a client trickling it byte by byte
    // must not hold a connection and a task forever.
    let bytes = tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, state))
        .await
        .map_err(|_| {
            ApiError::from_status(
                axum::http::StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            )
        })?
        .map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
    Ok((headers, bytes))
}

/// How long a request body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn parse<T: DeserializeOwned>(headers: &HeaderMap, bytes: &[u8]) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::from_status(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected Content-Type: application/json",
        ));
    }
    if super::limits::json_too_deep(bytes, super::limits::MAX_JSON_DEPTH) {
        return Err(ApiError::invalid("JSON nested too deeply"));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (headers, bytes) = body_bytes(req, state).await?;
        parse(&headers, &bytes).map(ApiJson)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let (headers, bytes) = body_bytes(req, state).await?;
        if bytes.is_empty() {
            return Ok(OptionalJson(T::default()));
        }
        parse(&headers, &bytes).map(OptionalJson)
    }
}

/// A query string.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|r| ApiError::invalid(r.body_text()))
    }
}

/// The `{id}` path segment (an id or a name).
pub struct IdOrName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for IdOrName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<String>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(p)| IdOrName(p))
            .map_err(|r| ApiError::invalid(r.body_text()))
    }
}
