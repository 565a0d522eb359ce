//! `EmbeddedState`: the in-process store, the default when no Redis is configured, and the
//! fallback while Redis is unreachable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::store::{
    Admission, BackendId, Backoff, BackoffReason, Candidate, FleetState, MAX_QUOTA_NAME_BYTES,
    MAX_RESPONSE_ID_BYTES, MemberSnapshot, PoolName, PoolSnapshot, QuotaCounter, Receipt,
    ResponseOwner, StateError, Ticket, UpstreamHints, Windows,
};
mod member;
mod queue;

use crate::ledger::{HourLedger, SpendCounts, SpendKey};
use member::Member;
use queue::Queue;

/// Fleet state held in this process. Replicas in one process that share one
/// `Arc<EmbeddedState>` (the demo) agree exactly as a Redis-backed fleet would.
#[derive(Debug)]
pub struct EmbeddedState {
    windows: Windows,
    epoch: Instant,
    /// Added to the clock by tests ([`crate::ClockControl`]).
    skew_ms: std::sync::atomic::AtomicU64,
    // std Mutex: critical sections are map operations and never await.
    members: Mutex<HashMap<(PoolName, BackendId), Member>>,
    /// Responses API affinity: response id → owner and expiry (store clock, ms).
    responses: Mutex<HashMap<String, (ResponseOwner, u64)>>,
    /// Quota counters: name → tokens and expiry (unix ms).
    quotas: Mutex<HashMap<String, (u64, u64)>>,
    /// Reservation ids, as in Redis: a settle corrects usage once, while its id is open.
    next_id: std::sync::atomic::AtomicU64,
    /// Each pool's queue of requests waiting in turn. Locked before `members`.
    queues: Mutex<HashMap<PoolName, Queue>>,
    /// The cost ledger: hour start (unix ms) → its expiry and lines.
    spend: Mutex<BTreeMap<u64, (u64, Lines)>>,
}

/// One hour's ledger lines.
type Lines = BTreeMap<SpendKey, SpendCounts>;

/// Quota counters kept at most; when full, expired ones are dropped first.
const MAX_QUOTA_COUNTERS: usize = 100_000;

/// Affinity entries kept at most; when full, expired ones are dropped first, then new
/// responses are not remembered (their follow-ups take normal routing).
const MAX_PINNED_RESPONSES: usize = 200_000;

impl Default for EmbeddedState {
    fn default() -> Self {
        Self::new(Windows::default())
    }
}

impl EmbeddedState {
    pub fn new(windows: Windows) -> Self {
        Self {
            windows,
            epoch: Instant::now(),
            skew_ms: std::sync::atomic::AtomicU64::new(0),
            members: Mutex::new(HashMap::new()),
            responses: Mutex::new(HashMap::new()),
            quotas: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
            queues: Mutex::new(HashMap::new()),
            spend: Mutex::new(BTreeMap::new()),
        }
    }

    /// Wall-clock time (unix ms) for quota periods, moved by the test clock too.
    fn unix_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            + self.skew_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        // Offset so bucket arithmetic never sees times before a window's start.
        (Instant::now() - self.epoch).as_millis() as u64
            + self.windows.budget.as_millis() as u64
            + self.skew_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn with_member<T>(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        f: impl FnOnce(&mut Member) -> T,
    ) -> T {
        let mut members = self.members.lock().expect("embedded state lock poisoned");
        f(members.entry((pool.clone(), backend.clone())).or_default())
    }
}

