//! `acquire` on Redis: from this replica's budget leases when it holds one (refilling them in
//! the background, ahead of demand), else one `acquire.lua` call (asking for a lease when this
//! replica's demand is high).

use std::time::Duration;

use fred::prelude::*;

use super::reply::{array, int};
use super::{Acquired, RedisState};
use crate::lease::{Grant, Local};
use crate::scripts::{AcquireArgs, CandidateArgs, LeaseArgs, Limit, QueueArgs};
use crate::store::{Admission, BackendId, Candidate, PoolName, Reservation, StateError, Ticket};

/// A lower traffic class's request: some candidate has a line ([`Candidate::ceiling`]).
fn under_ceiling(candidates: &[Candidate]) -> bool {
    candidates.iter().any(|c| c.ceiling.is_some())
}

/// Who asks `acquire.lua`.
#[derive(Clone, Copy)]
enum Asker<'a> {
    /// A request, for itself (and a lease when its replica's demand is high).
    Request,
    /// A refill of the pool's leases ahead of demand, sent at this lease epoch.
    Refill(u64),
    /// A request waiting in turn, with its ticket (never a lease).
    InTurn(&'a Ticket),
}

/// What this replica's leases say about a request.
enum OnLease {
    Admitted(Admission),
    /// No lease admits it, and one it would have taken from is spent.
    Dry,
    /// No lease admits it: ask Redis.
    Ask,
}

impl RedisState {
    /// `acquire`, with the reservation id the caller chose (to release it if it gives up).
    pub async fn acquire_with_id(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        id: u64,
    ) -> Result<Admission, StateError> {
        Ok(self
            .acquire_charging(pool, candidates, estimated_tokens, id)
            .await?
            .admission)
    }

    /// `acquire_with_id`, also saying what it charged in Redis.
    pub async fn acquire_charging(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        id: u64,
    ) -> Result<Acquired, StateError> {
        if let Some(admission) = self.acquire_on_lease(pool, candidates, estimated_tokens) {
            return Ok(Acquired::local(admission));
        }
        self.acquire_past_lease(pool, candidates, estimated_tokens, id)
            .await
    }

    /// `acquire_charging` for a request no lease admitted just now: it waits for a refill on
    /// its way (once) and takes the lease again, else makes one `acquire.lua` call.
    pub async fn acquire_past_lease(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        id: u64,
    ) -> Result<Acquired, StateError> {
        if candidates.is_empty() {
            return Ok(Acquired::local(Admission::Exhausted {
                retry_after: Duration::ZERO,
                throttled: false,
            }));
        }
        if self.leases.policy().enabled() && !under_ceiling(candidates) {
            let now = tokio::time::Instant::now();
            if let Some(refill) = self.leases.refill_lock(pool, now) {
                // A refill on its way is waited for (once), and whoever finds none on its
                // way is the refill the others wait for.
                match refill.clone().try_lock_owned() {
                    Ok(_refilling) => {
                        return self
                            .acquire_from_redis(
                                pool,
                                candidates,
                                estimated_tokens,
                                id,
                                Asker::Request,
                            )
                            .await;
                    }
                    Err(_) => {
                        self.waited_for_refill
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        drop(refill.lock().await);
                    }
                }
                if let Some(admission) = self.acquire_on_lease(pool, candidates, estimated_tokens) {
                    return Ok(Acquired::local(admission));
                }
            }
        }
        self.acquire_from_redis(pool, candidates, estimated_tokens, id, Asker::Request)
            .await
    }

    /// `acquire_in_turn` on Redis: one `acquire.lua` call with the pool's queue.
    pub async fn acquire_in_turn_charging(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        (id, ticket): (u64, &Ticket),
    ) -> Result<Acquired, StateError> {
        if ticket.id.len() > crate::store::MAX_TICKET_ID_BYTES {
            return Err(StateError::Protocol("ticket id too long".into()));
        }
        self.acquire_from_redis(
            pool,
            candidates,
            estimated_tokens,
            id,
            Asker::InTurn(ticket),
        )
        .await
    }

    /// An admission on this replica's leases, with no round trip, if one admits the request
    /// (refilling them in the background when they run low).
    pub fn acquire_on_lease(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
    ) -> Option<Admission> {
        // A lower class's line is only ever checked in Redis, against the whole fleet's use.
        if !self.leases.policy().enabled() || under_ceiling(candidates) {
            return None;
        }
        match self.admit_on_lease(pool, candidates, estimated_tokens) {
            OnLease::Admitted(admission) => {
                self.refill_ahead(pool, candidates, estimated_tokens, &admission);
                Some(admission)
            }
            // The lease this request would take from is spent: the pool's leases are too
            // small for what its requests take.
            OnLease::Dry => {
                self.leases.ran_dry(pool);
                None
            }
            OnLease::Ask => None,
        }
    }

