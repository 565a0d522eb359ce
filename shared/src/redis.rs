//! `RedisState`: the fleet state in Redis (single node, Cluster, TLS), every read-modify-write
//! in a Lua script run by EVALSHA (re-loaded on NOSCRIPT), with time taken from Redis.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::{mpsc, oneshot};

mod acquire;
mod reply;

use reply::{array, int, parse_member};

use crate::keys::{KeySchema, MemberKeys};
use crate::lease::{LeasePolicy, Leases, Unused};
use crate::ledger::{HourLedger, SpendCounts, SpendKey};
use crate::memory::ms_per_output_token;
use crate::round_trip::RoundTrips;
use crate::scripts::{
    ChargeArgs, HeartbeatArgs, LeaveArgs, PinArgs, QuotaArgs, ReceiptRecord, ReleaseArgs,
    RestoreArgs, Scripts, SnapshotArgs, SpendArgs, SpendEntry, UsageArgs,
};
use crate::settle_batch::{Batcher, SettleJob, Work, label};
use crate::store::{
    Admission, BackendId, Backoff, Candidate, FleetState, MAX_QUOTA_NAME_BYTES,
    MAX_RESPONSE_ID_BYTES, MemberSnapshot, PoolName, PoolSnapshot, QuotaCounter, Receipt,
    Reservation, ResponseOwner, StateError, Ticket, UpstreamHints, Windows,
};

/// Cheap to clone: one store, shared by the tasks it starts (lease refills, give-backs).
#[derive(Clone)]
pub struct RedisState {
    inner: Arc<Inner>,
}

impl std::ops::Deref for RedisState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

#[doc(hidden)]
pub struct Inner {
    client: Client,
    keys: KeySchema,
    windows: Windows,
    scripts: Scripts,
    /// Reservation ids: unique per store instance (prefix) and counted.
    id_prefix: String,
    next_id: std::sync::atomic::AtomicU64,
    /// Tests pin the scripts' clock; 0 in service (Redis `TIME`).
    clock_ms: Arc<std::sync::atomic::AtomicU64>,
    leases: Leases,
    /// Receipts on their way to `settle.lua`, sent in batches by one task (started with the
    /// first settle).
    settles: OnceLock<mpsc::UnboundedSender<SettleJob>>,
    /// Round trips to Redis as measured here: the calls' timeout follows them.
    round_trips: RoundTrips,
    /// Requests that waited for an `acquire.lua` call (no lease held, or none left).
    waited: std::sync::atomic::AtomicU64,
    /// Requests that found the lease spent and waited for the refill on its way.
    waited_for_refill: std::sync::atomic::AtomicU64,
    /// Give-backs on their way, so a stopping replica can wait for them.
    giving_back: Arc<GivingBack>,
}

#[derive(Default)]
struct GivingBack {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

fn unavailable(e: fred::error::Error) -> StateError {
    StateError::Unavailable(e.to_string())
}

/// A script's error: its own `spillway:` complaints, and a command inside it refusing its
/// arguments (`ERR ... script: ...`, e.g. a `-0` once sent to HINCRBY), are bugs here, to be
/// seen rather than hidden by the fallback; anything else (connection, `OOM`, `READONLY`,
/// `BUSY`, `LOADING`) is an outage.
pub(crate) fn script_error(e: fred::error::Error) -> StateError {
    let details = e.details();
    let rejected_inside = details.starts_with("ERR") && details.contains("script:");
    if details.contains("spillway:") || rejected_inside {
        StateError::Protocol(e.to_string())
    } else {
        unavailable(e)
    }
}

#[cfg(test)]
mod tests {
    use fred::error::{Error, ErrorKind};

    use super::*;

