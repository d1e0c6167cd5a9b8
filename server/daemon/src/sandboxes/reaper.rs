//! The reaper: one task that deletes sandboxes whose lifetime ran out.
//!
//! Clocks: the monitor's `timeout_secs` runs on CLOCK_MONOTONIC inside the monitor; TTL and
//! remove-after-exit deadlines are on the lifetime clock (the service's `Clock`: CLOCK_BOOTTIME plus
//! an offset kept in SQLite per boot), so a wall-clock step never moves them and they survive
//! daemon restarts. The reaper sleeps (the clock's `sleep_until`) until the earliest deadline,
//! re-reads the store whenever a deadline may have moved earlier (a `Notify`: create with a TTL,
//! an exit with `remove_after_exit_secs`, `/extend`), and never sleeps longer than
//! [`MAX_SLEEP`]. It runs once
//! immediately at daemon start, so deadlines that passed while the daemon was down are acted on.
//! There is no per-sandbox timer or polling.
//!
//! A TTL that runs out while the sandbox runs first records `kill_reason = 'ttl'` in its row,
//! then kills and deletes it like `DELETE`; the exit is recorded with reason `ttl` even when the
//! daemon restarts in between (the row stays due, and the next reaper run finishes the job).

use std::sync::Arc;
use std::time::Duration;

use sandboxd_api::EndReason;
use uuid::Uuid;

use super::{SandboxError, Service};
use crate::chain;
use crate::store::Deadline;

/// Longest sleep between two looks at the store, whatever the deadlines.
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// When removing a sandbox failed, try again this much later.
const RETRY_MS: i64 = 10_000;

impl Service {
    /// Start the reaper task; it runs its first pass at once.
    pub fn start_reaper(self: &Arc<Self>) {
        let svc = Arc::clone(self);
        tokio::spawn(async move { svc.reaper_loop().await });
    }

    async fn reaper_loop(self: Arc<Self>) {
        let max_sleep = i64::try_from(MAX_SLEEP.as_millis()).unwrap_or(i64::MAX);
        loop {
            let next = match self.reap_due().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "reaper: reading deadlines failed");
                    Some(self.clock.now_ms() + RETRY_MS)
                }
            };
            let latest = self.clock.now_ms() + max_sleep;
            let until = next.map_or(latest, |at| at.min(latest));
            tokio::select! {
                _ = self.reaper_wake.notified() => {}
                _ = self.clock.sleep_until(until) => {}
            }
        }
    }

    /// Start removing every sandbox whose deadline has passed; returns the next deadline.
    pub(crate) async fn reap_due(self: &Arc<Self>) -> Result<Option<i64>, SandboxError> {
        let now = self.clock.now_ms();
        let (due, next) = self.store.deadlines(now).await?;
        for (id, which) in due {
            let fresh = self
                .reaping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id);
            if !fresh {
                continue;
            }
            let svc = Arc::clone(self);
            tokio::spawn(async move {
                if let Err(e) = svc.expire(id, which).await {
                    tracing::warn!(%id, ?which, error = %chain(&e), "reaper: removing a sandbox failed; retrying later");
                    let later = svc.clock.now_ms() + RETRY_MS;
                    if let Err(e) = svc.store.postpone(id, which, later).await {
                        tracing::error!(%id, error = %e, "reaper: postponing a deadline failed");
                        // Do not spin on a failing database.
                        svc.clock.sleep_until(later).await;
                    }
                }
                svc.reaping
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                svc.reaper_wake.notify_one();
            });
        }
        Ok(next)
    }

    /// Whether the reaper is removing `id` right now.
    #[cfg(test)]
    pub(crate) fn is_reaping(&self, id: Uuid) -> bool {
        self.reaping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }

    async fn expire(&self, id: Uuid, which: Deadline) -> Result<(), SandboxError> {
        let Some(sandbox) = self.store.get(id).await? else {
            return Ok(());
        };
        if which == Deadline::Ttl && !sandbox.state.is_final() {
            // Persist the intent before the kill, so the exit is recorded as `ttl`.
            self.store.set_kill_reason(id, EndReason::Ttl).await?;
            tracing::info!(%id, "ttl ran out; killing and removing the sandbox");
        } else {
            tracing::info!(%id, ?which, "lifetime ran out; removing the sandbox");
        }
        match self.delete(&super::Scope::All, &id.to_string()).await {
            Ok(()) | Err(SandboxError::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
