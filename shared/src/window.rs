//! Budget arithmetic shared by the stores (the Lua scripts implement the same rules):
//! a window is counted in buckets; a bucket counts while any part of it is inside the window,
//! so what is counted never falls short of what a sliding window holds.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::store::{Reservation, Windows};

/// Tokens and requests charged to one member, per bucket start (ms), with their running
/// sums: admission reads the sums (O(1)); buckets leave the window from the oldest end.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    buckets: BTreeMap<u64, (u64, u64)>,
    sums: (u64, u64),
}

/// What a request may use of a member's window (`None`: no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub tokens: Option<u64>,
    pub requests: Option<u64>,
    /// A lower class's line ([`crate::Candidate::ceiling`]).
    pub ceiling: Option<u64>,
    /// Tokens queued ahead of this request ([`crate::FleetState::acquire_in_turn`]),
    /// counted as used.
    pub ahead: u64,
}

impl Limits {
    pub fn of(candidate: &crate::Candidate) -> Self {
        Self {
            tokens: candidate.tokens_per_window,
            requests: candidate.requests_per_window,
            ceiling: candidate.ceiling,
            ahead: 0,
        }
    }
}

/// Whether `tokens` more (and one request) fit on top of `used`. A request larger than the
/// whole budget is admitted into an empty window, else it could never be served; a lower
/// class's line has no such exception (the top class may still use the room above it).
pub fn fits(used_tokens: u64, used_requests: u64, tokens: u64, limits: Limits) -> bool {
    let used_tokens = used_tokens + limits.ahead;
    let tokens_ok = limits
        .tokens
        .is_none_or(|limit| used_tokens + tokens <= limit || used_tokens == 0);
    let requests_ok = limits.requests.is_none_or(|limit| used_requests < limit);
    let below_line = limits
        .ceiling
        .is_none_or(|line| used_tokens + tokens <= line);
    tokens_ok && requests_ok && below_line
}

impl Usage {
    /// Drop buckets wholly outside the window ending at `now_ms`.
    pub fn prune(&mut self, now_ms: u64, w: &Windows) {
        let (bucket, window) = (w.bucket_ms(), w.budget.as_millis() as u64);
        while let Some(entry) = self.buckets.first_entry() {
            if entry.key() + bucket + window > now_ms {
                break;
            }
            let (tokens, requests) = entry.remove();
            self.sums.0 -= tokens;
            self.sums.1 -= requests;
        }
    }

    pub fn totals(&self) -> (u64, u64) {
        self.sums
    }

    /// Add usage that no reservation covered to the current bucket, with no budget check.
    pub fn charge(&mut self, now_ms: u64, w: &Windows, tokens: u64, requests: u64) {
        self.prune(now_ms, w);
        let bucket_ms = now_ms - now_ms % w.bucket_ms();
        let entry = self.buckets.entry(bucket_ms).or_default();
        entry.0 += tokens;
        entry.1 += requests;
        self.sums.0 += tokens;
        self.sums.1 += requests;
    }

    /// Reserve `tokens` and one request in the current bucket, or say how long until they fit.
    pub fn try_reserve(
        &mut self,
        now_ms: u64,
        w: &Windows,
        tokens: u64,
        limits: Limits,
    ) -> Result<Reservation, Duration> {
        self.prune(now_ms, w);
        let (mut used_tokens, mut used_requests) = self.totals();
        if fits(used_tokens, used_requests, tokens, limits) {
            let bucket_ms = now_ms - now_ms % w.bucket_ms();
            let entry = self.buckets.entry(bucket_ms).or_default();
            entry.0 += tokens;
            entry.1 += 1;
            self.sums.0 += tokens;
            self.sums.1 += 1;
            return Ok(Reservation {
                bucket_ms,
                tokens,
                ledger: 0,
                admitted_ms: now_ms,
                issuer: crate::store::Issuer::Embedded,
                id: 0,
            });
        }
        let (bucket, window) = (w.bucket_ms(), w.budget.as_millis() as u64);
        for (start, (t, r)) in &self.buckets {
            used_tokens -= t;
            used_requests -= r;
            if fits(used_tokens, used_requests, tokens, limits) {
                return Err(Duration::from_millis(
                    (start + bucket + window).saturating_sub(now_ms).max(1),
                ));
            }
        }
        Err(w.budget)
    }

    /// Replace a reservation's estimate by the real count, if its bucket is still counted.
    pub fn settle(&mut self, reservation: Reservation, tokens: u64) {
        if let Some(entry) = self.buckets.get_mut(&reservation.bucket_ms) {
            let settled = (entry.0 + tokens).saturating_sub(reservation.tokens);
            self.sums.0 = self.sums.0 - entry.0 + settled;
            entry.0 = settled;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows() -> Windows {
        Windows {
            budget: Duration::from_millis(1_000),
            budget_buckets: 10,
            ..Windows::default()
        }
    }

    #[test]
    fn a_bucket_leaves_the_window_whole_after_it_ends() {
        let w = windows();
        let mut u = Usage::default();
        u.try_reserve(1_050, &w, 100, tokens(100)).unwrap();
        // The bucket [1000, 1100) is counted until 1100 + 1000.
        assert_eq!(
            u.try_reserve(2_099, &w, 1, tokens(100)),
            Err(Duration::from_millis(1))
        );
        assert!(u.try_reserve(2_100, &w, 100, tokens(100)).is_ok());
    }

    #[test]
    fn wait_is_until_enough_old_buckets_leave() {
        let w = windows();
        let mut u = Usage::default();
        u.try_reserve(0, &w, 40, tokens(100)).unwrap();
        u.try_reserve(500, &w, 40, tokens(100)).unwrap();
        // 80 used; 50 more fits once the first bucket [0,100) leaves at 1100.
        assert_eq!(
            u.try_reserve(600, &w, 50, tokens(100)),
            Err(Duration::from_millis(500))
        );
    }

    #[test]
    fn settle_replaces_the_estimate_and_ignores_gone_buckets() {
        let w = windows();
        let mut u = Usage::default();
        let r = u.try_reserve(0, &w, 50, tokens(100)).unwrap();
        u.settle(r, 20);
        assert_eq!(u.totals(), (20, 1));
        u.prune(5_000, &w);
        u.settle(r, 20);
        assert_eq!(u.totals(), (0, 0));
    }

    #[test]
    fn oversized_requests_fit_only_an_empty_window_and_requests_are_bounded() {
        assert!(fits(0, 0, 500, tokens(100)));
        assert!(!fits(1, 0, 500, tokens(100)));
        let two = Limits {
            requests: Some(2),
            ..Limits::default()
        };
        assert!(fits(0, 1, 0, two));
        assert!(!fits(0, 2, 0, two));
    }

    #[test]
    fn a_ceiling_admits_up_to_its_line_with_no_exception_for_an_empty_window() {
        let line = Limits {
            ceiling: Some(80),
            ..tokens(100)
        };
        assert!(fits(70, 0, 10, line));
        assert!(!fits(70, 0, 11, line));
        assert!(
            !fits(0, 0, 81, line),
            "an oversized lower-class request never takes the reserve"
        );
        assert!(
            fits(70, 0, 30, tokens(100)),
            "the top class uses the room above it"
        );
    }

    fn tokens(n: u64) -> Limits {
        Limits {
            tokens: Some(n),
            ..Limits::default()
        }
    }
}
