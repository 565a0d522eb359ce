//! Budget leases: a replica that admits many requests on a member takes several admissions
//! from Redis in one `acquire.lua` call and hands them out itself, so most requests need no
//! round trip. Everything here is this replica's own bookkeeping; Redis holds the charge.
//!
//! A lease is a count of requests and tokens already charged to one bucket of a member's
//! window (the `pending` entry `id` in Redis). It lives for `ttl`; what is left when it ends
//! (expired, replaced, or revoked by a failure on that member) is given back by id.
//!
//! A lease is sized by demand and distance: it lives `ttl` plus two round trips to Redis (its
//! horizon), and covers what this replica admitted in the pool per `ttl` lately, over that
//! horizon, capped by `max_requests` per `ttl` (and by the script, which never grants more than
//! an eighth of the budget left). A replica admitting fewer than two requests per `ttl` asks
//! for none.
//!
//! Leases are refilled ahead of demand: once a lease holds no more than what demand takes in
//! two round trips and 5 ms (or has that little time left), one refill per pool is sent
//! in the background and requests go on admitting on what is left meanwhile. A request waits
//! for Redis only when no lease is held and none is coming.
//!
//! While a replica admits on a lease for a lower-preference member, the members the script
//! passed over are not asked again for `ttl`: the lease is only worth having if a request does
//! not first go to Redis to hear that the PTU is still full.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{BackendId, Issuer, PoolName, Reservation};

/// A refill is sent when the lease holds what demand takes in two round trips plus this: one
/// round trip for the refill, one for the jitter around it.
const REFILL_MARGIN: Duration = Duration::from_millis(5);

/// How leases are sized and how long they live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeasePolicy {
    /// Most requests one lease covers; below 2, leases are off (every request asks Redis).
    pub max_requests: u32,
    /// How long a lease (and a passed-over member's refusal) is trusted.
    pub ttl: Duration,
}

impl LeasePolicy {
    /// No leases: every admission is one `acquire.lua` call (the store's exact contract).
    pub const OFF: Self = Self {
        max_requests: 0,
        ttl: Duration::ZERO,
    };

    pub fn enabled(&self) -> bool {
        self.max_requests >= 2 && !self.ttl.is_zero()
    }
}

/// What a lease had left when it ended: to be given back to Redis by its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unused {
    pub pool: PoolName,
    pub backend: BackendId,
    pub id: u64,
    pub tokens: u64,
    pub requests: u64,
}

struct Lease {
    id: u64,
    bucket_ms: u64,
    ledger: u64,
    admitted_ms: u64,
    tokens: u64,
    requests: u64,
    expires: Instant,
}

impl Lease {
    fn unused(&self, key: &Key) -> Option<Unused> {
        (self.requests > 0 || self.tokens > 0).then(|| Unused {
            pool: key.0.clone(),
            backend: key.1.clone(),
            id: self.id,
            tokens: self.tokens,
            requests: self.requests,
        })
    }
}

/// Admissions in one pool in the current and the previous `ttl`-long period.
#[derive(Default)]
struct Demand {
    period_start: Option<Instant>,
    current: u32,
    previous: u32,
}

type Key = (PoolName, BackendId);

#[derive(Default)]
struct Book {
    leases: HashMap<Key, Lease>,
    /// Members a lease-granting acquire passed over: not asked again before this instant.
    passed_over: HashMap<Key, Instant>,
    demand: HashMap<PoolName, Demand>,
    /// Per pool, the lock a refill holds: requests that find no lease to admit them wait for
    /// the refill on its way instead of each asking Redis for a lease of their own.
    refills: HashMap<PoolName, Arc<tokio::sync::Mutex<()>>>,
    /// Pools with a refill ahead of demand in flight.
    refilling: std::collections::HashSet<PoolName>,
    /// Bumped whenever a lease in the pool is revoked or ended: a refill sent before lands
    /// given back whole, not handed out.
    epochs: HashMap<PoolName, u64>,
    /// How much more than the admissions counted a pool's leases are sized for (1 to
    /// [`MAX_GROWTH`]): admissions wait while a lease is dry, so they undercount what the
    /// requests would take. Doubled each time a lease runs dry, less one at each refill that
    /// lands before it does.
    growth: HashMap<PoolName, u32>,
    /// Pools whose lease ran dry since their last grant (it grows once per dry spell).
    dried: std::collections::HashSet<PoolName>,
}