    /// After an admission on a lease: when the lease runs low, refill the pool's leases in
    /// the background (one `acquire.lua` call for requests like this one, all of them
    /// leased), holding the pool's refill lock so a request that finds the lease spent waits
    /// for this refill instead of sending its own.
    fn refill_ahead(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        admission: &Admission,
    ) {
        let Admission::Admitted { backend, .. } = admission else {
            return;
        };
        let now = tokio::time::Instant::now();
        let round_trip = self.round_trip().unwrap_or_default();
        if !self.leases.refill_due(pool, backend, now, round_trip) {
            return;
        }
        // Taken here, before the task starts: a stopping replica that takes every refill lock
        // then waits for this refill to land.
        let Some(refilling) = self
            .leases
            .refill_lock(pool, now)
            .and_then(|lock| lock.try_lock_owned().ok())
        else {
            // A request is fetching a lease right now: that is the refill.
            self.leases.refill_done(pool);
            return;
        };
        let (store, pool, candidates) = (self.clone(), pool.clone(), candidates.to_vec());
        let sent_at = self.leases.epoch(&pool);
        tokio::spawn(async move {
            let id = store.next_reservation_id();
            let refilled = store
                .acquire_from_redis(
                    &pool,
                    &candidates,
                    estimated_tokens,
                    id,
                    Asker::Refill(sent_at),
                )
                .await;
            if let Err(e) = refilled {
                tracing::debug!(error = %e, "fleet state: a lease refill failed");
            }
            store.leases.refill_done(&pool);
            drop(refilling);
        });
    }

    /// The first candidate, in preference order, this replica can admit on a lease, unless a
    /// candidate of an earlier tier must be asked in Redis first. Inside a tier the order is
    /// advice: a member of the tier that needs asking may still be admitted on its lease.
    fn admit_on_lease(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
    ) -> OnLease {
        let now = tokio::time::Instant::now();
        let mut ended = Vec::new();
        let mut admitted = OnLease::Ask;
        let mut asking_tier = None;
        for c in candidates {
            if asking_tier.is_some_and(|tier| tier != c.tier) {
                break; // a later tier only after Redis has refused this one
            }
            let (local, unused) = self.leases.take(pool, &c.backend, estimated_tokens, now);
            ended.extend(unused);
            match local {
                Local::Admitted(reservation) => {
                    admitted = OnLease::Admitted(Admission::Admitted {
                        backend: c.backend.clone(),
                        reservation,
                    });
                    break;
                }
                Local::PassedOver => continue,
                Local::Dry => {
                    admitted = OnLease::Dry;
                    asking_tier = Some(c.tier);
                }
                Local::Ask => asking_tier = Some(c.tier),
            }
        }
        self.give_back(ended);
        admitted
    }

