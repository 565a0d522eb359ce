//! A [`FleetState`] layer that times every call into `spillway_fleet_state_call_seconds`
//! (by operation), so operators see what the shared state costs each request.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use spillway_shared::{
    Admission, BackendId, Backoff, Candidate, FleetState, PoolName, PoolSnapshot, QuotaCounter,
    Receipt, Reservation, ResponseOwner, StateError, StoreHealth, UpstreamHints,
};
use tokio::time::Instant;

pub struct TimedFleet {
    inner: Arc<dyn FleetState>,
}

impl TimedFleet {
    pub fn new(inner: Arc<dyn FleetState>) -> Self {
        Self { inner }
    }
}

async fn timed<T>(op: &'static str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let result = call.await;
    crate::metrics::fleet_state_call(op, started.elapsed());
    result
}

#[async_trait]
impl FleetState for TimedFleet {
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
    ) -> Result<Admission, StateError> {
        timed(
            "acquire",
            self.inner.acquire(pool, candidates, estimated_tokens),
        )
        .await
    }

    async fn settle(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        receipt: Receipt,
    ) -> Result<(), StateError> {
        timed("settle", self.inner.settle(pool, backend, receipt)).await
    }

    async fn observe(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        hints: UpstreamHints,
        reservation: Reservation,
    ) -> Result<(), StateError> {
        timed(
            "observe",
            self.inner.observe(pool, backend, hints, reservation),
        )
        .await
    }

    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError> {
        timed("backoff", self.inner.backoff(pool, backend, backoff)).await
    }

    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[Candidate],
    ) -> Result<PoolSnapshot, StateError> {
        timed("snapshot", self.inner.snapshot(pool, members)).await
    }

    async fn charge(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        tokens: u64,
        requests: u64,
    ) -> Result<(), StateError> {
        timed("charge", self.inner.charge(pool, backend, tokens, requests)).await
    }

    async fn pin_response(
        &self,
        response_id: &str,
        owner: &ResponseOwner,
        ttl: Duration,
    ) -> Result<(), StateError> {
        timed(
            "pin_response",
            self.inner.pin_response(response_id, owner, ttl),
        )
        .await
    }

    async fn response_owner(&self, response_id: &str) -> Result<Option<ResponseOwner>, StateError> {
        timed("response_owner", self.inner.response_owner(response_id)).await
    }

    async fn spend_quota(&self, counter: &QuotaCounter, tokens: u64) -> Result<u64, StateError> {
        timed("spend_quota", self.inner.spend_quota(counter, tokens)).await
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.inner.ping().await
    }

    async fn close(&self) {
        self.inner.close().await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn health(&self) -> StoreHealth {
        self.inner.health()
    }
}
