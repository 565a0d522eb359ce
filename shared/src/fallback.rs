//! `FallbackState`: Redis is a dependency, not a single point of failure, and not a way
//! around the budgets either.
//!
//! - Every decision (acquire, settle, observe, backoff) goes to Redis within a time budget
//!   that follows the measured round trip ([`crate::round_trip`]; `redis_timeout_ms` is its
//!   floor), so a Redis a region away is slow, not down. A call that fails or overruns it is
//!   decided on this replica's embedded state, for that call.
//! - Health is per pool (so per Redis node in a cluster) and has hysteresis
//!   ([`crate::health`]): a pool turns degraded (every decision local) only after
//!   [`ENTER_AFTER`] such calls within a second, and back after [`LEAVE_AFTER`] timely
//!   probes in a row (2 s). Background snapshots never change it.
//! - Local decisions keep budgets: a member's budget is what the fleet had left at the last
//!   shared view, divided by the live replicas (heartbeats in Redis).
//! - What was decided locally reaches Redis once it answers: the usage admitted locally is
//!   charged to the shared buckets, and backoffs and open breakers still in force are written
//!   back (a later deadline wins).
//! - A Redis that lost a pool's data (restarted empty) gets the usage of the last shared view
//!   back, once per pool: the pool's generation marker is missing, and the replica that sets
//!   it again restores in the same step (`restore.lua`).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::health::Health;
use crate::last_view::LastView;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::ledger::{HourLedger, SpendCounts, SpendKey};
use crate::memory::EmbeddedState;
use crate::redis::RedisState;
use crate::round_trip::CEILING;
use crate::store::{
    Admission, BackendId, Backoff, Candidate, ClockControl, FleetState, Issuer, PoolName,
    PoolSnapshot, QuotaCounter, Receipt, Reservation, ResponseOwner, StateError, Ticket,
    UpstreamHints,
};

pub use crate::health::{ENTER_AFTER, LEAVE_AFTER};

/// How often a degraded pool is probed.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How often a replica announces itself, and how long an announcement counts.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const LIVE_TTL: Duration = Duration::from_secs(5);
/// Snapshots feed routing scores, not decisions: they get longer, and never flip health.
const SNAPSHOT_BUDGET: Duration = Duration::from_millis(250);

type MemberKey = (PoolName, BackendId);

pub struct FallbackState {
    primary: Arc<RedisState>,
    local: EmbeddedState,
    budget: Duration,
    replica: String,
    health: Health,
    /// Decisions taken on the embedded state since start (an operator metric).
    fallback_calls: AtomicU64,
    live_replicas: AtomicU32,
    /// The last shared view, for local shares and for restoring an emptied Redis.
    view: LastView,
    owed: Mutex<Owed>,
    /// Each quota counter's total as Redis last answered it, so a quota keeps counting from
    /// there while Redis is away.
    quotas_seen: Mutex<HashMap<String, u64>>,
    /// Generation markers this replica has offered (`<replica>:<n>`).
    claims: AtomicU64,
}

/// What was decided locally and still has to reach Redis.
#[derive(Debug, Default)]
struct Owed {
    /// Usage admitted on the embedded state: (tokens, requests).
    usage: HashMap<MemberKey, (u64, u64)>,
    /// Members given a backoff (or a breaker outcome) locally.
    backoffs: HashSet<MemberKey>,
    /// Quota tokens spent while Redis was away.
    quotas: HashMap<QuotaCounter, u64>,
    /// Cost ledger lines written while Redis was away: (hour, line) → (expiry, counts).
    spend: HashMap<(u64, SpendKey), (u64, SpendCounts)>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.usage.is_empty()
            && self.backoffs.is_empty()
            && self.quotas.is_empty()
            && self.spend.is_empty()
    }

    fn owe_spend(&mut self, hour_ms: u64, expires_at_ms: u64, lines: &[(SpendKey, SpendCounts)]) {
        for (key, counts) in lines {
            let owed = self.spend.entry((hour_ms, key.clone())).or_default();
            owed.0 = owed.0.max(expires_at_ms);
            owed.1.add(*counts);
        }
    }
}