/// The most a pool's leases grow past its counted demand.
const MAX_GROWTH: u32 = 8;

/// This replica's leases, by pool member.
pub struct Leases {
    policy: LeasePolicy,
    book: Mutex<Book>,
}

/// What one `acquire.lua` call admitted on a member.
pub struct Grant<'a> {
    pub pool: &'a PoolName,
    pub backend: &'a BackendId,
    /// The caller's own admission: the lease's bucket, ledger and breaker epoch.
    pub first: &'a Reservation,
    /// The id Redis holds the whole grant under (what a lease is given back by).
    pub id: u64,
    /// Requests admitted: 1, or the caller's and a lease of the rest.
    pub requests: u64,
    /// The candidates the script refused before this one.
    pub passed_over: &'a [BackendId],
    /// Whether a request is among `requests` (it asked); a refill ahead of demand leases
    /// them all.
    pub caller: bool,
    /// A refill's [`Leases::epoch`] when it was sent: revoked since, the grant is given back.
    pub sent_at: Option<u64>,
}

/// What the book says about a candidate, in preference order.
pub enum Local {
    /// Admitted on a lease: no round trip.
    Admitted(Reservation),
    /// Passed over by a recent lease-granting acquire: skip it.
    PassedOver,
    /// Its lease is live but spent (or holds too little for this request): ask Redis; the
    /// pool's leases ran dry.
    Dry,
    /// Ask Redis.
    Ask,
}

impl Leases {
    pub fn new(policy: LeasePolicy) -> Self {
        Self {
            policy,
            book: Mutex::new(Book::default()),
        }
    }

    pub fn policy(&self) -> LeasePolicy {
        self.policy
    }

    /// How long a lease granted now lives, `round_trip` from Redis: `ttl` of use after the
    /// round trip that brings the next one, and the one that gives it back.
    pub fn horizon(&self, round_trip: Duration) -> Duration {
        self.policy.ttl + 2 * round_trip
    }

    /// Take one admission of `tokens` on `backend` from its lease, if one is live and holds
    /// enough. An expired lease is removed; its unused part is returned for giving back.
    pub fn take(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        tokens: u64,
        now: Instant,
    ) -> (Local, Option<Unused>) {
        let key = (pool.clone(), backend.clone());
        let mut book = self.book.lock().expect("lease book");
        let mut spent = false;
        if let Some(lease) = book.leases.get_mut(&key) {
            if lease.expires > now {
                spent = true;
                if lease.requests >= 1 && lease.tokens >= tokens {
                    lease.requests -= 1;
                    lease.tokens -= tokens;
                    let reservation = Reservation {
                        bucket_ms: lease.bucket_ms,
                        tokens,
                        ledger: lease.ledger,
                        admitted_ms: lease.admitted_ms,
                        issuer: Issuer::Redis,
                        id: 0,
                    };
                    book.demand
                        .entry(key.0)
                        .or_default()
                        .count(now, self.policy.ttl);
                    return (Local::Admitted(reservation), None);
                }
            } else {
                let ended = book.leases.remove(&key);
                let unused = ended.and_then(|l| l.unused(&key));
                return (self.passed_over(&mut book, key, now), unused);
            }
        }
        match self.passed_over(&mut book, key, now) {
            Local::Ask if spent => (Local::Dry, None),
            local => (local, None),
        }
    }

