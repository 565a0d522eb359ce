//! `FallbackState`: Redis is a dependency, not a single point of failure. Every call goes to
//! Redis within a time budget; a failure or a slow answer switches this replica to its
//! embedded state (logged once), and a background probe switches it back when Redis answers.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::memory::EmbeddedState;
use crate::redis::RedisState;
use crate::store::{
    Admission, BackendId, Backoff, Candidate, FleetState, Issuer, PoolName, PoolSnapshot, Receipt,
    Reservation, StateError, UpstreamHints,
};

pub struct FallbackState {
    primary: Arc<RedisState>,
    local: EmbeddedState,
    budget: Duration,
    degraded: watch::Sender<bool>,
    /// Decisions taken on the embedded state since start (an operator metric).
    fallback_calls: AtomicU64,
}

/// How often a degraded replica asks Redis whether it is back.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

impl FallbackState {
    /// Wrap `primary`; must be called inside a tokio runtime (it starts the probe task).
    pub fn new(primary: RedisState, local: EmbeddedState, budget: Duration) -> Arc<Self> {
        let state = Arc::new(Self {
            primary: Arc::new(primary),
            local,
            budget,
            degraded: watch::Sender::new(false),
            fallback_calls: AtomicU64::new(0),
        });
        tokio::spawn(probe(Arc::downgrade(&state), state.degraded.subscribe()));
        state
    }

    pub fn is_degraded(&self) -> bool {
        *self.degraded.borrow()
    }

    pub fn fallback_calls(&self) -> u64 {
        self.fallback_calls.load(Ordering::Relaxed)
    }

    /// Wait until this replica decides on shared state again (tests, operators' tooling).
    pub async fn wait_shared(&self) {
        let _ = self
            .degraded
            .subscribe()
            .wait_for(|degraded| !degraded)
            .await;
    }

    /// Wait until this replica has switched to its embedded state.
    pub async fn wait_degraded(&self) {
        let _ = self
            .degraded
            .subscribe()
            .wait_for(|degraded| *degraded)
            .await;
    }

    fn degrade(&self, why: &str) {
        if !self.degraded.send_replace(true) {
            warn!(
                error = why,
                "fleet state: Redis unavailable; deciding with this replica's embedded state until it answers"
            );
        }
    }

    /// Run on Redis unless degraded; on failure or timeout, run on the embedded state.
    async fn either<T>(
        &self,
        shared: impl Future<Output = Result<T, StateError>>,
        local: impl Future<Output = Result<T, StateError>>,
    ) -> Result<T, StateError> {
        if !self.is_degraded() {
            match tokio::time::timeout(self.budget, shared).await {
                Ok(Ok(value)) => return Ok(value),
                // A script rejecting its arguments is a bug here, not an outage.
                Ok(Err(e @ StateError::Protocol(_))) => return Err(e),
                Ok(Err(e)) => self.degrade(&e.to_string()),
                Err(_) => self.degrade(&format!("no answer within {} ms", self.budget.as_millis())),
            }
        }
        self.fallback_calls.fetch_add(1, Ordering::Relaxed);
        local.await
    }
}

async fn probe(state: std::sync::Weak<FallbackState>, mut degraded: watch::Receiver<bool>) {
    loop {
        if degraded.wait_for(|d| *d).await.is_err() {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(state) = state.upgrade() else { return };
        if let Ok(Ok(())) = tokio::time::timeout(
            state.budget.max(Duration::from_millis(100)),
            state.primary.ping(),
        )
        .await
        {
            state.degraded.send_replace(false);
            info!("fleet state: Redis answers again; back on shared state");
        }
    }
}

impl crate::store::ClockControl for FallbackState {
    fn advance_clock(&self, by: Duration) {
        self.primary.advance_clock(by);
        self.local.advance_clock(by);
    }
}

#[async_trait]
impl FleetState for FallbackState {
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        tokens: u64,
    ) -> Result<Admission, StateError> {
        self.either(
            self.primary.acquire(pool, candidates, tokens),
            self.local.acquire(pool, candidates, tokens),
        )
        .await
    }

    /// A reservation is settled in the store that issued it: an embedded one never touches
    /// Redis's ledgers. A Redis one that cannot reach Redis still leaves its backoff, hints
    /// and latency in the embedded state (its charge there is nothing to undo).
    async fn settle(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        receipt: Receipt,
    ) -> Result<(), StateError> {
        match receipt.reservation.issuer {
            Issuer::Embedded => {
                self.fallback_calls.fetch_add(1, Ordering::Relaxed);
                self.local.settle(pool, backend, receipt).await
            }
            Issuer::Redis => {
                self.either(
                    self.primary.settle(pool, backend, receipt.clone()),
                    self.local.settle(pool, backend, receipt),
                )
                .await
            }
        }
    }

    async fn observe(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        hints: UpstreamHints,
        reservation: Reservation,
    ) -> Result<(), StateError> {
        match reservation.issuer {
            Issuer::Embedded => self.local.observe(pool, backend, hints, reservation).await,
            Issuer::Redis => {
                self.either(
                    self.primary.observe(pool, backend, hints, reservation),
                    self.local.observe(pool, backend, hints, reservation),
                )
                .await
            }
        }
    }

    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError> {
        self.either(
            self.primary.backoff(pool, backend, backoff),
            self.local.backoff(pool, backend, backoff),
        )
        .await
    }

    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[Candidate],
    ) -> Result<PoolSnapshot, StateError> {
        self.either(
            self.primary.snapshot(pool, members),
            self.local.snapshot(pool, members),
        )
        .await
    }

    /// Always usable: with Redis down the replica still decides, on its own state.
    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }

    fn health(&self) -> crate::store::StoreHealth {
        crate::store::StoreHealth {
            degraded: self.is_degraded(),
            fallback_decisions: self.fallback_calls(),
        }
    }

    fn describe(&self) -> String {
        if self.is_degraded() {
            format!(
                "redis (degraded: embedded fallback, {} decisions so far)",
                self.fallback_calls()
            )
        } else {
            "redis".into()
        }
    }
}
