//! Sliding-window quota of one simulated deployment: tokens and requests per window.

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
    Admit {
        remaining_tokens: u64,
        remaining_requests: u64,
    },
    Reject {
        retry_after: Duration,
        remaining_tokens: u64,
        remaining_requests: u64,
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
                remaining_requests: self.request_limit - self.entries.len() as u64,
            };
        }
        Decision::Reject {
            retry_after: self.time_until_room(now, tokens),
            remaining_tokens: self.token_limit.saturating_sub(self.tokens),
            remaining_requests: self.request_limit.saturating_sub(self.entries.len() as u64),
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

#[cfg(test)]
mod tests {
    use super::*;

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
                remaining_requests: 0,
                ..
            }
        ));
        assert!((w.utilization(Instant::now()) - 0.002).abs() < 1e-9);
    }
}
