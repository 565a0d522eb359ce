//! `EmbeddedState`: the in-process store, the default when no Redis is configured.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::store::{
    Admission, BackendId, Backoff, BackoffReason, FleetState, MemberSnapshot, PoolName,
    PoolSnapshot, StateError,
};

/// Fleet state held in this process. Share one `Arc<EmbeddedState>` between replicas that
/// run in one process (the demo) and they agree exactly as a Redis-backed fleet would.
#[derive(Debug, Default)]
pub struct EmbeddedState {
    // std Mutex: critical sections are a few map operations and never await.
    backoffs: Mutex<HashMap<(PoolName, BackendId), Deadline>>,
}

#[derive(Clone, Copy, Debug)]
struct Deadline {
    until: Instant,
    reason: BackoffReason,
}

impl EmbeddedState {
    pub fn new() -> Self {
        Self::default()
    }

    fn remaining(&self, pool: &PoolName, backend: &BackendId, now: Instant) -> Option<Backoff> {
        let mut map = self.backoffs.lock().expect("embedded state lock poisoned");
        let key = (pool.clone(), backend.clone());
        match map.get(&key) {
            Some(d) if d.until > now => Some(Backoff {
                duration: d.until - now,
                reason: d.reason,
            }),
            Some(_) => {
                // Expired marks are cleared on read so the map never outgrows the fleet.
                map.remove(&key);
                None
            }
            None => None,
        }
    }
}

#[async_trait]
impl FleetState for EmbeddedState {
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[BackendId],
    ) -> Result<Admission, StateError> {
        let now = Instant::now();
        let mut earliest: Option<Backoff> = None;
        let mut throttled = false;
        for backend in candidates {
            match self.remaining(pool, backend, now) {
                None => {
                    return Ok(Admission::Admitted {
                        backend: backend.clone(),
                    });
                }
                Some(b) => {
                    throttled |= b.reason == BackoffReason::Throttled;
                    if earliest.is_none_or(|e| b.duration < e.duration) {
                        earliest = Some(b);
                    }
                }
            }
        }
        Ok(Admission::Exhausted {
            retry_after: earliest.map(|b| b.duration).unwrap_or_default(),
            throttled,
        })
    }

    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError> {
        let until = Instant::now() + backoff.duration;
        let mut map = self.backoffs.lock().expect("embedded state lock poisoned");
        let entry = map
            .entry((pool.clone(), backend.clone()))
            .or_insert(Deadline {
                until,
                reason: backoff.reason,
            });
        if until >= entry.until {
            *entry = Deadline {
                until,
                reason: backoff.reason,
            };
        }
        Ok(())
    }

    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[BackendId],
    ) -> Result<PoolSnapshot, StateError> {
        let now = Instant::now();
        Ok(PoolSnapshot {
            pool: pool.clone(),
            members: members
                .iter()
                .map(|backend| MemberSnapshot {
                    backend: backend.clone(),
                    backoff: self.remaining(pool, backend, now),
                })
                .collect(),
        })
    }

    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ids(names: &[&str]) -> Vec<BackendId> {
        names.iter().map(BackendId::new).collect()
    }

    fn throttle(ms: u64) -> Backoff {
        Backoff {
            duration: Duration::from_millis(ms),
            reason: BackoffReason::Throttled,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_skips_members_in_backoff_until_their_deadline() {
        let state = EmbeddedState::new();
        let pool = PoolName::new("gpt-4o");
        let candidates = ids(&["a", "b"]);
        state
            .backoff(&pool, &candidates[0], throttle(3_000))
            .await
            .unwrap();

        let admitted = state.acquire(&pool, &candidates).await.unwrap();
        assert_eq!(
            admitted,
            Admission::Admitted {
                backend: candidates[1].clone()
            }
        );

        tokio::time::advance(Duration::from_millis(3_001)).await;
        let admitted = state.acquire(&pool, &candidates).await.unwrap();
        assert_eq!(
            admitted,
            Admission::Admitted {
                backend: candidates[0].clone()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_reports_the_earliest_deadline() {
        let state = EmbeddedState::new();
        let pool = PoolName::new("gpt-4o");
        let candidates = ids(&["a", "b"]);
        state
            .backoff(&pool, &candidates[0], throttle(5_000))
            .await
            .unwrap();
        let failure = Backoff {
            duration: Duration::from_millis(2_000),
            reason: BackoffReason::ServerError,
        };
        state.backoff(&pool, &candidates[1], failure).await.unwrap();

        let answer = state.acquire(&pool, &candidates).await.unwrap();
        assert_eq!(
            answer,
            Admission::Exhausted {
                retry_after: Duration::from_millis(2_000),
                throttled: true
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_keeps_the_later_deadline() {
        let state = EmbeddedState::new();
        let pool = PoolName::new("gpt-4o");
        let a = BackendId::new("a");
        state.backoff(&pool, &a, throttle(5_000)).await.unwrap();
        state.backoff(&pool, &a, throttle(1_000)).await.unwrap();

        let snap = state
            .snapshot(&pool, std::slice::from_ref(&a))
            .await
            .unwrap();
        assert_eq!(snap.members[0].backoff, Some(throttle(5_000)));
        assert_eq!(snap.earliest_available(), Duration::from_millis(5_000));
    }

    #[tokio::test(start_paused = true)]
    async fn pools_are_independent() {
        let state = EmbeddedState::new();
        let a = BackendId::new("a");
        state
            .backoff(&PoolName::new("gpt-4o"), &a, throttle(5_000))
            .await
            .unwrap();
        let other = state
            .acquire(&PoolName::new("emb"), std::slice::from_ref(&a))
            .await
            .unwrap();
        assert_eq!(other, Admission::Admitted { backend: a });
    }
}