    #[test]
    fn script_bugs_are_protocol_errors_and_outages_are_not() {
        let error =
            |details: &str| script_error(Error::new(ErrorKind::Unknown, details.to_owned()));
        for bug in [
            "ERR spillway: settle takes 5 keys per record",
            "ERR value is not an integer or out of range script: 3528cfd9, on @user_script:212.",
        ] {
            assert!(matches!(error(bug), StateError::Protocol(_)), "{bug}");
        }
        for outage in [
            "OOM command not allowed when used memory > 'maxmemory'. script: 3528cfd9, on @user_script:12.",
            "READONLY You can't write against a read only replica. script: 3528cfd9",
            "BUSY Redis is busy running a script.",
            "connection reset",
        ] {
            assert!(
                matches!(error(outage), StateError::Unavailable(_)),
                "{outage}"
            );
        }
    }
}

/// An admission and what it newly charged in Redis: (tokens, requests), a lease's worth for
/// an acquire that granted one, nothing for an admission on a lease.
#[derive(Debug)]
pub struct Acquired {
    pub admission: Admission,
    pub charged: (u64, u64),
}

impl Acquired {
    fn local(admission: Admission) -> Self {
        Self {
            admission,
            charged: (0, 0),
        }
    }
}

impl RedisState {
    /// Build a client for `url` and start connecting; returns at once. Commands issued while
    /// disconnected fail after `command_timeout` (callers add their own tighter budget).
    pub fn new(
        url: &str,
        key_prefix: &str,
        windows: Windows,
        command_timeout: Duration,
    ) -> Result<Self, StateError> {
        let mut config = Config::from_url(url)
            .map_err(|e| StateError::Unavailable(format!("state.redis_url: {e}")))?;
        // A replica started while Redis is down keeps trying, as after a later disconnect:
        // with fred's default it would give up on the first refusal and never join the fleet.
        config.fail_fast = false;
        let client = Builder::from_config(config)
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_attempts = 1;
            })
            .with_performance_config(|p| p.default_command_timeout = command_timeout)
            // Reconnect forever, quickly: Redis restarting or failing over is routine.
            .set_policy(ReconnectPolicy::new_constant(0, 250))
            .build()
            .map_err(unavailable)?;
        client.connect();
        let inner = Inner {
            client,
            keys: KeySchema::new(key_prefix),
            windows,
            scripts: Scripts::load(),
            id_prefix: format!(
                "{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
                    ^ u128::from(std::process::id())
            ),
            next_id: std::sync::atomic::AtomicU64::new(1),
            clock_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            leases: Leases::new(LeasePolicy::OFF),
            settles: OnceLock::new(),
            round_trips: RoundTrips::default(),
            waited: std::sync::atomic::AtomicU64::new(0),
            giving_back: Arc::default(),
            waited_for_refill: std::sync::atomic::AtomicU64::new(0),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Admit from budget leases (see [`crate::lease`]); off unless set.
    pub fn with_leases(mut self, policy: LeasePolicy) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("leases are set before the store is shared")
            .leases = Leases::new(policy);
        self
    }

    /// Wait for the first connection, and load the scripts (on every primary of a cluster).
    pub async fn ready(&self, within: Duration) -> Result<(), StateError> {
        tokio::time::timeout(within, async {
            self.client.wait_for_connect().await.map_err(unavailable)?;
            let s = &self.scripts;
            for script in [
                &s.acquire,
                &s.settle,
                &s.snapshot,
                &s.heartbeat,
                &s.charge,
                &s.restore,
                &s.release,
                &s.pin_response,
                &s.spend_quota,
            ] {
                script.load(&self.client).await.map_err(unavailable)?;
            }
            Ok(())
        })
        .await
        .map_err(|_| {
            StateError::Unavailable(format!("no connection within {} ms", within.as_millis()))
        })?
    }