impl FallbackState {
    /// `acquire` by a call to Redis (or, when it cannot answer in time, decided alone), for a
    /// request this replica's leases did not admit.
    /// `turn`: a request waiting in turn, with its ticket.
    async fn acquire_by_call(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        tokens: u64,
        turn: Option<&Ticket>,
    ) -> Result<Admission, StateError> {
        let id = self.primary.next_reservation_id();
        let answered = std::sync::atomic::AtomicBool::new(false);
        let shared = async {
            let acquired = match turn {
                Some(ticket) => {
                    self.primary
                        .acquire_in_turn_charging(pool, candidates, tokens, (id, ticket))
                        .await
                }
                None => {
                    self.primary
                        .acquire_past_lease(pool, candidates, tokens, id)
                        .await
                }
            };
            answered.store(true, Ordering::Relaxed);
            let acquired = acquired?;
            // An admission on a lease charged nothing new: the lease was noted when granted.
            if let (Admission::Admitted { backend, .. }, (tokens, requests @ 1..)) =
                (&acquired.admission, acquired.charged)
            {
                self.view.note_admitted(pool, backend, tokens, requests);
            }
            Ok(acquired.admission)
        };
        let local = async {
            let shares = self.view.shares(
                pool,
                candidates,
                self.live_replicas(),
                self.primary.windows().budget,
            );
            match turn {
                Some(ticket) => {
                    self.local
                        .acquire_in_turn(pool, &shares, tokens, ticket)
                        .await
                }
                None => self.local.acquire(pool, &shares, tokens).await,
            }
        };
        let tried_shared = !self.health.is_degraded(pool);
        // It may wait for a lease on its way (a round trip), then make its own call.
        let within = 2 * self.call_timeout();
        let admission = self.decide_within(pool, within, shared, local).await;
        if tried_shared && !answered.load(Ordering::Relaxed) {
            // Given up on here, the script may still run in Redis: release what it reserves.
            tokio::spawn(release_abandoned(
                self.primary.clone(),
                pool.clone(),
                candidates.to_vec(),
                id,
            ));
        }
        admission
    }

    /// Wrap `primary`; must be called inside a tokio runtime (it starts the probe and the
    /// heartbeat tasks).
    pub fn new(primary: RedisState, local: EmbeddedState, budget: Duration) -> Arc<Self> {
        let state = Arc::new(Self {
            primary: Arc::new(primary),
            local,
            budget,
            replica: replica_id(),
            health: Health::default(),
            fallback_calls: AtomicU64::new(0),
            live_replicas: AtomicU32::new(1),
            view: LastView::default(),
            owed: Mutex::new(Owed::default()),
            quotas_seen: Mutex::new(HashMap::new()),
            claims: AtomicU64::new(0),
        });
        tokio::spawn(probe(Arc::downgrade(&state), state.health.subscribe()));
        tokio::spawn(heartbeat(Arc::downgrade(&state)));
        state
    }

    /// Wait, at most `within`, for Redis to accept connections and load the scripts; a
    /// replica that cannot reach it starts degraded. True when Redis is ready.
    pub async fn wait_ready(&self, within: Duration) -> bool {
        match self.primary.ready(within).await {
            Ok(()) => {
                // A first measure of the distance, before the first decision waits on it.
                for _ in 0..3 {
                    let _ = tokio::time::timeout(CEILING, self.primary.ping()).await;
                }
                self.announce().await;
                true
            }
            Err(e) => {
                if self.health.degrade_all() {
                    self.log_degraded(None, &e.to_string());
                }
                false
            }
        }
    }

    /// Whether any pool decides locally now.
    pub fn is_degraded(&self) -> bool {
        self.health.any_degraded()
    }

    pub fn fallback_calls(&self) -> u64 {
        self.fallback_calls.load(Ordering::Relaxed)
    }

    /// Replicas that announced themselves recently (this one included), as last read.
    pub fn live_replicas(&self) -> u32 {
        self.live_replicas.load(Ordering::Relaxed).max(1)
    }

    /// Wait until every pool decides on shared state again (tests, operators' tooling).
    pub async fn wait_shared(&self) {
        let _ = self.health.subscribe().wait_for(|n| *n == 0).await;
    }

