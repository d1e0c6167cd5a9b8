//! Command-line arguments of `sandboxd` and their defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// Default number of uid ranges (and so of concurrently running sandboxes) in privileged mode.
pub const DEFAULT_UID_SLOTS: u32 = 1024;
/// Default first host uid of the sandbox ranges in privileged mode.
pub const DEFAULT_UID_BASE: u32 = 100_000_000;

#[derive(Debug, Clone, Parser)]
#[command(name = "sandboxd", version, about = "Rootless Linux sandbox daemon")]
pub struct Args {
    /// Address of the HTTP API.
    #[arg(long, env = "SANDBOXD_LISTEN", default_value = "127.0.0.1:4280")]
    pub listen: SocketAddr,
    /// Directory of the database, the helper socket and the sandboxes.
    /// Default: /var/lib/sandboxd as root, else $XDG_STATE_HOME/sandboxd or ~/.local/state/sandboxd.
    #[arg(long, env = "SANDBOXD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// User the daemon runs as after starting the helper (only meaningful when started as root).
    #[arg(long, env = "SANDBOXD_USER", default_value = "sandboxd")]
    pub user: String,
    /// Path of the helper binary. Default: `sandboxd-helper` next to this executable.
    #[arg(long, env = "SANDBOXD_HELPER")]
    pub helper: Option<PathBuf>,
    /// First host uid of the per-sandbox uid ranges (privileged mode).
    #[arg(long, env = "SANDBOXD_UID_BASE", default_value_t = DEFAULT_UID_BASE)]
    pub uid_base: u32,
    /// Number of per-sandbox uid ranges (privileged mode).
    #[arg(long, env = "SANDBOXD_UID_SLOTS", default_value_t = DEFAULT_UID_SLOTS,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub uid_slots: u32,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax (`info`, `sandboxd=debug`...).
    #[arg(long, env = "SANDBOXD_LOG", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot determine the state directory: set --state-dir, XDG_STATE_HOME or HOME")]
    NoStateDir,
    #[error("cannot determine the helper path: pass --helper")]
    NoHelperPath(#[source] std::io::Error),
}

/// Where the state lives when `--state-dir` is absent.
pub fn default_state_dir(is_root: bool) -> Result<PathBuf, ConfigError> {
    if is_root {
        return Ok(PathBuf::from("/var/lib/sandboxd"));
    }
    if let Some(xdg) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("sandboxd"));
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/state/sandboxd")),
        None => Err(ConfigError::NoStateDir),
    }
}

/// `sandboxd-helper` next to the running executable.
pub fn default_helper_path() -> Result<PathBuf, ConfigError> {
    let exe = std::env::current_exe().map_err(ConfigError::NoHelperPath)?;
    Ok(exe.with_file_name("sandboxd-helper"))
}
