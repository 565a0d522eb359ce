//! The behaviour every `FleetState` store must show: one suite, run on each store by
//! [`fleet_state_contract!`](crate::fleet_state_contract). Time-driven rules (cool-downs,
//! probes, windows) move the store's clock with [`ClockControl`] instead of waiting; each
//! check uses its own pool and a fresh store built with the windows it needs.
//!
//! The checks are listed once, in [`CHECKS`], and nowhere per store. A check is a private
//! function: one left out of the list is dead code, which the build (clippy `-D warnings`)
//! refuses, so adding a check cannot forget a store.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::store::{
    Admission, BackendId, Backoff, BackoffReason, Candidate, ClockControl, FleetState,
    LatencySample, PoolName, Receipt, Ticket, UpstreamHints, Windows,
};

/// A store under test: its state and its clock.
pub trait ContractStore: FleetState + ClockControl {}

impl<T: FleetState + ClockControl + ?Sized> ContractStore for T {}

/// A store built for one check, with whatever must live as long as it (a Redis server).
pub struct Subject {
    pub store: Arc<dyn ContractStore>,
    pub keep: Box<dyn Any + Send + Sync>,
}

impl Subject {
    pub fn new(store: Arc<dyn ContractStore>) -> Self {
        Self::keeping(store, ())
    }

    pub fn keeping(store: Arc<dyn ContractStore>, keep: impl Any + Send + Sync) -> Self {
        Self {
            store,
            keep: Box::new(keep),
        }
    }
}

type Run = fn(Arc<dyn ContractStore>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// One rule of the contract.
pub struct Check {
    pub name: &'static str,
    /// The windows the store must be built with.
    pub windows: fn() -> Windows,
    pub run: Run,
}

/// Run every check on a fresh store from `make` (given the check's windows), each in a task of
/// its own; fails naming every check that failed (their panics are printed above).
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(Windows) -> Fut,
    Fut: Future<Output = Subject>,
{
    let mut failed = Vec::new();
    for check in CHECKS {
        let subject = make((check.windows)()).await;
        let outcome = tokio::spawn((check.run)(subject.store.clone())).await;
        if outcome.is_err() {
            failed.push(check.name);
        }
        subject.store.close().await;
        drop(subject);
    }
    assert!(
        failed.is_empty(),
        "{} of {} contract checks failed: {failed:?}",
        failed.len(),
        CHECKS.len()
    );
}

/// Lists the checks: `name(store)` or `name(store, clock)`, optionally `with <windows fn>`.
macro_rules! checks {
    ($( $name:ident ( $($arg:ident),+ ) $(with $windows:path)? ;)*) => {
        /// Every check of the contract.
        pub const CHECKS: &[Check] = &[$(Check {
            name: stringify!($name),
            windows: checks!(@windows $($windows)?),
            run: |store| Box::pin(async move { checks!(@call $name store $($arg)+) }),
        }),*];
    };
    (@windows) => { Windows::default };
    (@windows $windows:path) => { $windows };
    (@call $name:ident $s:ident store) => { $name(&*$s).await };
    (@call $name:ident $s:ident store clock) => { $name(&*$s, &*$s).await };
}

checks! {
    acquire_takes_the_first_candidate_not_in_backoff(store);
    exhausted_reports_the_earliest_deadline_and_why(store);
    backoff_keeps_the_later_deadline(store);
    budgets_admit_up_to_the_limit_then_refuse_as_throttled(store);
    settle_replaces_the_estimate_with_real_usage(store);
    a_settle_corrects_usage_once(store);
    requests_per_window_are_bounded(store);
    an_oversized_request_is_admitted_into_an_empty_window_only(store);
    settle_without_acquire_changes_no_budget(store);
    settle_records_latency_hints_and_backoff_in_one_call(store);
    pools_and_unknown_backends_are_independent(store);
    a_fresh_hint_of_high_utilization_or_too_few_tokens_skips_a_member(store);
    a_later_observed_hint_wins_over_an_earlier_one_settled_later(store);
    admissions_use_up_the_hinted_room_down_to_none(store);
    a_pinned_response_names_its_owner_and_unknown_ids_none(store);
    charged_usage_counts_against_the_budget(store);
    charged_usage_is_on_the_hint_ledger_and_not_an_estimate(store);
    completed_requests_report_what_the_prompt_cache_served(store);
    quota_counters_add_up_apart_and_end_with_their_period(store);
    consecutive_failures_open_the_breaker_for_ever_longer(store, clock);
    a_probe_success_closes_the_breaker(store, clock);
    outcomes_from_before_the_breaker_opened_neither_close_nor_reopen_it(store, clock);
    a_failed_probe_reopens_a_breaker_the_failure_rate_opened(store, clock) with rate_breaker_windows;
    after_a_429_backoff_one_request_probes_before_the_fleet_resumes(store, clock);
    a_budget_frees_when_its_bucket_leaves_the_window(store, clock);
    a_lower_class_is_admitted_only_below_its_line(store);
    tickets_are_admitted_oldest_first_and_leave_when_admitted_or_gone(store);
    a_ticket_not_renewed_in_time_stops_holding_its_place(store, clock);
    the_cost_ledger_adds_up_each_hour_apart(store);
}

fn pool(name: &str) -> PoolName {
    // Unique per run so a shared Redis never sees one run's keys in another.
    PoolName::new(format!("{name}-{}-{}", std::process::id(), rand_suffix()))
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) ^ NEXT.fetch_add(1, Ordering::Relaxed)
}