    /// Pin the scripts' clock to `now_ms` (tests of window arithmetic only); 0 unpins.
    #[doc(hidden)]
    pub fn set_clock_ms(&self, now_ms: u64) {
        self.clock_ms
            .store(now_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Move the pinned clock forward (pinning it to now first when it was not pinned).
    fn advance_pinned(&self, by: Duration) {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let _ = self
            .clock_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pinned| {
                Some(if pinned == 0 { now } else { pinned } + by.as_millis() as u64)
            });
    }

    fn clock(&self) -> String {
        crate::settle_batch::clock(&self.clock_ms)
    }

    fn member_keys(&self, pool: &PoolName, backend: &BackendId) -> MemberKeys {
        self.keys.member(pool, backend)
    }

    async fn run(
        &self,
        script: &Script,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, StateError> {
        let started = tokio::time::Instant::now();
        // Boxed: fred's call is a large future, and every future awaiting it (then boxed or
        // spawned) would otherwise carry and copy it whole.
        let value = Box::pin(script.evalsha_with_reload(&self.client, keys, args))
            .await
            .map_err(script_error)?;
        self.round_trips.record(started.elapsed());
        Ok(value)
    }

    /// How long a call may take before the caller abandons it: follows the measured round
    /// trip, never below `floor` ([`crate::round_trip`]).
    pub fn call_timeout(&self, floor: Duration) -> Duration {
        self.round_trips.timeout(floor)
    }

    /// Requests that waited for Redis to admit them (the rest were admitted on a lease).
    pub fn acquires_waited(&self) -> u64 {
        self.waited.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests that found their lease spent and waited for the refill on its way.
    pub fn refill_waits(&self) -> u64 {
        self.waited_for_refill
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The typical round trip measured so far.
    pub fn round_trip(&self) -> Option<Duration> {
        self.round_trips.typical()
    }

    /// Queue `work` for `settle.lua` (sent with whatever else is queued) and wait for it.
    async fn run_settle(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        work: Work,
    ) -> Result<(), StateError> {
        let queue = self.settles.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let batcher = Batcher {
                client: self.client.clone(),
                script: self.scripts.settle.clone(),
                keys: self.keys.clone(),
                windows: self.windows,
                clock_ms: self.clock_ms.clone(),
            };
            tokio::spawn(crate::settle_batch::run(batcher, rx));
            tx
        });
        let (done, answer) = oneshot::channel();
        let job = SettleJob {
            pool: pool.clone(),
            backend: backend.clone(),
            work,
            done,
            queued: tokio::time::Instant::now(),
        };
        queue
            .send(job)
            .map_err(|_| StateError::Unavailable("settle queue closed".into()))?;
        answer
            .await
            .map_err(|_| StateError::Unavailable("settle queue closed".into()))?
    }

    /// Give back what leases did not use (`release.lua` with an amount), in the background.
    fn give_back(&self, unused: impl IntoIterator<Item = Unused>) {
        for u in unused {
            let call = self.give_back_call(u);
            let giving = self.giving_back.clone();
            giving
                .count
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                call.await;
                if giving
                    .count
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
                    == 1
                {
                    giving.done.notify_waiters();
                }
            });
        }
    }

