//! The `FleetState` contract: the request/receipt types every store implements.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

/// Name of a backend (an Azure OpenAI resource) as configured: `ptu-eastus`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(Arc<str>);

/// Name a client puts in its URL (`gpt-4o`); the pool of deployments that serve it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolName(Arc<str>);

macro_rules! name_type {
    ($t:ident) => {
        impl $t {
            pub fn new(name: impl AsRef<str>) -> Self {
                Self(Arc::from(name.as_ref()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl From<&str> for $t {
            fn from(name: &str) -> Self {
                Self::new(name)
            }
        }
    };
}
name_type!(BackendId);
name_type!(PoolName);

/// Why a deployment is being avoided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackoffReason {
    /// The upstream answered 429.
    Throttled,
    /// The upstream answered 5xx.
    ServerError,
    /// The upstream rejected the gateway's own credential (401/403).
    AuthRejected,
    /// Connection refused, reset, or TLS failure.
    Unreachable,
    /// No response within the attempt timeout.
    Timeout,
    /// A response body (a stream) the upstream broke off mid-way.
    StreamCut,
    /// The breaker let one request through to probe a recovered member; others wait.
    Probing,
}

impl BackoffReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Throttled => "throttled",
            Self::ServerError => "server_error",
            Self::AuthRejected => "auth_rejected",
            Self::Unreachable => "unreachable",
            Self::Timeout => "timeout",
            Self::StreamCut => "stream_cut",
            Self::Probing => "probing",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            Self::Throttled,
            Self::ServerError,
            Self::AuthRejected,
            Self::Unreachable,
            Self::Timeout,
            Self::StreamCut,
            Self::Probing,
        ]
        .into_iter()
        .find(|r| r.as_str() == text)
    }
}

impl fmt::Display for BackoffReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// "Avoid this deployment for `duration`, because `reason`".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub duration: Duration,
    pub reason: BackoffReason,
}

/// A pool member offered to [`FleetState::acquire`], with its budget per window.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub backend: BackendId,
    /// Tokens per budget window (TPM with the default one-minute window); `None`: unlimited.
    pub tokens_per_window: Option<u64>,
    /// Requests per budget window; `None`: unlimited.
    pub requests_per_window: Option<u64>,
    /// Skip it while a fresh hint says its utilization is at or above this share.
    pub spill_utilization: Option<f64>,
    /// Its tier (the backend's priority). Candidates come in preference order, and a later
    /// tier is used only once every earlier one refused; inside a tier the order is advice,
    /// so a replica may admit on any member of the tier it holds a lease for.
    pub tier: u32,
    /// A lower traffic class's line on this member: admitted only while the window's
    /// tokens, this request's included, stay at or below it (a PTU's `budget × (1 −
    /// reserve)`, the rest kept for the top class). Decided in the same atomic step that
    /// admits; never on a lease. `None`: no line.
    pub ceiling: Option<u64>,
}

impl Candidate {
    pub fn unlimited(backend: BackendId) -> Self {
        Self {
            backend,
            tokens_per_window: None,
            requests_per_window: None,
            spill_utilization: None,
            tier: 0,
            ceiling: None,
        }
    }
}

/// Tokens and a request charged to a member's window by `acquire`, to be settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Start of the window bucket charged, in the store's clock (milliseconds).
    pub bucket_ms: u64,
    /// Tokens charged (the estimate).
    pub tokens: u64,
    /// The member's running count of admitted tokens, this request included: tokens
    /// admitted after it are what its upstream's `remaining_tokens` did not yet see.
    pub ledger: u64,
    /// When it was admitted, in the store's clock (ms): the breaker's epoch. An outcome of a
    /// request admitted before the breaker last opened can neither close it nor open it again.
    pub admitted_ms: u64,
    /// The store that issued it: a reservation is settled only there.
    pub issuer: Issuer,
    /// Its id in the issuing store (0: none): a settle applies once, and a reservation whose
    /// acquire was abandoned can be released by it.
    pub id: u64,
}

/// Which kind of store issued a reservation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Issuer {
    #[default]
    Embedded,
    Redis,
}

