//! Receipts on their way to `settle.lua`. One task sends them: whatever queued while its
//! previous call was on the wire goes in the next call (one per pool, in queue order), and
//! lease admissions' receipts wait up to [`LINGER`] for more. On
//! the way, the completed requests of a member's lease are summed into one record (token
//! corrections per bucket, histogram counts, outcomes, the newest hints), so what a batch
//! costs Redis grows with the members it touches, not with the requests it carries.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::{mpsc, oneshot};

use crate::keys::KeySchema;
use crate::memory::ms_per_output_token;
use crate::scripts::{RECEIPT_KIND, ReceiptRecord, SUM_KIND, SumRecord};
use crate::store::{
    BackendId, Histogram, LATENCY_BOUNDS_MS, PoolName, Receipt, StateError, UpstreamHints, Windows,
};

/// Most receipts taken from the queue for one round of calls.
const MAX_JOBS: usize = 1024;

/// What one queued call to `settle.lua` carries.
pub(crate) enum Work {
    /// One receipt record (failures, backoffs, hints, reservations by id).
    Record(ReceiptRecord),
    /// A receipt that may be summed with others of its member: no backoff, no reservation id
    /// (an admission on a lease).
    Summable(Receipt),
}

pub(crate) struct SettleJob {
    pub pool: PoolName,
    pub backend: BackendId,
    pub work: Work,
    pub done: oneshot::Sender<Result<(), StateError>>,
    /// When it was queued: a record's hints grow older by the time it waits to be sent
    /// (a sum's are aged when it is written), so Redis places every hint at its real time.
    pub queued: tokio::time::Instant,
}

impl SettleJob {
    /// Whether this receipt may wait [`LINGER`] for company.
    fn may_wait(&self) -> bool {
        matches!(self.work, Work::Summable(_))
    }
}

/// What the sending task needs of its store.
pub(crate) struct Batcher {
    pub client: Client,
    pub script: Script,
    pub keys: KeySchema,
    pub windows: Windows,
    /// The store's pinned clock (tests), 0 for Redis `TIME`.
    pub clock_ms: Arc<AtomicU64>,
}

/// Histogram field label of a value: `le_<bound>` or `le_inf`.
pub(crate) fn label(value: u64) -> String {
    match LATENCY_BOUNDS_MS.get(Histogram::bucket_of(value)) {
        Some(bound) => format!("le_{bound}"),
        None => "le_inf".into(),
    }
}

pub(crate) fn clock(clock_ms: &AtomicU64) -> String {
    match clock_ms.load(Ordering::Relaxed) {
        0 => String::new(),
        ms => ms.to_string(),
    }
}

/// How long a batch of lease admissions' receipts waits for more before it is sent. They
/// only correct estimates Redis charged at admission (by the difference with the real usage),
/// so Redis's view of a member lags by at most this; one call then settles every request a
/// member completed meanwhile. A receipt that must not wait (a failure, a backoff, a
/// reservation by id) sends the batch at once.
const LINGER: Duration = Duration::from_millis(5);

pub(crate) async fn run(batcher: Batcher, mut queue: mpsc::UnboundedReceiver<SettleJob>) {
    while let Some(first) = queue.recv().await {
        let jobs = gather(first, &mut queue).await;
        // One call per pool (its keys share one hash slot), each in queue order.
        let mut by_pool: Vec<(PoolName, Vec<SettleJob>)> = Vec::new();
        for job in jobs {
            match by_pool.iter_mut().find(|(pool, _)| *pool == job.pool) {
                Some((_, jobs)) => jobs.push(job),
                None => by_pool.push((job.pool.clone(), vec![job])),
            }
        }
        let batcher = &batcher;
        let calls = by_pool
            .into_iter()
            .map(|(pool, jobs)| batcher.call(pool, jobs));
        futures_util::future::join_all(calls).await;
    }
}

