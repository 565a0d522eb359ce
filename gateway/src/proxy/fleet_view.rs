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

/// Completed requests the pool must have seen before the quantile below is trusted.
pub const RESERVE_MIN_SAMPLES: u64 = 20;
/// The output reserve is this quantile of the pool's recent answers (bucket upper bound).
pub const RESERVE_QUANTILE: f64 = 0.95;

/// What a request that names no output cap is charged for its output, learned from the
/// pool's completed answers over the latency window, fleet-wide: from
/// [`RESERVE_MIN_SAMPLES`] answers on, their [`RESERVE_QUANTILE`]; before that, `default`
/// or the largest answer seen if larger (a pool that has seen a few long answers knows more
/// than the default: a cold fleet's first burst would otherwise be charged too little);
/// `default` until one was seen. Bucket upper bounds, so a 600-token answer reserves 1,024.
pub fn output_reserve(view: &MemberView, default: u64) -> u64 {
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
    let learned = if merged.samples() >= RESERVE_MIN_SAMPLES {
        merged.quantile_ms(RESERVE_QUANTILE)
    } else {
        merged.quantile_ms(1.0).map(|largest| largest.max(default))
    };
    learned.unwrap_or(default)
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

#[cfg(test)]
mod tests {
    use spillway_shared::{BackendId, MemberSnapshot};

    use super::*;

    fn view_of(answers: &[u64]) -> MemberView {
        let mut member = MemberSnapshot {
            backend: BackendId::new("a"),
            backoff: None,
            tokens_used: 0,
            requests_used: 0,
            hints: Default::default(),
            latency: Default::default(),
            estimated_tokens: 0,
            actual_tokens: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
        };
        for &tokens in answers {
            member.latency.output_tokens.record(tokens);
        }
        HashMap::from([(BackendId::new("a"), member)])
    }

    #[test]
    fn the_reserve_follows_the_first_answers_then_their_p95() {
        assert_eq!(
            output_reserve(&view_of(&[]), 256),
            256,
            "nothing seen: the default"
        );
        assert_eq!(
            output_reserve(&view_of(&[600]), 256),
            1_024,
            "one long answer: at least it (its bucket)"
        );
        assert_eq!(
            output_reserve(&view_of(&[20, 30]), 256),
            256,
            "short answers: never below the default before the quantile counts"
        );
        let mut many = vec![30; 19];
        many.push(600);
        assert_eq!(
            output_reserve(&view_of(&many), 256),
            32,
            "20 answers: their p95, as before"
        );
    }
}