    fn passed_over(&self, book: &mut Book, key: Key, now: Instant) -> Local {
        match book.passed_over.get(&key) {
            Some(&until) if until > now => Local::PassedOver,
            Some(_) => {
                book.passed_over.remove(&key);
                Local::Ask
            }
            None => Local::Ask,
        }
    }

    /// While `pool`'s demand asks for leases, one refill at a time: the lock to hold around
    /// the acquire (and to take the lease again under, in case another request refilled it).
    /// None below that demand: requests then ask Redis each for itself, none waits for another.
    pub fn refill_lock(
        &self,
        pool: &PoolName,
        now: Instant,
    ) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let mut book = self.book.lock().expect("lease book");
        if self.demand(&mut book, pool, now) < 2 {
            return None;
        }
        Some(book.refills.entry(pool.clone()).or_default().clone())
    }

    /// How many requests to ask for in `pool` (0: no lease): this replica's demand over a
    /// lease's horizon at `round_trip` from Redis.
    pub fn wanted(&self, pool: &PoolName, now: Instant, round_trip: Duration) -> u32 {
        if !self.policy.enabled() {
            return 0;
        }
        let mut book = self.book.lock().expect("lease book");
        let counted = self.demand(&mut book, pool, now);
        if counted < 2 {
            return 0;
        }
        let recent = counted.saturating_mul(Self::growth_of(&book, pool));
        let ttl = self.policy.ttl.as_secs_f64();
        let periods = self.horizon(round_trip).as_secs_f64() / ttl;
        // The cap never makes a replica wait: a lease may hold twice what demand takes until
        // the next one can land (so a refill leaves when it is half used), however far Redis
        // is; the script's eighth of the budget left still bounds it.
        let bridge = self.low_water(recent, round_trip);
        let cap = (f64::from(self.policy.max_requests) * periods).max(2.0 * bridge) as u32;
        ((f64::from(recent) * periods).ceil() as u32).min(cap)
    }

    /// Admissions in `pool` per `ttl` lately.
    fn demand(&self, book: &mut Book, pool: &PoolName, now: Instant) -> u32 {
        let demand = book.demand.entry(pool.clone()).or_default();
        demand.roll(now, self.policy.ttl);
        demand.per_period(now, self.policy.ttl)
    }

    /// What `recent` admissions per `ttl` take in two round trips and [`REFILL_MARGIN`]: the
    /// lease level at which a refill is sent.
    fn low_water(&self, recent: u32, round_trip: Duration) -> f64 {
        let ahead = 2 * round_trip + REFILL_MARGIN;
        (f64::from(recent) * ahead.as_secs_f64() / self.policy.ttl.as_secs_f64()).ceil()
    }

    /// After an admission on `backend`'s lease: whether to refill `pool`'s leases now, ahead
    /// of demand (the lease holds what two round trips and 5 ms take, or has that little
    /// time left). True at most once until [`Self::refill_done`].
    pub fn refill_due(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        now: Instant,
        round_trip: Duration,
    ) -> bool {
        let mut book = self.book.lock().expect("lease book");
        if book.refilling.contains(pool) {
            return false;
        }
        let counted = self.demand(&mut book, pool, now);
        let Some(lease) = book.leases.get(&(pool.clone(), backend.clone())) else {
            return false;
        };
        if counted < 2 {
            return false;
        }
        let recent = counted.saturating_mul(Self::growth_of(&book, pool));
        let low = self.low_water(recent, round_trip) as u64;
        let due = lease.requests <= low || lease.expires <= now + 2 * round_trip + REFILL_MARGIN;
        if due {
            book.refilling.insert(pool.clone());
        }
        due
    }

    /// A request found `pool`'s lease spent ([`Local::Dry`]) before its refill landed (or with
    /// none coming): size the pool's next leases for more than the admissions counted.
    pub fn ran_dry(&self, pool: &PoolName) {
        let mut book = self.book.lock().expect("lease book");
        if book.dried.insert(pool.clone()) {
            let growth = book.growth.entry(pool.clone()).or_insert(1);
            *growth = (*growth * 2).min(MAX_GROWTH);
        }
    }

    fn growth_of(book: &Book, pool: &PoolName) -> u32 {
        book.growth.get(pool).copied().unwrap_or(1)
    }

    /// `pool`'s revocation count: a refill notes it when sent, and its grant is kept only if
    /// no lease was revoked meanwhile ([`Grant::sent_at`]).
    pub fn epoch(&self, pool: &PoolName) -> u64 {
        let book = self.book.lock().expect("lease book");
        book.epochs.get(pool).copied().unwrap_or(0)
    }

    /// The refill [`Self::refill_due`] asked for has landed (or failed).
    pub fn refill_done(&self, pool: &PoolName) {
        let mut book = self.book.lock().expect("lease book");
        book.refilling.remove(pool);
    }

    /// An acquire admitted `grant`, to live `horizon`; returns the unused part of a lease it
    /// replaces.
    pub fn admitted(&self, grant: Grant<'_>, now: Instant, horizon: Duration) -> Option<Unused> {
        let Grant {
            pool,
            backend,
            first,
            id: lease_id,
            requests,
            passed_over,
            caller,
            sent_at,
        } = grant;
        let key = (pool.clone(), backend.clone());
        let mut book = self.book.lock().expect("lease book");
        let epoch = book.epochs.get(pool).copied().unwrap_or(0);
        if sent_at.is_some_and(|sent| sent != epoch) {
            // A failure or another replica's backoff ended leases while this was on its way.
            return (requests > 0).then(|| Unused {
                pool: pool.clone(),
                backend: backend.clone(),
                id: lease_id,
                tokens: first.tokens * requests,
                requests,
            });
        }
        if caller {
            book.demand
                .entry(pool.clone())
                .or_default()
                .count(now, self.policy.ttl);
        }
        let leased = if caller {
            requests.saturating_sub(1)
        } else {
            requests
        };
        if leased == 0 {
            return None;
        }
        book.dried.remove(pool);
        let expires = now + horizon;
        for skipped in passed_over {
            book.passed_over
                .insert((pool.clone(), skipped.clone()), expires);
        }
        let lease = Lease {
            id: lease_id,
            bucket_ms: first.bucket_ms,
            ledger: first.ledger,
            admitted_ms: first.admitted_ms,
            tokens: first.tokens * leased,
            requests: leased,
            expires,
        };
        let replaced = book.leases.insert(key.clone(), lease);
        if !caller && replaced.as_ref().is_some_and(|l| l.requests > 0) {
            // The refill landed before the lease ran dry: grow less.
            if let Some(growth) = book.growth.get_mut(pool) {
                *growth = (*growth - 1).max(1);
            }
        }
        replaced.and_then(|l| l.unused(&key))
    }

    /// A request on `backend` failed (or its upstream said it is full): end its lease, and
    /// let every member be asked again.
    pub fn revoke(&self, pool: &PoolName, backend: &BackendId) -> Option<Unused> {
        let key = (pool.clone(), backend.clone());
        let mut book = self.book.lock().expect("lease book");
        book.passed_over.retain(|(p, _), _| p != pool);
        Self::end_lease(&mut book, key)
    }

    /// Another replica held `backend` back: end this replica's lease on it (the members
    /// passed over stay so: the fleet's view has not changed for them).
    pub fn end(&self, pool: &PoolName, backend: &BackendId) -> Option<Unused> {
        let key = (pool.clone(), backend.clone());
        let mut book = self.book.lock().expect("lease book");
        Self::end_lease(&mut book, key)
    }

    /// Remove a lease; if there was one, a refill on its way in its pool is given back when it
    /// lands (it was asked for on a view this ending just changed).
    fn end_lease(book: &mut Book, key: Key) -> Option<Unused> {
        let ended = book.leases.remove(&key)?;
        *book.epochs.entry(key.0.clone()).or_default() += 1;
        ended.unused(&key)
    }

    /// Every pool's refill lock: held by a refill on its way (a stopping replica waits for
    /// them, so what they bring is given back too).
    pub fn refill_locks(&self) -> Vec<Arc<tokio::sync::Mutex<()>>> {
        let book = self.book.lock().expect("lease book");
        book.refills.values().cloned().collect()
    }

    /// End every lease (the replica is stopping); their unused parts, for giving back.
    pub fn end_all(&self) -> Vec<Unused> {
        let mut book = self.book.lock().expect("lease book");
        book.passed_over.clear();
        book.leases
            .drain()
            .filter_map(|(key, lease)| lease.unused(&key))
            .collect()
    }

    /// Remove every expired lease; their unused parts, for giving back.
    pub fn expired(&self, now: Instant) -> Vec<Unused> {
        let mut book = self.book.lock().expect("lease book");
        book.passed_over.retain(|_, until| *until > now);
        let ended: Vec<Key> = book
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        ended
            .into_iter()
            .filter_map(|key| book.leases.remove(&key).and_then(|l| l.unused(&key)))
            .collect()
    }
}

