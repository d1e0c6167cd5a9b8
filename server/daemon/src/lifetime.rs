//! The lifetime clock: the time base of TTL and remove-after-exit deadlines.
//!
//! Deadlines must be immune to wall-clock steps (NTP, an operator's `date -s`) and must survive
//! daemon restarts. The clock is CLOCK_BOOTTIME (monotonic, counting suspend) plus an offset that
//! is stored in SQLite with the kernel's boot id: the same boot reuses the stored offset, so the
//! clock continues monotonically across restarts; a new boot re-derives it from the wall clock
//! (the only link between boots), so deadlines keep their approximate wall-clock meaning. It
//! starts out equal to the wall clock, in Unix milliseconds.
//!
//! Every reading of time goes through a [`Clock`] handed to the services at start: the
//! [`SystemClock`] in the daemon, a [`FakeClock`] that tests set and advance, so that no test
//! waits for a deadline in real time. The store takes the time as a parameter and reads no clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::watch;

/// The time sources of the daemon.
pub trait Clock: Send + Sync + 'static {
    /// The wall clock in Unix milliseconds: timestamps shown to clients, token expiry.
    fn now_unix_ms(&self) -> i64;
    /// The lifetime clock in milliseconds: TTL and remove-after-exit deadlines.
    fn now_ms(&self) -> i64;
    /// Resolve once the lifetime clock reads `at_ms` or later.
    fn sleep_until(&self, at_ms: i64) -> BoxFuture<'static, ()>;
}

fn boottime_ms() -> i64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => ts.tv_sec() * 1000 + ts.tv_nsec() / 1_000_000,
        // CLOCK_BOOTTIME exists on every kernel this runs on; fall back to a wall reading.
        Err(_) => crate::now_unix_ms(),
    }
}

/// The kernel's boot id (empty when unreadable).
pub fn boot_id() -> String {
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

/// The real clocks: the wall clock, and CLOCK_BOOTTIME plus this boot's offset.
pub struct SystemClock {
    offset_ms: i64,
}

impl SystemClock {
    /// The clock for this boot from the stored `(boot id, offset)`; the offset to store when it
    /// changed (a first start, or a new boot).
    pub fn establish(stored: Option<(String, i64)>, boot: &str) -> (Self, Option<i64>) {
        let rebooted = stored.is_some();
        let (offset_ms, changed) = offset_for(stored, boot, crate::now_unix_ms(), boottime_ms());
        if changed && rebooted {
            tracing::info!("the host rebooted since the last start: lifetime deadlines follow the wall clock across it");
        }
        (SystemClock { offset_ms }, changed.then_some(offset_ms))
    }
}

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        crate::now_unix_ms()
    }

    fn now_ms(&self) -> i64 {
        boottime_ms() + self.offset_ms
    }

    fn sleep_until(&self, at_ms: i64) -> BoxFuture<'static, ()> {
        let ms = (at_ms - self.now_ms()).max(0);
        Box::pin(tokio::time::sleep(Duration::from_millis(ms as u64)))
    }
}

/// A clock that stands still until [`FakeClock::advance`]; both readings move together.
pub struct FakeClock {
    unix_ms: AtomicI64,
    lifetime: watch::Sender<i64>,
}

impl FakeClock {
    /// Both clocks at `unix_ms`.
    pub fn at(unix_ms: i64) -> Arc<Self> {
        Arc::new(FakeClock {
            unix_ms: AtomicI64::new(unix_ms),
            lifetime: watch::channel(unix_ms).0,
        })
    }

    /// Move both clocks forward, waking the sleepers whose time has come.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.unix_ms.fetch_add(ms, Ordering::SeqCst);
        self.lifetime.send_modify(|now| *now += ms);
    }
}

impl Clock for FakeClock {
    fn now_unix_ms(&self) -> i64 {
        self.unix_ms.load(Ordering::SeqCst)
    }

    fn now_ms(&self) -> i64 {
        *self.lifetime.borrow()
    }

    fn sleep_until(&self, at_ms: i64) -> BoxFuture<'static, ()> {
        let mut rx = self.lifetime.subscribe();
        Box::pin(async move {
            // The sender lives as long as the clock; a dropped clock never wakes anyone.
            if rx.wait_for(|now| *now >= at_ms).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
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
    async fn a_fake_clock_wakes_sleepers_when_it_reaches_their_time() {
        let clock = FakeClock::at(1_000);
        let mut sleeper = tokio::spawn(clock.sleep_until(1_500));
        clock.advance(Duration::from_millis(400));
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut sleeper)
                .await
                .is_err(),
            "woke before its time"
        );
        clock.advance(Duration::from_millis(100));
        sleeper.await.unwrap();
        assert_eq!((clock.now_ms(), clock.now_unix_ms()), (1_500, 1_500));
        // A time already passed resolves at once.
        clock.sleep_until(10).await;
    }
}