/// Answer to [`FleetState::acquire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Send the request to this backend; its estimate is reserved.
    Admitted {
        backend: BackendId,
        reservation: Reservation,
    },
    /// No candidate admits now; the earliest one will in `retry_after`.
    Exhausted {
        retry_after: Duration,
        /// True when a candidate is held back by a 429 or by its budget (not a failure).
        throttled: bool,
    },
}

/// Latency of one completed response (and what its prompt cache served).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySample {
    /// Time to the first byte of the response body.
    pub ttfb: Duration,
    /// Time to the last byte.
    pub total: Duration,
    /// Output tokens, to derive time per output token; 0 when unknown.
    pub output_tokens: u64,
    /// Prompt tokens the answer reported, and those the deployment's prompt cache served
    /// (the pool's cache hit share); 0 when unknown.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
}

/// What the upstream said about its own capacity.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamHints {
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u64>,
    /// `azure-openai-deployment-utilization`, as a share (0.95 = 95 %).
    pub utilization: Option<f64>,
    /// When the response head carrying them arrived (this replica's clock). A store keeps
    /// the newest observation: hints observed earlier never replace later ones, whatever
    /// order they are settled in. `None`: observed now.
    pub observed: Option<tokio::time::Instant>,
}

impl UpstreamHints {
    /// How long ago they were observed.
    pub fn age(&self) -> Duration {
        self.observed.map_or(Duration::ZERO, |at| at.elapsed())
    }

    pub fn is_empty(&self) -> bool {
        self.remaining_tokens.is_none() && self.utilization.is_none()
    }
}

/// What became of an admitted request.
#[derive(Clone, Debug, PartialEq)]
pub struct Receipt {
    pub reservation: Reservation,
    /// Tokens really used (from `usage`); replaces the reservation's estimate.
    pub tokens: u64,
    pub latency: Option<LatencySample>,
    pub hints: UpstreamHints,
    /// Hold the member back, in the same round trip (the attempt failed).
    pub backoff: Option<Backoff>,
}

/// Latency histogram bucket bounds: powers of two from 1 ms to 65,536 ms, then overflow.
pub const LATENCY_BOUNDS_MS: [u64; 17] = {
    let mut bounds = [0u64; 17];
    let mut i = 0;
    while i < 17 {
        bounds[i] = 1 << i;
        i += 1;
    }
    bounds
};

/// Counts per latency bucket: `counts[i]` samples were `<= LATENCY_BOUNDS_MS[i]`
/// (the last slot counts everything larger).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Histogram {
    pub counts: [u64; LATENCY_BOUNDS_MS.len() + 1],
}

impl Histogram {
    pub fn bucket_of(ms: u64) -> usize {
        LATENCY_BOUNDS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BOUNDS_MS.len())
    }

    pub fn record(&mut self, ms: u64) {
        self.counts[Self::bucket_of(ms)] += 1;
    }

    pub fn samples(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1); `None` without samples.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let total = self.samples();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }
}

/// Latency of a member over the latency window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencyHistograms {
    pub ttfb_ms: Histogram,
    pub total_ms: Histogram,
    pub ms_per_output_token: Histogram,
    /// Output tokens of completed requests: what the pool's answers really take (the
    /// learned output reserve of a request that names no cap).
    pub output_tokens: Histogram,
}

/// What a store knows about one pool member right now.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberSnapshot {
    pub backend: BackendId,
    /// Remaining backoff and its reason; `None` when the member is usable.
    pub backoff: Option<Backoff>,
    /// Tokens and requests charged in the current budget window.
    pub tokens_used: u64,
    pub requests_used: u64,
    pub hints: UpstreamHints,
    pub latency: LatencyHistograms,
    /// Estimated and real tokens of completed requests, summed (estimation error = the gap).
    pub estimated_tokens: u64,
    pub actual_tokens: u64,
    /// Prompt tokens of completed requests, and those served from the prompt cache.
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
}

/// Everything a router or operator needs about a pool, in one call.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolSnapshot {
    pub pool: PoolName,
    pub members: Vec<MemberSnapshot>,
}