impl Demand {
    fn roll(&mut self, now: Instant, period: Duration) {
        match self.period_start {
            Some(start) if now < start + period => {}
            Some(start) if now < start + 2 * period => {
                self.previous = self.current;
                self.current = 0;
                self.period_start = Some(start + period);
            }
            _ => {
                self.previous = 0;
                self.current = 0;
                self.period_start = Some(now);
            }
        }
    }

    fn count(&mut self, now: Instant, period: Duration) {
        self.roll(now, period);
        self.current = self.current.saturating_add(1);
    }

    /// Admissions per `period` lately: the previous period's, or the current one's pace if
    /// higher (a burst counts at once, not a period later). The pace is taken over at least a
    /// quarter period, so the first admissions of a period do not read as a flood.
    fn per_period(&self, now: Instant, period: Duration) -> u32 {
        if self.current < 2 {
            return self.previous.max(self.current);
        }
        let elapsed = self
            .period_start
            .map_or(period, |start| now.saturating_duration_since(start))
            .clamp(period / 4, period);
        let pace = f64::from(self.current) * period.as_secs_f64() / elapsed.as_secs_f64();
        self.previous.max(pace.ceil() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HORIZON: Duration = Duration::from_millis(100);

    fn policy() -> LeasePolicy {
        LeasePolicy {
            max_requests: 8,
            ttl: Duration::from_millis(100),
        }
    }

    fn first(tokens: u64) -> Reservation {
        Reservation {
            bucket_ms: 1000,
            tokens,
            ledger: 7,
            admitted_ms: 5,
            issuer: Issuer::Redis,
            id: 0,
        }
    }

    fn grant<'a>(
        pool: &'a PoolName,
        backend: &'a BackendId,
        first: &'a Reservation,
        id: u64,
        requests: u64,
        passed_over: &'a [BackendId],
    ) -> Grant<'a> {
        Grant {
            pool,
            backend,
            first,
            id,
            requests,
            passed_over,
            caller: true,
            sent_at: None,
        }
    }

