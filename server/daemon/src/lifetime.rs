//! The lifetime clock: the time base of TTL and remove-after-exit deadlines.
//!
//! Deadlines must be immune to wall-clock steps (NTP, an operator's `date -s`) and must survive
//! daemon restarts. The clock is CLOCK_BOOTTIME (monotonic, counting suspend) plus an offset that
//! is stored in SQLite with the kernel's boot id: the same boot reuses the stored offset, so the
//! clock continues monotonically across restarts; a new boot re-derives it from the wall clock
//! (the only link between boots), so deadlines keep their approximate wall-clock meaning. It
//! starts out equal to the wall clock, in Unix milliseconds.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::store::{Store, StoreError};

static OFFSET_MS: AtomicI64 = AtomicI64::new(i64::MIN);

fn boottime_ms() -> i64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => ts.tv_sec() * 1000 + ts.tv_nsec() / 1_000_000,
        // CLOCK_BOOTTIME exists on every kernel this runs on; fall back to a wall reading.
        Err(_) => crate::now_unix_ms(),
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The offset for this boot: the stored one within the same boot, else re-derived from the wall
/// clock. Returns it and whether it must be stored.
fn offset_for(
    stored: Option<(String, i64)>,
    boot: &str,
    wall_ms: i64,
    boot_ms: i64,
) -> (i64, bool) {
    match stored {
        Some((stored_boot, offset)) if !boot.is_empty() && stored_boot == boot => (offset, false),
        _ => (wall_ms - boot_ms, true),
    }
}

/// Load (or establish) the offset for this boot. Called once at start, before any deadline.
pub async fn init(store: &Store) -> Result<(), StoreError> {
    let boot = boot_id();
    let stored = store.lifetime_clock().await?;
    let rebooted = stored.is_some();
    let (offset, changed) = offset_for(stored, &boot, crate::now_unix_ms(), boottime_ms());
    if changed {
        if rebooted {
            tracing::info!("the host rebooted since the last start: lifetime deadlines follow the wall clock across it");
        }
        store.set_lifetime_clock(&boot, offset).await?;
    }
    OFFSET_MS.store(offset, Ordering::SeqCst);
    Ok(())
}

/// Now, on the lifetime clock, in milliseconds.
pub fn now_ms() -> i64 {
    let offset = OFFSET_MS.load(Ordering::SeqCst);
    if offset == i64::MIN {
        // Not initialised (unit tests without a store): the wall clock is the best stand-in.
        return crate::now_unix_ms();
    }
    boottime_ms() + offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_survives_a_restart_in_the_same_boot_and_follows_the_wall_after_a_reboot() {
        // First start: derived from the wall clock, and stored.
        assert_eq!(offset_for(None, "b1", 10_000, 400), (9_600, true));
        // Same boot, even with the wall clock stepped an hour: the stored offset stands.
        assert_eq!(
            offset_for(Some(("b1".into(), 9_600)), "b1", 3_610_000, 500),
            (9_600, false)
        );
        // Another boot: re-derived.
        assert_eq!(
            offset_for(Some(("b1".into(), 9_600)), "b2", 50_000, 100),
            (49_900, true)
        );
        // No boot id readable: never trust a stored offset.
        assert_eq!(offset_for(Some(("".into(), 1)), "", 7, 2), (5, true));
    }

    #[tokio::test]
    async fn the_clock_is_stored_per_boot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).await.unwrap();
        assert_eq!(store.lifetime_clock().await.unwrap(), None);
        store.set_lifetime_clock("b1", 42).await.unwrap();
        store.set_lifetime_clock("b2", 43).await.unwrap();
        assert_eq!(
            store.lifetime_clock().await.unwrap(),
            Some(("b2".into(), 43))
        );
    }
}
