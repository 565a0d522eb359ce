//! A replica's recent copy of each pool's fleet state, for scoring members. Refreshed in the
//! background when older than the refresh interval, so a routing decision still costs one
//! round trip to the store (`acquire`); the copy lags by at most about that interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spillway_shared::{BackendId, FleetState, MemberSnapshot, PoolName};
use tokio::time::Instant;

use crate::table::Pool;

pub type MemberView = HashMap<BackendId, MemberSnapshot>;

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

    async fn refresh(&self, fleet: &dyn FleetState, pool: &Pool) {
        let snapshot = fleet.snapshot(&pool.name, &pool.candidates()).await;
        let mut pools = self.pools.lock().expect("fleet view lock poisoned");
        let Some(entry) = pools.get_mut(&pool.name) else {
            return;
        };
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