    fn names() -> (PoolName, BackendId, BackendId) {
        (
            PoolName::new("p"),
            BackendId::new("ptu"),
            BackendId::new("payg"),
        )
    }

    #[test]
    fn a_lease_admits_what_it_holds_then_asks_again() {
        let (pool, ptu, _) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        assert!(
            leases
                .admitted(
                    Grant {
                        pool: &pool,
                        backend: &ptu,
                        first: &first(10),
                        id: 9,
                        requests: 3,
                        passed_over: &[],
                        caller: true,
                        sent_at: None,
                    },
                    now,
                    HORIZON,
                )
                .is_none()
        );
        for _ in 0..2 {
            let (local, unused) = leases.take(&pool, &ptu, 10, now);
            let Local::Admitted(r) = local else {
                panic!("expected a lease admission")
            };
            assert_eq!((r.bucket_ms, r.tokens, r.ledger, r.id), (1000, 10, 7, 0));
            assert!(unused.is_none());
        }
        assert!(
            matches!(leases.take(&pool, &ptu, 10, now).0, Local::Dry),
            "spent: ask Redis, the lease ran dry"
        );
    }

    #[test]
    fn a_larger_request_than_the_lease_holds_asks_redis() {
        let (pool, ptu, _) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        leases.admitted(grant(&pool, &ptu, &first(10), 9, 3, &[]), now, HORIZON);
        assert!(matches!(leases.take(&pool, &ptu, 25, now).0, Local::Dry));
        assert!(matches!(
            leases.take(&pool, &ptu, 20, now).0,
            Local::Admitted(_)
        ));
    }