/// Time shape shared by every store: the budget window and the latency window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Windows {
    /// Budget window (a minute for TPM/RPM); tests shorten it.
    pub budget: Duration,
    /// The budget window is counted in this many buckets; a bucket leaves the window whole.
    pub budget_buckets: u32,
    /// Latency samples are kept this long.
    pub latency: Duration,
    /// ... in this many slots.
    pub latency_slots: u32,
    /// An upstream's capacity hints (utilization, remaining tokens) are trusted this long.
    pub hint_ttl: Duration,
    /// Circuit breaker: consecutive failures (not throttling) that open it.
    pub breaker_failures: u32,
    /// After a cool-down, one request probes; others wait this long for its outcome.
    pub breaker_probe: Duration,
    /// Cool-downs double with each consecutive opening, up to this.
    pub breaker_max: Duration,
    /// The breaker also opens when this share of a member's outcomes in `breaker_window`
    /// failed, once there are at least `breaker_min_requests` of them.
    pub breaker_failure_rate: f64,
    pub breaker_min_requests: u32,
    pub breaker_window: Duration,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            budget: Duration::from_secs(60),
            budget_buckets: 60,
            latency: Duration::from_secs(300),
            latency_slots: 5,
            hint_ttl: Duration::from_secs(1),
            breaker_failures: 1,
            breaker_probe: Duration::from_secs(5),
            breaker_max: Duration::from_secs(300),
            breaker_failure_rate: 0.5,
            breaker_min_requests: 20,
            breaker_window: Duration::from_secs(30),
        }
    }
}

impl Windows {
    pub fn bucket_ms(&self) -> u64 {
        (self.budget.as_millis() as u64 / u64::from(self.budget_buckets.max(1))).max(1)
    }

    pub fn slot_ms(&self) -> u64 {
        (self.latency.as_millis() as u64 / u64::from(self.latency_slots.max(1))).max(1)
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StateError {
    #[error("fleet state store unavailable: {0}")]
    Unavailable(String),
    #[error("fleet state store answered something unexpected: {0}")]
    Protocol(String),
}

/// Where a stored Responses API object lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseOwner {
    pub pool: PoolName,
    pub backend: BackendId,
    /// Who created it: an opaque tag of the consumer (a hash of its name), `None` when the
    /// gateway authenticates no one. Only the same tag may read, continue or delete it.
    pub consumer: Option<String>,
}

/// A long-period counter: a consumer's token quota for one hour, day, week or month. The
/// name identifies the consumer and the period (so a new period is a new counter); the
/// counter is forgotten at `expires_at_ms` (unix time), the period's end.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct QuotaCounter {
    pub name: String,
    pub expires_at_ms: u64,
}

/// A request's place in its pool's queue: requests of a class that waits for the PTU are
/// admitted oldest first, fleet-wide ([`FleetState::acquire_in_turn`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// Unique in the fleet (the replica's id and a counter); at most
    /// [`MAX_TICKET_ID_BYTES`].
    pub id: String,
    /// The ticket stops holding its place this long after its holder last asked: a replica
    /// that died, or a client that left without a word, blocks no one for longer.
    pub alive: Duration,
}

/// Ticket ids longer than this are refused (they become members of a shared queue).
pub const MAX_TICKET_ID_BYTES: usize = 128;

/// Quota counter names longer than this are refused (they become keys).
pub const MAX_QUOTA_NAME_BYTES: usize = 512;

/// Response ids longer than this are never remembered nor looked up (a client's path
/// segment must not become an unbounded key).
pub const MAX_RESPONSE_ID_BYTES: usize = 256;