fn open(name: &str) -> Candidate {
    Candidate::unlimited(BackendId::new(name))
}

fn budget(name: &str, tokens: u64, requests: Option<u64>) -> Candidate {
    Candidate {
        backend: BackendId::new(name),
        tokens_per_window: Some(tokens),
        requests_per_window: requests,
        spill_utilization: None,
        tier: 0,
        ceiling: None,
    }
}

fn throttle(ms: u64) -> Backoff {
    Backoff {
        duration: Duration::from_millis(ms),
        reason: BackoffReason::Throttled,
    }
}

async fn admitted(
    store: &dyn FleetState,
    pool: &PoolName,
    candidates: &[Candidate],
    tokens: u64,
) -> Option<(BackendId, crate::Reservation)> {
    match store
        .acquire(pool, candidates, tokens)
        .await
        .expect("acquire")
    {
        Admission::Admitted {
            backend,
            reservation,
        } => Some((backend, reservation)),
        Admission::Exhausted { .. } => None,
    }
}

fn receipt(reservation: crate::Reservation, tokens: u64) -> Receipt {
    Receipt {
        reservation,
        tokens,
        latency: None,
        hints: UpstreamHints::default(),
        backoff: None,
    }
}

async fn acquire_takes_the_first_candidate_not_in_backoff(store: &dyn FleetState) {
    let p = pool("order");
    let c = [open("a"), open("b")];
    assert_eq!(admitted(store, &p, &c, 10).await.unwrap().0.as_str(), "a");
    store
        .backoff(&p, &c[0].backend, throttle(30_000))
        .await
        .unwrap();
    assert_eq!(admitted(store, &p, &c, 10).await.unwrap().0.as_str(), "b");
}

async fn exhausted_reports_the_earliest_deadline_and_why(store: &dyn FleetState) {
    let p = pool("exhausted");
    let c = [open("a"), open("b")];
    store
        .backoff(&p, &c[0].backend, throttle(50_000))
        .await
        .unwrap();
    let failure = Backoff {
        duration: Duration::from_millis(20_000),
        reason: BackoffReason::ServerError,
    };
    store.backoff(&p, &c[1].backend, failure).await.unwrap();
    match store.acquire(&p, &c, 1).await.unwrap() {
        Admission::Exhausted {
            retry_after,
            throttled,
        } => {
            assert!(
                retry_after <= Duration::from_millis(20_000)
                    && retry_after > Duration::from_millis(15_000),
                "{retry_after:?}"
            );
            assert!(throttled);
        }
        other => panic!("expected exhausted, got {other:?}"),
    }
}

async fn backoff_keeps_the_later_deadline(store: &dyn FleetState) {
    let p = pool("later");
    let c = [open("a")];
    store
        .backoff(&p, &c[0].backend, throttle(50_000))
        .await
        .unwrap();
    store
        .backoff(
            &p,
            &c[0].backend,
            Backoff {
                duration: Duration::from_millis(1_000),
                reason: BackoffReason::Timeout,
            },
        )
        .await
        .unwrap();
    let snap = store.snapshot(&p, &c).await.unwrap();
    let b = snap.members[0].backoff.expect("in backoff");
    assert_eq!(b.reason, BackoffReason::Throttled);
    assert!(b.duration > Duration::from_millis(45_000), "{b:?}");
}

async fn budgets_admit_up_to_the_limit_then_refuse_as_throttled(store: &dyn FleetState) {
    let p = pool("budget");
    let c = [budget("ptu", 100, None), open("payg")];
    assert_eq!(admitted(store, &p, &c, 60).await.unwrap().0.as_str(), "ptu");
    assert_eq!(admitted(store, &p, &c, 40).await.unwrap().0.as_str(), "ptu");
    assert_eq!(
        admitted(store, &p, &c, 1).await.unwrap().0.as_str(),
        "payg",
        "ptu is full"
    );
    match store.acquire(&p, &c[..1], 1).await.unwrap() {
        Admission::Exhausted {
            retry_after,
            throttled,
        } => {
            assert!(throttled, "an exhausted budget counts as throttling");
            assert!(retry_after > Duration::ZERO);
        }
        other => panic!("expected exhausted, got {other:?}"),
    }
    let snap = store.snapshot(&p, &c).await.unwrap();
    assert_eq!(
        (snap.members[0].tokens_used, snap.members[0].requests_used),
        (100, 2)
    );
}

