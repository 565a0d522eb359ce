//! Round trips to Redis as this replica measures them, and what follows from them: how long
//! a call may take before it is abandoned, and how far ahead leases are refilled. A replica
//! next to Redis and one a region away run the same configuration; only the measurement
//! differs.
//!
//! The estimate is the last [`SAMPLES`] completed calls. The call timeout is
//! [`TIMEOUT_FACTOR`] × their p90, never below the configured floor (`redis_timeout_ms`) nor
//! above [`CEILING`]: a Redis 80 ms away is slow, not failing, while a stalled call near Redis
//! is still abandoned at the floor. The p90 (not the p99) because a stall is sampled too, by
//! the calls that waited it out, and a handful of those must not stretch every later call's
//! timeout.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Completed calls the estimate is taken over.
pub const SAMPLES: usize = 128;
/// The timeout is this many times the round trip's p90.
pub const TIMEOUT_FACTOR: u32 = 2;
/// No call waits longer than this, however far Redis is.
pub const CEILING: Duration = Duration::from_secs(1);
/// The estimate is recomputed every this many samples (sorting on every call would cost more
/// than the call's bookkeeping is worth).
const RECOMPUTE_EVERY: u64 = 8;

#[derive(Debug, Default)]
pub struct RoundTrips {
    samples: Mutex<VecDeque<u32>>,
    recorded: AtomicU64,
    /// The latest p50 and p90, µs (0: no sample yet).
    p50_us: AtomicU64,
    p90_us: AtomicU64,
}

impl RoundTrips {
    /// A call to Redis completed after `took`.
    pub fn record(&self, took: Duration) {
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        let n = self.recorded.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().expect("round trips lock");
        if samples.len() == SAMPLES {
            samples.pop_front();
        }
        samples.push_back(us);
        // The first samples count at once: a replica far from Redis must not start with
        // the floor as its timeout for long.
        if n < RECOMPUTE_EVERY || n.is_multiple_of(RECOMPUTE_EVERY) {
            let mut sorted: Vec<u32> = samples.iter().copied().collect();
            drop(samples);
            sorted.sort_unstable();
            let at = |q: f64| u64::from(sorted[((sorted.len() - 1) as f64 * q).round() as usize]);
            self.p50_us.store(at(0.5).max(1), Ordering::Relaxed);
            self.p90_us.store(at(0.9).max(1), Ordering::Relaxed);
        }
    }

    /// The typical round trip (p50); `None` before the first call completed.
    pub fn typical(&self) -> Option<Duration> {
        match self.p50_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// How long a call may take before it is abandoned: [`TIMEOUT_FACTOR`] × the p90,
    /// between `floor` and [`CEILING`] (`floor` before any sample, or if it is the larger).
    pub fn timeout(&self, floor: Duration) -> Duration {
        let p90 = Duration::from_micros(self.p90_us.load(Ordering::Relaxed));
        (p90 * TIMEOUT_FACTOR).min(CEILING).max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: Duration = Duration::from_millis(25);

    #[test]
    fn near_redis_the_floor_holds() {
        let rt = RoundTrips::default();
        assert_eq!(rt.timeout(FLOOR), FLOOR, "nothing measured: the floor");
        assert_eq!(rt.typical(), None);
        for _ in 0..50 {
            rt.record(Duration::from_micros(300));
        }
        assert_eq!(rt.timeout(FLOOR), FLOOR);
        assert_eq!(rt.typical(), Some(Duration::from_micros(300)));
    }

    #[test]
    fn far_from_redis_the_timeout_follows_the_round_trip() {
        let rt = RoundTrips::default();
        rt.record(Duration::from_millis(80));
        assert_eq!(
            rt.timeout(FLOOR),
            Duration::from_millis(160),
            "from the first call"
        );
        for _ in 0..200 {
            rt.record(Duration::from_millis(80));
        }
        assert_eq!(rt.timeout(FLOOR), Duration::from_millis(160));
        rt.record(Duration::from_secs(5));
        assert!(rt.timeout(FLOOR) <= CEILING);
    }

    #[test]
    fn a_few_stalls_do_not_stretch_the_timeout() {
        let rt = RoundTrips::default();
        for i in 0..SAMPLES {
            let took = if i % 16 == 0 { 900 } else { 1 };
            rt.record(Duration::from_millis(took));
        }
        assert_eq!(rt.timeout(FLOOR), FLOOR, "8 stalls in 128 calls");
    }

    #[test]
    fn the_estimate_moves_with_the_distance() {
        let rt = RoundTrips::default();
        for _ in 0..SAMPLES {
            rt.record(Duration::from_millis(1));
        }
        for _ in 0..SAMPLES {
            rt.record(Duration::from_millis(40));
        }
        assert_eq!(rt.typical(), Some(Duration::from_millis(40)));
        assert_eq!(rt.timeout(FLOOR), Duration::from_millis(80));
    }
}