    /// Wait until some pool has switched to local decisions.
    pub async fn wait_degraded(&self) {
        let _ = self.health.subscribe().wait_for(|n| *n > 0).await;
    }

    fn log_degraded(&self, pool: Option<&PoolName>, why: &str) {
        warn!(
            pool = pool.map_or("every pool", PoolName::as_str),
            error = why,
            live_replicas = self.live_replicas(),
            "fleet state: Redis unavailable; deciding on this replica's share of the budgets until it answers"
        );
    }

    /// Run a decision for `pool` on Redis unless the pool is degraded; on failure or timeout,
    /// run it locally.
    async fn decide<T>(
        &self,
        pool: &PoolName,
        shared: impl Future<Output = Result<T, StateError>>,
        local: impl Future<Output = Result<T, StateError>>,
    ) -> Result<T, StateError> {
        self.decide_within(pool, self.call_timeout(), shared, local)
            .await
    }

    /// A settle, an observation or a backoff rides `settle.lua`'s next batch, which leaves
    /// once the batch ahead of it is answered: two round trips.
    async fn decide_batched(
        &self,
        pool: &PoolName,
        shared: impl Future<Output = Result<(), StateError>>,
        local: impl Future<Output = Result<(), StateError>>,
    ) -> Result<(), StateError> {
        self.decide_within(pool, 2 * self.call_timeout(), shared, local)
            .await
    }

