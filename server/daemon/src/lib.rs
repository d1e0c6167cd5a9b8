//! `sandboxd`: the unprivileged HTTP daemon in front of `sandboxd-helper`.
//!
//! The binary (`main.rs`) parses its configuration, starts the helper, drops privileges and only
//! then builds the tokio runtime and calls into this library. Everything after the privilege drop
//! lives here so that it can be tested without root and without the real helper:
//!
//! * [`config`]: command-line arguments and the resolved configuration.
//! * [`privileges`]: user lookup and the privilege drop.
//! * [`helper_client`]: the [`helper_client::Helper`] trait, its socket client and a fake.
//! * [`limits`]: resource limit defaults, maximums and enforceability.
//! * [`storage`]: the free-space reserve of the state directory's filesystem.
//! * [`store`]: every SQL statement.
//! * [`validate`]: parses a `CreateSandbox` request once into a validated type.
//! * [`sandboxes`]: the lifecycle service (create, watch, kill, delete, reconcile).
//! * [`logs`]: reading and following a sandbox's output log.
//! * [`auth`]: tokens, websocket tickets and the admin token bootstrap.
//! * [`api`]: the HTTP router, one module per resource.
//! * [`lifetime`]: the [`lifetime::Clock`] every reading of time goes through.
//! * [`transport`]: the TCP and unix listeners around the router.
//!
//! The modules form layers (checked by a unit test in `layers.rs`, described in ARCHITECTURE.md):
//! `lifetime`, `privileges`, `validate` < `limits` < `storage` < `config`, `store`, `helper_client`, `logs` <
//! `sandboxes`, `auth` < `api` < `transport`; a module uses lower layers only, and `api` reaches
//! the store and the helper through the services.

pub mod api;
pub mod auth;
pub mod config;
pub mod helper_client;
#[cfg(test)]
mod layers;
pub mod lifetime;
pub mod limits;
pub mod logs;
pub mod privileges;
pub mod sandboxes;
pub mod storage;
pub mod store;
pub mod transport;
pub mod validate;

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

/// Milliseconds since the Unix epoch, the time unit of the database (read through
/// [`lifetime::Clock`] everywhere but in the real clock and the fake helper).
pub fn now_unix_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}
