//! One task per live sandbox: hold the monitor's socket until it closes, then record the exit.

use std::sync::Arc;
use std::time::Duration;

use sandboxd_api::{EndReason, SandboxState};
use sandboxd_protocol::layout::SandboxDir;
use sandboxd_protocol::status::{ExitReason, ExitStatus};
use uuid::Uuid;

use super::monitor::{self, MonitorError};
use super::{lost, Service};
use crate::store::Ending;

/// Attempts to reach a monitor when the error is neither "not found" nor "refused".
const CONNECT_ATTEMPTS: u32 = 3;

pub(super) async fn watch(svc: Arc<Service>, id: Uuid) {
    let dir = svc.dir(id);
    let socket = dir.monitor_socket();
    for attempt in 1..=CONNECT_ATTEMPTS {
        match monitor::connect(&socket).await {
            Ok(stream) => {
                if let Err(e) = svc.store.recover_running(id, svc.clock.now_unix_ms()).await {
                    tracing::warn!(%id, error = %e, "marking a recovered sandbox running failed");
                }
                // The monitor answers nothing on this connection; it closes it once the status
                // and all output are written.
                monitor::wait_for_close(stream).await;
                break;
            }
            Err(MonitorError::Gone(_)) => break,
            Err(e) => {
                tracing::warn!(%id, attempt, error = %e, "connecting to a monitor failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let ending = match read_status(&dir).await {
        Some(status) => ending_of(&status),
        None => {
            tracing::warn!(%id, "monitor ended without an exit status");
            lost(
                "the sandbox's monitor ended without recording an exit status",
                svc.clock.now_unix_ms(),
            )
        }
    };
    if let Err(e) = svc.store.finish(id, &ending, svc.clock.now_ms()).await {
        tracing::error!(%id, error = %e, "recording a sandbox exit failed");
    }
    // After the row is final, so that a Sync in between does not bring the policy back.
    svc.forget_policy(id);
    svc.notify_final(id);
}

async fn read_status(dir: &SandboxDir) -> Option<ExitStatus> {
    let bytes = tokio::fs::read(dir.status()).await.ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "unreadable status.json");
            None
        }
    }
}

fn ending_of(status: &ExitStatus) -> Ending {
    Ending {
        state: SandboxState::Exited,
        exit_code: Some(status.exit_code),
        signal: status.signal.map(sandboxd_protocol::rules::Signal::name_of),
        reason: match status.reason {
            ExitReason::Exited => EndReason::Exited,
            ExitReason::Killed => EndReason::Killed,
            ExitReason::Timeout => EndReason::Timeout,
            ExitReason::ExecFailed => EndReason::ExecFailed,
            ExitReason::Oom => EndReason::Oom,
        },
        error: status.error.clone(),
        finished_at_ms: status.finished_at_unix_ms,
        stats: Some(status.stats),
    }
}
