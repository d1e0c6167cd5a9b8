//! `/v1/sandboxes/{id}/start`, `/files` and `/archive`: start a created sandbox, and move files
//! in and out.
//!
//! Paths and modes are checked here (400) before anything reaches the helper. Content streams
//! between the HTTP body and the service's [`Transfer`] one chunk at a time: the daemon never
//! holds a whole file, whatever its size.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use sandboxd_api::Sandbox;
use sandboxd_protocol::files::{check_mode, FileKind, FileOp, SandboxPath};
use serde::Deserialize;

use super::auth::Principal;
use super::extract::{ApiQuery, IdOrName};
use super::{ApiError, AppState};
use crate::sandboxes::{FileError, Transfer};

/// How long an upload may pause between two pieces of its body.
const UPLOAD_IDLE: Duration = Duration::from_secs(60);

/// Transfers in progress at once, across all clients: each holds a helper process (a file
/// worker) for as long as it lasts. Beyond: 429.
const MAX_TRANSFERS: usize = 64;
static TRANSFERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_TRANSFERS);

fn transfer_slot() -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
    TRANSFERS.try_acquire().map_err(|_| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            sandboxd_api::ErrorCode::TooManyTransfers,
            format!("{MAX_TRANSFERS} file transfers are in progress; retry later"),
        )
    })
}

/// Header of `GET /files` answers for a regular file: its permission bits in octal.
pub const MODE_HEADER: &str = "x-sandbox-file-mode";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileParams {
    path: String,
    /// Permission bits in octal (`0644`, `755`), `PUT /files` only.
    #[serde(default)]
    mode: Option<String>,
}

/// Parse and check the query for `op`: everything a client can get wrong is a 400 here.
fn checked(params: &FileParams, op: FileOp) -> Result<(SandboxPath, Option<u32>), ApiError> {
    let path =
        SandboxPath::parse(&params.path).map_err(|e| ApiError::invalid(format!("path: {e}")))?;
    path.check_for(op)
        .map_err(|e| ApiError::invalid(format!("path: {e}")))?;
    let mode = match (&params.mode, op) {
        (None, _) => None,
        (Some(m), FileOp::Put) => Some(
            u32::from_str_radix(m, 8)
                .map_err(|_| ApiError::invalid("mode: must be octal permission bits like 0644"))
                .and_then(|m| check_mode(m).map_err(|e| ApiError::invalid(format!("mode: {e}"))))?,
        ),
        (Some(_), _) => {
            return Err(ApiError::invalid(
                "mode: only applies to PUT /files (an archive carries its own modes)",
            ))
        }
    };
    Ok((path, mode))
}

pub async fn start(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
) -> Result<Json<Sandbox>, ApiError> {
    let sandbox = state.svc.start(&principal.scope(), &id).await?;
    Ok(Json(principal.shown(sandbox)))
}

pub async fn get_file(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<FileParams>,
) -> Result<Response, ApiError> {
    download(state, principal, id, params, FileOp::Get).await
}

pub async fn get_archive(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<FileParams>,
) -> Result<Response, ApiError> {
    download(state, principal, id, params, FileOp::GetArchive).await
}

pub async fn put_file(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<FileParams>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    upload(state, principal, id, params, FileOp::Put, body).await
}

pub async fn put_archive(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<FileParams>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    upload(state, principal, id, params, FileOp::PutArchive, body).await
}

