//! Small things every side of the filter uses: the policy table's lock, which accept errors
//! are transient, and a throttle for log lines a sandbox could otherwise repeat without end
//! (the filter's standard error is a file on the host).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::policy::Table;

pub fn lock_table(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    // Every change to the table is a few map operations that cannot panic half-way in a way
    // that breaks an invariant another reader relies on; a poisoned lock is still consistent.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accept and receive errors that say nothing about the socket itself (a peer gone, an ICMP
/// error for an earlier datagram, descriptors or memory short for a moment).
pub fn is_transient(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let Some(raw) = e.raw_os_error() else {
        return false;
    };
    matches!(
        Errno::from_raw(raw),
        Errno::ECONNABORTED
            | Errno::EMFILE
            | Errno::ENFILE
            | Errno::ENOBUFS
            | Errno::ENOMEM
            | Errno::EPROTO
            | Errno::EINTR
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
    )
}

/// Lets one log line through per period; the others are counted and reported with the next.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Seconds since the epoch of the last line let through.
    last: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    /// `Some(lines suppressed since the last one)` if a line may be written now.
    pub fn allow(&self, period: Duration) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last + period.as_secs() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_lets_one_line_through_per_period() {
        let t = Throttle::default();
        assert_eq!(t.allow(Duration::from_secs(3600)), Some(0));
        assert_eq!(t.allow(Duration::from_secs(3600)), None);
        assert_eq!(t.allow(Duration::from_secs(3600)), None);
        assert_eq!(t.allow(Duration::ZERO), Some(2));
    }
}
