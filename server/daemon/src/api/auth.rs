//! Authentication at the edge: every route but `GET /healthz` needs `Authorization: Bearer
//! <token>` (or, on a real websocket upgrade of one of the websocket routes of the sandbox the
//! ticket was issued for, a single-use `?ticket=` from `POST /v1/tickets`).
//!
//! The layer inserts a [`Principal`] request extension that handlers read; a request without one
//! never reaches a handler that needs it (the extractor fails closed). A [`LocalPeer`] extension,
//! set by the unix-socket listener for the daemon's own user, stands for the admin of tenant
//! `default` without a token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub use crate::auth::Principal;
pub use sandboxd_api::Role;

use super::limits::{rate_limited, RateLimiter};
use super::ApiError;
use crate::auth::Auth;
use crate::sandboxes::Scope;

/// Request extension present on every request that arrived over the local unix socket
/// (`<state-dir>/api.sock`) from the daemon's own uid or root (checked with SO_PEERCRED when the
/// connection was accepted). Inserted per connection by `transport.rs`; never set from anything
/// the client sends. Treated as `admin` of tenant `default` without a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPeer;

/// The tenant of the daemon's own user and of the bootstrap admin token.
pub const DEFAULT_TENANT: &str = "default";

impl Principal {
    pub fn local() -> Self {
        Principal {
            token_id: None,
            tenant: DEFAULT_TENANT.to_owned(),
            role: Role::Admin,
        }
    }

    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// What this principal may see: everything for an admin, its tenant for a user.
    pub fn scope(&self) -> Scope {
        match self.role {
            Role::Admin => Scope::All,
            Role::User => Scope::Tenant(self.tenant.clone()),
        }
    }

    /// A sandbox as this principal may see it: host details (`init_pid`, `host_uid`) are for
    /// admins only; a `user` token's sandbox objects omit them.
    pub fn shown(&self, mut sandbox: sandboxd_api::Sandbox) -> sandboxd_api::Sandbox {
        if !self.is_admin() {
            sandbox.init_pid = None;
            sandbox.host_uid = None;
        }
        sandbox
    }

    /// 403 `forbidden` unless an admin.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                sandboxd_api::ErrorCode::Forbidden,
                "this needs an admin token",
            ))
        }
    }
}

/// 401 `unauthorized` with `WWW-Authenticate: Bearer`.
pub fn unauthorized(message: &str) -> Response {
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        sandboxd_api::ErrorCode::Unauthorized,
        message,
    )
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"sandboxd\""),
    );
    resp
}

enum Credential<'a> {
    None,
    Malformed,
    Bearer(&'a str),
}

fn bearer(headers: &HeaderMap) -> Credential<'_> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Credential::None;
    };
    let Ok(value) = value.to_str() else {
        return Credential::Malformed;
    };
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Credential::Bearer(token.trim())
        }
        _ => Credential::Malformed,
    }
}

/// Whether a header's comma-separated values include `token` (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// A real websocket handshake (RFC 6455 section 4.1): `GET`, `Connection: upgrade`,
/// `Upgrade: websocket`, a `Sec-WebSocket-Key` and `Sec-WebSocket-Version: 13`.
fn is_websocket_upgrade(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_KEY)
            .is_some_and(|k| !k.as_bytes().is_empty())
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v.as_bytes() == b"13")
}

/// The sandbox (id or name, as written) of a websocket route's path: `/v1/sandboxes/{id}/logs`,
/// `/v1/sandboxes/{id}/attach`, `/v1/sandboxes/{id}/execs/{exec_id}/logs` and
/// `/v1/sandboxes/{id}/execs/{exec_id}/attach`. `None` for every other path.
fn websocket_route_sandbox(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let ok = match parts.as_slice() {
        [_, "logs" | "attach"] => true,
        [_, "execs", exec, "logs" | "attach"] => !exec.is_empty(),
        _ => false,
    };
    match parts.first() {
        Some(id) if ok && !id.is_empty() => Some(id),
        _ => None,
    }
}

