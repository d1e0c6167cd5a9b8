//! `X-Request-Id` on every answer: the client's own when it sent a valid one (1-128 of
//! `[A-Za-z0-9._:-]`), else a new UUID. The id is set on the request (so inner layers and a
//! second pass of this layer see the same one), on the response, in the JSON error body
//! (`error.request_id`, through a task-local that [`super::ApiError`] reads), and in the log
//! line of every request.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

pub const HEADER: &str = "x-request-id";
const MAX_LEN: usize = 128;

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The id of the request being answered, if inside [`layer`].
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Whether a client's id is one we echo.
fn acceptable(id: &str) -> bool {
    (1..=MAX_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The middleware.
pub async fn layer(mut request: Request, next: Next) -> Response {
    // A second pass (the app inside the served edge) keeps the first one's id and log line.
    if current().is_some() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|id| acceptable(id))
        .map(str::to_owned);
    let id = given.unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    // Only characters `acceptable` allows (or hex digits): always a valid header value.
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("-"));
    request.headers_mut().insert(HEADER, value.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut response = REQUEST_ID.scope(id.clone(), next.run(request)).await;
    tracing::debug!(request_id = %id, %method, %path, status = response.status().as_u16(), "request");
    response.headers_mut().insert(HEADER, value);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_are_echoed() {
        for ok in ["a", "req-1.2_3:x", &"x".repeat(128)] {
            assert!(acceptable(ok), "{ok:?}");
        }
        for bad in ["", "a b", "a\nb", "ä", &"x".repeat(129), "<script>"] {
            assert!(!acceptable(bad), "{bad:?}");
        }
    }
}