    /// Until every give-back sent so far has been answered (a stopping replica).
    async fn given_back(&self) {
        loop {
            let done = self.giving_back.done.notified();
            if self
                .giving_back
                .count
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                return;
            }
            done.await;
        }
    }

    fn give_back_call(&self, unused: Unused) -> impl Future<Output = ()> + Send + 'static {
        let k = self.member_keys(&unused.pool, &unused.backend);
        let keys = vec![self.keys.pending(&unused.pool), k.usage, k.backoff];
        let ttl = 2 * (self.windows.budget.as_millis() as u64 + self.windows.bucket_ms());
        let args = ReleaseArgs {
            reservation_id: self.reservation_key(unused.id),
            ttl_ms: ttl,
            part: format!("{}|{}", unused.tokens, unused.requests),
        }
        .to_args();
        let (client, script) = (self.client.clone(), self.scripts.release.clone());
        async move {
            let given: Result<Value, _> =
                Box::pin(script.evalsha_with_reload(&client, keys, args)).await;
            if let Err(e) = given {
                tracing::warn!(error = %e, "fleet state: could not give back an unused lease");
            }
        }
    }

    /// A fresh reservation id (never 0).
    pub fn next_reservation_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn reservation_key(&self, id: u64) -> String {
        if id == 0 {
            String::new()
        } else {
            format!("{}-{id}", self.id_prefix)
        }
    }

    /// Give back reservation `id` of an acquire over `candidates` that was abandoned
    /// (`release.lua`); true when Redis held it.
    pub async fn release(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        id: u64,
    ) -> Result<bool, StateError> {
        let mut keys = vec![self.keys.pending(pool)];
        for c in candidates {
            let k = self.member_keys(pool, &c.backend);
            keys.extend([k.usage, k.backoff]);
        }
        let ttl = 2 * (self.windows.budget.as_millis() as u64 + self.windows.bucket_ms());
        let args = ReleaseArgs {
            reservation_id: self.reservation_key(id),
            ttl_ms: ttl,
            part: String::new(),
        }
        .to_args();
        Ok(int(&self.run(&self.scripts.release, keys, args).await?)? == 1)
    }

    /// `settle.lua`'s receipt record; without a receipt only the backoff is applied, with no
    /// breaker (`backoff`).
    fn receipt_record(&self, receipt: Option<&Receipt>, backoff: Option<Backoff>) -> ReceiptRecord {
        let w = &self.windows;
        let latency = receipt.and_then(|r| r.latency.as_ref());
        let hints = receipt.map(|r| r.hints).unwrap_or_default();
        ReceiptRecord {
            bucket_ms: receipt.map(|r| r.reservation.bucket_ms),
            reserved: receipt.map(|r| r.reservation.tokens),
            used: receipt.map(|r| r.tokens),
            ttfb_label: latency
                .map(|s| label(s.ttfb.as_millis() as u64))
                .unwrap_or_default(),
            total_label: latency
                .map(|s| label(s.total.as_millis() as u64))
                .unwrap_or_default(),
            per_token_label: latency
                .and_then(ms_per_output_token)
                .map(label)
                .unwrap_or_default(),
            remaining_tokens: hints.remaining_tokens,
            utilization: hints.utilization,
            backoff_ms: backoff.map(|b| b.duration.as_millis() as u64),
            backoff_reason: backoff
                .map(|b| b.reason.as_str().to_string())
                .unwrap_or_default(),
            slot_ms: w.slot_ms(),
            latency_window_ms: w.latency.as_millis() as u64,
            clock: self.clock(),
            breaker_failures: if receipt.is_some() {
                w.breaker_failures
            } else {
                0
            },
            breaker_max_ms: w.breaker_max.as_millis() as u64,
            breaker_failure_rate: w.breaker_failure_rate,
            breaker_min_outcomes: w.breaker_min_requests,
            breaker_window_ms: w.breaker_window.as_millis() as u64,
            ledger_mark: receipt.map(|r| r.reservation.ledger),
            admitted_ms: receipt.map(|r| r.reservation.admitted_ms),
            hints_age_ms: hints.age().as_millis() as u64,
            reservation_id: self.reservation_key(receipt.map_or(0, |r| r.reservation.id)),
            output_tokens_label: latency
                .filter(|s| s.output_tokens > 0)
                .map(|s| label(s.output_tokens))
                .unwrap_or_default(),
            prompt_tokens: latency.map_or(0, |s| s.prompt_tokens),
            cached_tokens: latency.map_or(0, |s| s.cached_tokens),
        }
    }

    /// The pool's generation marker: `None` when Redis holds none of the pool's history
    /// (first start, or Redis lost its data).
    pub async fn generation(&self, pool: &PoolName) -> Result<Option<String>, StateError> {
        self.client
            .get(self.keys.generation(pool))
            .await
            .map_err(unavailable)
    }

    /// `restore.lua`: when the pool has no generation marker, set it to `generation` and put
    /// back `usage` (tokens, requests per member), in one step. Returns the generation in
    /// force; safe to call again when an answer was lost.
    pub async fn restore(
        &self,
        pool: &PoolName,
        generation: &str,
        usage: &[(BackendId, (u64, u64))],
    ) -> Result<String, StateError> {
        let mut keys = vec![self.keys.generation(pool)];
        let mut args = RestoreArgs {
            generation: generation.to_owned(),
            bucket_ms: self.windows.bucket_ms(),
            window_ms: self.windows.budget.as_millis() as u64,
            clock: self.clock(),
        }
        .to_args();
        for (backend, (tokens, requests)) in usage {
            let k = self.member_keys(pool, backend);
            keys.extend([k.usage, k.hints]);
            UsageArgs {
                tokens: *tokens,
                requests: *requests,
            }
            .push_to(&mut args);
        }
        let reply = self.run(&self.scripts.restore, keys, args).await?;
        reply
            .into_string()
            .ok_or_else(|| StateError::Protocol("restore returned no generation".into()))
    }

    /// A cheap read on the node that holds `pool`'s keys: is that node answering?
    pub async fn probe_pool(&self, pool: &PoolName) -> Result<(), StateError> {
        let started = tokio::time::Instant::now();
        self.client
            .exists::<i64, _>(self.keys.pending(pool))
            .await
            .map_err(unavailable)?;
        self.round_trips.record(started.elapsed());
        Ok(())
    }

    /// Record this replica as live; returns how many replicas are (`heartbeat.lua`).
    pub async fn heartbeat(&self, replica: &str, ttl: Duration) -> Result<u32, StateError> {
        // Leases nobody took from since they expired are given back here at the latest.
        self.give_back(self.leases.expired(tokio::time::Instant::now()));
        let args = HeartbeatArgs {
            replica: replica.to_owned(),
            ttl_ms: ttl.as_millis() as u64,
            round_trip_us: self.round_trip().map(|rt| rt.as_micros() as u64),
            clock: self.clock(),
        }
        .to_args();
        let keys = vec![self.keys.replicas(), self.keys.replica_round_trips()];
        let reply = self.run(&self.scripts.heartbeat, keys, args).await?;
        Ok(int(&reply)?.clamp(1, i64::from(u32::MAX)) as u32)
    }

    pub fn windows(&self) -> Windows {
        self.windows
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl crate::store::ClockControl for RedisState {
    fn advance_clock(&self, by: Duration) {
        self.advance_pinned(by);
    }
}

#[async_trait]
impl FleetState for RedisState {
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
    ) -> Result<Admission, StateError> {
        let id = self.next_reservation_id();
        self.acquire_with_id(pool, candidates, estimated_tokens, id)
            .await
    }

    async fn acquire_in_turn(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        ticket: &Ticket,
    ) -> Result<Admission, StateError> {
        let id = self.next_reservation_id();
        let acquired = self
            .acquire_in_turn_charging(pool, candidates, estimated_tokens, (id, ticket))
            .await?;
        Ok(acquired.admission)
    }

    async fn leave_queue(&self, pool: &PoolName, ticket: &Ticket) -> Result<(), StateError> {
        let keys = vec![self.keys.queue(pool), self.keys.tickets(pool)];
        let args = LeaveArgs {
            ticket: ticket.id.clone(),
        }
        .to_args();
        self.run(&self.scripts.leave, keys, args).await.map(|_| ())
    }

    async fn settle(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        receipt: Receipt,
    ) -> Result<(), StateError> {
        if receipt.backoff.is_some() {
            // A failure ends this replica's lease on the member at once (others' leases end
            // within their time to live).
            self.give_back(self.leases.revoke(pool, backend));
        }
        // An admission on a lease that did not fail is summed with its member's others;
        // anything else is its own record.
        let work = if receipt.backoff.is_none() && receipt.reservation.id == 0 {
            Work::Summable(receipt)
        } else {
            Work::Record(self.receipt_record(Some(&receipt), receipt.backoff))
        };
        self.run_settle(pool, backend, work).await
    }

    async fn observe(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        hints: UpstreamHints,
        reservation: Reservation,
    ) -> Result<(), StateError> {
        // The settle script with no reservation, latency or backoff: hints only.
        let record = ReceiptRecord {
            remaining_tokens: hints.remaining_tokens,
            utilization: hints.utilization,
            ledger_mark: Some(reservation.ledger),
            hints_age_ms: hints.age().as_millis() as u64,
            ..self.receipt_record(None, None)
        };
        self.run_settle(pool, backend, Work::Record(record)).await
    }

    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError> {
        self.give_back(self.leases.revoke(pool, backend));
        let record = self.receipt_record(None, Some(backoff));
        self.run_settle(pool, backend, Work::Record(record)).await
    }

    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[Candidate],
    ) -> Result<PoolSnapshot, StateError> {
        if members.is_empty() {
            return Ok(PoolSnapshot {
                pool: pool.clone(),
                members: Vec::new(),
            });
        }
        let keys = members
            .iter()
            .flat_map(|c| {
                let k = self.member_keys(pool, &c.backend);
                [k.backoff, k.usage, k.latency, k.hints]
            })
            .collect();
        let args = SnapshotArgs {
            bucket_ms: self.windows.bucket_ms(),
            window_ms: self.windows.budget.as_millis() as u64,
            slot_ms: self.windows.slot_ms(),
            latency_window_ms: self.windows.latency.as_millis() as u64,
            clock: self.clock(),
        }
        .to_args();
        let reply = array(self.run(&self.scripts.snapshot, keys, args).await?)?;
        if reply.len() != members.len() {
            return Err(StateError::Protocol(format!(
                "snapshot returned {} members",
                reply.len()
            )));
        }
        let members: Vec<MemberSnapshot> = members
            .iter()
            .zip(reply)
            .map(|(c, entry)| parse_member(c, entry))
            .collect::<Result<_, _>>()?;
        // A member another replica has held back (a 429, an open breaker) is no longer
        // admitted on here either: this replica's lease on it ends now, not at its expiry.
        for held_back in members.iter().filter(|m| m.backoff.is_some()) {
            let ended = self.leases.end(pool, &held_back.backend);
            self.give_back(ended);
        }
        Ok(PoolSnapshot {
            pool: pool.clone(),
            members,
        })
    }

    /// `charge.lua`: usage admitted on a replica's own state, or a Realtime session's
    /// responses, added to the member's current bucket so the fleet counts it.
    async fn charge(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        tokens: u64,
        requests: u64,
    ) -> Result<(), StateError> {
        let k = self.member_keys(pool, backend);
        let args = ChargeArgs {
            tokens,
            requests,
            bucket_ms: self.windows.bucket_ms(),
            window_ms: self.windows.budget.as_millis() as u64,
            clock: self.clock(),
        }
        .to_args();
        self.run(&self.scripts.charge, vec![k.usage, k.hints], args)
            .await?;
        Ok(())
    }

    async fn pin_response(
        &self,
        response_id: &str,
        owner: &ResponseOwner,
        ttl: Duration,
    ) -> Result<(), StateError> {
        if response_id.len() > MAX_RESPONSE_ID_BYTES {
            return Ok(());
        }
        let keys = vec![self.keys.response(response_id)];
        let args = PinArgs {
            pool: owner.pool.to_string(),
            backend: owner.backend.to_string(),
            ttl_ms: (ttl.as_millis() as u64).max(1),
            consumer: owner.consumer.clone().unwrap_or_default(),
        }
        .to_args();
        self.run(&self.scripts.pin_response, keys, args)
            .await
            .map(|_| ())
    }

    async fn response_owner(&self, response_id: &str) -> Result<Option<ResponseOwner>, StateError> {
        if response_id.len() > MAX_RESPONSE_ID_BYTES {
            return Ok(None);
        }
        let (pool, backend, consumer): (Option<String>, Option<String>, Option<String>) = self
            .client
            .hmget(
                self.keys.response(response_id),
                vec!["pool", "backend", "consumer"],
            )
            .await
            .map_err(unavailable)?;
        Ok(match (pool, backend) {
            (Some(pool), Some(backend)) => Some(ResponseOwner {
                pool: PoolName::new(pool),
                backend: BackendId::new(backend),
                consumer: consumer.filter(|c| !c.is_empty()),
            }),
            _ => None,
        })
    }

    async fn record_spend(
        &self,
        hour_ms: u64,
        expires_at_ms: u64,
        lines: &[(SpendKey, SpendCounts)],
    ) -> Result<(), StateError> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut args = SpendArgs {
            expires_at_ms: expires_at_ms.max(1),
        }
        .to_args();
        for (key, counts) in lines {
            SpendEntry {
                line: key.line(),
                input: counts.input,
                cached: counts.cached,
                output: counts.output,
                requests: counts.requests,
            }
            .push_to(&mut args);
        }
        let keys = vec![self.keys.spend(hour_ms)];
        self.run(&self.scripts.spend, keys, args).await.map(|_| ())
    }

    async fn spend_between(
        &self,
        from_hour_ms: u64,
        to_hour_ms: u64,
    ) -> Result<Vec<HourLedger>, StateError> {
        // A week of hours per pipelined round trip.
        let starts: Vec<u64> = (crate::ledger::hour_of(from_hour_ms)..=to_hour_ms)
            .step_by(crate::ledger::HOUR_MS as usize)
            .collect();
        let mut hours = Vec::new();
        for week in starts.chunks(168) {
            let pipeline = self.client.pipeline();
            for hour in week {
                let () = pipeline
                    .hgetall(self.keys.spend(*hour))
                    .await
                    .map_err(unavailable)?;
            }
            let read: Vec<std::collections::HashMap<String, u64>> =
                pipeline.all().await.map_err(unavailable)?;
            for (hour, fields) in week.iter().zip(read) {
                if fields.is_empty() {
                    continue;
                }
                let mut lines = std::collections::BTreeMap::new();
                for (field, value) in &fields {
                    crate::ledger::read_field(&mut lines, field, *value);
                }
                hours.push((*hour, lines));
            }
        }
        Ok(hours)
    }

    async fn spend_quota(&self, counter: &QuotaCounter, tokens: u64) -> Result<u64, StateError> {
        if counter.name.len() > MAX_QUOTA_NAME_BYTES {
            return Err(StateError::Protocol("quota counter name too long".into()));
        }
        let keys = vec![self.keys.quota(&counter.name)];
        let args = QuotaArgs {
            tokens,
            expires_at_ms: counter.expires_at_ms.max(1),
        }
        .to_args();
        match self.run(&self.scripts.spend_quota, keys, args).await? {
            Value::Integer(total) => Ok(total.max(0) as u64),
            other => Err(StateError::Protocol(format!(
                "spend_quota answered {other:?}"
            ))),
        }
    }

    async fn ping(&self) -> Result<(), StateError> {
        let started = tokio::time::Instant::now();
        self.client.ping::<()>(None).await.map_err(unavailable)?;
        self.round_trips.record(started.elapsed());
        Ok(())
    }

    async fn close(&self) {
        // Refills on their way land first, so their leases are given back with the rest.
        let landed = async {
            for refill in self.leases.refill_locks() {
                drop(refill.lock().await);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), landed).await;
        let unused = self.leases.end_all();
        futures_util::future::join_all(unused.into_iter().map(|u| self.give_back_call(u))).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.given_back()).await;
    }

    async fn replicas(&self) -> Result<Vec<crate::store::ReplicaDistance>, StateError> {
        let seen: std::collections::HashMap<String, u64> = self
            .client
            .hgetall(self.keys.replica_round_trips())
            .await
            .map_err(unavailable)?;
        let mut replicas: Vec<_> = seen
            .into_iter()
            .map(|(replica, us)| crate::store::ReplicaDistance {
                replica,
                round_trip: Duration::from_micros(us),
            })
            .collect();
        replicas.sort_by(|a, b| a.replica.cmp(&b.replica));
        Ok(replicas)
    }

    fn describe(&self) -> String {
        "redis".into()
    }
}