/// The `ticket` query parameter, if any.
fn ticket_param(query: Option<&str>) -> Option<String> {
    let query = query?;
    for pair in query.split('&') {
        if let Some(value) = pair.strip_prefix("ticket=") {
            // Tickets are `sbxt_` + hex: nothing to percent-decode.
            return Some(value.to_owned());
        }
    }
    None
}

/// Routes anyone may call: liveness, readiness and the version.
fn is_public(method: &Method, path: &str) -> bool {
    method == Method::GET && matches!(path, "/healthz" | "/readyz" | "/version")
}

/// Failed authentications allowed per client address in a burst, and how fast the allowance
/// comes back: beyond it, every credential from that address is 429 until it refills (whatever
/// the token, so rotating made-up tokens gains nothing). The local socket is exempt.
pub const FAILED_AUTH_BURST: u32 = 20;
pub const FAILED_AUTH_PER_SEC: f64 = 0.5;

/// The authentication layer's state: token checks, and failed attempts per client address.
#[derive(Clone)]
pub struct Gate {
    auth: Arc<Auth>,
    failures: Arc<RateLimiter>,
}

impl Gate {
    /// `burst` refused credentials per address before 429 ([`FAILED_AUTH_BURST`] by default).
    pub fn new(auth: Arc<Auth>, burst: u32) -> Self {
        Gate {
            auth,
            failures: Arc::new(RateLimiter::new(FAILED_AUTH_PER_SEC, burst)),
        }
    }
}

/// The key failed attempts count against: the peer's IP address (`transport.rs` sets it on
/// every TCP and TLS connection; only the local socket and in-process tests have none).
fn address_key(request: &Request) -> Option<Vec<u8>> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| format!("ip:{}", addr.ip()).into_bytes())
}

pub async fn authenticate(State(gate): State<Gate>, request: Request, next: Next) -> Response {
    let key = address_key(&request);
    let Some(key) = key.filter(|_| {
        !is_public(request.method(), request.uri().path())
            && request.extensions().get::<LocalPeer>().is_none()
    }) else {
        return check_credentials(&gate.auth, request, next).await;
    };
    if let Err(wait) = gate.failures.peek(&key, Instant::now()) {
        return rate_limited(wait);
    }
    let presented = request.headers().contains_key(header::AUTHORIZATION)
        || ticket_param(request.uri().query()).is_some();
    let response = check_credentials(&gate.auth, request, next).await;
    if presented && response.status() == StatusCode::UNAUTHORIZED {
        // A credential that was presented and refused: one failure of this address.
        let _ = gate.failures.check(&key, Instant::now());
    }
    response
}

async fn check_credentials(auth: &Auth, mut request: Request, next: Next) -> Response {
    if is_public(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    if request.extensions().get::<LocalPeer>().is_some() {
        request.extensions_mut().insert(Principal::local());
        return next.run(request).await;
    }
    let checked = match bearer(request.headers()) {
        Credential::Bearer(secret) => auth.check_token(secret).await,
        Credential::Malformed => {
            return unauthorized("the Authorization header must be `Bearer <token>`")
        }
        Credential::None => match ticket_param(request.uri().query()) {
            Some(ticket) => {
                let sandbox = websocket_route_sandbox(request.uri().path())
                    .filter(|_| is_websocket_upgrade(request.method(), request.headers()));
                match sandbox {
                    Some(sandbox) => auth.redeem_ticket(&ticket, sandbox).await,
                    None => {
                        return unauthorized(
                            "a ticket is accepted only on a websocket upgrade of a sandbox's \
                             logs or attach route",
                        )
                    }
                }
            }
            None => return unauthorized("missing bearer token (Authorization: Bearer <token>)"),
        },
    };
    match checked {
        Ok(Some(principal)) => {
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Ok(None) => {
            unauthorized("invalid, expired or revoked token (or a ticket used on another sandbox)")
        }
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

/// Wrap a router in the authentication layer ([`super::app`] does it already).
pub fn protect(router: axum::Router, auth: Arc<Auth>) -> axum::Router {
    router.layer(axum::middleware::from_fn_with_state(
        Gate::new(auth, FAILED_AUTH_BURST),
        authenticate,
    ))
}