    async fn decide_within<T>(
        &self,
        pool: &PoolName,
        within: Duration,
        shared: impl Future<Output = Result<T, StateError>>,
        local: impl Future<Output = Result<T, StateError>>,
    ) -> Result<T, StateError> {
        if !self.health.is_degraded(pool) {
            let why = match tokio::time::timeout(within, shared).await {
                Ok(Ok(value)) => return Ok(value),
                // A script rejecting its arguments is a bug here, not an outage.
                Ok(Err(e @ StateError::Protocol(_))) => return Err(e),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} ms", within.as_millis()),
            };
            if self.health.note_bad_call(pool) {
                self.log_degraded(Some(pool), &why);
            }
        }
        self.fallback_calls.fetch_add(1, Ordering::Relaxed);
        local.await
    }

    /// How long a decision waits for Redis: the measured round trip's allowance, never less
    /// than `state.redis_timeout_ms` ([`crate::round_trip`]).
    pub fn call_timeout(&self) -> Duration {
        self.primary.call_timeout(self.budget)
    }

    /// Requests that waited for a round trip to Redis to be admitted.
    pub fn acquires_waited(&self) -> u64 {
        self.primary.acquires_waited()
    }

    /// Requests that found their lease spent and waited for the refill on its way.
    pub fn refill_waits(&self) -> u64 {
        self.primary.refill_waits()
    }

    /// The typical round trip to Redis measured by this replica.
    pub fn round_trip(&self) -> Option<Duration> {
        self.primary.round_trip()
    }

    fn owe_usage(&self, pool: &PoolName, backend: &BackendId, tokens: u64, requests: u64) {
        let mut owed = self.owed.lock().expect("fallback lock");
        let entry = owed
            .usage
            .entry((pool.clone(), backend.clone()))
            .or_default();
        entry.0 += tokens;
        entry.1 += requests;
    }

    fn owe_backoff(&self, pool: &PoolName, backend: &BackendId) {
        let mut owed = self.owed.lock().expect("fallback lock");
        owed.backoffs.insert((pool.clone(), backend.clone()));
    }

    /// Make sure Redis holds `pool`'s history. When the pool's generation marker is missing
    /// (first start, or Redis lost the pool's data), `restore.lua` sets it and puts back the
    /// usage this replica last read under an earlier generation, in one step; when it is
    /// there (Redis kept its data, or another replica restored first), nothing is written.
    /// Safe to repeat after a lost answer.
    async fn restore(&self, pool: &PoolName) -> Result<Restore, StateError> {
        let usage = match self.view.generation(pool) {
            Some(_) => {
                let window = self.primary.windows().budget;
                self.view.pool_usage(pool, self.live_replicas(), window)
            }
            None => Vec::new(),
        };
        let claim = format!(
            "{}:{}",
            self.replica,
            self.claims.fetch_add(1, Ordering::Relaxed)
        );
        let restore = self.primary.restore(pool, &claim, &usage);
        let generation = tokio::time::timeout(SNAPSHOT_BUDGET, restore)
            .await
            .map_err(|_| StateError::Unavailable("restore: no answer in time".into()))??;
        let outcome = if generation != claim {
            Restore::Found
        } else if usage.iter().all(|(_, used)| *used == (0, 0)) {
            Restore::Marked
        } else {
            warn!(
                pool = pool.as_str(),
                members = usage.len(),
                "fleet state: Redis had lost this pool's usage; restored the last shared view's"
            );
            Restore::Restored
        };
        self.view.note_generation(pool, generation);
        Ok(outcome)
    }

    /// Write what was decided locally to Redis: usage, and backoffs still in force. What
    /// cannot be written stays owed.
    /// True when nothing is owed any more.
    async fn repay(&self) -> bool {
        let mut restored = true;
        for pool in self.view.pools() {
            restored &= self.restore(&pool).await.is_ok();
        }
        let Owed {
            usage,
            backoffs,
            quotas,
            spend,
        } = std::mem::take(&mut *self.owed.lock().expect("lock"));
        let mut hours: HashMap<u64, (u64, Vec<(SpendKey, SpendCounts)>)> = HashMap::new();
        for ((hour, key), (expires, counts)) in spend {
            let entry = hours.entry(hour).or_default();
            entry.0 = entry.0.max(expires);
            entry.1.push((key, counts));
        }
        for (hour, (expires, lines)) in hours {
            let written = tokio::time::timeout(
                SNAPSHOT_BUDGET,
                self.primary.record_spend(hour, expires, &lines),
            )
            .await;
            if !matches!(written, Ok(Ok(()))) {
                self.owed
                    .lock()
                    .expect("lock")
                    .owe_spend(hour, expires, &lines);
            }
        }
        for (counter, tokens) in quotas {
            let spent =
                tokio::time::timeout(SNAPSHOT_BUDGET, self.primary.spend_quota(&counter, tokens))
                    .await;
            if !matches!(spent, Ok(Ok(_))) {
                *self
                    .owed
                    .lock()
                    .expect("lock")
                    .quotas
                    .entry(counter)
                    .or_default() += tokens;
            }
        }
        for ((pool, backend), (tokens, requests)) in usage {
            let charged = tokio::time::timeout(
                SNAPSHOT_BUDGET,
                self.primary.charge(&pool, &backend, tokens, requests),
            )
            .await;
            if !matches!(charged, Ok(Ok(()))) {
                let mut owed = self.owed.lock().expect("lock");
                let entry = owed.usage.entry((pool, backend)).or_default();
                entry.0 += tokens;
                entry.1 += requests;
            }
        }
        for (pool, backend) in backoffs {
            let candidate = Candidate::unlimited(backend.clone());
            let Ok(local) = self.local.snapshot(&pool, &[candidate]).await else {
                continue;
            };
            let Some(backoff) = local.members.first().and_then(|m| m.backoff) else {
                continue; // expired meanwhile
            };
            let written = tokio::time::timeout(
                SNAPSHOT_BUDGET,
                self.primary.backoff(&pool, &backend, backoff),
            )
            .await;
            if !matches!(written, Ok(Ok(()))) {
                self.owe_backoff(&pool, &backend);
            }
        }
        restored && self.owed.lock().expect("lock").is_empty()
    }

    /// Announce this replica now (it also does every second); returns the live count.
    pub async fn announce(&self) -> u32 {
        let beat =
            tokio::time::timeout(CEILING, self.primary.heartbeat(&self.replica, LIVE_TTL)).await;
        if let Ok(Ok(live)) = beat {
            self.live_replicas.store(live, Ordering::Relaxed);
        }
        self.live_replicas()
    }
}

/// What [`FallbackState::restore`] found.
enum Restore {
    /// The pool's marker was there: Redis holds its history (or another replica restored it).
    Found,
    /// The marker was missing and this replica set it, with nothing to put back: what Redis
    /// holds now is all of this generation's history.
    Marked,
    /// The marker was missing; this replica set it and put back its last view's usage.
    Restored,
}