/// The shared view of the world. Every operation is atomic in its store.
#[async_trait]
pub trait FleetState: Send + Sync + 'static {
    /// The first of `candidates` (in preference order) not in backoff and with budget left
    /// for `estimated_tokens` and one request; that estimate is reserved on it.
    async fn acquire(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
    ) -> Result<Admission, StateError>;

    /// `acquire` in turn: the request holds `ticket` in the pool's queue (joining it at the
    /// end on its first call, kept alive by every call) and is admitted only when each
    /// candidate's room also covers the estimates of the live tickets ahead of it, counted as
    /// used. Admitted, the ticket leaves the queue; refused, it keeps its place. Tickets not
    /// renewed within their `alive` time leave by themselves. Never on a lease.
    async fn acquire_in_turn(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        ticket: &Ticket,
    ) -> Result<Admission, StateError>;

    /// Take `ticket` out of the pool's queue (its client left, or it stopped waiting).
    async fn leave_queue(&self, pool: &PoolName, ticket: &Ticket) -> Result<(), StateError>;

    /// Replace a reservation by the real outcome; record latency and hints; optionally back off.
    async fn settle(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        receipt: Receipt,
    ) -> Result<(), StateError>;

    /// Record an upstream's capacity hints as soon as its response head arrives (a stream
    /// settles only at its end), unless newer ones are held. `reservation` is the request's.
    async fn observe(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        hints: UpstreamHints,
        reservation: Reservation,
    ) -> Result<(), StateError>;

    /// Hold `backend` back in `pool` for the given time, keeping a later existing deadline.
    async fn backoff(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        backoff: Backoff,
    ) -> Result<(), StateError>;

    /// The state of the given pool members, in the order given.
    async fn snapshot(
        &self,
        pool: &PoolName,
        members: &[Candidate],
    ) -> Result<PoolSnapshot, StateError>;

    /// Add usage that no reservation covered (each response of a Realtime session) to the
    /// member's current bucket. No budget check: it was served.
    async fn charge(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        tokens: u64,
        requests: u64,
    ) -> Result<(), StateError>;

    /// Remember, for `ttl`, that `owner` holds the stored Responses API object `response_id`:
    /// only the resource that created a response knows it, so follow-ups go there.
    async fn pin_response(
        &self,
        response_id: &str,
        owner: &ResponseOwner,
        ttl: Duration,
    ) -> Result<(), StateError>;

    /// The member holding `response_id`, while remembered.
    async fn response_owner(&self, response_id: &str) -> Result<Option<ResponseOwner>, StateError>;

    /// Add served usage to the cost ledger's hour starting at `hour_ms` (unix ms), kept
    /// until `expires_at_ms`.
    async fn record_spend(
        &self,
        hour_ms: u64,
        expires_at_ms: u64,
        lines: &[(crate::ledger::SpendKey, crate::ledger::SpendCounts)],
    ) -> Result<(), StateError>;

    /// The cost ledger's hours from `from_hour_ms` to `to_hour_ms` (unix ms, inclusive),
    /// those that hold anything.
    async fn spend_between(
        &self,
        from_hour_ms: u64,
        to_hour_ms: u64,
    ) -> Result<Vec<crate::ledger::HourLedger>, StateError>;

    /// Add `tokens` to a quota counter and return its total; 0 tokens reads it.
    async fn spend_quota(&self, counter: &QuotaCounter, tokens: u64) -> Result<u64, StateError>;

    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StateError>;

    /// The replica is stopping: give back what it holds for itself (budget leases), so the
    /// fleet can spend it at once.
    async fn close(&self) {}

    /// The live replicas sharing this store and how far each is from it, as each last
    /// reported (empty for a store of one replica's own).
    async fn replicas(&self) -> Result<Vec<ReplicaDistance>, StateError> {
        Ok(Vec::new())
    }

    /// A word for operators: `embedded`, `redis`, `redis (degraded: embedded fallback)`.
    fn describe(&self) -> String;

    /// Whether decisions are being made on a fallback store, for metrics.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }
}

/// Test hook: move a store's clock forward, so the contract suite can run time-driven rules
/// (cool-downs, probes, windows) on every store without waiting.
#[doc(hidden)]
pub trait ClockControl: Send + Sync {
    fn advance_clock(&self, by: Duration);
}

/// A live replica and its round trip to the shared store, as it measured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaDistance {
    pub replica: String,
    pub round_trip: Duration,
}

/// A store's health, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreHealth {
    /// Deciding on this replica's embedded state because Redis is unreachable or slow.
    pub degraded: bool,
    /// Decisions taken on the fallback since start.
    pub fallback_decisions: u64,
    /// The typical round trip to Redis, as this replica measures it (`None`: no Redis, or
    /// nothing measured yet).
    pub round_trip: Option<Duration>,
    /// How long a call to Redis may take before it is abandoned, following the round trip.
    pub call_timeout: Option<Duration>,
    /// Requests that waited for a round trip to Redis to be admitted (the rest were admitted
    /// on a budget lease).
    pub acquires_waited: u64,
}
