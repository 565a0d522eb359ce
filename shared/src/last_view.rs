//! A replica's last shared view of the budgets: each member's usage as last read from Redis,
//! plus what this replica admitted there since. From it, the share of each budget the replica
//! may admit alone while Redis cannot be reached, and the fleet's usage to restore when Redis
//! comes back empty.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{BackendId, Candidate, PoolName, PoolSnapshot};

type MemberKey = (PoolName, BackendId);

#[derive(Debug, Default)]
pub struct LastView {
    members: Mutex<HashMap<MemberKey, Seen>>,
    /// Each pool's generation marker as last read with its usage: the usage seen under a
    /// generation is the history to put back when Redis no longer has that generation.
    generations: Mutex<HashMap<PoolName, String>>,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    at: Instant,
    tokens_used: u64,
    requests_used: u64,
    tokens_since: u64,
    requests_since: u64,
}

impl Seen {
    fn empty() -> Self {
        Self {
            at: Instant::now(),
            tokens_used: 0,
            requests_used: 0,
            tokens_since: 0,
            requests_since: 0,
        }
    }

    /// The fleet's usage, as this replica can best tell: the view, plus its own admissions
    /// since, as many times as there are replicas (peers admit about as much).
    fn fleet_usage(&self, live: u64) -> (u64, u64) {
        (
            self.tokens_used + live * self.tokens_since,
            self.requests_used + live * self.requests_since,
        )
    }
}

impl LastView {
    /// Remember a snapshot read from Redis.
    pub fn note(&self, snapshot: &PoolSnapshot) {
        let mut members = self.members.lock().expect("last view lock");
        for m in &snapshot.members {
            members.insert(
                (snapshot.pool.clone(), m.backend.clone()),
                Seen {
                    tokens_used: m.tokens_used,
                    requests_used: m.requests_used,
                    ..Seen::empty()
                },
            );
        }
    }

    /// Count what this replica charged in Redis since the last snapshot: one request, or a
    /// lease's worth of them (admissions on a lease were charged with it).
    pub fn note_admitted(&self, pool: &PoolName, backend: &BackendId, tokens: u64, requests: u64) {
        let mut members = self.members.lock().expect("last view lock");
        // Before any snapshot, what this replica admitted is all there is to go on.
        let s = members
            .entry((pool.clone(), backend.clone()))
            .or_insert_with(Seen::empty);
        s.tokens_since += tokens;
        s.requests_since += requests;
    }

    /// The candidates as this replica may admit them alone: each budget cut to what the
    /// fleet had left (per a view younger than `window`), divided by the `live` replicas.
    pub fn shares(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        live: u32,
        window: Duration,
    ) -> Vec<Candidate> {
        let live = u64::from(live.max(1));
        let members = self.members.lock().expect("last view lock");
        candidates
            .iter()
            .map(|c| {
                let (tokens_used, requests_used) = members
                    .get(&(pool.clone(), c.backend.clone()))
                    .filter(|s| s.at.elapsed() < window)
                    .map_or((0, 0), |s| s.fleet_usage(live));
                let share = |limit: u64, used: u64| limit.saturating_sub(used) / live;
                let tokens = c.tokens_per_window.map(|t| share(t, tokens_used));
                let requests = c.requests_per_window.map(|r| share(r, requests_used));
                // No share left: no request either (an empty window would otherwise take
                // one request of any size).
                let requests = if tokens == Some(0) { Some(0) } else { requests };
                Candidate {
                    tokens_per_window: tokens,
                    requests_per_window: requests,
                    // A lower class's line is shared the same way.
                    ceiling: c.ceiling.map(|line| share(line, tokens_used)),
                    ..c.clone()
                }
            })
            .collect()
    }

    /// Remember the generation `pool`'s usage was read under.
    pub fn note_generation(&self, pool: &PoolName, generation: String) {
        let mut generations = self.generations.lock().expect("last view lock");
        generations.insert(pool.clone(), generation);
    }

    pub fn generation(&self, pool: &PoolName) -> Option<String> {
        let generations = self.generations.lock().expect("last view lock");
        generations.get(pool).cloned()
    }

    /// The pools whose usage was read under a known generation.
    pub fn pools(&self) -> Vec<PoolName> {
        let generations = self.generations.lock().expect("last view lock");
        generations.keys().cloned().collect()
    }

    /// The fleet's usage of `pool`'s members seen within `window`: (tokens, requests).
    pub fn pool_usage(
        &self,
        pool: &PoolName,
        live: u32,
        window: Duration,
    ) -> Vec<(BackendId, (u64, u64))> {
        let live = u64::from(live.max(1));
        self.members
            .lock()
            .expect("last view lock")
            .iter()
            .filter(|((p, _), s)| p == pool && s.at.elapsed() < window)
            .map(|((_, backend), s)| (backend.clone(), s.fleet_usage(live)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemberSnapshot;

    fn budgeted(tokens: u64) -> Candidate {
        Candidate {
            tokens_per_window: Some(tokens),
            ..Candidate::unlimited(BackendId::new("ptu"))
        }
    }

    #[test]
    fn a_share_is_what_was_left_divided_by_the_live_replicas() {
        let view = LastView::default();
        let pool = PoolName::new("p");
        let c = [budgeted(1_000)];
        let window = Duration::from_secs(60);
        assert_eq!(
            view.shares(&pool, &c, 4, window)[0].tokens_per_window,
            Some(250),
            "nothing seen: the whole budget, divided"
        );
        view.note(&PoolSnapshot {
            pool: pool.clone(),
            members: vec![MemberSnapshot {
                backend: BackendId::new("ptu"),
                backoff: None,
                tokens_used: 400,
                requests_used: 4,
                hints: Default::default(),
                latency: Default::default(),
                estimated_tokens: 0,
                actual_tokens: 0,
                prompt_tokens: 0,
                cached_tokens: 0,
            }],
        });
        view.note_admitted(&pool, &BackendId::new("ptu"), 50, 1);
        // 1,000 - 400 seen - 4 replicas x 50 admitted since = 400 left, 100 each.
        assert_eq!(
            view.shares(&pool, &c, 4, window)[0].tokens_per_window,
            Some(100)
        );
        view.note_admitted(&pool, &BackendId::new("ptu"), 100, 1);
        let none_left = &view.shares(&pool, &c, 4, window)[0];
        assert_eq!(
            (none_left.tokens_per_window, none_left.requests_per_window),
            (Some(0), Some(0)),
            "no share: not even one request"
        );
    }
}
