//! Retry budget: retries may add at most a share of the traffic (plus a small floor), so an
//! outage cannot turn into a retry storm. Each replica keeps its own budget; as every
//! replica caps its retries to that share of its own traffic, the fleet's retries are capped
//! to the same share of the fleet's traffic, with no shared state.
//!
//! Why not `tower::retry::budget::TpsBudget` (the same idea, from Finagle): it starts with no
//! credit beyond its per-second floor and keeps none, where this budget starts full (ten
//! seconds of floor, at least 10 retries), so a replica that just started, or one configured
//! with no floor, can still fail over its first requests during an outage (pinned by
//! `tests/routing.rs::a_spent_retry_budget_stops_failover`); its floor is a whole number of
//! retries per second where `routing.min_retries_per_second` takes fractions; and it panics
//! on parameters out of its range where configuration errors are reported by name.

use std::sync::Mutex;

use tokio::time::Instant;

pub struct RetryBudget {
    /// Retry credit each request adds.
    ratio: f64,
    /// Credit added per second whatever the traffic, so quiet replicas can still retry.
    floor_per_sec: f64,
    /// Most credit that can be saved up (ten seconds' worth of floor, at least 10).
    cap: f64,
    state: Mutex<(f64, Instant)>,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_sec: f64) -> Self {
        let cap = (floor_per_sec * 10.0).max(10.0);
        Self {
            ratio,
            floor_per_sec,
            cap,
            state: Mutex::new((cap, Instant::now())),
        }
    }

    fn refill(&self, state: &mut (f64, Instant)) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.floor_per_sec).min(self.cap);
        state.1 = now;
    }

    /// A new request adds its share of retry credit.
    pub fn deposit(&self) {
        let mut state = self.state.lock().expect("retry budget lock poisoned");
        self.refill(&mut state);
        state.0 = (state.0 + self.ratio).min(self.cap);
    }

    /// Spend one credit on a retry; false when the budget is spent.
    pub fn try_withdraw(&self) -> bool {
        let mut state = self.state.lock().expect("retry budget lock poisoned");
        self.refill(&mut state);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::RetryBudget;

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_to_the_ratio_of_requests() {
        let budget = RetryBudget::new(0.2, 0.0);
        // Spend the initial credit first.
        while budget.try_withdraw() {}
        for _ in 0..100 {
            budget.deposit();
        }
        let retries = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(retries, 10, "the cap (10) binds before 100 x 0.2 = 20");
        for _ in 0..25 {
            budget.deposit();
        }
        assert_eq!((0..100).filter(|_| budget.try_withdraw()).count(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_refills_over_time() {
        let budget = RetryBudget::new(0.0, 2.0);
        while budget.try_withdraw() {}
        assert!(!budget.try_withdraw());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(
            budget.try_withdraw(),
            "2 per second: one after half a second"
        );
        assert!(!budget.try_withdraw());
    }
}