async fn completed_requests_report_what_the_prompt_cache_served(store: &dyn FleetState) {
    let p = pool("cache-share");
    let c = [open("a")];
    for (prompt, cached) in [(2_000, 0), (2_000, 1_920)] {
        let (backend, reservation) = admitted(store, &p, &c, 2_010).await.unwrap();
        let sample = LatencySample {
            ttfb: Duration::from_millis(50),
            total: Duration::from_millis(90),
            output_tokens: 10,
            prompt_tokens: prompt,
            cached_tokens: cached,
        };
        let r = Receipt {
            reservation,
            tokens: prompt + 10,
            latency: Some(sample),
            hints: UpstreamHints::default(),
            backoff: None,
        };
        store.settle(&p, &backend, r).await.unwrap();
    }
    let snap = store.snapshot(&p, &c).await.unwrap();
    assert_eq!(
        (snap.members[0].prompt_tokens, snap.members[0].cached_tokens),
        (4_000, 1_920)
    );
}

async fn charged_usage_counts_against_the_budget(store: &dyn FleetState) {
    let p = pool("charged");
    let c = [budget("ptu", 100, None)];
    store
        .charge(&p, &BackendId::new("ptu"), 90, 1)
        .await
        .unwrap();
    assert!(
        admitted(store, &p, &c, 20).await.is_none(),
        "90 of 100 spent"
    );
    assert!(admitted(store, &p, &c, 10).await.is_some());
    let snap = store.snapshot(&p, &c).await.unwrap();
    assert_eq!(
        (snap.members[0].tokens_used, snap.members[0].requests_used),
        (100, 2)
    );
}

async fn settle_replaces_the_estimate_with_real_usage(store: &dyn FleetState) {
    let p = pool("settle");
    let c = [budget("ptu", 100, None)];
    let (backend, reservation) = admitted(store, &p, &c, 90).await.unwrap();
    assert!(admitted(store, &p, &c, 20).await.is_none());
    store
        .settle(&p, &backend, receipt(reservation, 30))
        .await
        .unwrap();
    assert!(
        admitted(store, &p, &c, 20).await.is_some(),
        "the unused estimate was released"
    );
    let snap = store.snapshot(&p, &c).await.unwrap();
    assert_eq!(snap.members[0].tokens_used, 50);
}

async fn a_settle_corrects_usage_once(store: &dyn FleetState) {
    let p = pool("settle-once");
    let c = [budget("a", 1_000, None)];
    let (backend, reservation) = admitted(store, &p, &c, 100).await.unwrap();
    store
        .settle(&p, &backend, receipt(reservation, 30))
        .await
        .unwrap();
    // The same receipt again (a retried call): its estimate was already replaced.
    store
        .settle(&p, &backend, receipt(reservation, 30))
        .await
        .unwrap();
    let snap = store.snapshot(&p, &c).await.unwrap();
    assert_eq!(snap.members[0].tokens_used, 30, "corrected once");
}

async fn admissions_use_up_the_hinted_room_down_to_none(store: &dyn FleetState) {
    let p = pool("hint-room");
    let c = [open("a")];
    let (a, first) = admitted(store, &p, &c, 100).await.unwrap();
    let hints = UpstreamHints {
        remaining_tokens: Some(250),
        utilization: None,
        observed: None,
    };
    store.observe(&p, &a, hints, first).await.unwrap();
    let remaining = async || {
        let snap = store.snapshot(&p, &c).await.unwrap();
        snap.members[0].hints.remaining_tokens
    };
    assert!(admitted(store, &p, &c, 100).await.is_some());
    assert!(admitted(store, &p, &c, 100).await.is_some());
    assert_eq!(remaining().await, Some(50));
    assert!(
        admitted(store, &p, &c, 100).await.is_none(),
        "50 left: a request of 100 waits"
    );
    assert!(admitted(store, &p, &c, 50).await.is_some());
    assert!(admitted(store, &p, &c, 0).await.is_some());
    assert_eq!(
        remaining().await,
        Some(0),
        "none left, never less, never 'no hint'"
    );
}

async fn charged_usage_is_on_the_hint_ledger_and_not_an_estimate(store: &dyn FleetState) {
    let p = pool("charge-ledger");
    let c = [open("a")];
    let (a, r) = admitted(store, &p, &c, 10).await.unwrap();
    // Served meanwhile without a reservation (a Realtime response, or decided on a replica's
    // own state): 400 tokens the upstream counts too.
    store.charge(&p, &a, 400, 1).await.unwrap();
    // The answer to `r` says 1,000 left, as it stood before those 400 reached it.
    let hints = UpstreamHints {
        remaining_tokens: Some(1_000),
        utilization: None,
        observed: None,
    };
    store.observe(&p, &a, hints, r).await.unwrap();
    let snap = store.snapshot(&p, &c).await.unwrap();
    let m = &snap.members[0];
    assert_eq!(m.hints.remaining_tokens, Some(600), "on the hint ledger");
    assert_eq!(
        (m.estimated_tokens, m.actual_tokens),
        (0, 0),
        "no estimate was made for them"
    );
    assert_eq!((m.tokens_used, m.requests_used), (410, 2));
}

