//! `overflow = "wait"`: a request of a lower class that finds no room on the PTU waits in
//! its pool's fleet-wide queue (`FleetState::acquire_in_turn`) until its turn comes, its
//! class's `max_wait` passes (then 429), or its client leaves (its ticket leaves with it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use spillway_shared::{Admission, Candidate, FleetState, PoolName, Ticket};
use tokio::time::Instant;

use crate::error::GatewayError;

/// How long a ticket holds its place unless asked again: several polls, so a busy Redis
/// does not cost a waiting request its place, yet a dead replica's tickets go soon.
const TICKET_ALIVE: Duration = Duration::from_secs(2);

/// Waiting requests ask again at most this often (and at least this rarely), sooner when
/// the store says room frees up sooner.
const POLL_MIN: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(250);

/// A ticket held in a pool's queue; dropped before it was admitted (the client left, the
/// wait ended), it leaves the queue.
pub struct Waiting {
    fleet: Arc<dyn FleetState>,
    pool: PoolName,
    ticket: Ticket,
    admitted: bool,
    since: Instant,
}

impl Waiting {
    pub fn new(fleet: Arc<dyn FleetState>, pool: PoolName) -> Self {
        Self {
            fleet,
            pool,
            ticket: Ticket {
                id: ticket_id(),
                alive: TICKET_ALIVE,
            },
            admitted: false,
            since: Instant::now(),
        }
    }

    /// Ask in turn until admitted or `until`; the last refusal when the wait ends.
    pub async fn admit(
        &mut self,
        candidates: &[Candidate],
        tokens: u64,
        until: Instant,
    ) -> Result<Admission, GatewayError> {
        loop {
            let admission = self
                .fleet
                .acquire_in_turn(&self.pool, candidates, tokens, &self.ticket)
                .await?;
            let Admission::Exhausted { retry_after, .. } = admission else {
                self.admitted = true;
                return Ok(admission);
            };
            let now = Instant::now();
            if now >= until {
                return Ok(admission);
            }
            let poll = retry_after.clamp(POLL_MIN, POLL_MAX);
            tokio::time::sleep_until((now + poll).min(until)).await;
        }
    }

    /// How long it has waited.
    pub fn waited(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.admitted {
            return;
        }
        let (fleet, pool, ticket) = (self.fleet.clone(), self.pool.clone(), self.ticket.clone());
        tokio::spawn(async move {
            if let Err(e) = fleet.leave_queue(&pool, &ticket).await {
                tracing::debug!(error = %e, "a ticket was left to expire");
            }
        });
    }
}

/// Unique in the fleet: this process's random tag and a counter.
fn ticket_id() -> String {
    static TAG: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tag = TAG.get_or_init(rand::random);
    format!("{tag:016x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}
