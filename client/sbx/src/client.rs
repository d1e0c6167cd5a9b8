//! `Client`: one async method per endpoint of the sandboxd HTTP API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use reqwest::{Method, RequestBuilder, Response, Url};
use sandboxd_api::{
    CreateSandbox, ExtendRequest, Info, KillRequest, Sandbox, SandboxList, SandboxState, Stats,
};
use serde::de::DeserializeOwned;

use crate::error::{ClientError, Result};

mod images;

/// Where `sbx` and the library look for the daemon when nothing else is said.
pub const DEFAULT_URL: &str = "http://127.0.0.1:4280";

/// How many times in a row `follow_logs` reconnects a dropped websocket before giving up.
pub const DEFAULT_LOG_RECONNECTS: u32 = 5;

/// Filters of `GET /v1/sandboxes`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    pub state: Option<SandboxState>,
    /// `(key, value)` pairs; a sandbox must carry all of them.
    pub labels: Vec<(String, String)>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Which output stream `GET /logs` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// A handle on one daemon. Cheap to clone: clones share the connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    log_reconnects: u32,
    /// Bearer token sent on every request and websocket upgrade.
    token: Option<String>,
    /// When set, every connection goes to this unix socket instead of `base`'s host and port.
    unix_socket: Option<PathBuf>,
}

impl Client {
    /// A client for the daemon at `base_url` (`http://host:port`, optionally with a path prefix).
    pub fn new(base_url: &str) -> Result<Self> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let mut base = Url::parse(base_url).map_err(|e| invalid(&e.to_string()))?;
        if base.scheme() != "http" {
            return Err(invalid("only http:// is supported"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(invalid("must not have a query or fragment"));
        }
        // Paths are appended segment by segment, so drop a trailing slash once here.
        if let Ok(mut segments) = base.path_segments_mut() {
            segments.pop_if_empty();
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| invalid(&e.to_string()))?;
        Ok(Client {
            http,
            base,
            log_reconnects: DEFAULT_LOG_RECONNECTS,
            token: None,
            unix_socket: None,
        })
    }

    /// A client for the daemon's local unix socket (`<state-dir>/api.sock`), which needs no token.
    pub fn unix(socket: impl Into<PathBuf>) -> Result<Self> {
        let socket = socket.into();
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: socket.display().to_string(),
            reason,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .unix_socket(socket.as_path())
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        let base = Url::parse("http://localhost").map_err(|e| invalid(e.to_string()))?;
        Ok(Client {
            http,
            base,
            log_reconnects: DEFAULT_LOG_RECONNECTS,
            token: None,
            unix_socket: Some(socket),
        })
    }

    /// Sends `token` as `Authorization: Bearer <token>` on every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The unix socket this client talks to, if it does not use TCP.
    pub fn unix_socket(&self) -> Option<&Path> {
        self.unix_socket.as_deref()
    }

    /// Sets how many consecutive drops `follow_logs` survives.
    pub fn with_log_reconnects(mut self, reconnects: u32) -> Self {
        self.log_reconnects = reconnects;
        self
    }

    pub(crate) fn log_reconnects(&self) -> u32 {
        self.log_reconnects
    }

    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// The HTTP client, for requests built by other modules of this crate.
    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The base URL followed by `segments`, each percent-encoded as one path segment.
    pub(crate) fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    pub(crate) fn sandbox_url(&self, id: &str, rest: &[&str]) -> Url {
        let mut segments = vec!["v1", "sandboxes", id];
        segments.extend_from_slice(rest);
        self.url(&segments)
    }

    /// Sends a request and turns any non-2xx answer into `ClientError::Api`.
    pub(crate) async fn send(&self, mut request: RequestBuilder) -> Result<Response> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let request = request.build().map_err(ClientError::Decode)?;
        let url = match &self.unix_socket {
            Some(socket) => format!("unix:{}", socket.display()),
            None => request.url().to_string(),
        };
        let response = self
            .http
            .execute(request)
            .await
            .map_err(|source| ClientError::Connect { url, source })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(ClientError::from_status_body(status.as_u16(), &body))
    }

    /// Send a request; a non-2xx answer is an error (for request modules in this crate).
    pub(crate) async fn send_request(&self, request: RequestBuilder) -> Result<Response> {
        self.send(request).await
    }