async fn requests_per_window_are_bounded(store: &dyn FleetState) {
    let p = pool("rpm");
    let c = [budget("a", 1_000_000, Some(2))];
    assert!(
        admitted(store, &p, &c, 0).await.is_some(),
        "zero-token requests still count"
    );
    assert!(admitted(store, &p, &c, 0).await.is_some());
    assert!(admitted(store, &p, &c, 0).await.is_none());
}

async fn an_oversized_request_is_admitted_into_an_empty_window_only(store: &dyn FleetState) {
    let p = pool("oversized");
    let c = [budget("a", 100, None)];
    assert!(admitted(store, &p, &c, 500).await.is_some());
    assert!(admitted(store, &p, &c, 500).await.is_none());
}

async fn settle_without_acquire_changes_no_budget(store: &dyn FleetState) {
    let p = pool("stray");
    let c = [budget("a", 100, None)];
    let stray = crate::Reservation {
        bucket_ms: 12_345,
        tokens: 50,
        ledger: 0,
        admitted_ms: 12_345,
        issuer: crate::store::Issuer::default(),
        id: 0,
    };
    store
        .settle(&p, &c[0].backend, receipt(stray, 80))
        .await
        .unwrap();
    let snap = store.snapshot(&p, &c).await.unwrap();
    assert_eq!(
        (snap.members[0].tokens_used, snap.members[0].requests_used),
        (0, 0)
    );
}

async fn settle_records_latency_hints_and_backoff_in_one_call(store: &dyn FleetState) {
    let p = pool("receipt");
    let c = [open("a")];
    let (backend, reservation) = admitted(store, &p, &c, 10).await.unwrap();
    let sample = LatencySample {
        ttfb: Duration::from_millis(90),
        total: Duration::from_millis(490),
        output_tokens: 20,
        ..Default::default()
    };
    let hints = UpstreamHints {
        remaining_tokens: Some(1234),
        utilization: Some(0.875),
        observed: None,
    };
    let r = Receipt {
        reservation,
        tokens: 12,
        latency: Some(sample),
        hints,
        backoff: Some(throttle(40_000)),
    };
    store.settle(&p, &backend, r).await.unwrap();
    let snap = store.snapshot(&p, &c).await.unwrap();
    let m = &snap.members[0];
    assert_eq!(m.hints, hints);
    assert_eq!(m.tokens_used, 12);
    assert_eq!(
        (m.estimated_tokens, m.actual_tokens),
        (10, 12),
        "estimation error is reported"
    );
    assert_eq!(m.backoff.map(|b| b.reason), Some(BackoffReason::Throttled));
    assert_eq!(m.latency.ttfb_ms.samples(), 1);
    assert_eq!(m.latency.ttfb_ms.quantile_ms(0.5), Some(128));
    assert_eq!(m.latency.total_ms.quantile_ms(0.5), Some(512));
    assert_eq!(
        m.latency.ms_per_output_token.quantile_ms(0.5),
        Some(32),
        "(490-90)/20 = 20 ms"
    );
}

async fn pools_and_unknown_backends_are_independent(store: &dyn FleetState) {
    let (p1, p2) = (pool("one"), pool("two"));
    let c = [open("a")];
    store
        .backoff(&p1, &c[0].backend, throttle(30_000))
        .await
        .unwrap();
    assert!(admitted(store, &p2, &c, 1).await.is_some());
    assert!(
        admitted(store, &p1, &[open("never-seen")], 1)
            .await
            .is_some()
    );
}

