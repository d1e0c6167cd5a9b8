//! Browser safety at the edge: `Host` and `Origin` checks for a daemon that listens on localhost.
//!
//! A web page the user opens can aim requests at `127.0.0.1:4280`. Two attacks matter:
//! * DNS rebinding: a page on `evil.example` makes its name resolve to 127.0.0.1 and then talks to
//!   the daemon "same-origin". Its requests carry `Host: evil.example`, so only IP literals,
//!   `localhost` and names the operator allows (`--allowed-host`) are accepted.
//! * Cross-site requests and websocket hijacking: a page can open a websocket or send a form POST
//!   to the daemon. Browsers always send `Origin` with those; state-changing requests and
//!   websocket upgrades that carry an `Origin` must name one the operator allows
//!   (`--allowed-origin`). Requests without `Origin` (curl, CI jobs, `sbx`) are not browsers'.
//!
//! Both answer 403 in the API's error shape.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::ApiError;

/// What the operator allows besides loopback.
#[derive(Debug, Clone, Default)]
pub struct RequestGuard {
    /// Extra host names (lower case) accepted in `Host`.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`, lower case) accepted on state-changing requests and
    /// websocket upgrades.
    pub allowed_origins: Vec<String>,
}

impl RequestGuard {
    pub fn new(hosts: &[String], origins: &[String]) -> Self {
        RequestGuard {
            allowed_hosts: hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
            allowed_origins: origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a `Host` header value may address this daemon.
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        // Strip the port: "[::1]:4280", "127.0.0.1:4280", "localhost:4280", "name".
        let name = if let Some(rest) = host.strip_prefix('[') {
            rest.split(']').next().unwrap_or("")
        } else {
            host.rsplit_once(':').map(|(h, _)| h).unwrap_or(&host)
        };
        // An IP literal cannot be rebound: a page addressing it is on that address already.
        name.parse::<IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.allowed_hosts.iter().any(|h| h == name)
    }

    pub fn origin_allowed(&self, origin: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        self.allowed_origins.contains(&origin)
    }
}

fn forbidden(code: sandboxd_api::ErrorCode, message: String) -> Response {
    ApiError::new(axum::http::StatusCode::FORBIDDEN, code, message).into_response()
}

async fn check(State(guard): State<Arc<RequestGuard>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !guard.host_allowed(host) {
            return forbidden(
                sandboxd_api::ErrorCode::ForbiddenHost,
                format!("Host {host:?} is not this daemon's (allow it with --allowed-host)"),
            );
        }
    }
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let changes_state = !matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if websocket || changes_state {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !guard.origin_allowed(origin) {
                return forbidden(
                    sandboxd_api::ErrorCode::ForbiddenOrigin,
                    format!("Origin {origin:?} may not use this daemon (allow it with --allowed-origin)"),
                );
            }
        }
    }
    next.run(request).await
}

/// Wrap the application in the checks.
pub fn protect(router: Router, guard: RequestGuard) -> Router {
    router.layer(axum::middleware::from_fn_with_state(Arc::new(guard), check))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_origins() {
        let g = RequestGuard::new(
            &["sandboxd.internal".into()],
            &["https://dash.example:8443/".into()],
        );
        for ok in [
            "127.0.0.1:4280",
            "127.0.0.1",
            "[::1]:4280",
            "localhost:4280",
            "LOCALHOST",
            "10.1.2.3:80",
            "sandboxd.internal:4280",
            "a.localhost",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:4280",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        assert!(g.origin_allowed("https://dash.example:8443"));
        for bad in [
            "https://dash.example",
            "http://dash.example:8443",
            "null",
            "https://evil.example",
        ] {
            assert!(!g.origin_allowed(bad), "{bad}");
        }
    }
}