pub async fn delete_file(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    IdOrName(id): IdOrName,
    ApiQuery(params): ApiQuery<FileParams>,
) -> Result<StatusCode, ApiError> {
    let (path, _) = checked(&params, FileOp::Delete)?;
    let _slot = transfer_slot()?;
    let transfer = state
        .svc
        .transfer(&principal.scope(), &id, FileOp::Delete, &path, None)
        .await?;
    transfer.outcome().await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn download(
    state: AppState,
    principal: Principal,
    id: String,
    params: FileParams,
    op: FileOp,
) -> Result<Response, ApiError> {
    let (path, _) = checked(&params, op)?;
    let slot = transfer_slot()?;
    let transfer = state
        .svc
        .transfer(&principal.scope(), &id, op, &path, None)
        .await?;
    let ready = transfer.ready().clone();
    let content_type = match ready.kind {
        FileKind::Directory => "application/json",
        FileKind::Archive => "application/x-tar",
        _ => "application/octet-stream",
    };
    let mut response = Body::from_stream(chunks(transfer, slot)).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if ready.kind == FileKind::File {
        // The worker sends exactly this many bytes (zeros if the file shrank meanwhile); an
        // error on the way cuts the body short, which the client sees.
        if let Some(size) = ready.size {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        if let Some(mode) = ready.mode {
            if let Ok(v) = HeaderValue::from_str(&format!("{:04o}", mode)) {
                headers.insert(MODE_HEADER, v);
            }
        }
    }
    Ok(response)
}

/// The content chunks of a download as a body stream; an error at the end (or a broken
/// connection) becomes a stream error, which aborts the HTTP body.
/// The transfer's slot is held until the stream ends (or the client goes away and drops it).
fn chunks(
    transfer: Transfer,
    slot: tokio::sync::SemaphorePermit<'static>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(Some((transfer, slot)), |state| async move {
        let (mut transfer, slot) = state?;
        match transfer.next_chunk().await {
            Ok(Some(data)) => Some((Ok(data), Some((transfer, slot)))),
            Ok(None) => None,
            Err(FileError::Refused(e)) => {
                tracing::info!(error = %e.message, "a download failed part-way");
                Some((Err(std::io::Error::other(e.message)), None))
            }
            Err(_) => Some((
                Err(std::io::Error::other("the file worker broke off")),
                None,
            )),
        }
    })
}

async fn upload(
    state: AppState,
    principal: Principal,
    id: String,
    params: FileParams,
    op: FileOp,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let mut body = body.into_data_stream();
    let result = send_upload(state, principal, id, params, op, &mut body).await;
    if result.is_err() {
        drain(&mut body).await;
    }
    result
}

/// Read what is left of a refused upload (within bounds) before answering: an HTTP/1.1 client
/// still sending its body would otherwise see a broken connection instead of the answer.
async fn drain(body: &mut axum::body::BodyDataStream) {
    let mut left = DRAIN_MAX;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while let Some(Ok(data)) = body.next().await {
            left = left.saturating_sub(data.len());
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// At most this much of a refused upload is read and discarded, for at most this long.
const DRAIN_MAX: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

async fn send_upload(
    state: AppState,
    principal: Principal,
    id: String,
    params: FileParams,
    op: FileOp,
    body: &mut axum::body::BodyDataStream,
) -> Result<StatusCode, ApiError> {
    let (path, mode) = checked(&params, op)?;
    let _slot = transfer_slot()?;
    let mut transfer = state
        .svc
        .transfer(&principal.scope(), &id, op, &path, mode)
        .await?;
    loop {
        let next = match tokio::time::timeout(UPLOAD_IDLE, body.next()).await {
            Ok(next) => next,
            Err(_) => {
                // Dropping the transfer without its end makes the worker discard the upload.
                return Err(ApiError::from_status(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body stalled",
                ));
            }
        };
        let data = match next {
            None => break,
            Some(Ok(data)) => data,
            Some(Err(e)) => {
                return Err(ApiError::invalid(format!(
                    "the request body broke off: {e}"
                )))
            }
        };
        match transfer.send(&data).await {
            Ok(()) => {}
            // The worker stopped reading: its verdict says why.
            Err(FileError::Stopped) => {
                return transfer
                    .outcome()
                    .await
                    .map(|()| StatusCode::NO_CONTENT)
                    .map_err(ApiError::from)
            }
            Err(e) => return Err(e.into()),
        }
    }
    transfer.end_upload().await?;
    Ok(StatusCode::NO_CONTENT)
}