async fn a_fresh_hint_of_high_utilization_or_too_few_tokens_skips_a_member(store: &dyn FleetState) {
    let p = pool("hints");
    let ptu = Candidate {
        spill_utilization: Some(0.95),
        ..open("ptu")
    };
    let c = [ptu, open("payg")];
    let (backend, reservation) = admitted(store, &p, &c, 10).await.unwrap();
    assert_eq!(backend.as_str(), "ptu");
    let hot = UpstreamHints {
        remaining_tokens: Some(50_000),
        utilization: Some(0.97),
        observed: None,
    };
    store
        .settle(
            &p,
            &backend,
            Receipt {
                hints: hot,
                ..receipt(reservation, 10)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        admitted(store, &p, &c, 10).await.unwrap().0.as_str(),
        "payg",
        "97% >= 95%: spill early"
    );

    let p = pool("hints-low");
    let (backend, reservation) = admitted(store, &p, &c, 10).await.unwrap();
    let low = UpstreamHints {
        remaining_tokens: Some(100),
        utilization: Some(0.5),
        observed: None,
    };
    store
        .settle(
            &p,
            &backend,
            Receipt {
                hints: low,
                ..receipt(reservation, 10)
            },
        )
        .await
        .unwrap();
    assert_eq!(
        admitted(store, &p, &c, 99).await.unwrap().0.as_str(),
        "ptu",
        "99 tokens fit in 100"
    );
    assert_eq!(
        admitted(store, &p, &c, 101).await.unwrap().0.as_str(),
        "payg",
        "101 do not"
    );
}

fn failed(reservation: crate::Reservation, ms: u64) -> Receipt {
    let b = Backoff {
        duration: Duration::from_millis(ms),
        reason: BackoffReason::ServerError,
    };
    Receipt {
        backoff: Some(b),
        ..receipt(reservation, 0)
    }
}

fn completed(reservation: crate::Reservation) -> Receipt {
    let sample = LatencySample {
        ttfb: Duration::from_millis(5),
        total: Duration::from_millis(9),
        output_tokens: 1,
        ..Default::default()
    };
    Receipt {
        latency: Some(sample),
        ..receipt(reservation, 1)
    }
}

async fn a_later_observed_hint_wins_over_an_earlier_one_settled_later(store: &dyn FleetState) {
    let p = pool("hints-order");
    let mut ptu = open("ptu");
    ptu.spill_utilization = Some(0.95);
    let c = [ptu, open("payg")];
    let (a, early) = admitted(store, &p, &c, 10).await.unwrap();
    let (_, late) = admitted(store, &p, &c, 10).await.unwrap();
    let hint = |utilization: f64, ago_ms: u64| UpstreamHints {
        remaining_tokens: Some(100_000),
        utilization: Some(utilization),
        observed: tokio::time::Instant::now().checked_sub(Duration::from_millis(ago_ms)),
    };
    // The later request's head (99 %, 100 ms ago) is settled first; the earlier long
    // stream's (40 %, observed 300 ms ago) settles afterwards and must not bring the PTU back.
    store
        .settle(
            &p,
            &a,
            Receipt {
                hints: hint(0.99, 100),
                ..receipt(late, 10)
            },
        )
        .await
        .unwrap();
    store
        .settle(
            &p,
            &a,
            Receipt {
                hints: hint(0.40, 300),
                ..receipt(early, 10)
            },
        )
        .await
        .unwrap();
    let held = store.snapshot(&p, &c[..1]).await.unwrap().members[0].hints;
    assert_eq!(held.utilization, Some(0.99));
    assert_eq!(
        admitted(store, &p, &c, 10).await.unwrap().0.as_str(),
        "payg",
        "the fresher 99 % still holds"
    );
    // A stream's head observed now replaces them; a later settle of older hints does not.
    store.observe(&p, &a, hint(0.97, 0), late).await.unwrap();
    store
        .settle(
            &p,
            &a,
            Receipt {
                hints: hint(0.10, 200),
                ..receipt(early, 10)
            },
        )
        .await
        .unwrap();
    let held = store.snapshot(&p, &c[..1]).await.unwrap().members[0].hints;
    assert_eq!(
        held.utilization,
        Some(0.97),
        "an older observation changes nothing"
    );
}

/// The member's backoff now.
async fn backoff_of(store: &dyn FleetState, p: &PoolName, c: &[Candidate]) -> Option<Backoff> {
    store.snapshot(p, c).await.unwrap().members[0].backoff
}

async fn consecutive_failures_open_the_breaker_for_ever_longer(
    store: &dyn FleetState,
    clock: &dyn ClockControl,
) {
    // Default breaker: opens on the first failure, cool-down doubling per opening.
    let p = pool("breaker");
    let c = [open("a")];
    let (a, r) = admitted(store, &p, &c, 1).await.unwrap();
    store.settle(&p, &a, failed(r, 10_000)).await.unwrap();
    let first = backoff_of(store, &p, &c).await.expect("open");
    assert_eq!(first.reason, BackoffReason::ServerError);
    assert!(
        first.duration <= Duration::from_millis(10_000)
            && first.duration > Duration::from_millis(9_000),
        "{first:?}"
    );
    // After the cool-down one request probes; its failure reopens for twice as long.
    clock.advance_clock(Duration::from_millis(10_001));
    let (a, probe) = admitted(store, &p, &c, 1).await.expect("the probe");
    store.settle(&p, &a, failed(probe, 10_000)).await.unwrap();
    let second = backoff_of(store, &p, &c).await.expect("reopened");
    assert!(
        second.duration > Duration::from_millis(19_000),
        "{second:?}"
    );
}

async fn a_probe_success_closes_the_breaker(store: &dyn FleetState, clock: &dyn ClockControl) {
    let p = pool("breaker-close");
    let c = [open("a")];
    let (a, r) = admitted(store, &p, &c, 1).await.unwrap();
    store.settle(&p, &a, failed(r, 10_000)).await.unwrap();
    clock.advance_clock(Duration::from_millis(10_001));
    let (a, probe) = admitted(store, &p, &c, 1).await.expect("the probe");
    assert!(
        admitted(store, &p, &c, 1).await.is_none(),
        "others wait for the probe's outcome"
    );
    store.settle(&p, &a, completed(probe)).await.unwrap();
    assert!(backoff_of(store, &p, &c).await.is_none(), "closed");
    // Closed: the next failure opens it for the base time again, not doubled.
    let (a, r) = admitted(store, &p, &c, 1).await.unwrap();
    store.settle(&p, &a, failed(r, 10_000)).await.unwrap();
    let b = backoff_of(store, &p, &c).await.expect("open");
    assert!(b.duration <= Duration::from_millis(10_000), "{b:?}");
}

async fn outcomes_from_before_the_breaker_opened_neither_close_nor_reopen_it(
    store: &dyn FleetState,
    clock: &dyn ClockControl,
) {
    let p = pool("breaker-epoch");
    let c = [open("a")];
    let (a, early) = admitted(store, &p, &c, 1).await.unwrap();
    let (_, late) = admitted(store, &p, &c, 1).await.unwrap();
    let (_, later) = admitted(store, &p, &c, 1).await.unwrap();
    clock.advance_clock(Duration::from_millis(5));
    store.settle(&p, &a, failed(early, 10_000)).await.unwrap();
    let opened = backoff_of(store, &p, &c).await.expect("open");
    // A request admitted before the opening succeeds afterwards: the breaker stays open.
    store.settle(&p, &a, completed(late)).await.unwrap();
    assert_eq!(
        backoff_of(store, &p, &c).await.map(|b| b.reason),
        Some(BackoffReason::ServerError),
        "a late success does not close the breaker"
    );
    // Another one fails afterwards: already counted, the cool-down does not double.
    store.settle(&p, &a, failed(later, 10_000)).await.unwrap();
    let still = backoff_of(store, &p, &c).await.expect("open");
    assert!(still.duration <= opened.duration, "{still:?} vs {opened:?}");
    // The probe after the cool-down still decides.
    clock.advance_clock(Duration::from_millis(10_001));
    let (a, probe) = admitted(store, &p, &c, 1).await.expect("the probe");
    store.settle(&p, &a, completed(probe)).await.unwrap();
    assert!(backoff_of(store, &p, &c).await.is_none());
}

async fn a_failed_probe_reopens_a_breaker_the_failure_rate_opened(
    store: &dyn FleetState,
    clock: &dyn ClockControl,
) {
    // For a store built with [`rate_breaker_windows`]: two failed outcomes open it by rate.
    let p = pool("breaker-rate-probe");
    let c = [open("a")];
    let (a, r) = admitted(store, &p, &c, 1).await.unwrap();
    store.settle(&p, &a, failed(r, 10_000)).await.unwrap();
    assert!(
        backoff_of(store, &p, &c).await.is_none(),
        "1 outcome is too few"
    );
    store.settle(&p, &a, failed(r, 10_000)).await.unwrap();
    assert!(backoff_of(store, &p, &c).await.is_some(), "2 of 2 failed");
    // Past the cool-down and the rate window: the probe alone is too few for the rate rule.
    clock.advance_clock(Duration::from_millis(10_001));
    let (a, probe) = admitted(store, &p, &c, 1).await.expect("the probe");
    store.settle(&p, &a, failed(probe, 10_000)).await.unwrap();
    assert!(
        backoff_of(store, &p, &c).await.is_some(),
        "a failed probe reopens"
    );
}

async fn after_a_429_backoff_one_request_probes_before_the_fleet_resumes(
    store: &dyn FleetState,
    clock: &dyn ClockControl,
) {
    let p = pool("throttle-probe");
    let c = [open("a")];
    let (a, r) = admitted(store, &p, &c, 1).await.unwrap();
    let throttled = Receipt {
        backoff: Some(throttle(2_000)),
        ..receipt(r, 0)
    };
    store.settle(&p, &a, throttled).await.unwrap();
    clock.advance_clock(Duration::from_millis(2_001));
    let (a, probe) = admitted(store, &p, &c, 1).await.expect("the probe");
    match store.acquire(&p, &c, 1).await.unwrap() {
        Admission::Exhausted { retry_after, .. } => {
            assert!(retry_after > Duration::ZERO, "others wait for the probe")
        }
        other => panic!("a second request went along with the probe: {other:?}"),
    }
    store.settle(&p, &a, completed(probe)).await.unwrap();
    assert!(admitted(store, &p, &c, 1).await.is_some(), "resumed");
    assert!(admitted(store, &p, &c, 1).await.is_some(), "for everyone");
}

async fn a_budget_frees_when_its_bucket_leaves_the_window(
    store: &dyn FleetState,
    clock: &dyn ClockControl,
) {
    let p = pool("window-edge");
    let c = [budget("a", 100, None)];
    assert!(admitted(store, &p, &c, 100).await.is_some());
    assert!(admitted(store, &p, &c, 1).await.is_none(), "spent");
    // Default window: 60 s in 60 buckets; the bucket counts while any part is inside.
    clock.advance_clock(Duration::from_millis(59_000));
    assert!(admitted(store, &p, &c, 1).await.is_none(), "still inside");
    clock.advance_clock(Duration::from_millis(2_001));
    assert!(
        admitted(store, &p, &c, 1).await.is_some(),
        "left the window"
    );
}

async fn a_pinned_response_names_its_owner_and_unknown_ids_none(store: &dyn FleetState) {
    let owner = crate::ResponseOwner {
        pool: pool("affinity"),
        backend: BackendId::new("east"),
        consumer: Some("3f2a9c".into()),
    };
    let day = Duration::from_secs(86_400);
    store.pin_response("resp_1", &owner, day).await.unwrap();
    assert_eq!(
        store.response_owner("resp_1").await.unwrap(),
        Some(owner.clone())
    );
    assert_eq!(store.response_owner("resp_2").await.unwrap(), None);
    // A response made on a gateway that authenticates no one has no consumer.
    let anonymous = crate::ResponseOwner {
        consumer: None,
        ..owner.clone()
    };
    store.pin_response("resp_3", &anonymous, day).await.unwrap();
    assert_eq!(
        store.response_owner("resp_3").await.unwrap(),
        Some(anonymous)
    );
    // Ids beyond the bound are never kept (a client's path must not become a huge key).
    let long = "r".repeat(crate::MAX_RESPONSE_ID_BYTES + 1);
    store.pin_response(&long, &owner, day).await.unwrap();
    assert_eq!(store.response_owner(&long).await.unwrap(), None);
}

async fn quota_counters_add_up_apart_and_end_with_their_period(store: &dyn FleetState) {
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let counter = |name: &str, expires_at_ms| crate::QuotaCounter {
        name: name.into(),
        expires_at_ms,
    };
    let hour = counter("batch:hourly:1", unix_ms + 3_600_000);
    assert_eq!(store.spend_quota(&hour, 0).await.unwrap(), 0, "fresh");
    assert_eq!(store.spend_quota(&hour, 700).await.unwrap(), 700);
    assert_eq!(store.spend_quota(&hour, 300).await.unwrap(), 1_000);
    assert_eq!(store.spend_quota(&hour, 0).await.unwrap(), 1_000, "read");
    let other = counter("chat:hourly:1", unix_ms + 3_600_000);
    assert_eq!(store.spend_quota(&other, 5).await.unwrap(), 5, "apart");
    // A counter whose period has ended is gone: the next period starts from nothing.
    let ended = counter("batch:hourly:0", unix_ms.saturating_sub(1_000));
    store.spend_quota(&ended, 50).await.unwrap();
    assert_eq!(store.spend_quota(&ended, 0).await.unwrap(), 0, "expired");
    // Names beyond the bound are refused, not stored.
    let long = counter(
        &"q".repeat(crate::MAX_QUOTA_NAME_BYTES + 1),
        unix_ms + 1_000,
    );
    assert!(store.spend_quota(&long, 1).await.is_err());
}

/// Windows under which only the failure rate opens the breaker (2 outcomes, 5 s window).
pub fn rate_breaker_windows() -> crate::Windows {
    crate::Windows {
        breaker_failures: 1_000,
        breaker_min_requests: 2,
        breaker_window: Duration::from_secs(5),
        ..crate::Windows::default()
    }
}

/// The contract as one `#[tokio::test]`, each check on a fresh store from `$make`: an async
/// function taking the check's [`Windows`] and returning a [`Subject`].
#[macro_export]
macro_rules! fleet_state_contract {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn fleet_state_contract() {
            $crate::contract::run_all($make).await;
        }
    };
}