    #[test]
    fn an_expired_lease_gives_back_what_it_did_not_use() {
        let (pool, ptu, _) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        leases.admitted(grant(&pool, &ptu, &first(10), 9, 4, &[]), now, HORIZON);
        leases.take(&pool, &ptu, 10, now);
        let later = now + Duration::from_millis(100);
        let (local, unused) = leases.take(&pool, &ptu, 10, later);
        assert!(matches!(local, Local::Ask));
        assert_eq!(
            unused,
            Some(Unused {
                pool: pool.clone(),
                backend: ptu.clone(),
                id: 9,
                tokens: 20,
                requests: 2
            })
        );
        assert!(leases.expired(later).is_empty());
    }

    #[test]
    fn passed_over_members_are_skipped_until_the_lease_ends_or_a_failure() {
        let (pool, ptu, payg) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        leases.admitted(
            grant(&pool, &payg, &first(10), 9, 4, std::slice::from_ref(&ptu)),
            now,
            HORIZON,
        );
        assert!(matches!(
            leases.take(&pool, &ptu, 10, now).0,
            Local::PassedOver
        ));
        assert!(matches!(
            leases
                .take(&pool, &ptu, 10, now + Duration::from_millis(100))
                .0,
            Local::Ask
        ));
        leases.admitted(
            grant(&pool, &payg, &first(10), 10, 4, std::slice::from_ref(&ptu)),
            now,
            HORIZON,
        );
        let unused = leases.revoke(&pool, &payg).unwrap();
        assert_eq!((unused.id, unused.requests), (10, 3));
        assert!(matches!(leases.take(&pool, &ptu, 10, now).0, Local::Ask));
    }

    #[test]
    fn requests_wait_for_a_refill_while_demand_asks_for_leases_whatever_the_last_grant() {
        let (pool, ptu, payg) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        assert!(leases.refill_lock(&pool, now).is_none(), "no demand yet");
        leases.admitted(grant(&pool, &payg, &first(10), 1, 4, &[]), now, HORIZON);
        assert!(
            leases.refill_lock(&pool, now).is_none(),
            "one request is no demand"
        );
        // A second caller admitted alone (the PTU's last eighth goes one request at a time):
        // the pool's demand still asks for leases, so the next requests that find none wait
        // for one refill rather than each asking Redis.
        leases.admitted(grant(&pool, &ptu, &first(10), 2, 1, &[]), now, HORIZON);
        assert!(leases.refill_lock(&pool, now).is_some());
        assert!(
            leases
                .refill_lock(&pool, now + Duration::from_millis(250))
                .is_none(),
            "after two idle periods, no demand"
        );
    }

    #[test]
    fn only_a_spent_lease_is_dry() {
        let (pool, ptu, payg) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        leases.admitted(grant(&pool, &payg, &first(10), 1, 2, &[]), now, HORIZON);
        assert!(
            matches!(leases.take(&pool, &ptu, 10, now).0, Local::Ask),
            "no lease"
        );
        assert!(matches!(
            leases.take(&pool, &payg, 10, now).0,
            Local::Admitted(_)
        ));
        assert!(matches!(leases.take(&pool, &payg, 10, now).0, Local::Dry));
        let later = now + HORIZON;
        assert!(
            matches!(leases.take(&pool, &payg, 10, later).0, Local::Ask),
            "expired"
        );
    }

