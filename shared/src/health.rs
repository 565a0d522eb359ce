//! Health of the shared store, per pool (a pool's keys live on one Redis node, so this is
//! per node in a cluster), with hysteresis: degraded after [`ENTER_AFTER`] failed or slow
//! decisions within [`ENTER_WINDOW`], healthy again after [`LEAVE_AFTER`] timely probes in a
//! row. Decisions run concurrently, so a timely answer between slow ones does not reset the
//! count: a replica that stayed on Redis through a stall its peers felt would spend the
//! budgets its peers hold as shares.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

use crate::store::PoolName;

/// Failed or slow decision calls within [`ENTER_WINDOW`] that make a pool degraded.
pub const ENTER_AFTER: u32 = 3;
pub const ENTER_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
/// Timely probes in a row that bring a degraded pool back to shared state: 2 s of good
/// answers at one probe per 250 ms. A Redis that stalls every second or so keeps replicas on
/// their shares instead of flapping (replicas back on Redis while others are still on their
/// shares could spend those shares a second time).
pub const LEAVE_AFTER: u32 = 8;

/// Which pools decide locally. `None` stands for "every pool": the store was not reachable
/// at start-up, before any pool was seen.
#[derive(Debug)]
pub struct Health {
    pools: Mutex<HashMap<Option<PoolName>, Streaks>>,
    /// How many entries are degraded (for waiting and metrics).
    degraded: watch::Sender<usize>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Streaks {
    degraded: bool,
    /// Bad calls since `bad_since` (counted while within [`ENTER_WINDOW`] of it).
    bad: u32,
    bad_since: Option<tokio::time::Instant>,
    good: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            pools: Mutex::new(HashMap::new()),
            degraded: watch::Sender::new(0),
        }
    }
}

impl Health {
    /// Whether decisions for `pool` are made locally now.
    pub fn is_degraded(&self, pool: &PoolName) -> bool {
        let pools = self.pools.lock().expect("health lock");
        pools.get(&Some(pool.clone())).is_some_and(|s| s.degraded)
            || pools.get(&None).is_some_and(|s| s.degraded)
    }

    pub fn any_degraded(&self) -> bool {
        *self.degraded.borrow() > 0
    }

    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.degraded.subscribe()
    }

    /// A decision for `pool` failed or was slow; true when this made the pool degraded.
    pub fn note_bad_call(&self, pool: &PoolName) -> bool {
        self.update(Some(pool.clone()), |s| {
            let now = tokio::time::Instant::now();
            match s.bad_since {
                Some(since) if now.duration_since(since) < ENTER_WINDOW => s.bad += 1,
                _ => (s.bad, s.bad_since) = (1, Some(now)),
            }
            s.good = 0;
            if !s.degraded && s.bad >= ENTER_AFTER {
                s.degraded = true;
                return true;
            }
            false
        })
    }

    /// The store is unreachable before any pool was seen: every pool decides locally.
    pub fn degrade_all(&self) -> bool {
        self.update(None, |s| {
            let flipped = !s.degraded;
            s.degraded = true;
            s.good = 0;
            flipped
        })
    }

    /// What needs probing: degraded pools (`None`: every pool).
    pub fn degraded_entries(&self) -> Vec<Option<PoolName>> {
        let pools = self.pools.lock().expect("health lock");
        pools
            .iter()
            .filter(|(_, s)| s.degraded)
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// A probe for `entry` answered in time (`ok`) or not; true when this brings it back.
    pub fn note_probe(&self, entry: Option<PoolName>, ok: bool) -> bool {
        self.update(entry, |s| {
            if !ok {
                s.good = 0;
                return false;
            }
            s.good += 1;
            if s.degraded && s.good >= LEAVE_AFTER {
                *s = Streaks::default();
                return true;
            }
            false
        })
    }

    fn update(&self, entry: Option<PoolName>, f: impl FnOnce(&mut Streaks) -> bool) -> bool {
        let mut pools = self.pools.lock().expect("health lock");
        let changed = f(pools.entry(entry).or_default());
        let count = pools.values().filter(|s| s.degraded).count();
        drop(pools);
        self.degraded.send_if_modified(|n| {
            let modified = *n != count;
            *n = count;
            modified
        });
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pool_degrades_after_bad_calls_close_together_and_recovers_after_good_probes() {
        let health = Health::default();
        let (a, b) = (PoolName::new("a"), PoolName::new("b"));
        assert!(!health.note_bad_call(&a));
        tokio::time::advance(ENTER_WINDOW).await; // too far apart: the count starts again
        assert!(!health.note_bad_call(&a));
        assert!(!health.note_bad_call(&a));
        assert!(health.note_bad_call(&a), "third within the window");
        assert!(health.is_degraded(&a) && !health.is_degraded(&b));
        assert!(!health.note_probe(Some(a.clone()), true));
        assert!(
            !health.note_probe(Some(a.clone()), false),
            "a miss restarts the count"
        );
        for _ in 0..LEAVE_AFTER - 1 {
            assert!(!health.note_probe(Some(a.clone()), true));
        }
        assert!(health.note_probe(Some(a.clone()), true));
        assert!(!health.any_degraded());
    }

    #[test]
    fn degrading_everything_covers_pools_not_seen_yet() {
        let health = Health::default();
        assert!(health.degrade_all());
        assert!(health.is_degraded(&PoolName::new("new")));
        assert_eq!(health.degraded_entries(), vec![None]);
    }
}
