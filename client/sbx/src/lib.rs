//! Client library of the sandboxd HTTP API (`/v1`), used by the `sbx` command line and the benchmark.
//!
//! `Client` has one async method per endpoint and returns the wire types of `sandboxd-api`;
//! `Client::follow_logs` streams a sandbox's output over the log websocket and survives drops.

mod client;
mod error;
mod exec;
mod files;
mod logs;
pub mod unpack;

pub use client::{
    Client, CreatedToken, ListQuery, LogStream, TokenInfo, DEFAULT_LOG_RECONNECTS, DEFAULT_URL,
};
pub use error::{ClientError, Result};
pub use exec::{AttachEvent, AttachReader, AttachWriter};
pub use files::Download;
pub use logs::{Channel, LogEvent};
pub use sandboxd_api as api;