async fn a_lower_class_is_admitted_only_below_its_line(store: &dyn FleetState) {
    let p = pool("ceiling");
    let ptu = budget("ptu", 100, None);
    let below_line = |c: &Candidate| Candidate {
        ceiling: Some(80),
        ..c.clone()
    };
    let lower = [below_line(&ptu), open("payg")];
    // Below the line the lower class is served by the PTU, then it overflows.
    assert_eq!(
        admitted(store, &p, &lower, 50).await.unwrap().0.as_str(),
        "ptu"
    );
    assert_eq!(
        admitted(store, &p, &lower, 30).await.unwrap().0.as_str(),
        "ptu"
    );
    assert_eq!(
        admitted(store, &p, &lower, 1).await.unwrap().0.as_str(),
        "payg"
    );
    // With nowhere else to go it is refused as throttled, while the top class still gets
    // the reserve above the line.
    match store.acquire(&p, &lower[..1], 1).await.unwrap() {
        Admission::Exhausted { throttled, .. } => assert!(throttled),
        other => panic!("a lower class above its line was admitted: {other:?}"),
    }
    assert_eq!(
        admitted(store, &p, std::slice::from_ref(&ptu), 20)
            .await
            .unwrap()
            .0
            .as_str(),
        "ptu"
    );
    assert!(
        admitted(store, &p, &[ptu], 1).await.is_none(),
        "the budget itself is spent"
    );
    // No exception for an empty window: an oversized lower-class request never takes the
    // reserve.
    let empty = pool("ceiling-empty");
    let big = [below_line(&budget("ptu", 100, None))];
    assert!(admitted(store, &empty, &big, 81).await.is_none());
}

