//! An admitted attempt's reservation until it is settled: settled exactly once, on every
//! path (delivered, failed, or dropped because the client went away before the response
//! head). A settlement that cannot finish at once (a store across the network) goes on in a
//! task of its own, so a cancelled request cannot lose it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use spillway_shared::{
    BackendId, FleetState, PoolName, Receipt, Reservation, ResponseOwner, StateError, UpstreamHints,
};
use tokio::task::JoinHandle;
use tracing::warn;

/// A settlement under way: finished when the store answered at once (the embedded store
/// always does), else running in its task. Awaiting it is optional.
pub enum Settling {
    Done(Option<Result<(), StateError>>),
    Running(JoinHandle<Result<(), StateError>>),
}

impl Future for Settling {
    type Output = Result<(), StateError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Settling::Done(result) => Poll::Ready(result.take().unwrap_or(Ok(()))),
            Settling::Running(task) => Pin::new(task).poll(cx).map(|joined| {
                joined.unwrap_or_else(|e| Err(StateError::Unavailable(e.to_string())))
            }),
        }
    }
}

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

    pub fn pool(&self) -> &PoolName {
        &self.pool
    }

    /// Remember, fleet-wide, that this attempt's member holds the stored response
    /// `response_id`. The future ends when the store has it (or gave up: the fallback store
    /// bounds the wait); failures are logged, never the client's.
    pub fn pin_response(
        &self,
        response_id: String,
        ttl: std::time::Duration,
        consumer: Option<String>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let fleet = self.fleet.clone();
        let owner = ResponseOwner {
            pool: self.pool.clone(),
            backend: self.backend.clone(),
            consumer,
        };
        async move {
            if let Err(e) = fleet.pin_response(&response_id, &owner, ttl).await {
                warn!(error = %e, backend = %owner.backend, "response affinity not recorded");
            }
        }
    }

    /// Settle with `receipt` (its reservation is this one). Awaiting the result is optional:
    /// dropping it, or the request, does not cancel the settlement.
    pub fn settle(mut self, receipt: Receipt) -> Settling {
        self.start_settle(receipt)
    }

    /// Mark settled and start the settlement: finished here if the store answers at once
    /// (no task, no wake-up), else carried on in a task of its own.
    fn start_settle(&mut self, receipt: Receipt) -> Settling {
        self.settled = true;
        let (fleet, pool, backend) = (self.fleet.clone(), self.pool.clone(), self.backend.clone());
        let mut settlement = Box::pin(async move {
            let result = fleet.settle(&pool, &backend, receipt).await;
            if let Err(e) = &result {
                warn!(backend = %backend, error = %e, "could not settle a request in the fleet state");
            }
            result
        });
        // The spawned task polls it again with its own waker before anything can wake it.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match settlement.as_mut().poll(&mut cx) {
            Poll::Ready(result) => Settling::Done(Some(result)),
            Poll::Pending => {
                let running = Running::start();
                Settling::Running(tokio::spawn(async move {
                    let result = settlement.await;
                    drop(running);
                    result
                }))
            }
        }
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
        drop(self.start_settle(receipt));
    }
}

/// Settlements running in tasks of their own, so a stopping replica can wait for them.
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static ALL_SETTLED: tokio::sync::Notify = tokio::sync::Notify::const_new();

struct Running;

impl Running {
    fn start() -> Self {
        RUNNING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if RUNNING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            ALL_SETTLED.notify_waiters();
        }
    }
}

/// Run `work` (a count owed to the fleet state) in a task of its own that a stopping
/// replica waits for, like a settlement.
pub fn spawn_tracked(work: impl Future<Output = ()> + Send + 'static) {
    let running = Running::start();
    tokio::spawn(async move {
        work.await;
        drop(running);
    });
}

/// Wait, at most `within`, until no settlement is running; false if some still were.
pub async fn all_settled(within: std::time::Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            let notified = ALL_SETTLED.notified();
            if RUNNING.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    })
    .await
    .is_ok()
}
