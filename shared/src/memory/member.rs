//! One member's state in the embedded store: backoff and breaker, budget usage, latency,
//! capacity hints and their ledger, open reservations.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use crate::store::{
    Backoff, BackoffReason, LatencyHistograms, Reservation, UpstreamHints, Windows,
};
use crate::window::Usage;

#[derive(Debug, Default)]
pub(super) struct Member {
    /// Backoff deadline (store clock, ms) and reason.
    pub(super) backoff: Option<(u64, BackoffReason)>,
    pub(super) usage: Usage,
    /// Latency slot start (ms) → histograms.
    pub(super) latency: BTreeMap<u64, LatencyHistograms>,
    pub(super) hints: UpstreamHints,
    /// When the hints were last set (store clock, ms).
    pub(super) hints_ms: Option<u64>,
    pub(super) estimated_tokens: u64,
    pub(super) actual_tokens: u64,
    pub(super) prompt_tokens: u64,
    pub(super) cached_tokens: u64,
    /// Circuit breaker: consecutive failures, and consecutive openings (cool-downs double).
    pub(super) failures: u32,
    pub(super) opened: u32,
    /// When it last opened (store clock, ms): the epoch outcomes are judged against.
    pub(super) opened_ms: u64,
    /// The last backoff that expired was a 429's: the next admission probes alone.
    pub(super) throttle_expired: bool,
    /// Outcomes in the current breaker window: start (ms), successes, failures.
    pub(super) outcomes: (u64, u32, u32),
    /// Running count of admitted tokens (the hint ledger).
    pub(super) admitted_tokens: u64,
    /// Open reservations: id → bucket start (ms). A settle corrects usage only while its id
    /// is here (once); entries whose bucket left the window are dropped as it grows.
    pub(super) open: HashMap<u64, u64>,
}

/// Open reservations a member holds before those whose bucket left the window are dropped.
const OPEN_RESERVATIONS_PRUNED_AT: usize = 4_096;

impl Member {
    pub(super) fn open_reservation(&mut self, reservation: &Reservation, now_ms: u64, w: &Windows) {
        if self.open.len() >= OPEN_RESERVATIONS_PRUNED_AT {
            let horizon = (w.budget.as_millis() as u64) + w.bucket_ms();
            self.open
                .retain(|_, bucket_ms| *bucket_ms + horizon > now_ms);
        }
        self.open.insert(reservation.id, reservation.bucket_ms);
    }

    /// Whether a settle of `reservation` may correct usage: once per id (id 0: not tracked).
    pub(super) fn close_reservation(&mut self, reservation: &Reservation) -> bool {
        reservation.id == 0 || self.open.remove(&reservation.id).is_some()
    }

    pub(super) fn remaining_backoff(&mut self, now_ms: u64) -> Option<Backoff> {
        match self.backoff {
            Some((until, reason)) if until > now_ms => Some(Backoff {
                duration: std::time::Duration::from_millis(until - now_ms),
                reason,
            }),
            Some((_, reason)) => {
                // A 429's backoff (or a probe that never reported) is over: one request
                // probes before the fleet resumes.
                self.throttle_expired =
                    matches!(reason, BackoffReason::Throttled | BackoffReason::Probing);
                self.backoff = None;
                None
            }
            None => None,
        }
    }

    /// How long a fresh capacity hint says this member has no room for `tokens` (`Err`), or
    /// `Ok(true)` when an expired hint said so (the next request then probes it alone).
    pub(super) fn hinted_full(
        &self,
        now_ms: u64,
        ttl_ms: u64,
        tokens: u64,
        spill: Option<f64>,
    ) -> Result<bool, Duration> {
        let Some(updated) = self.hints_ms else {
            return Ok(false);
        };
        let low = self.hints.remaining_tokens.is_some_and(|r| r < tokens);
        let hot = matches!((spill, self.hints.utilization), (Some(limit), Some(u)) if u >= limit);
        match (low || hot, updated + ttl_ms > now_ms) {
            (false, _) => Ok(false),
            (true, true) => Err(Duration::from_millis((updated + ttl_ms - now_ms).max(1))),
            (true, false) => Ok(true),
        }
    }

