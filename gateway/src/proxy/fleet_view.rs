//! A replica's recent copy of each pool's fleet state, for scoring members. Refreshed in the
//! background when older than the refresh interval, so a routing decision still costs one
//! round trip to the store (`acquire`); the copy lags by at most about that interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spillway_shared::{BackendId, FleetState, MemberSnapshot, PoolName};
use tokio::time::Instant;

use crate::routing_table::Pool;

pub type MemberView = HashMap<BackendId, MemberSnapshot>;

/// Completed requests the pool must have seen before its learned output reserve is used.
pub const RESERVE_MIN_SAMPLES: u64 = 20;
/// The output reserve is this quantile of the pool's recent answers (bucket upper bound).
pub const RESERVE_QUANTILE: f64 = 0.95;

/// What a request that names no output cap is charged for its output, learned from the
/// pool's completed answers over the latency window, fleet-wide; `None` before enough.
pub fn output_reserve(view: &MemberView) -> Option<u64> {
    let mut merged = spillway_shared::Histogram::default();
    for member in view.values() {
        for (total, count) in merged
            .counts
            .iter_mut()
            .zip(member.latency.output_tokens.counts)
        {
            *total += count;
        }
    }
    (merged.samples() >= RESERVE_MIN_SAMPLES)
        .then(|| merged.quantile_ms(RESERVE_QUANTILE))
        .flatten()
}

pub struct FleetView {
    refresh: Duration,
    pools: Mutex<HashMap<PoolName, Entry>>,
}

struct Entry {
    taken: Option<Instant>,
    members: Arc<MemberView>,
    refreshing: bool,
}

impl FleetView {
    pub fn new(refresh: Duration) -> Arc<Self> {
        Arc::new(Self {
            refresh,
            pools: Mutex::new(HashMap::new()),
        })
    }

    /// The latest copy for `pool` (empty before the first refresh); starts a refresh when stale.
    pub fn get(self: &Arc<Self>, fleet: &Arc<dyn FleetState>, pool: &Arc<Pool>) -> Arc<MemberView> {
        let mut pools = self.pools.lock().expect("fleet view lock poisoned");
        let entry = pools.entry(pool.name.clone()).or_insert_with(|| Entry {
            taken: None,
            members: Arc::default(),
            refreshing: false,
        });
        let stale = entry.taken.is_none_or(|at| at.elapsed() >= self.refresh);
        if stale && !entry.refreshing {
            entry.refreshing = true;
            let (view, fleet, pool) = (self.clone(), fleet.clone(), pool.clone());
            tokio::spawn(async move { view.refresh(&*fleet, &pool).await });
        }
        entry.members.clone()
    }

    /// Refresh `pool`'s copy now (the background refresh does this when it is stale).
    pub async fn refresh(&self, fleet: &dyn FleetState, pool: &Pool) {
        let snapshot = fleet.snapshot(&pool.name, &pool.candidates()).await;
        let mut pools = self.pools.lock().expect("fleet view lock poisoned");
        let entry = pools.entry(pool.name.clone()).or_insert_with(|| Entry {
            taken: None,
            members: Arc::default(),
            refreshing: false,
        });
        entry.refreshing = false;
        if let Ok(snapshot) = snapshot {
            entry.taken = Some(Instant::now());
            entry.members = Arc::new(
                snapshot
                    .members
                    .into_iter()
                    .map(|m| (m.backend.clone(), m))
                    .collect(),
            );
        }
    }
}