fn ticket(id: &str) -> Ticket {
    Ticket {
        id: format!("{id}-{}", rand_suffix()),
        alive: Duration::from_secs(2),
    }
}

async fn in_turn(
    store: &dyn FleetState,
    p: &PoolName,
    c: &[Candidate],
    tokens: u64,
    t: &Ticket,
) -> bool {
    matches!(
        store
            .acquire_in_turn(p, c, tokens, t)
            .await
            .expect("acquire in turn"),
        Admission::Admitted { .. }
    )
}

async fn tickets_are_admitted_oldest_first_and_leave_when_admitted_or_gone(store: &dyn FleetState) {
    let p = pool("queue");
    let c = [budget("ptu", 100, None)];
    let (_, first) = admitted(store, &p, &c, 80).await.unwrap();
    let (a, b, d) = (ticket("a"), ticket("b"), ticket("d"));
    assert!(!in_turn(store, &p, &c, 30, &a).await, "30 more do not fit");
    // 10 would fit alone, but not behind the 30 queued ahead of it.
    assert!(!in_turn(store, &p, &c, 10, &b).await);
    // The first answer used 50 of its 80: room for both, in turn.
    store
        .settle(&p, &c[0].backend, receipt(first, 50))
        .await
        .unwrap();
    assert!(
        in_turn(store, &p, &c, 10, &b).await,
        "b fits with a's 30 counted ahead"
    );
    assert!(
        in_turn(store, &p, &c, 30, &a).await,
        "a still fits: b counted it"
    );
    // Admitted tickets left the queue: a newcomer counts nothing ahead of it.
    assert!(in_turn(store, &p, &c, 10, &d).await);
    // A ticket that leaves holds nothing back.
    let (e, f) = (ticket("e"), ticket("f"));
    assert!(!in_turn(store, &p, &c, 100, &e).await);
    store.leave_queue(&p, &e).await.unwrap();
    assert!(
        in_turn(store, &p, &c, 0, &f).await,
        "nothing is queued ahead of f"
    );
}

