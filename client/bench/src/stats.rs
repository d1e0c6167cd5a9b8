//! Latency percentiles and throughput of one measured phase.

use std::time::Duration;

/// Summary of one phase: `iterations` runs at some concurrency that took `wall` in total.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub iterations: usize,
    pub p50: Duration,
    pub p99: Duration,
    /// Completed runs per second of wall-clock time.
    pub throughput: f64,
}

impl Stats {
    /// Summarises latencies; `None` when there are none.
    pub fn new(mut latencies: Vec<Duration>, wall: Duration) -> Option<Self> {
        if latencies.is_empty() {
            return None;
        }
        latencies.sort_unstable();
        let secs = wall.as_secs_f64();
        Some(Stats {
            iterations: latencies.len(),
            p50: percentile(&latencies, 50),
            p99: percentile(&latencies, 99),
            throughput: if secs > 0.0 {
                latencies.len() as f64 / secs
            } else {
                f64::INFINITY
            },
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty samples: the smallest sample with at least `p`
/// percent of the samples at or below it.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<Duration> = (1..=100).rev().map(ms).collect();
        let stats = Stats::new(samples, Duration::from_secs(2)).expect("samples");
        assert_eq!(stats.p50, ms(50));
        assert_eq!(stats.p99, ms(99));
        assert_eq!(stats.iterations, 100);
        assert!((stats.throughput - 50.0).abs() < 1e-9);

        let one = Stats::new(vec![ms(7)], Duration::from_millis(7)).expect("samples");
        assert_eq!((one.p50, one.p99), (ms(7), ms(7)));

        let three = Stats::new(vec![ms(1), ms(2), ms(30)], ms(33)).expect("samples");
        assert_eq!((three.p50, three.p99), (ms(2), ms(30)));
    }

    #[test]
    fn no_samples_no_stats() {
        assert_eq!(Stats::new(Vec::new(), Duration::ZERO), None);
    }
}
