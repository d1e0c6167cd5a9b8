//! The one error type of the client library.

use sandboxd_api::{ErrorBody, ErrorCode};

/// Everything that can go wrong talking to sandboxd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL given with `--url` / `SANDBOXD_URL` is not a usable `http://` URL.
    #[error("invalid daemon url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },

    /// The request never got an HTTP answer (connection refused, reset, timed out...).
    #[error("cannot reach sandboxd at {url}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },

    /// The daemon answered with an error status; `code` and `message` come from its `ErrorBody`.
    #[error("{message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },

    /// The daemon answered with a success status but a body that is not the expected JSON.
    #[error("unexpected response from sandboxd")]
    Decode(#[source] reqwest::Error),

    /// Reading a streamed response body failed.
    #[error("reading response from sandboxd")]
    Body(#[source] reqwest::Error),

    /// The log websocket could not be opened or failed in a way that is not worth retrying.
    #[error("log websocket")]
    WebSocket(#[source] Box<tokio_tungstenite::tungstenite::Error>),

    /// Opening the connection of the log websocket failed (TCP or unix socket).
    #[error("cannot reach sandboxd at {url}")]
    WebSocketConnect {
        url: String,
        #[source]
        source: std::io::Error,
    },

    /// The log websocket sent something that does not follow the protocol.
    #[error("malformed log message: {0}")]
    LogProtocol(String),

    /// The log websocket kept dropping before the final `LogEnd` arrived.
    #[error("log stream dropped {attempts} times in a row at offset {offset}; giving up")]
    LogsInterrupted { attempts: u32, offset: u64 },

    /// A local file could not be read (an image archive to upload).
    #[error("reading {0}")]
    Io(String, #[source] std::io::Error),
}

impl ClientError {
    /// The HTTP status of an API error, if this is one.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's machine-readable error code (`not_found`, `conflict`...), if this is an API error.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True for an API error with status 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// Builds an `Api` error from a status and an error body that may or may not be an `ErrorBody`.
    pub(crate) fn from_status_body(status: u16, body: &[u8]) -> Self {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(parsed) => ClientError::Api {
                status,
                code: parsed.error.code,
                message: parsed.error.message,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                let message = if text.is_empty() {
                    format!("daemon answered HTTP {status}")
                } else {
                    format!("daemon answered HTTP {status}: {text}")
                };
                ClientError::Api {
                    status,
                    code: ErrorCode::Other(format!("http_{status}")),
                    message,
                }
            }
        }
    }
}

/// Result with a `ClientError`.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_parsed() {
        let err = ClientError::from_status_body(
            404,
            br#"{"error":{"code":"not_found","message":"no sandbox named x"}}"#,
        );
        assert_eq!(err.status(), Some(404));
        assert_eq!(err.code(), Some(&ErrorCode::NotFound));
        assert_eq!(err.to_string(), "no sandbox named x");
        assert!(err.is_not_found());
    }

    #[test]
    fn non_json_error_body_keeps_status_and_text() {
        let err = ClientError::from_status_body(502, b"bad gateway\n");
        assert_eq!(err.code(), Some(&ErrorCode::Other("http_502".into())));
        assert_eq!(err.to_string(), "daemon answered HTTP 502: bad gateway");
        let err = ClientError::from_status_body(500, b"");
        assert_eq!(err.to_string(), "daemon answered HTTP 500");
    }
}
