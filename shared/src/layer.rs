//! Layers: a store that wraps another and watches its calls (timing them, counting them)
//! implements [`FleetLayer`] (the inner store, and what to do when a call ends); the blanket
//! impl below forwards every [`FleetState`] method, so no wrapper forwards them by hand.

use std::time::Duration;

use async_trait::async_trait;

use crate::ledger::{HourLedger, SpendCounts, SpendKey};
use tokio::time::Instant;

use crate::store::{
    Admission, BackendId, Backoff, Candidate, FleetState, PoolName, PoolSnapshot, QuotaCounter,
    Receipt, Reservation, ResponseOwner, StateError, StoreHealth, Ticket, UpstreamHints,
};

/// A call that ended, as a layer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// `admitted`: a member took the request.
    Acquire {
        admitted: bool,
    },
    Settle,
    LeaveQueue,
    RecordSpend,
    Observe,
    Backoff,
    Snapshot,
    Charge,
    PinResponse,
    ResponseOwner,
    /// `tokens`: what was added (0 reads the counter).
    SpendQuota {
        tokens: u64,
    },
}

impl Call {
    /// The operation's name (`acquire`, `settle`, ...), as metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            Call::Acquire { .. } => "acquire",
            Call::Settle => "settle",
            Call::LeaveQueue => "leave_queue",
            Call::RecordSpend => "record_spend",
            Call::Observe => "observe",
            Call::Backoff => "backoff",
            Call::Snapshot => "snapshot",
            Call::Charge => "charge",
            Call::PinResponse => "pin_response",
            Call::ResponseOwner => "response_owner",
            Call::SpendQuota { .. } => "spend_quota",
        }
    }
}

/// A store around another: [`FleetState`] comes from the blanket impl, which hands every
/// call to `inner` and then tells [`FleetLayer::ended`] (`ping`, `close`, `describe` and
/// `health` are forwarded unwatched).
pub trait FleetLayer: Send + Sync + 'static {
    fn inner(&self) -> &dyn FleetState;

    /// A call ended after `took` (whatever its result).
    fn ended(&self, call: Call, took: Duration);
}

/// Run `call` on the inner store and report it.
async fn watched<L: FleetLayer + ?Sized, T>(
    layer: &L,
    call: impl Future<Output = T>,
    kind: impl FnOnce(&T) -> Call,
) -> T {
    let started = Instant::now();
    let result = call.await;
    layer.ended(kind(&result), started.elapsed());
    result
}

#[async_trait]
impl<L: FleetLayer> FleetState for L {
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
    ) -> Result<Admission, StateError> {
        let call = self.inner().acquire(pool, candidates, estimated_tokens);
        watched(self, call, |result| Call::Acquire {
            admitted: matches!(result, Ok(Admission::Admitted { .. })),
        })
        .await
    }

    async fn acquire_in_turn(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        ticket: &Ticket,
    ) -> Result<Admission, StateError> {
        let call = self
            .inner()
            .acquire_in_turn(pool, candidates, estimated_tokens, ticket);
        watched(self, call, |result| Call::Acquire {
            admitted: matches!(result, Ok(Admission::Admitted { .. })),
        })
        .await
    }

    async fn leave_queue(&self, pool: &PoolName, ticket: &Ticket) -> Result<(), StateError> {
        let call = self.inner().leave_queue(pool, ticket);
        watched(self, call, |_| Call::LeaveQueue).await
    }

    async fn record_spend(
        &self,
        hour_ms: u64,
        expires_at_ms: u64,
        lines: &[(SpendKey, SpendCounts)],
    ) -> Result<(), StateError> {
        let call = self.inner().record_spend(hour_ms, expires_at_ms, lines);
        watched(self, call, |_| Call::RecordSpend).await
    }

    async fn spend_between(
        &self,
        from_hour_ms: u64,
        to_hour_ms: u64,
    ) -> Result<Vec<HourLedger>, StateError> {
        self.inner().spend_between(from_hour_ms, to_hour_ms).await
    }

    async fn settle(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        receipt: Receipt,
    ) -> Result<(), StateError> {
        let call = self.inner().settle(pool, backend, receipt);
        watched(self, call, |_| Call::Settle).await
    }

    async fn observe(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        hints: UpstreamHints,
        reservation: Reservation,
    ) -> Result<(), StateError> {
        let call = self.inner().observe(pool, backend, hints, reservation);
        watched(self, call, |_| Call::Observe).await
    }

    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError> {
        let call = self.inner().backoff(pool, backend, backoff);
        watched(self, call, |_| Call::Backoff).await
    }

    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[Candidate],
    ) -> Result<PoolSnapshot, StateError> {
        let call = self.inner().snapshot(pool, members);
        watched(self, call, |_| Call::Snapshot).await
    }

    async fn charge(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        tokens: u64,
        requests: u64,
    ) -> Result<(), StateError> {
        let call = self.inner().charge(pool, backend, tokens, requests);
        watched(self, call, |_| Call::Charge).await
    }

    async fn pin_response(
        &self,
        response_id: &str,
        owner: &ResponseOwner,
        ttl: Duration,
    ) -> Result<(), StateError> {
        let call = self.inner().pin_response(response_id, owner, ttl);
        watched(self, call, |_| Call::PinResponse).await
    }

    async fn response_owner(&self, response_id: &str) -> Result<Option<ResponseOwner>, StateError> {
        let call = self.inner().response_owner(response_id);
        watched(self, call, |_| Call::ResponseOwner).await
    }

    async fn spend_quota(&self, counter: &QuotaCounter, tokens: u64) -> Result<u64, StateError> {
        let call = self.inner().spend_quota(counter, tokens);
        watched(self, call, |_| Call::SpendQuota { tokens }).await
    }

    async fn ping(&self) -> Result<(), StateError> {
        self.inner().ping().await
    }

    async fn close(&self) {
        self.inner().close().await
    }

    async fn replicas(&self) -> Result<Vec<crate::store::ReplicaDistance>, StateError> {
        self.inner().replicas().await
    }

    fn describe(&self) -> String {
        self.inner().describe()
    }

    fn health(&self) -> StoreHealth {
        self.inner().health()
    }
}
