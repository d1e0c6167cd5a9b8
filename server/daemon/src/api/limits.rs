//! Request limits that protect the daemon from one client: JSON nesting depth and a per-client
//! burst limit. (Body size is the router's `DefaultBodyLimit`; header size and slow or idle
//! connections are handled per connection in `transport.rs`.)

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::auth::LocalPeer;
use super::ApiError;

/// Largest total size of a request's head (request line and headers): 431 beyond.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Deepest nesting of arrays and objects accepted in a JSON request body.
pub const MAX_JSON_DEPTH: usize = 32;
/// Most clients tracked by the rate limiter at once; beyond, the least recently seen is forgotten.
pub const MAX_TRACKED_CLIENTS: usize = 10_000;

/// Whether `json` nests arrays and objects deeper than `max`. A lexical scan (strings and their
/// escapes skipped) done before serde sees the body, so a deep body costs no recursion.
pub fn json_too_deep(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Token buckets, one per client: `per_sec` tokens a second up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    max_clients: usize,
    hasher: RandomState,
    buckets: Mutex<HashMap<u64, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// `per_sec` > 0 and `burst` ≥ 1.
    pub fn new(per_sec: f64, burst: u32) -> Self {
        Self::with_capacity(per_sec, burst, MAX_TRACKED_CLIENTS)
    }

    pub fn with_capacity(per_sec: f64, burst: u32, max_clients: usize) -> Self {
        RateLimiter {
            per_sec,
            burst: f64::from(burst.max(1)),
            max_clients: max_clients.max(1),
            hasher: RandomState::new(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Number of clients currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }

    /// Take one token for `client` (only a keyed hash of it is kept, never a token itself).
    /// `Err(wait)` when the bucket is empty: the time until a token is available.
    pub fn check(&self, client: &[u8], now: Instant) -> Result<(), Duration> {
        let key = self.hasher.hash_one(client);
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        if !buckets.contains_key(&key) && buckets.len() >= self.max_clients {
            self.evict(&mut buckets, now);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_sec,
            ))
        }
    }

    /// Whether `client` has a token left, without taking it (the bucket refills meanwhile).
    /// `Err(wait)` as for [`RateLimiter::check`].
    pub fn peek(&self, client: &[u8], now: Instant) -> Result<(), Duration> {
        let key = self.hasher.hash_one(client);
        let Ok(buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let Some(bucket) = buckets.get(&key) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        let tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_sec))
        }
    }

    /// Make room: forget every client whose bucket has refilled (forgetting it changes nothing),
    /// and if none has, the least recently seen one.
    fn evict(&self, buckets: &mut HashMap<u64, Bucket>, now: Instant) {
        let refill = Duration::from_secs_f64(self.burst / self.per_sec);
        buckets.retain(|_, b| now.saturating_duration_since(b.updated) < refill);
        if buckets.len() >= self.max_clients {
            if let Some(oldest) = buckets
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(k, _)| *k)
            {
                buckets.remove(&oldest);
            }
        }
    }
}

/// Who a request counts against: its `Authorization` value, else the local socket, else the
/// peer's IP address.
fn client_key(request: &Request) -> Vec<u8> {
    if let Some(auth) = request.headers().get(header::AUTHORIZATION) {
        let mut key = b"a:".to_vec();
        key.extend_from_slice(auth.as_bytes());
        return key;
    }
    if request.extensions().get::<LocalPeer>().is_some() {
        return b"local".to_vec();
    }
    match request.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) => format!("ip:{}", addr.ip()).into_bytes(),
        None => b"unknown".to_vec(),
    }
}

/// The 429 answer, with `Retry-After` in whole seconds (at least 1).
pub fn rate_limited(wait: Duration) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    let mut resp = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        sandboxd_api::ErrorCode::RateLimited,
        format!("too many requests from this client; retry in {secs} s"),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

async fn limit(State(limiter): State<Arc<RateLimiter>>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    match limiter.check(&client_key(&request), Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => rate_limited(wait),
    }
}

/// Wrap the application in the per-client burst limit (`/healthz` exempt).
pub fn rate_limit(router: Router, limiter: Arc<RateLimiter>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(limiter, limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    #[test]
    fn json_depth() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(!json_too_deep(deep(32).as_bytes(), 32));
        assert!(json_too_deep(deep(33).as_bytes(), 32));
        assert!(!json_too_deep(br#"{"a":{"b":[1,2,{"c":"[[[[{{{{"}]}}"#, 4));
        assert!(json_too_deep(br#"{"a":{"b":[1,2,{"c":"[[[[{{{{"}]}}"#, 3));
        assert!(!json_too_deep(br#"{"a":"\"[[[[[["}"#, 1));
        assert!(json_too_deep(br#"{"a":{"b":[{}]}}"#, 3));
    }

    #[test]
    fn bucket_refills_and_clients_are_separate() {
        let l = RateLimiter::new(10.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            l.check(b"a", t0).unwrap();
        }
        let wait = l.check(b"a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100));
        l.check(b"b", t0).unwrap();
        l.check(b"a", t0 + Duration::from_millis(100)).unwrap();
        l.check(b"a", t0 + Duration::from_millis(100)).unwrap_err();
    }

    #[test]
    fn tracked_clients_are_bounded() {
        let l = RateLimiter::with_capacity(1.0, 5, 100);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let _ = l.check(&i.to_be_bytes(), t0 + Duration::from_millis(u64::from(i)));
        }
        assert!(l.tracked() <= 100);
    }

    #[tokio::test]
    async fn burst_gets_429_with_retry_after_and_healthz_is_exempt() {
        let app = rate_limit(
            Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route("/v1/info", get(|| async { "info" })),
            Arc::new(RateLimiter::new(0.5, 2)),
        );
        let req = |path: &str, token: &str| {
            axum::http::Request::get(path)
                .header(header::AUTHORIZATION, format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap()
        };
        for _ in 0..2 {
            let r = app.clone().oneshot(req("/v1/info", "t1")).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
        let r = app.clone().oneshot(req("/v1/info", "t1")).await.unwrap();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "rate_limited");
        // Another token is not starved, and health checks never count.
        let r = app.clone().oneshot(req("/v1/info", "t2")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        for _ in 0..5 {
            let r = app.clone().oneshot(req("/healthz", "t1")).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
        }
    }
}

#[cfg(test)]
mod extract_tests {
    use super::super::extract::ApiJson;
    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt;

    #[tokio::test]
    async fn deep_json_bodies_are_400() {
        let app = Router::new().route(
            "/",
            post(|ApiJson(_): ApiJson<serde_json::Value>| async { "ok" }),
        );
        let send = |depth: usize| {
            let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            app.clone().oneshot(
                Request::post("/")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body))
                    .unwrap(),
            )
        };
        assert_eq!(send(32).await.unwrap().status(), StatusCode::OK);
        let r = send(100_000).await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_request");
        assert_eq!(v["error"]["message"], "JSON nested too deeply");
    }
}