impl crate::store::ClockControl for EmbeddedState {
    fn advance_clock(&self, by: std::time::Duration) {
        self.skew_ms
            .fetch_add(by.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl EmbeddedState {
    /// `acquire`, with `ahead` tokens queued before the request counted as used.
    fn admit(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        ahead: u64,
    ) -> Admission {
        let now = self.now_ms();
        let mut members = self.members.lock().expect("embedded state lock poisoned");
        let mut earliest: Option<std::time::Duration> = None;
        let mut throttled = false;
        for c in candidates {
            let member = members
                .entry((pool.clone(), c.backend.clone()))
                .or_default();
            let hint_ttl = self.windows.hint_ttl.as_millis() as u64;
            let hint = member.hinted_full(now, hint_ttl, estimated_tokens, c.spill_utilization);
            let wait = if let Some(b) = member.remaining_backoff(now) {
                throttled |= b.reason == BackoffReason::Throttled;
                b.duration
            } else if let Err(wait) = hint {
                throttled = true;
                wait
            } else {
                let limits = crate::window::Limits {
                    ahead,
                    ..crate::window::Limits::of(c)
                };
                match member
                    .usage
                    .try_reserve(now, &self.windows, estimated_tokens, limits)
                {
                    Ok(mut reservation) => {
                        member.admitted_tokens += estimated_tokens;
                        reservation.ledger = member.admitted_tokens;
                        reservation.id = self
                            .next_id
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        member.open_reservation(&reservation, now, &self.windows);
                        // Hint ledger: requests admitted since the upstream's last answer use
                        // up its remaining tokens, so concurrent requests see the room shrink.
                        if member.hints_ms.is_some_and(|at| at + hint_ttl > now) {
                            let remaining = &mut member.hints.remaining_tokens;
                            *remaining = remaining.map(|r| r.saturating_sub(estimated_tokens));
                        }
                        if hint == Ok(true) {
                            // The last hint said "full" and has expired: this request probes;
                            // the others keep treating the hint as fresh until its answer.
                            member.hints_ms = Some(now);
                        }
                        if member.opened > 0 || std::mem::take(&mut member.throttle_expired) {
                            // Half-open breaker, or a 429 backoff just over: this request
                            // probes; the others wait for its outcome.
                            let probe = Backoff {
                                duration: self.windows.breaker_probe,
                                reason: BackoffReason::Probing,
                            };
                            member.set_backoff(now, probe);
                        }
                        return Admission::Admitted {
                            backend: c.backend.clone(),
                            reservation,
                        };
                    }
                    Err(wait) => {
                        throttled = true;
                        wait
                    }
                }
            };
            earliest = Some(earliest.map_or(wait, |e| e.min(wait)));
        }
        Admission::Exhausted {
            retry_after: earliest.unwrap_or_default(),
            throttled,
        }
    }
}

#[async_trait]
impl FleetState for EmbeddedState {
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
    ) -> Result<Admission, StateError> {
        Ok(self.admit(pool, candidates, estimated_tokens, 0))
    }

    async fn acquire_in_turn(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        ticket: &Ticket,
    ) -> Result<Admission, StateError> {
        if ticket.id.len() > crate::store::MAX_TICKET_ID_BYTES {
            return Err(StateError::Protocol("ticket id too long".into()));
        }
        let mut queues = self.queues.lock().expect("embedded state lock poisoned");
        let queue = queues.entry(pool.clone()).or_default();
        let ahead = queue.renew(ticket, estimated_tokens, self.now_ms());
        let admission = self.admit(pool, candidates, estimated_tokens, ahead);
        if matches!(admission, Admission::Admitted { .. }) {
            queue.leave(&ticket.id);
        }
        Ok(admission)
    }

    async fn leave_queue(&self, pool: &PoolName, ticket: &Ticket) -> Result<(), StateError> {
        let mut queues = self.queues.lock().expect("embedded state lock poisoned");
        if let Some(queue) = queues.get_mut(pool) {
            queue.leave(&ticket.id);
        }
        Ok(())
    }

    async fn settle(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        receipt: Receipt,
    ) -> Result<(), StateError> {
        let now = self.now_ms();
        let w = self.windows;
        self.with_member(pool, backend, |m| {
            if m.close_reservation(&receipt.reservation) {
                m.usage.settle(receipt.reservation, receipt.tokens);
            }
            if receipt.latency.is_some() {
                m.estimated_tokens += receipt.reservation.tokens;
                m.actual_tokens += receipt.tokens;
            }
            if let Some(sample) = receipt.latency {
                m.prompt_tokens += sample.prompt_tokens;
                m.cached_tokens += sample.cached_tokens;
                let slot = now - now % w.slot_ms();
                let h = m.latency.entry(slot).or_default();
                h.ttfb_ms.record(sample.ttfb.as_millis() as u64);
                h.total_ms.record(sample.total.as_millis() as u64);
                if let Some(per_token) = ms_per_output_token(&sample) {
                    h.ms_per_output_token.record(per_token);
                }
                if sample.output_tokens > 0 {
                    h.output_tokens.record(sample.output_tokens);
                }
            }
            m.observe(now, &receipt.hints, receipt.reservation.ledger);
            let admitted_ms = receipt.reservation.admitted_ms;
            match receipt.backoff {
                Some(backoff) => m.fail(now, admitted_ms, backoff, &w),
                None if receipt.latency.is_some() => m.succeed(now, admitted_ms, &w),
                None => {}
            }
        });
        Ok(())
    }

    async fn observe(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        hints: UpstreamHints,
        reservation: crate::store::Reservation,
    ) -> Result<(), StateError> {
        let now = self.now_ms();
        self.with_member(pool, backend, |m| {
            m.observe(now, &hints, reservation.ledger)
        });
        Ok(())
    }

    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError> {
        let now = self.now_ms();
        self.with_member(pool, backend, |m| m.set_backoff(now, backoff));
        Ok(())
    }

    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[Candidate],
    ) -> Result<PoolSnapshot, StateError> {
        let now = self.now_ms();
        let w = self.windows;
        let members = members
            .iter()
            .map(|c| {
                self.with_member(pool, &c.backend, |m| {
                    m.usage.prune(now, &w);
                    let (tokens_used, requests_used) = m.usage.totals();
                    MemberSnapshot {
                        backend: c.backend.clone(),
                        backoff: m.remaining_backoff(now),
                        tokens_used,
                        requests_used,
                        hints: m.hints,
                        latency: m.latency(now, &w),
                        estimated_tokens: m.estimated_tokens,
                        actual_tokens: m.actual_tokens,
                        prompt_tokens: m.prompt_tokens,
                        cached_tokens: m.cached_tokens,
                    }
                })
            })
            .collect();
        Ok(PoolSnapshot {
            pool: pool.clone(),
            members,
        })
    }

    async fn charge(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        tokens: u64,
        requests: u64,
    ) -> Result<(), StateError> {
        let now = self.now_ms();
        self.with_member(pool, backend, |m| {
            m.usage.charge(now, &self.windows, tokens, requests);
            // Served tokens the upstream counts: on the hint ledger, as admissions are. Not
            // in estimated/actual: no estimate was made for them.
            m.admitted_tokens += tokens;
        });
        Ok(())
    }

    async fn pin_response(
        &self,
        response_id: &str,
        owner: &ResponseOwner,
        ttl: std::time::Duration,
    ) -> Result<(), StateError> {
        if response_id.len() > MAX_RESPONSE_ID_BYTES {
            return Ok(());
        }
        let now = self.now_ms();
        let mut pins = self.responses.lock().expect("responses lock");
        if pins.len() >= MAX_PINNED_RESPONSES && !pins.contains_key(response_id) {
            pins.retain(|_, (_, expires)| *expires > now);
            if pins.len() >= MAX_PINNED_RESPONSES {
                return Ok(());
            }
        }
        let expires = now + ttl.as_millis() as u64;
        pins.insert(response_id.to_owned(), (owner.clone(), expires));
        Ok(())
    }

    async fn response_owner(&self, response_id: &str) -> Result<Option<ResponseOwner>, StateError> {
        let now = self.now_ms();
        let mut pins = self.responses.lock().expect("responses lock");
        match pins.get(response_id) {
            Some((owner, expires)) if *expires > now => Ok(Some(owner.clone())),
            Some(_) => {
                pins.remove(response_id);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn record_spend(
        &self,
        hour_ms: u64,
        expires_at_ms: u64,
        lines: &[(SpendKey, SpendCounts)],
    ) -> Result<(), StateError> {
        let now = self.unix_ms();
        let mut spend = self.spend.lock().expect("embedded state lock poisoned");
        spend.retain(|_, (expires, _)| *expires > now);
        let (expires, hour) = spend.entry(hour_ms).or_default();
        *expires = expires_at_ms;
        for (key, counts) in lines {
            hour.entry(key.clone()).or_default().add(*counts);
        }
        Ok(())
    }

    async fn spend_between(
        &self,
        from_hour_ms: u64,
        to_hour_ms: u64,
    ) -> Result<Vec<HourLedger>, StateError> {
        let now = self.unix_ms();
        let spend = self.spend.lock().expect("embedded state lock poisoned");
        Ok(spend
            .range(from_hour_ms..=to_hour_ms)
            .filter(|(_, (expires, _))| *expires > now)
            .map(|(hour, (_, lines))| (*hour, lines.clone()))
            .collect())
    }

    async fn spend_quota(&self, counter: &QuotaCounter, tokens: u64) -> Result<u64, StateError> {
        if counter.name.len() > MAX_QUOTA_NAME_BYTES {
            return Err(StateError::Protocol("quota counter name too long".into()));
        }
        let now = self.unix_ms();
        let mut quotas = self.quotas.lock().expect("quotas lock");
        if quotas.len() >= MAX_QUOTA_COUNTERS && !quotas.contains_key(&counter.name) {
            quotas.retain(|_, (_, expires)| *expires > now);
        }
        let entry = quotas
            .entry(counter.name.clone())
            .or_insert((0, counter.expires_at_ms));
        if entry.1 <= now {
            *entry = (0, counter.expires_at_ms);
        }
        if tokens > 0 {
            *entry = (entry.0.saturating_add(tokens), counter.expires_at_ms);
        }
        let total = entry.0;
        if entry.1 <= now {
            quotas.remove(&counter.name);
        }
        Ok(total)
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "embedded".into()
    }
}

/// Time per output token after the first byte; `None` without output tokens.
pub fn ms_per_output_token(sample: &crate::store::LatencySample) -> Option<u64> {
    (sample.output_tokens > 0).then(|| {
        (sample.total.saturating_sub(sample.ttfb).as_millis() as u64) / sample.output_tokens
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{Admission, Backoff};

    #[tokio::test(start_paused = true)]
    async fn a_backoff_ends_at_its_deadline() {
        let store = EmbeddedState::default();
        let (pool, c) = (
            PoolName::new("p"),
            [Candidate::unlimited(BackendId::new("a"))],
        );
        let b = Backoff {
            duration: Duration::from_millis(3_000),
            reason: BackoffReason::Throttled,
        };
        store.backoff(&pool, &c[0].backend, b).await.unwrap();
        tokio::time::advance(Duration::from_millis(2_999)).await;
        assert!(matches!(
            store.acquire(&pool, &c, 1).await.unwrap(),
            Admission::Exhausted { .. }
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(
            store.acquire(&pool, &c, 1).await.unwrap(),
            Admission::Admitted { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_budget_admits_again_when_the_window_rolls_over() {
        let windows = Windows {
            budget: Duration::from_millis(1_000),
            budget_buckets: 10,
            ..Windows::default()
        };
        let store = EmbeddedState::new(windows);
        let pool = PoolName::new("p");
        let c = [Candidate {
            backend: BackendId::new("a"),
            tokens_per_window: Some(100),
            requests_per_window: None,
            spill_utilization: None,
            tier: 0,
            ceiling: None,
        }];
        assert!(matches!(
            store.acquire(&pool, &c, 100).await.unwrap(),
            Admission::Admitted { .. }
        ));
        let Admission::Exhausted { retry_after, .. } = store.acquire(&pool, &c, 1).await.unwrap()
        else {
            panic!("the budget is full");
        };
        tokio::time::advance(retry_after).await;
        assert!(matches!(
            store.acquire(&pool, &c, 100).await.unwrap(),
            Admission::Admitted { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_cool_down_one_request_probes_and_the_rest_wait_for_it() {
        let store = EmbeddedState::default();
        let (pool, c) = (
            PoolName::new("p"),
            [Candidate::unlimited(BackendId::new("a"))],
        );
        let Admission::Admitted {
            backend,
            reservation,
        } = store.acquire(&pool, &c, 1).await.unwrap()
        else {
            panic!("admitted");
        };
        let fail = Backoff {
            duration: Duration::from_millis(1_000),
            reason: BackoffReason::ServerError,
        };
        let receipt = Receipt {
            reservation,
            tokens: 0,
            latency: None,
            hints: UpstreamHints::default(),
            backoff: Some(fail),
        };
        store.settle(&pool, &backend, receipt).await.unwrap();
        tokio::time::advance(Duration::from_millis(1_000)).await;

        assert!(
            matches!(
                store.acquire(&pool, &c, 1).await.unwrap(),
                Admission::Admitted { .. }
            ),
            "the probe"
        );
        match store.acquire(&pool, &c, 1).await.unwrap() {
            Admission::Exhausted { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(5))
            }
            other => panic!("others wait for the probe: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_rate_over_the_window_opens_the_breaker() {
        let windows = Windows {
            breaker_failures: 1_000,
            breaker_min_requests: 10,
            ..Windows::default()
        };
        let store = EmbeddedState::new(windows);
        let (pool, c) = (
            PoolName::new("p"),
            [Candidate::unlimited(BackendId::new("a"))],
        );
        let Admission::Admitted {
            backend,
            reservation,
        } = store.acquire(&pool, &c, 1).await.unwrap()
        else {
            panic!("admitted");
        };
        let outcome = |ok: bool| Receipt {
            reservation,
            tokens: 0,
            latency: ok.then_some(crate::store::LatencySample {
                ttfb: Duration::ZERO,
                total: Duration::ZERO,
                output_tokens: 0,
                ..Default::default()
            }),
            hints: UpstreamHints::default(),
            backoff: (!ok).then_some(Backoff {
                duration: Duration::from_secs(1),
                reason: BackoffReason::ServerError,
            }),
        };
        // Alternating: never two failures in a row, but half of the outcomes failed.
        for i in 0..9 {
            store
                .settle(&pool, &backend, outcome(i % 2 == 1))
                .await
                .unwrap();
        }
        assert!(
            matches!(
                store.acquire(&pool, &c, 1).await.unwrap(),
                Admission::Admitted { .. }
            ),
            "9 < 10 outcomes"
        );
        store.settle(&pool, &backend, outcome(false)).await.unwrap();
        assert!(
            matches!(
                store.acquire(&pool, &c, 1).await.unwrap(),
                Admission::Exhausted { .. }
            ),
            "5 of 10 failed"
        );
    }
}
