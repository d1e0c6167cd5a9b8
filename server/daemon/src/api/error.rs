//! [`ApiError`]: the one error type of the HTTP edge, rendered as `sandboxd_api::ErrorBody`.
//!
//! Client mistakes get a 4xx with a message that names the problem; server-side failures get a
//! 5xx with a generic message, while the detail (which may contain host paths) goes to the log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sandboxd_api::{ErrorBody, ErrorCode, ErrorDetail};

use crate::sandboxes::ServiceError;
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

/// `outer: inner: innermost`, for logs.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut next = err.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
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

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match &e {
            ServiceError::NotFound => ApiError::not_found("no such sandbox"),
            ServiceError::NameTaken => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::Conflict,
                "name: already taken",
            ),
            ServiceError::NoCapacity => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::NoCapacity,
                e.to_string(),
            ),
            ServiceError::NotRunning => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::NotRunning, e.to_string())
            }
            ServiceError::NotCreated => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::NotCreated, e.to_string())
            }
            ServiceError::NoFiles(m) => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::Conflict, m.clone())
            }
            ServiceError::Files(h) => {
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
            ServiceError::BadSignal(_) => ApiError::invalid(format!("signal: {e}")),
            ServiceError::Limit(l) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, l.code(), l.to_string())
            }
            ServiceError::QuotaExceeded(m) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::QuotaExceeded,
                m.clone(),
            ),
            ServiceError::MemoryLimitRequired => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::MemoryLimitRequired,
                e.to_string(),
            ),
            ServiceError::StopTimeout | ServiceError::Busy(_) => {
                tracing::warn!(error = %chain(&e), "sandbox busy");
                ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorCode::Conflict,
                    "the sandbox is still stopping; retry",
                )
            }
            ServiceError::SpawnFailed { id, .. } => {
                tracing::error!(error = %chain(&e), "spawn failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::SpawnFailed,
                    format!("setting up sandbox {id} failed; its error field has the detail"),
                )
            }
            ServiceError::ExecNotFound => ApiError::not_found("no such exec"),
            ServiceError::StdinBusy => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::StdinBusy, e.to_string())
            }
            ServiceError::NoStdin => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::NoStdin, e.to_string())
            }
            ServiceError::ExecFailed(_) => {
                tracing::error!(error = %chain(&e), "exec failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::ExecFailed,
                    e.to_string(),
                )
            }
            ServiceError::ImageNotFound => ApiError::not_found("no such image"),
            ServiceError::UnknownImage(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::UnknownImage,
                e.to_string(),
            ),
            ServiceError::ImageInUse(_) => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::ImageInUse, e.to_string())
            }
            ServiceError::ImageExists => {
                ApiError::new(StatusCode::CONFLICT, ErrorCode::ImageExists, e.to_string())
            }
            ServiceError::BadImage(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadImage, m)
            }
            ServiceError::ImageTooLarge(m) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::ImageTooLarge, m)
            }
            ServiceError::Upload(_) => ApiError::internal(&e),
            ServiceError::NetworkUnavailable(m) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorCode::NetworkUnavailable,
                m.clone(),
            ),
            ServiceError::PortInUse(m) => ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::PortInUse,
                format!("network.ports: {m}"),
            ),
            ServiceError::NoAddress => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::NoCapacity,
                e.to_string(),
            ),
            ServiceError::Store(_)
            | ServiceError::Helper(_)
            | ServiceError::Monitor(_)
            | ServiceError::Task(_) => ApiError::internal(&e),
        }
    }
}