    #[test]
    fn demand_sizes_the_lease() {
        let (pool, ptu, _) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        assert_eq!(leases.wanted(&pool, now, Duration::ZERO), 0);
        leases.admitted(grant(&pool, &ptu, &first(1), 1, 1, &[]), now, HORIZON);
        assert_eq!(
            leases.wanted(&pool, now, Duration::ZERO),
            0,
            "one request is no demand"
        );
        for _ in 0..20 {
            leases.admitted(grant(&pool, &ptu, &first(1), 1, 1, &[]), now, HORIZON);
        }
        assert_eq!(
            leases.wanted(&pool, now, Duration::ZERO),
            10,
            "21 at once: a pace of 84 per 100 ms; capped by the policy or twice what 5 ms take"
        );
        assert_eq!(
            leases.wanted(&pool, now + Duration::from_millis(100), Duration::ZERO),
            8,
            "capped by the policy"
        );
        // Two periods of silence: no demand left.
        assert_eq!(
            leases.wanted(&pool, now + Duration::from_millis(250), Duration::ZERO),
            0
        );
        assert_eq!(
            Leases::new(LeasePolicy::OFF).wanted(&pool, now, Duration::ZERO),
            0
        );
    }

    #[test]
    fn far_from_redis_a_lease_covers_its_round_trips() {
        let (pool, ptu, _) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        for _ in 0..3 {
            leases.admitted(grant(&pool, &ptu, &first(1), 1, 1, &[]), now, HORIZON);
        }
        // Read a period later: 3 per 100 ms (the pace of a period just begun reads higher).
        let now = now + Duration::from_millis(100);
        assert_eq!(leases.wanted(&pool, now, Duration::ZERO), 3);
        let far = Duration::from_millis(80);
        assert_eq!(leases.horizon(far), Duration::from_millis(260));
        assert_eq!(
            leases.wanted(&pool, now, far),
            8,
            "3 per 100 ms over 260 ms"
        );
        for _ in 0..20 {
            leases.admitted(grant(&pool, &ptu, &first(1), 1, 1, &[]), now, HORIZON);
        }
        let now = now + Duration::from_millis(100);
        assert_eq!(
            leases.wanted(&pool, now, Duration::from_millis(1)),
            8,
            "near: capped at 8 per 100 ms"
        );
        // Far, the cap gives way: 20 per 100 ms take 33 until the next lease can land.
        assert_eq!(
            leases.wanted(&pool, now, far),
            52,
            "20 per 100 ms over 260 ms"
        );
    }

    #[test]
    fn a_lease_running_low_is_refilled_once_ahead_of_demand() {
        let (pool, ptu, _) = names();
        let leases = Leases::new(policy());
        let now = Instant::now();
        for _ in 0..8 {
            leases.admitted(grant(&pool, &ptu, &first(1), 1, 1, &[]), now, HORIZON);
        }
        let one = first(1);
        let refill = Grant {
            caller: false,
            sent_at: Some(0),
            ..grant(&pool, &ptu, &one, 2, 8, &[])
        };
        leases.admitted(refill, now, HORIZON);
        let rt = Duration::from_millis(1);
        let mut due = Vec::new();
        for _ in 0..8 {
            assert!(matches!(
                leases.take(&pool, &ptu, 1, now).0,
                Local::Admitted(_)
            ));
            due.push(leases.refill_due(&pool, &ptu, now, rt));
        }
        assert_eq!(due.iter().filter(|d| **d).count(), 1, "{due:?}");
        let at = due.iter().position(|d| *d).unwrap();
        assert!((2..6).contains(&at), "ahead of the lease's end: {due:?}");
        leases.refill_done(&pool);
        assert!(
            leases.refill_due(&pool, &ptu, now, rt),
            "still low, asked again"
        );
    }
}
