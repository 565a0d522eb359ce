//! Quotas of simulated deployments: PAYG's sliding window of tokens and requests, and PTU's
//! leaky bucket of utilization.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Window {
    length: Duration,
    token_limit: u64,
    request_limit: u64,
    /// (admitted at, tokens charged), oldest first.
    entries: VecDeque<(Instant, u64)>,
    tokens: u64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// `remaining_requests` is `None` where the quota counts no requests (PTU).
    Admit {
        remaining_tokens: u64,
        remaining_requests: Option<u64>,
    },
    Reject {
        retry_after: Duration,
        remaining_tokens: u64,
        remaining_requests: Option<u64>,
    },
}

impl Window {
    pub fn new(length: Duration, token_limit: u64, request_limit: u64) -> Self {
        Self {
            length,
            token_limit,
            request_limit,
            entries: VecDeque::new(),
            tokens: 0,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, tokens)) = self.entries.front() {
            if at + self.length > now {
                break;
            }
            self.entries.pop_front();
            self.tokens -= tokens;
        }
    }

    /// Charge `tokens` (the request's up-front estimate) if the window has room.
    /// A single request larger than the whole limit is admitted only into an empty window.
    pub fn try_admit(&mut self, now: Instant, tokens: u64) -> Decision {
        self.expire(now);
        let fits_tokens = self.tokens + tokens <= self.token_limit || self.entries.is_empty();
        let fits_requests = (self.entries.len() as u64) < self.request_limit;
        if fits_tokens && fits_requests {
            self.entries.push_back((now, tokens));
            self.tokens += tokens;
            return Decision::Admit {
                remaining_tokens: self.token_limit.saturating_sub(self.tokens),
                remaining_requests: Some(self.request_limit - self.entries.len() as u64),
            };
        }
        Decision::Reject {
            retry_after: self.time_until_room(now, tokens),
            remaining_tokens: self.token_limit.saturating_sub(self.tokens),
            remaining_requests: Some(self.request_limit.saturating_sub(self.entries.len() as u64)),
        }
    }

    /// When enough old entries will have left the window for this request to fit.
    fn time_until_room(&self, now: Instant, tokens: u64) -> Duration {
        let mut held_tokens = self.tokens;
        let mut held_requests = self.entries.len() as u64;
        for &(at, charged) in &self.entries {
            held_tokens -= charged;
            held_requests -= 1;
            let fits = held_tokens + tokens <= self.token_limit || held_requests == 0;
            if fits && held_requests < self.request_limit {
                return (at + self.length)
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
            }
        }
        self.length
    }

    /// Tokens charged in the window as a share of the limit (PTU "utilization").
    pub fn utilization(&mut self, now: Instant) -> f64 {
        self.expire(now);
        self.tokens as f64 / self.token_limit.max(1) as f64
    }
}

/// PTU capacity: each admitted request adds its tokens to the level, which drains at
/// `capacity` tokens per `period`. Admitted while the level stays within capacity; above it
/// the service fails fast with a precise retry time instead of queueing.
#[derive(Debug)]
pub struct LeakyBucket {
    capacity: f64,
    drain_per_sec: f64,
    level: f64,
    at: Instant,
}

impl LeakyBucket {
    pub fn new(period: Duration, capacity: u64) -> Self {
        let capacity = capacity.max(1) as f64;
        Self {
            capacity,
            drain_per_sec: capacity / period.as_secs_f64().max(0.001),
            level: 0.0,
            at: Instant::now(),
        }
    }

    fn drain(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level - elapsed * self.drain_per_sec).max(0.0);
        self.at = now;
    }

    pub fn try_admit(&mut self, now: Instant, tokens: u64) -> Decision {
        self.drain(now);
        let tokens = tokens as f64;
        if self.level + tokens <= self.capacity || self.level == 0.0 {
            self.level += tokens;
            return Decision::Admit {
                remaining_tokens: self.remaining(),
                remaining_requests: None,
            };
        }
        let excess = self.level + tokens - self.capacity;
        let retry_after =
            Duration::from_secs_f64(excess / self.drain_per_sec).max(Duration::from_millis(1));
        Decision::Reject {
            retry_after,
            remaining_tokens: self.remaining(),
            remaining_requests: None,
        }
    }

    fn remaining(&self) -> u64 {
        (self.capacity - self.level).max(0.0) as u64
    }

    pub fn utilization(&mut self, now: Instant) -> f64 {
        self.drain(now);
        self.level / self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn leaky_bucket_rejects_above_capacity_with_the_drain_time() {
        // 600 tokens per minute drain at 10 tokens per second.
        let mut b = LeakyBucket::new(Duration::from_secs(60), 600);
        assert!(matches!(
            b.try_admit(Instant::now(), 550),
            Decision::Admit {
                remaining_tokens: 50,
                ..
            }
        ));
        match b.try_admit(Instant::now(), 100) {
            Decision::Reject { retry_after, .. } => assert_eq!(retry_after, Duration::from_secs(5)),
            other => panic!("expected reject, got {other:?}"),
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(matches!(
            b.try_admit(Instant::now(), 100),
            Decision::Admit {
                remaining_tokens: 0,
                ..
            }
        ));
        assert!((b.utilization(Instant::now()) - 1.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_over_the_token_limit_until_the_oldest_entry_leaves() {
        let mut w = Window::new(Duration::from_secs(60), 100, 1_000);
        assert!(matches!(
            w.try_admit(Instant::now(), 60),
            Decision::Admit {
                remaining_tokens: 40,
                ..
            }
        ));
        tokio::time::advance(Duration::from_secs(10)).await;
        match w.try_admit(Instant::now(), 60) {
            Decision::Reject { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(50))
            }
            other => panic!("expected reject, got {other:?}"),
        }
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(matches!(
            w.try_admit(Instant::now(), 60),
            Decision::Admit { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn request_limit_applies_too() {
        let mut w = Window::new(Duration::from_secs(10), 1_000, 2);
        w.try_admit(Instant::now(), 1);
        w.try_admit(Instant::now(), 1);
        assert!(matches!(
            w.try_admit(Instant::now(), 1),
            Decision::Reject {
                remaining_requests: Some(0),
                ..
            }
        ));
        assert!((w.utilization(Instant::now()) - 0.002).abs() < 1e-9);
    }
}