/// The batch `first` starts: whatever is queued behind it, and while every receipt in it may
/// wait, whatever arrives within [`LINGER`] (until one that may not).
async fn gather(
    first: SettleJob,
    queue: &mut mpsc::UnboundedReceiver<SettleJob>,
) -> Vec<SettleJob> {
    let mut jobs = vec![first];
    while jobs.len() < MAX_JOBS {
        match queue.try_recv() {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    if !jobs.iter().all(SettleJob::may_wait) {
        return jobs;
    }
    let deadline = tokio::time::Instant::now() + LINGER;
    while jobs.len() < MAX_JOBS {
        match tokio::time::timeout_at(deadline, queue.recv()).await {
            Ok(Some(job)) => {
                let urgent = !job.may_wait();
                jobs.push(job);
                if urgent {
                    break;
                }
            }
            // Stopping (the store is gone) or waited long enough.
            Ok(None) | Err(_) => break,
        }
    }
    jobs
}

impl Batcher {
    /// One `settle.lua` call for `jobs` of `pool`; every caller gets its outcome.
    async fn call(&self, pool: PoolName, jobs: Vec<SettleJob>) {
        let mut keys = Vec::new();
        let mut args = Vec::new();
        let mut done = Vec::with_capacity(jobs.len());
        // A member's open sum is written before any other record of that member, so a
        // failure still follows the successes queued before it.
        let mut sums: Vec<(BackendId, Sum)> = Vec::new();
        for job in jobs {
            done.push(job.done);
            match job.work {
                Work::Summable(receipt) => match sums.iter_mut().find(|(b, _)| *b == job.backend) {
                    Some((_, sum)) => sum.add(&receipt),
                    None => {
                        let mut sum = Sum::default();
                        sum.add(&receipt);
                        sums.push((job.backend, sum));
                    }
                },
                Work::Record(mut record) => {
                    record.hints_age_ms += job.queued.elapsed().as_millis() as u64;
                    if let Some(at) = sums.iter().position(|(b, _)| *b == job.backend) {
                        let (backend, sum) = sums.remove(at);
                        self.push_sum(&pool, &backend, &sum, &mut keys, &mut args);
                    }
                    keys.extend(self.member_keys(&pool, &job.backend));
                    args.push(RECEIPT_KIND.to_string());
                    record.push_to(&mut args);
                }
            }
        }
        for (backend, sum) in &sums {
            self.push_sum(&pool, backend, sum, &mut keys, &mut args);
        }
        // Boxed, like `RedisState::run`'s: fred's call is a large future.
        let result: Result<Value, _> =
            Box::pin(self.script.evalsha_with_reload(&self.client, keys, args)).await;
        let result = result.map(|_| ()).map_err(crate::redis::script_error);
        for caller in done {
            let _ = caller.send(result.clone());
        }
    }

    fn member_keys(&self, pool: &PoolName, backend: &BackendId) -> [String; 5] {
        let k = self.keys.member(pool, backend);
        [
            k.backoff,
            k.usage,
            k.latency,
            k.hints,
            self.keys.pending(pool),
        ]
    }

    fn push_sum(
        &self,
        pool: &PoolName,
        backend: &BackendId,
        sum: &Sum,
        keys: &mut Vec<String>,
        args: &mut Vec<String>,
    ) {
        keys.extend(self.member_keys(pool, backend));
        args.push(SUM_KIND.to_string());
        sum.record(&self.windows, clock(&self.clock_ms))
            .push_to(args);
    }
}

/// Summable receipts of one member, summed.
#[derive(Default)]
struct Sum {
    /// Token corrections (used - reserved) per bucket start.
    corrections: Vec<(u64, i64)>,
    /// `<metric>:le_<bound>` -> samples.
    histogram: HashMap<String, u64>,
    completed: u64,
    estimated: u64,
    actual: u64,
    prompt: u64,
    cached: u64,
    /// Latest admission time among the successes (the breaker epoch rule).
    admitted_ms: u64,
    /// The newest hints, with their request's ledger mark.
    hints: Option<(UpstreamHints, u64)>,
}

impl Sum {
    fn add(&mut self, r: &Receipt) {
        let correction = r.tokens as i64 - r.reservation.tokens as i64;
        match self
            .corrections
            .iter_mut()
            .find(|(b, _)| *b == r.reservation.bucket_ms)
        {
            Some((_, c)) => *c += correction,
            None => self.corrections.push((r.reservation.bucket_ms, correction)),
        }
        if let Some(sample) = &r.latency {
            let mut count = |metric: &str, value: u64| {
                *self
                    .histogram
                    .entry(format!("{metric}:{}", label(value)))
                    .or_default() += 1;
            };
            count("ttfb_ms", sample.ttfb.as_millis() as u64);
            count("total_ms", sample.total.as_millis() as u64);
            if let Some(per_token) = ms_per_output_token(sample) {
                count("ms_per_output_token", per_token);
            }
            if sample.output_tokens > 0 {
                count("output_tokens", sample.output_tokens);
            }
            self.completed += 1;
            self.estimated += r.reservation.tokens;
            self.actual += r.tokens;
            self.prompt += sample.prompt_tokens;
            self.cached += sample.cached_tokens;
            self.admitted_ms = self.admitted_ms.max(r.reservation.admitted_ms);
        }
        if !r.hints.is_empty() {
            let newer = match &self.hints {
                None => true,
                Some((held, _)) => match (held.observed, r.hints.observed) {
                    (_, None) => true,
                    (None, Some(_)) => false,
                    (Some(a), Some(b)) => b > a,
                },
            };
            if newer {
                self.hints = Some((r.hints, r.reservation.ledger));
            }
        }
    }

    /// The sum record (see settle.lua).
    fn record(&self, windows: &Windows, clock: String) -> SumRecord {
        let corrections = self
            .corrections
            .iter()
            .map(|(bucket, c)| format!("{bucket}={c}"))
            .collect::<Vec<_>>()
            .join(",");
        let histogram = self
            .histogram
            .iter()
            .map(|(label, n)| format!("{label}={n}"))
            .collect::<Vec<_>>()
            .join(",");
        let (hints, ledger) = self.hints.unwrap_or_default();
        SumRecord {
            corrections,
            histogram,
            completed: self.completed,
            estimated: self.estimated,
            actual: self.actual,
            successes: self.completed,
            admitted_ms: self.admitted_ms,
            remaining_tokens: hints.remaining_tokens,
            utilization: hints.utilization,
            ledger_mark: ledger,
            hints_age_ms: hints.age().as_millis() as u64,
            slot_ms: windows.slot_ms(),
            latency_window_ms: windows.latency.as_millis() as u64,
            clock,
            breaker_window_ms: windows.breaker_window.as_millis() as u64,
            prompt_tokens: self.prompt,
            cached_tokens: self.cached,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scripts::ReceiptRecord;
    use crate::store::{Issuer, Reservation};

    fn job(work: Work) -> SettleJob {
        SettleJob {
            pool: PoolName::new("p"),
            backend: BackendId::new("ptu"),
            work,
            done: oneshot::channel().0,
            queued: tokio::time::Instant::now(),
        }
    }

    fn on_lease() -> SettleJob {
        job(Work::Summable(Receipt {
            reservation: Reservation {
                bucket_ms: 0,
                tokens: 10,
                ledger: 0,
                admitted_ms: 0,
                issuer: Issuer::Redis,
                id: 0,
            },
            tokens: 9,
            latency: None,
            hints: UpstreamHints::default(),
            backoff: None,
        }))
    }

    fn failure() -> SettleJob {
        job(Work::Record(ReceiptRecord::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn lease_receipts_wait_for_company_then_go() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sender = tokio::spawn(async move {
            for _ in 0..3 {
                tx.send(on_lease()).ok().unwrap();
                tokio::time::sleep(LINGER / 5).await;
            }
            // Too late for the batch: the next one's.
            tokio::time::sleep(LINGER).await;
            tx.send(on_lease()).ok().unwrap();
        });
        let started = tokio::time::Instant::now();
        let first = rx.recv().await.unwrap();
        let batch = gather(first, &mut rx).await;
        assert_eq!(batch.len(), 3);
        assert_eq!(started.elapsed(), LINGER, "sent when the linger ended");
        sender.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_sends_the_batch_at_once() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(on_lease()).ok().unwrap();
        let started = tokio::time::Instant::now();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(LINGER / 5).await;
            tx.send(failure()).ok().unwrap();
            tx.send(on_lease()).ok().unwrap();
        });
        let first = rx.recv().await.unwrap();
        let batch = gather(first, &mut rx).await;
        assert_eq!(batch.len(), 2, "the failure ends the batch");
        assert_eq!(started.elapsed(), LINGER / 5);
        sender.await.unwrap();

        // Alone, a failure never waits.
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(failure()).ok().unwrap();
        let started = tokio::time::Instant::now();
        let batch = gather(rx.recv().await.unwrap(), &mut rx).await;
        assert_eq!((batch.len(), started.elapsed()), (1, Duration::ZERO));
    }
}