    /// Send a request and decode its JSON answer (for request modules in this crate).
    pub(crate) async fn json_request<T: DeserializeOwned>(
        &self,
        request: RequestBuilder,
    ) -> Result<T> {
        self.json(request).await
    }

    pub(crate) async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T> {
        self.send(request)
            .await?
            .json()
            .await
            .map_err(ClientError::Decode)
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<()> {
        self.send(self.http.get(self.url(&["healthz"]))).await?;
        Ok(())
    }

    /// `GET /v1/info`.
    pub async fn info(&self) -> Result<Info> {
        self.json(self.http.get(self.url(&["v1", "info"]))).await
    }

    /// `POST /v1/sandboxes`: answers as soon as the sandbox is started.
    pub async fn create(&self, spec: &CreateSandbox) -> Result<Sandbox> {
        let url = self.url(&["v1", "sandboxes"]);
        self.json(self.http.post(url).json(spec)).await
    }

    /// `POST /v1/sandboxes?wait=true`: answers once the sandbox has ended.
    pub async fn create_and_wait(&self, spec: &CreateSandbox) -> Result<Sandbox> {
        let url = self.url(&["v1", "sandboxes"]);
        let request = self.http.post(url).query(&[("wait", "true")]).json(spec);
        self.json(request).await
    }

    /// `GET /v1/sandboxes`: one page.
    pub async fn list(&self, query: &ListQuery) -> Result<SandboxList> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(state) = query.state {
            params.push(("state", state.as_str().to_owned()));
        }
        for (key, value) in &query.labels {
            params.push(("label", format!("{key}={value}")));
        }
        if let Some(limit) = query.limit {
            params.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &query.cursor {
            params.push(("cursor", cursor.clone()));
        }
        let url = self.url(&["v1", "sandboxes"]);
        self.json(self.http.get(url).query(&params)).await
    }

    /// `GET /v1/sandboxes`, following `next_cursor` until the last page.
    pub async fn list_all(&self, query: &ListQuery) -> Result<Vec<Sandbox>> {
        let mut query = query.clone();
        let mut items = Vec::new();
        loop {
            let page = self.list(&query).await?;
            items.extend(page.items);
            match page.next_cursor {
                // A cursor that does not move would loop forever; treat it as the end.
                Some(cursor) if query.cursor.as_deref() != Some(cursor.as_str()) => {
                    query.cursor = Some(cursor);
                }
                _ => return Ok(items),
            }
        }
    }

    /// `GET /v1/sandboxes/{id_or_name}`.
    pub async fn get(&self, id_or_name: &str) -> Result<Sandbox> {
        self.json(self.http.get(self.sandbox_url(id_or_name, &[])))
            .await
    }

    /// `POST /v1/sandboxes/{id_or_name}/wait`: answers once the sandbox has ended.
    pub async fn wait(&self, id_or_name: &str) -> Result<Sandbox> {
        let url = self.sandbox_url(id_or_name, &["wait"]);
        self.json(self.http.post(url)).await
    }

    /// `POST /v1/sandboxes/{id_or_name}/kill`; `None` means SIGKILL.
    pub async fn kill(&self, id_or_name: &str, signal: Option<&str>) -> Result<Sandbox> {
        let url = self.sandbox_url(id_or_name, &["kill"]);
        let body = KillRequest {
            signal: signal.map(str::to_owned),
        };
        self.json(self.http.post(url).json(&body)).await
    }

    /// `GET /v1/sandboxes/{id_or_name}/stats`: live while running, the final figures after.
    pub async fn stats(&self, id_or_name: &str) -> Result<Stats> {
        self.json(self.http.get(self.sandbox_url(id_or_name, &["stats"])))
            .await
    }

    /// `POST /v1/sandboxes/{id_or_name}/extend`: the sandbox now lives `ttl_secs` from now.
    pub async fn extend(&self, id_or_name: &str, ttl_secs: u64) -> Result<Sandbox> {
        let url = self.sandbox_url(id_or_name, &["extend"]);
        self.json(self.http.post(url).json(&ExtendRequest { ttl_secs }))
            .await
    }

    /// `PATCH /v1/sandboxes/{id_or_name}/network`: replace the egress policy.
    pub async fn set_egress(
        &self,
        id_or_name: &str,
        egress: &sandboxd_api::egress::EgressPolicy,
    ) -> Result<sandboxd_api::NetworkInfo> {
        let url = self.sandbox_url(id_or_name, &["network"]);
        let body = sandboxd_api::NetworkUpdate {
            egress: egress.clone(),
        };
        self.json(self.http.request(Method::PATCH, url).json(&body))
            .await
    }

    /// `GET /v1/sandboxes/{id_or_name}/network/denials`: the most recent first.
    pub async fn egress_denials(
        &self,
        id_or_name: &str,
        limit: u32,
    ) -> Result<Vec<sandboxd_api::egress::EgressDenial>> {
        let url = self.sandbox_url(id_or_name, &["network", "denials"]);
        let list: sandboxd_api::EgressDenialList = self
            .json(self.http.get(url).query(&[("limit", limit.to_string())]))
            .await?;
        Ok(list.items)
    }

    /// `DELETE /v1/sandboxes/{id_or_name}`.
    pub async fn delete(&self, id_or_name: &str) -> Result<()> {
        let url = self.sandbox_url(id_or_name, &[]);
        self.send(self.http.request(Method::DELETE, url)).await?;
        Ok(())
    }

    /// `GET /v1/sandboxes/{id}/logs` as raw bytes; with `follow` the body goes on until the sandbox
    /// ends. Without `stream` the daemon decides what to send (both streams, without channel marks).
    pub async fn logs(
        &self,
        id_or_name: &str,
        stream: Option<LogStream>,
        offset: u64,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Bytes>> + Send + 'static> {
        let mut params: Vec<(&str, String)> = vec![("offset", offset.to_string())];
        if let Some(stream) = stream {
            params.push(("stream", stream.as_str().to_owned()));
        }
        if follow {
            params.push(("follow", "true".to_owned()));
        }
        let url = self.sandbox_url(id_or_name, &["logs"]);
        let response = self.send(self.http.get(url).query(&params)).await?;
        Ok(response.bytes_stream().map_err(ClientError::Body))
    }
}

/// One token as `GET /v1/tokens` lists it (never with its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub tenant: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
}