    /// One `acquire.lua` call (asking for a lease when this replica's demand is high): for a
    /// request (`refill` is `None`), or to refill the leases ahead of demand (`refill` is the
    /// pool's lease epoch when it was sent).
    async fn acquire_from_redis(
        &self,
        pool: &PoolName,
        candidates: &[Candidate],
        estimated_tokens: u64,
        id: u64,
        asker: Asker<'_>,
    ) -> Result<Acquired, StateError> {
        let refill = match asker {
            Asker::Refill(sent_at) => Some(sent_at),
            _ => None,
        };
        let caller = refill.is_none();
        let now = tokio::time::Instant::now();
        let round_trip = self.round_trip().unwrap_or_default();
        if caller {
            self.waited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut keys = Vec::with_capacity(1 + candidates.len() * 3);
        keys.push(self.keys.pending(pool));
        let mut args = AcquireArgs {
            estimate: estimated_tokens,
            bucket_ms: self.windows.bucket_ms(),
            window_ms: self.windows.budget.as_millis() as u64,
            clock: self.clock(),
            hint_ttl_ms: self.windows.hint_ttl.as_millis() as u64,
            probe_ms: self.windows.breaker_probe.as_millis() as u64,
            reservation_id: self.reservation_key(id),
        }
        .to_args();
        for c in candidates {
            let k = self.member_keys(pool, &c.backend);
            keys.extend([k.backoff, k.usage, k.hints]);
            CandidateArgs {
                tokens_per_window: Limit(c.tokens_per_window),
                requests_per_window: Limit(c.requests_per_window),
                spill_utilization: Limit(c.spill_utilization),
                ceiling: Limit(c.ceiling),
            }
            .push_to(&mut args);
        }
        // A lower class below its line, and a request in turn, are decided one at a time.
        let wanted = if under_ceiling(candidates) || matches!(asker, Asker::InTurn(_)) {
            0
        } else {
            self.leases.wanted(pool, now, round_trip)
        };
        LeaseArgs {
            wanted: u64::from(wanted),
        }
        .push_to(&mut args);
        if let Asker::InTurn(ticket) = asker {
            keys.extend([self.keys.queue(pool), self.keys.tickets(pool)]);
            QueueArgs {
                ticket: ticket.id.clone(),
                alive_ms: (ticket.alive.as_millis() as u64).max(1),
            }
            .push_to(&mut args);
        }
        let reply = array(self.run(&self.scripts.acquire, keys, args).await?)?;
        let (flag, a, b, ledger, admitted, granted) = match reply.as_slice() {
            [flag, a, b] => (flag, a, b, None, None, None),
            [flag, a, b, ledger, admitted, granted] => {
                (flag, a, b, Some(ledger), Some(admitted), Some(granted))
            }
            _ => return Err(StateError::Protocol(format!("acquire returned {reply:?}"))),
        };
        if int(flag)? == 1 {
            let index = int(a)? as usize;
            let candidate = candidates
                .get(index.wrapping_sub(1))
                .ok_or_else(|| StateError::Protocol(format!("acquire chose candidate {index}")))?;
            let mut reservation = Reservation {
                bucket_ms: int(b)? as u64,
                tokens: estimated_tokens,
                ledger: ledger.map(int).transpose()?.unwrap_or(0).max(0) as u64,
                admitted_ms: admitted.map(int).transpose()?.unwrap_or(0).max(0) as u64,
                issuer: crate::store::Issuer::Redis,
                id,
            };
            let granted = granted.map(int).transpose()?.unwrap_or(1).max(1) as u64;
            if granted > 1 || !caller {
                // A lease: its id is the lease's (given back by it); this request's part is
                // settled like any other of the lease's.
                reservation.id = 0;
            }
            let passed_over = &candidates[..index - 1];
            let horizon = self.leases.horizon(round_trip);
            self.note_admission(
                pool,
                passed_over,
                candidate,
                &reservation,
                (id, granted, refill),
                (now, horizon),
            );
            Ok(Acquired {
                admission: Admission::Admitted {
                    backend: candidate.backend.clone(),
                    reservation,
                },
                charged: (estimated_tokens * granted, granted),
            })
        } else {
            Ok(Acquired::local(Admission::Exhausted {
                retry_after: Duration::from_millis(int(a)?.max(0) as u64),
                throttled: int(b)? == 1,
            }))
        }
    }

    /// Tell the leases what `acquire.lua` admitted: a lease of `granted` requests on
    /// `candidate` (its `id`), or, with leases on, one request counted as demand (it sizes
    /// this replica's next lease).
    fn note_admission(
        &self,
        pool: &PoolName,
        passed_over: &[Candidate],
        candidate: &Candidate,
        first: &Reservation,
        (id, granted, refill): (u64, u64, Option<u64>),
        (now, horizon): (tokio::time::Instant, Duration),
    ) {
        if granted > 1 || refill.is_some() {
            let passed_over: Vec<BackendId> =
                passed_over.iter().map(|c| c.backend.clone()).collect();
            let grant = Grant {
                pool,
                backend: &candidate.backend,
                first,
                id,
                requests: granted,
                passed_over: &passed_over,
                caller: refill.is_none(),
                sent_at: refill,
            };
            let replaced = self.leases.admitted(grant, now, horizon);
            self.give_back(replaced);
        } else if self.leases.policy().enabled() {
            let single = Grant {
                pool,
                backend: &candidate.backend,
                first,
                id,
                requests: 1,
                passed_over: &[],
                caller: true,
                sent_at: None,
            };
            self.leases.admitted(single, now, horizon);
        }
    }

    /// The raw `acquire` script, for script-level tests.
    #[doc(hidden)]
    pub async fn eval_acquire(
        &self,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, StateError> {
        self.run(&self.scripts.acquire, keys, args).await
    }
}
