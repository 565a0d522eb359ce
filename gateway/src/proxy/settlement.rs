//! An admitted attempt's reservation until it is settled: settled exactly once, on every
//! path (delivered, failed, or dropped because the client went away before the response
//! head), always in a task of its own so a cancelled request cannot lose it.

use std::sync::Arc;

use spillway_shared::{
    BackendId, FleetState, PoolName, Receipt, Reservation, StateError, UpstreamHints,
};
use tokio::task::JoinHandle;
use tracing::warn;

pub struct OpenReservation {
    fleet: Arc<dyn FleetState>,
    pool: PoolName,
    backend: BackendId,
    reservation: Reservation,
    settled: bool,
}

impl OpenReservation {
    pub fn new(
        fleet: Arc<dyn FleetState>,
        pool: PoolName,
        backend: BackendId,
        reservation: Reservation,
    ) -> Self {
        Self {
            fleet,
            pool,
            backend,
            reservation,
            settled: false,
        }
    }

    pub fn backend(&self) -> &BackendId {
        &self.backend
    }

    /// Settle with `receipt` (its reservation is this one) in a detached task. Awaiting the
    /// handle is optional: dropping it, or the request, does not cancel the settlement.
    pub fn settle(mut self, receipt: Receipt) -> JoinHandle<Result<(), StateError>> {
        self.spawn_settle(receipt)
    }

    /// Mark settled and run the settlement in a task of its own.
    fn spawn_settle(&mut self, receipt: Receipt) -> JoinHandle<Result<(), StateError>> {
        self.settled = true;
        let (fleet, pool, backend) = (self.fleet.clone(), self.pool.clone(), self.backend.clone());
        tokio::spawn(async move {
            let result = fleet.settle(&pool, &backend, receipt).await;
            if let Err(e) = &result {
                warn!(backend = %backend, error = %e, "could not settle a request in the fleet state");
            }
            result
        })
    }

    /// Share the upstream's capacity hints now, in a detached task: a stream settles only at
    /// its end, and the fleet must not route on older hints meanwhile.
    pub fn observe_now(&self, hints: UpstreamHints) {
        if hints.is_empty() {
            return;
        }
        let (fleet, pool, backend) = (self.fleet.clone(), self.pool.clone(), self.backend.clone());
        let reservation = self.reservation;
        tokio::spawn(async move {
            if let Err(e) = fleet.observe(&pool, &backend, hints, reservation).await {
                warn!(backend = %backend, error = %e, "could not record capacity hints");
            }
        });
    }

    /// A receipt for this reservation that charges `tokens` and carries nothing else.
    pub fn receipt(&self, tokens: u64) -> Receipt {
        Receipt {
            reservation: self.reservation,
            tokens,
            latency: None,
            hints: UpstreamHints::default(),
            backoff: None,
        }
    }
}

impl Drop for OpenReservation {
    /// Never settled (the request was cancelled before its response head): release the
    /// reservation, nothing was served.
    fn drop(&mut self) {
        if self.settled || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let receipt = self.receipt(0);
        drop(self.spawn_settle(receipt));
    }
}
