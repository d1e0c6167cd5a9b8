//! The HTTP API (v1). [`routes`] is the single route table: [`app`] builds the router from it and
//! a test checks it against `openapi.yaml`. One module per resource.

pub mod auth;
mod error;
mod execs;
mod extract;
mod files;
pub mod guard;
mod health;
mod images;
mod info;
pub mod limits;
mod logs;
mod network;
mod relay;
pub mod request_id;
mod sandboxes;
mod tokens;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::Router;

pub use error::{chain, ApiError};

use crate::sandboxes::Service;

/// The contract, served at `GET /openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../../../openapi.yaml");

#[derive(Clone)]
pub struct AppState {
    pub svc: Arc<Service>,
    /// Tokens and websocket tickets.
    pub auth: Arc<crate::auth::Auth>,
    /// Refused credentials allowed per client address in a burst (`--failed-auth-burst`).
    pub failed_auth_burst: u32,
}

impl AppState {
    pub fn new(svc: Arc<Service>, auth: Arc<crate::auth::Auth>) -> Self {
        AppState {
            svc,
            auth,
            failed_auth_burst: auth::FAILED_AUTH_BURST,
        }
    }
}

/// One route of the API.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub handler: MethodRouter<AppState>,
}

fn route(method: Method, path: &'static str, handler: MethodRouter<AppState>) -> Route {
    Route {
        method,
        path,
        handler,
    }
}

/// Every route of the API, in one place.
pub fn routes() -> Vec<Route> {
    use axum::routing::{delete, get, patch, post, put};
    vec![
        route(Method::GET, "/healthz", get(health::healthz)),
        route(Method::GET, "/readyz", get(health::readyz)),
        route(Method::GET, "/version", get(health::version)),
        route(Method::GET, "/openapi.yaml", get(openapi)),
        route(Method::GET, "/v1/info", get(info::info)),
        route(Method::POST, "/v1/sandboxes", post(sandboxes::create)),
        route(Method::GET, "/v1/sandboxes", get(sandboxes::list)),
        route(Method::GET, "/v1/sandboxes/{id}", get(sandboxes::get)),
        route(
            Method::DELETE,
            "/v1/sandboxes/{id}",
            delete(sandboxes::delete),
        ),
        route(
            Method::POST,
            "/v1/sandboxes/{id}/wait",
            post(sandboxes::wait),
        ),
        route(
            Method::POST,
            "/v1/sandboxes/{id}/kill",
            post(sandboxes::kill),
        ),
        route(Method::GET, "/v1/sandboxes/{id}/logs", get(logs::logs)),
        route(
            Method::GET,
            "/v1/sandboxes/{id}/stats",
            get(sandboxes::stats),
        ),
        route(
            Method::POST,
            "/v1/sandboxes/{id}/extend",
            post(sandboxes::extend),
        ),
        route(
            Method::PATCH,
            "/v1/sandboxes/{id}/network",
            patch(network::patch),
        ),
        route(
            Method::GET,
            "/v1/sandboxes/{id}/network/denials",
            get(network::denials),
        ),
        route(Method::POST, "/v1/tokens", post(tokens::create)),
        route(Method::GET, "/v1/tokens", get(tokens::list)),
        route(Method::DELETE, "/v1/tokens/{id}", delete(tokens::revoke)),
        route(
            Method::PUT,
            "/v1/tenants/{tenant}/quota",
            put(tokens::put_quota),
        ),
        route(
            Method::GET,
            "/v1/tenants/{tenant}/quota",
            get(tokens::get_quota),
        ),
        route(Method::POST, "/v1/tickets", post(tokens::ticket)),
        route(
            Method::GET,
            "/v1/sandboxes/{id}/attach",
            get(execs::attach_main),
        ),
        route(
            Method::POST,
            "/v1/sandboxes/{id}/execs",
            post(execs::create),
        ),
        route(Method::GET, "/v1/sandboxes/{id}/execs", get(execs::list)),
        route(
            Method::GET,
            "/v1/sandboxes/{id}/execs/{exec_id}",
            get(execs::get),
        ),
        route(
            Method::GET,
            "/v1/sandboxes/{id}/execs/{exec_id}/logs",
            get(execs::logs),
        ),
        route(
            Method::GET,
            "/v1/sandboxes/{id}/execs/{exec_id}/attach",
            get(execs::attach),
        ),
        route(Method::POST, "/v1/sandboxes/{id}/start", post(files::start)),
        route(
            Method::GET,
            "/v1/sandboxes/{id}/files",
            get(files::get_file),
        ),
        // Uploads stream without the JSON body limit (see api/files.rs).
        route(
            Method::PUT,
            "/v1/sandboxes/{id}/files",
            put(files::put_file).layer(DefaultBodyLimit::disable()),
        ),
        route(
            Method::DELETE,
            "/v1/sandboxes/{id}/files",
            delete(files::delete_file),
        ),
        route(
            Method::GET,
            "/v1/sandboxes/{id}/archive",
            get(files::get_archive),
        ),
        route(
            Method::PUT,
            "/v1/sandboxes/{id}/archive",
            put(files::put_archive).layer(DefaultBodyLimit::disable()),
        ),
        // An image upload is streamed to disk, so it is not bound by the JSON body limit (the
        // daemon's --max-image-bytes caps it instead).
        route(
            Method::POST,
            "/v1/images",
            post(images::import).layer(DefaultBodyLimit::disable()),
        ),
        route(Method::GET, "/v1/images", get(images::list)),
        route(Method::GET, "/v1/images/{name}", get(images::get)),
        route(Method::DELETE, "/v1/images/{name}", delete(images::delete)),
    ]
}

/// The whole HTTP application, authentication included (see [`auth`]).
pub fn app(state: AppState) -> Router {
    let mut router: Router<AppState> = Router::new();
    let mut by_path: Vec<(&'static str, MethodRouter<AppState>)> = Vec::new();
    for r in routes() {
        match by_path.iter_mut().find(|(p, _)| *p == r.path) {
            Some((_, existing)) => {
                let merged = std::mem::replace(existing, on(MethodFilter::GET, not_found));
                *existing = merged.merge(r.handler);
            }
            None => by_path.push((r.path, r.handler)),
        }
    }
    for (path, handler) in by_path {
        router = router.route(path, handler);
    }
    let auth = Arc::clone(&state.auth);
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(extract::MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            auth::Gate::new(auth, state.failed_auth_burst),
            auth::authenticate,
        ))
        // Outermost: authentication refusals carry the request id too.
        .layer(axum::middleware::from_fn(request_id::layer))
        .with_state(state)
}

/// A 201 answer: `body` as JSON, with `Location` naming the new resource.
pub fn created(location: String, body: impl serde::Serialize) -> Response {
    let mut response = (StatusCode::CREATED, axum::Json(body)).into_response();
    // Every location is built from ids and checked names: always a valid header value.
    if let Ok(value) = header::HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        sandboxd_api::ErrorCode::MethodNotAllowed,
        "method not allowed on this route",
    )
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}

#[cfg(test)]
mod tests;