    pub(super) fn set_backoff(&mut self, now_ms: u64, backoff: Backoff) {
        let until = now_ms + backoff.duration.as_millis() as u64;
        let replace = match self.backoff {
            None => true,
            // A failed probe reopens the breaker whatever the probe's own deadline.
            Some((current, reason)) => until >= current || reason == BackoffReason::Probing,
        };
        if replace {
            self.backoff = Some((until, backoff.reason));
        }
    }

    /// A failed attempt: throttling backs off as asked; other failures count toward the
    /// breaker, which opens at the threshold with a cool-down doubling per opening. Once open,
    /// any failure of a request admitted since (the probe) reopens it; a failure of a request
    /// admitted before it opened is already accounted for.
    pub(super) fn fail(&mut self, now_ms: u64, admitted_ms: u64, backoff: Backoff, w: &Windows) {
        if backoff.reason == BackoffReason::Throttled {
            return self.set_backoff(now_ms, backoff);
        }
        if self.opened > 0 && admitted_ms < self.opened_ms {
            self.count_outcome(now_ms, w, false);
            return;
        }
        self.failures += 1;
        let (ok, failed) = self.count_outcome(now_ms, w, false);
        let rate_exceeded = ok + failed >= w.breaker_min_requests
            && f64::from(failed) >= w.breaker_failure_rate * f64::from(ok + failed);
        if self.failures < w.breaker_failures && !rate_exceeded && self.opened == 0 {
            return;
        }
        let cooldown = backoff
            .duration
            .saturating_mul(1 << self.opened.min(20))
            .min(w.breaker_max);
        self.opened += 1;
        self.opened_ms = now_ms;
        self.set_backoff(
            now_ms,
            Backoff {
                duration: cooldown,
                ..backoff
            },
        );
    }

    /// Count an outcome in the breaker window (a new window starts when the last one ended).
    pub(super) fn count_outcome(&mut self, now_ms: u64, w: &Windows, ok: bool) -> (u32, u32) {
        let (start, oks, fails) = &mut self.outcomes;
        if now_ms >= *start + w.breaker_window.as_millis() as u64 {
            (*start, *oks, *fails) = (now_ms, 0, 0);
        }
        if ok {
            *oks += 1
        } else {
            *fails += 1
        }
        (*oks, *fails)
    }

    /// A completed request closes the breaker and ends a probe, unless it was admitted
    /// before the breaker last opened (the past cannot vouch for the present).
    pub(super) fn succeed(&mut self, now_ms: u64, admitted_ms: u64, w: &Windows) {
        self.count_outcome(now_ms, w, true);
        if self.opened > 0 && admitted_ms < self.opened_ms {
            return;
        }
        self.failures = 0;
        self.opened = 0;
        if matches!(self.backoff, Some((_, BackoffReason::Probing))) {
            self.backoff = None;
        }
    }

    /// Take an upstream's capacity hints, unless newer ones are already held. `ledger` is
    /// the admitted-token mark of the request they came with.
    pub(super) fn observe(&mut self, now_ms: u64, hints: &UpstreamHints, ledger: u64) {
        let observed = now_ms.saturating_sub(hints.age().as_millis() as u64);
        if hints.is_empty() || self.hints_ms.is_some_and(|held| held >= observed) {
            return;
        }
        self.hints_ms = Some(observed);
        if let Some(remaining) = hints.remaining_tokens {
            // Less what was admitted after this request, which the upstream had not seen.
            let unseen = self.admitted_tokens.saturating_sub(ledger);
            self.hints.remaining_tokens = Some(remaining.saturating_sub(unseen));
        }
        if hints.utilization.is_some() {
            self.hints.utilization = hints.utilization;
        }
    }

    pub(super) fn latency(&mut self, now_ms: u64, w: &Windows) -> LatencyHistograms {
        let (slot, window) = (w.slot_ms(), w.latency.as_millis() as u64);
        self.latency
            .retain(|start, _| start + slot + window > now_ms);
        let mut sum = LatencyHistograms::default();
        for h in self.latency.values() {
            for (total, part) in [
                (&mut sum.ttfb_ms, &h.ttfb_ms),
                (&mut sum.total_ms, &h.total_ms),
                (&mut sum.ms_per_output_token, &h.ms_per_output_token),
                (&mut sum.output_tokens, &h.output_tokens),
            ] {
                for (t, p) in total.counts.iter_mut().zip(part.counts) {
                    *t += p;
                }
            }
        }
        sum
    }
}