async fn a_ticket_not_renewed_in_time_stops_holding_its_place(
    store: &dyn FleetState,
    clock: &dyn ClockControl,
) {
    let p = pool("queue-alive");
    let c = [budget("ptu", 100, None)];
    let (a, b) = (ticket("a"), ticket("b"));
    admitted(store, &p, &c, 90).await.unwrap();
    assert!(!in_turn(store, &p, &c, 50, &a).await);
    // Renewed, a holds its place: b's 10 fit the room, not the room behind a.
    assert!(!in_turn(store, &p, &c, 10, &b).await);
    clock.advance_clock(Duration::from_millis(1_500));
    assert!(!in_turn(store, &p, &c, 10, &b).await, "a is alive for 2 s");
    // a's holder stopped asking (its replica died): after its alive time b goes first.
    clock.advance_clock(Duration::from_millis(1_000));
    assert!(in_turn(store, &p, &c, 10, &b).await);
}

async fn the_cost_ledger_adds_up_each_hour_apart(store: &dyn FleetState) {
    use crate::ledger::{HOUR_MS, SpendCounts, SpendKey};
    let p = pool("ledger");
    let line = |consumer: &str| SpendKey {
        pool: p.to_string(),
        class: "batch".into(),
        backend: "ptu".into(),
        tier: "ptu".into(),
        consumer: consumer.into(),
    };
    let counts = |input, output| SpendCounts {
        input,
        cached: 1,
        output,
        requests: 1,
    };
    let expires = 4_102_444_800_000; // 2100
    // An hour of its own (in 2020), so other checks' lines never mix in.
    let hour = (1_577_836_800_000 / HOUR_MS + rand_suffix() % 10_000) * HOUR_MS;
    let (a, b) = (line("a"), line("b|c"));
    store
        .record_spend(
            hour,
            expires,
            &[(a.clone(), counts(10, 5)), (b.clone(), counts(3, 1))],
        )
        .await
        .unwrap();
    store
        .record_spend(hour, expires, &[(a.clone(), counts(20, 7))])
        .await
        .unwrap();
    store
        .record_spend(hour + HOUR_MS, expires, &[(a.clone(), counts(1, 1))])
        .await
        .unwrap();
    let hours = store.spend_between(hour, hour + HOUR_MS).await.unwrap();
    assert_eq!(hours.len(), 2, "{hours:?}");
    assert_eq!(hours[0].0, hour);
    assert_eq!(
        hours[0].1[&a],
        SpendCounts {
            input: 30,
            cached: 2,
            output: 12,
            requests: 2
        }
    );
    assert_eq!(
        hours[0].1[&b],
        counts(3, 1),
        "a consumer name with '|' reads back"
    );
    assert_eq!(hours[1].1[&a], counts(1, 1));
    assert!(
        store
            .spend_between(hour + 2 * HOUR_MS, hour + 5 * HOUR_MS)
            .await
            .unwrap()
            .is_empty()
    );
}