/// The answer of `POST /v1/tokens`: the token and, this once, its secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub token: String,
    pub tenant: String,
    pub role: String,
    #[serde(default)]
    pub expires_at: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
struct TokenList {
    items: Vec<TokenInfo>,
}

impl Client {
    /// `POST /v1/tokens` (admin): a new token for `tenant` with `role` (`user` or `admin`).
    pub async fn create_token(
        &self,
        tenant: &str,
        role: &str,
        ttl_secs: Option<u64>,
    ) -> Result<CreatedToken> {
        let mut body = serde_json::json!({ "tenant": tenant, "role": role });
        if let Some(ttl) = ttl_secs {
            body["ttl_secs"] = ttl.into();
        }
        let url = self.url(&["v1", "tokens"]);
        self.json(self.http.post(url).json(&body)).await
    }

    /// `GET /v1/tokens` (admin).
    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        let list: TokenList = self
            .json(self.http.get(self.url(&["v1", "tokens"])))
            .await?;
        Ok(list.items)
    }

    /// `DELETE /v1/tokens/{id}` (admin): the token stops working at once.
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let url = self.url(&["v1", "tokens", id]);
        self.send(self.http.request(Method::DELETE, url)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_built_per_segment() {
        let client = Client::new("http://127.0.0.1:4280/").expect("valid url");
        assert_eq!(
            client.sandbox_url("a b/c", &["logs"]).as_str(),
            "http://127.0.0.1:4280/v1/sandboxes/a%20b%2Fc/logs"
        );
        let client = Client::new("http://host:1/prefix").expect("valid url");
        assert_eq!(
            client.url(&["v1", "info"]).as_str(),
            "http://host:1/prefix/v1/info"
        );
    }

    #[test]
    fn bad_urls_are_rejected() {
        for url in [
            "",
            "127.0.0.1:4280",
            "ftp://x",
            "https://x",
            "http://x/?a=b",
        ] {
            assert!(
                matches!(Client::new(url), Err(ClientError::InvalidUrl { .. })),
                "{url}"
            );
        }
    }
}
