//! [`ApiError`]: the one error type of the HTTP edge, rendered as `sandboxd_api::ErrorBody`.
//!
//! Client mistakes get a 4xx with a message that names the problem; server-side failures get a
//! 5xx with a generic message, while the detail (which may contain host paths) goes to the log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sandboxd_api::{ErrorBody, ErrorCode, ErrorDetail};

use crate::sandboxes::{ExecError, FileError, ImageError, SandboxError};
use crate::validate::ValidationError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// A failure on our side: log the whole chain, answer without internals.
    pub fn internal(err: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %chain(err), "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "internal error",
        )
    }

    /// Map any status code (typically from a framework rejection) to the error shape.
    pub fn from_status(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status {
            StatusCode::BAD_REQUEST => ErrorCode::InvalidRequest,
            StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
            StatusCode::FORBIDDEN => ErrorCode::Forbidden,
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::CONFLICT => ErrorCode::Conflict,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::Unprocessable,
            StatusCode::REQUEST_TIMEOUT => ErrorCode::RequestTimeout,
            s if s.is_client_error() => ErrorCode::InvalidRequest,
            _ => ErrorCode::Internal,
        };
        let status = if status.is_client_error() || status.is_server_error() {
            status
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, code, message)
    }
}

pub use crate::chain;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                request_id: super::request_id::current(),
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::invalid(e.0)
    }
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        match &e {
            SandboxError::NotFound => ApiError::not_found("no such sandbox"),
            SandboxError::NameTaken => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::Conflict,
                "name: already taken",
            ),
            SandboxError::AmbiguousName(_) => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::AmbiguousName,
                e.to_string(),
            ),
            SandboxError::NoCapacity | SandboxError::NoAddress => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::NoCapacity,
                e.to_string(),
            ),
            SandboxError::NotRunning => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::NotRunning, e.to_string())
            }
            SandboxError::NotCreated => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::NotCreated, e.to_string())
            }
            SandboxError::BadSignal(_) => ApiError::invalid(format!("signal: {e}")),
            SandboxError::Limit(l) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, l.code(), l.to_string())
            }
            SandboxError::QuotaExceeded(m) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::QuotaExceeded,
                m.clone(),
            ),
            SandboxError::MemoryLimitRequired => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::MemoryLimitRequired,
                e.to_string(),
            ),
            SandboxError::StopTimeout => {
                tracing::warn!(error = %chain(&e), "sandbox busy");
                ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::Conflict,
                    "the sandbox is still stopping; retry",
                )
            }
            // What holds the sandbox (a transfer, a stop in progress) is the message itself.
            SandboxError::Busy(m) => {
                tracing::info!(error = %chain(&e), "sandbox busy");
                ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, m.clone())
            }
            SandboxError::SpawnFailed { id, .. } => {
                tracing::error!(error = %chain(&e), "spawn failed");
                // The same text as the sandbox's `error` field, which its owner can read anyway:
                // a client that prints only this answer still says what went wrong.
                let detail = e.spawn_failure().unwrap_or_default();
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::SpawnFailed,
                    format!("setting up sandbox {id} failed: {detail} (also in its error field)"),
                )
            }
            SandboxError::UnknownImage(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::UnknownImage,
                e.to_string(),
            ),
            SandboxError::UnknownUser(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::UnknownUser,
                e.to_string(),
            ),
            SandboxError::Launch(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::NoCommand,
                e.to_string(),
            ),
            SandboxError::NetworkUnavailable(m) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::NetworkUnavailable,
                m.clone(),
            ),
            SandboxError::InsufficientStorage(m) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                ErrorCode::InsufficientStorage,
                m.clone(),
            ),
            SandboxError::PortNotAllowed(m) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::PortNotAllowed,
                m.clone(),
            ),
            SandboxError::EgressUnavailable(m) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::EgressUnavailable,
                m.clone(),
            ),
            SandboxError::EgressNotAllowed(_) => ApiError::new(
                StatusCode::FORBIDDEN,
                ErrorCode::EgressNotAllowed,
                e.to_string(),
            ),
            SandboxError::PortInUse(m) => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::PortInUse,
                format!("network.ports: {m}"),
            ),
            SandboxError::Store(_)
            | SandboxError::Helper(_)
            | SandboxError::Monitor(_)
            | SandboxError::Task(_) => ApiError::internal(&e),
        }
    }
}

impl From<ExecError> for ApiError {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::Sandbox(e) => e.into(),
            ExecError::NotFound => ApiError::not_found("no such exec"),
            ExecError::StdinBusy => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::StdinBusy, e.to_string())
            }
            ExecError::NoStdin => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::NoStdin, e.to_string())
            }
            ExecError::Failed(_) => {
                tracing::error!(error = %chain(&e), "exec failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::ExecFailed,
                    e.to_string(),
                )
            }
            ExecError::Store(_) | ExecError::Monitor(_) | ExecError::Task(_) => {
                ApiError::internal(&e)
            }
        }
    }
}

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        match e {
            FileError::Sandbox(e) => e.into(),
            FileError::NoFiles(m) => ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, m),
            FileError::Refused(ref h) => {
                use sandboxd_protocol::wire::HelperErrorCode as C;
                match h.code {
                    C::Invalid => ApiError::invalid(h.message.clone()),
                    C::NotFound => ApiError::not_found(h.message.clone()),
                    C::Denied => ApiError::new(
                        StatusCode::FORBIDDEN,
                        ErrorCode::Forbidden,
                        h.message.clone(),
                    ),
                    C::Busy => {
                        ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, h.message.clone())
                    }
                    _ => ApiError::internal(&e),
                }
            }
            FileError::Stopped | FileError::Helper(_) | FileError::Unexpected(_) => {
                ApiError::internal(&e)
            }
        }
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::NotFound => ApiError::not_found("no such image"),
            ImageError::InUse(_) => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::ImageInUse, e.to_string())
            }
            ImageError::Exists => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::ImageExists, e.to_string())
            }
            ImageError::Bad(m) => ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadImage, m),
            ImageError::TooLarge(m) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::ImageTooLarge, m)
            }
            ImageError::Quota(m) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, ErrorCode::QuotaExceeded, m)
            }
            ImageError::InsufficientStorage(m) => ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                ErrorCode::InsufficientStorage,
                m,
            ),
            ImageError::Upload(_)
            | ImageError::Store(_)
            | ImageError::Helper(_)
            | ImageError::Task(_) => ApiError::internal(&e),
        }
    }
}
