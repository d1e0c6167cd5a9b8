//! [`ApiError`]: the one error type of the HTTP edge, rendered as `sandboxd_api::ErrorBody`.
//!
//! Client mistakes get a 4xx with a message that names the problem; server-side failures get a
//! 5xx with a generic message, while the detail (which may contain host paths) goes to the log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sandboxd_api::{ErrorBody, ErrorDetail};

use crate::sandboxes::ServiceError;
use crate::validate::ValidationError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A failure on our side: log the whole chain, answer without internals.
    pub fn internal(err: &(dyn std::error::Error + 'static)) -> Self {
        tracing::error!(error = %chain(err), "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    /// Map any status code (typically from a framework rejection) to the error shape.
    pub fn from_status(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status {
            StatusCode::BAD_REQUEST => "invalid_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::CONFLICT => "conflict",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
            StatusCode::REQUEST_TIMEOUT => "request_timeout",
            s if s.is_client_error() => "invalid_request",
            _ => "internal",
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
                code: self.code.to_owned(),
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
            ServiceError::NameTaken => {
                ApiError::new(StatusCode::CONFLICT, "conflict", "name: already taken")
            }
            ServiceError::NoCapacity => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_capacity",
                e.to_string(),
            ),
            ServiceError::NotRunning => {
                ApiError::new(StatusCode::CONFLICT, "not_running", e.to_string())
            }
            ServiceError::NotCreated => {
                ApiError::new(StatusCode::CONFLICT, "not_created", e.to_string())
            }
            ServiceError::NoFiles(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m.clone()),
            ServiceError::Files(h) => {
                use sandboxd_protocol::wire::HelperErrorCode as C;
                match h.code {
                    C::Invalid => ApiError::invalid(h.message.clone()),
                    C::NotFound => ApiError::not_found(h.message.clone()),
                    C::Denied => {
                        ApiError::new(StatusCode::FORBIDDEN, "forbidden", h.message.clone())
                    }
                    C::Busy => ApiError::new(StatusCode::CONFLICT, "conflict", h.message.clone()),
                    _ => ApiError::internal(&e),
                }
            }
            ServiceError::BadSignal(_) => ApiError::invalid(format!("signal: {e}")),
            ServiceError::Limit(l) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, l.code(), l.to_string())
            }
            ServiceError::QuotaExceeded(m) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", m.clone())
            }
            ServiceError::MemoryLimitRequired => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "memory_limit_required",
                e.to_string(),
            ),
            ServiceError::StopTimeout | ServiceError::Busy(_) => {
                tracing::warn!(error = %chain(&e), "sandbox busy");
                ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    "the sandbox is still stopping; retry",
                )
            }
            ServiceError::SpawnFailed { id, .. } => {
                tracing::error!(error = %chain(&e), "spawn failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "spawn_failed",
                    format!("setting up sandbox {id} failed; its error field has the detail"),
                )
            }
            ServiceError::ExecNotFound => ApiError::not_found("no such exec"),
            ServiceError::StdinBusy => {
                ApiError::new(StatusCode::CONFLICT, "stdin_busy", e.to_string())
            }
            ServiceError::NoStdin => ApiError::new(StatusCode::CONFLICT, "no_stdin", e.to_string()),
            ServiceError::ExecFailed(_) => {
                tracing::error!(error = %chain(&e), "exec failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exec_failed",
                    e.to_string(),
                )
            }
            ServiceError::ImageNotFound => ApiError::not_found("no such image"),
            ServiceError::UnknownImage(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_image",
                e.to_string(),
            ),
            ServiceError::ImageInUse(_) => {
                ApiError::new(StatusCode::CONFLICT, "image_in_use", e.to_string())
            }
            ServiceError::ImageExists => {
                ApiError::new(StatusCode::CONFLICT, "image_exists", e.to_string())
            }
            ServiceError::BadImage(m) => ApiError::new(StatusCode::BAD_REQUEST, "bad_image", m),
            ServiceError::ImageTooLarge(m) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", m)
            }
            ServiceError::Upload(_) => ApiError::internal(&e),
            ServiceError::NetworkUnavailable(m) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "network_unavailable",
                m.clone(),
            ),
            ServiceError::PortInUse(m) => ApiError::new(
                StatusCode::CONFLICT,
                "port_in_use",
                format!("network.ports: {m}"),
            ),
            ServiceError::NoAddress => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_capacity",
                e.to_string(),
            ),
            ServiceError::Store(_)
            | ServiceError::Helper(_)
            | ServiceError::Monitor(_)
            | ServiceError::Task(_) => ApiError::internal(&e),
        }
    }
}