/// Release an abandoned reservation once Redis answers (commands on one connection run in
/// order, so the release runs after the acquire it follows). Gives up after a budget window,
/// when any reservation has expired with its bucket anyway.
async fn release_abandoned(
    primary: Arc<RedisState>,
    pool: PoolName,
    candidates: Vec<Candidate>,
    id: u64,
) {
    let give_up = Instant::now() + primary.windows().budget;
    let mut pause = Duration::from_millis(50);
    while Instant::now() < give_up {
        match primary.release(&pool, &candidates, id).await {
            Ok(_) => return,
            Err(StateError::Protocol(e)) => {
                warn!(error = %e, "fleet state: could not release an abandoned reservation");
                return;
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// An id for this replica's heartbeats, unique across restarts.
fn replica_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

/// While some pool is degraded: probe it (a read on its node) every 250 ms; at every timely
/// answer repay what is owed; after enough in a row, the pool is back on shared state.
async fn probe(state: Weak<FallbackState>, mut degraded: watch::Receiver<usize>) {
    loop {
        if degraded.wait_for(|n| *n > 0).await.is_err() {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
        let Some(state) = state.upgrade() else { return };
        for entry in state.health.degraded_entries() {
            let probe = async {
                match &entry {
                    Some(pool) => state.primary.probe_pool(pool).await,
                    None => state.primary.ping().await,
                }
            };
            // Waited for up to the ceiling, so a Redis that moved further away is measured
            // (and the timeout follows); in time only within the timeout that follows.
            let started = Instant::now();
            let answered = matches!(tokio::time::timeout(CEILING, probe).await, Ok(Ok(())))
                && started.elapsed() <= state.call_timeout();
            // Repay at every chance, so replicas already back on shared state count what this
            // one admitted alone; a probe counts as healthy only once nothing is owed, so a
            // replica is back on shared state with everything it decided alone written back.
            let ok = answered && state.repay().await;
            if state.health.note_probe(entry.clone(), ok) {
                state.announce().await;
                info!(
                    pool = entry.as_ref().map_or("every pool", PoolName::as_str),
                    "fleet state: Redis answers again; local decisions written back, back on shared state"
                );
            }
        }
    }
}

/// Announce this replica every second; learn how many are live.
async fn heartbeat(state: Weak<FallbackState>) {
    loop {
        tokio::time::sleep(HEARTBEAT_INTERVAL).await;
        let Some(state) = state.upgrade() else { return };
        state.announce().await; // the last count stands while Redis cannot be reached
        // Usage owed from single slow calls is repaid on the healthy path too.
        let owes = {
            let owed = state.owed.lock().expect("lock");
            !owed.usage.is_empty() || !owed.quotas.is_empty() || !owed.spend.is_empty()
        };
        if owes {
            let _ = state.repay().await;
        }
    }
}

impl ClockControl for FallbackState {
    fn advance_clock(&self, by: Duration) {
        self.primary.advance_clock(by);
        self.local.advance_clock(by);
    }
}

#[async_trait]
impl FleetState for FallbackState {
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        tokens: u64,
    ) -> Result<Admission, StateError> {
        // Most requests are admitted on a lease: no round trip, and none of the (large)
        // future that asks Redis or decides alone is built or moved for them.
        if !self.health.is_degraded(pool)
            && let Some(admission) = self.primary.acquire_on_lease(pool, candidates, tokens)
        {
            return Ok(admission);
        }
        Box::pin(self.acquire_by_call(pool, candidates, tokens, None)).await
    }

    async fn acquire_in_turn(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        tokens: u64,
        ticket: &Ticket,
    ) -> Result<Admission, StateError> {
        Box::pin(self.acquire_by_call(pool, candidates, tokens, Some(ticket))).await
    }

    /// Left in both queues: a ticket taken while Redis was away lives in the embedded one.
    async fn leave_queue(&self, pool: &PoolName, ticket: &Ticket) -> Result<(), StateError> {
        let _ = self.local.leave_queue(pool, ticket).await;
        self.decide_batched(
            pool,
            self.primary.leave_queue(pool, ticket),
            std::future::ready(Ok(())),
        )
        .await
    }

    /// A reservation is settled in the store that issued it: an embedded one never touches
    /// Redis's ledgers; its real usage is charged to Redis's buckets instead. A Redis one
    /// that cannot reach Redis still leaves its backoff, hints and latency locally.
    async fn settle(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        receipt: Receipt,
    ) -> Result<(), StateError> {
        let failed = receipt.backoff.is_some();
        match receipt.reservation.issuer {
            Issuer::Embedded => {
                self.owe_usage(pool, backend, receipt.tokens, 1);
                if failed {
                    self.owe_backoff(pool, backend);
                }
                self.local.settle(pool, backend, receipt).await
            }
            Issuer::Redis => {
                let local = async {
                    if failed {
                        self.owe_backoff(pool, backend);
                    }
                    self.local.settle(pool, backend, receipt.clone()).await
                };
                self.decide_batched(
                    pool,
                    self.primary.settle(pool, backend, receipt.clone()),
                    local,
                )
                .await
            }
        }
    }

    async fn observe(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        hints: UpstreamHints,
        reservation: Reservation,
    ) -> Result<(), StateError> {
        match reservation.issuer {
            Issuer::Embedded => self.local.observe(pool, backend, hints, reservation).await,
            Issuer::Redis => {
                self.decide_batched(
                    pool,
                    self.primary.observe(pool, backend, hints, reservation),
                    self.local.observe(pool, backend, hints, reservation),
                )
                .await
            }
        }
    }

    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError> {
        let local = async {
            self.owe_backoff(pool, backend);
            self.local.backoff(pool, backend, backoff).await
        };
        self.decide_batched(pool, self.primary.backoff(pool, backend, backoff), local)
            .await
    }

    /// Read for routing scores and operators: from Redis when it answers in time (and
    /// remembered as the last shared view), else from the embedded state. Never changes
    /// the replica's health.
    /// Give back leases, and hand Redis what this replica decided on its own (usage, quota
    /// spends, backoffs) if it answers: a stopping replica leaves nothing owed behind.
    async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.repay()).await;
        self.primary.close().await;
    }

    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[Candidate],
    ) -> Result<PoolSnapshot, StateError> {
        if !self.health.is_degraded(pool) {
            let budget = SNAPSHOT_BUDGET.max(self.call_timeout());
            // One round trip: the two commands go out together on the connection.
            let read = async {
                tokio::try_join!(
                    self.primary.snapshot(pool, members),
                    self.primary.generation(pool)
                )
            };
            match tokio::time::timeout(budget, read).await {
                Ok(Ok((snapshot, generation))) => {
                    match generation {
                        Some(generation) => {
                            self.view.note(&snapshot);
                            self.view.note_generation(pool, generation);
                        }
                        // The pool's first read, or Redis lost its data unnoticed: mark it, or
                        // put the history back (then this read is out of date at once).
                        None => {
                            if let Ok(Restore::Marked) = self.restore(pool).await {
                                self.view.note(&snapshot);
                            }
                        }
                    }
                    return Ok(snapshot);
                }
                Ok(Err(e @ StateError::Protocol(_))) => return Err(e),
                _ => {}
            }
        }
        self.local.snapshot(pool, members).await
    }

    async fn charge(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        tokens: u64,
        requests: u64,
    ) -> Result<(), StateError> {
        let local = async {
            self.owe_usage(pool, backend, tokens, requests);
            self.local.charge(pool, backend, tokens, requests).await
        };
        self.decide(
            pool,
            self.primary.charge(pool, backend, tokens, requests),
            local,
        )
        .await
    }

    /// Written to both stores: a pin made while Redis is away still serves this replica.
    async fn pin_response(
        &self,
        response_id: &str,
        owner: &ResponseOwner,
        ttl: Duration,
    ) -> Result<(), StateError> {
        self.local.pin_response(response_id, owner, ttl).await?;
        if !self.health.is_degraded(&owner.pool) {
            let shared = self.primary.pin_response(response_id, owner, ttl);
            match tokio::time::timeout(self.call_timeout(), shared).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "response affinity not shared (kept locally)"),
                Err(_) => warn!("response affinity not shared in time (kept locally)"),
            }
        }
        Ok(())
    }

    /// From Redis when it answers in time, else (or when Redis knows nothing) this replica's
    /// own pins.
    async fn response_owner(&self, response_id: &str) -> Result<Option<ResponseOwner>, StateError> {
        let shared = self.primary.response_owner(response_id);
        if let Ok(Ok(Some(owner))) = tokio::time::timeout(self.call_timeout(), shared).await {
            return Ok(Some(owner));
        }
        self.local.response_owner(response_id).await
    }

    /// On Redis; while it is away, the last total Redis gave plus what this replica spent
    /// since (owed to Redis, added when it answers).
    /// Recorded in Redis when it answers; else kept in this replica's embedded ledger (read
    /// by `spend_between` while Redis is away) and owed to Redis, written when it is back.
    async fn record_spend(
        &self,
        hour_ms: u64,
        expires_at_ms: u64,
        lines: &[(SpendKey, SpendCounts)],
    ) -> Result<(), StateError> {
        // Off the request path (a replica's page, once a second): it may wait longer than a
        // decision, which makes a line written late and also repaid (counted twice) rarer.
        let shared = self.primary.record_spend(hour_ms, expires_at_ms, lines);
        match tokio::time::timeout(SNAPSHOT_BUDGET, shared).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.owed
                    .lock()
                    .expect("fallback lock")
                    .owe_spend(hour_ms, expires_at_ms, lines);
                self.local.record_spend(hour_ms, expires_at_ms, lines).await
            }
        }
    }

    async fn spend_between(
        &self,
        from_hour_ms: u64,
        to_hour_ms: u64,
    ) -> Result<Vec<HourLedger>, StateError> {
        match self.primary.spend_between(from_hour_ms, to_hour_ms).await {
            Ok(hours) => Ok(hours),
            Err(_) => self.local.spend_between(from_hour_ms, to_hour_ms).await,
        }
    }

    async fn spend_quota(&self, counter: &QuotaCounter, tokens: u64) -> Result<u64, StateError> {
        let pool = PoolName::new(format!("quota:{}", counter.name));
        let shared = async {
            let total = self.primary.spend_quota(counter, tokens).await?;
            let mut seen = self.quotas_seen.lock().expect("lock");
            if seen.len() >= 100_000 {
                seen.clear(); // old periods' counters; a miss only costs the local estimate
            }
            seen.insert(counter.name.clone(), total);
            Ok(total)
        };
        let local = async {
            // A counter whose period is over is gone at once, as in Redis (PEXPIREAT in the
            // past): it counts nothing and owes nothing.
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if counter.expires_at_ms <= unix_ms {
                return Ok(tokens);
            }
            let mut owed = self.owed.lock().expect("fallback lock");
            let owed = owed.quotas.entry(counter.clone()).or_default();
            *owed += tokens;
            let seen = self.quotas_seen.lock().expect("lock");
            Ok(seen.get(&counter.name).copied().unwrap_or(0) + *owed)
        };
        self.decide(&pool, shared, local).await
    }

    /// Always usable: with Redis down the replica still decides, on its share.
    async fn ping(&self) -> Result<(), StateError> {
        Ok(())
    }

    async fn replicas(&self) -> Result<Vec<crate::store::ReplicaDistance>, StateError> {
        tokio::time::timeout(
            SNAPSHOT_BUDGET.max(self.call_timeout()),
            self.primary.replicas(),
        )
        .await
        .map_err(|_| StateError::Unavailable("no answer in time".into()))?
    }

    fn health(&self) -> crate::store::StoreHealth {
        crate::store::StoreHealth {
            degraded: self.is_degraded(),
            fallback_decisions: self.fallback_calls(),
            round_trip: self.round_trip(),
            call_timeout: Some(self.call_timeout()),
            acquires_waited: self.acquires_waited(),
        }
    }

    fn describe(&self) -> String {
        if self.is_degraded() {
            format!(
                "redis (degraded: deciding on this replica's share of {} live, {} decisions so far)",
                self.live_replicas(),
                self.fallback_calls()
            )
        } else {
            "redis".into()
        }
    }
}
