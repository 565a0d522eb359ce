//! The Redis store against a real `redis-server`: the same contract suite as the embedded
//! store, and the Lua scripts' own edge cases on a pinned clock.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use spillway_shared::contract::Subject;
use spillway_shared::{
    Admission, BackendId, Candidate, ClockControl, EmbeddedState, FallbackState, FleetState,
    PoolName, RedisState, StateError, Windows,
};
use spillway_tests::redis_server::RedisServer;

/// A store with its own server, which lives as long as the store.
pub struct Served {
    store: RedisState,
    pub server: RedisServer,
}

impl Deref for Served {
    type Target = RedisState;
    fn deref(&self) -> &RedisState {
        &self.store
    }
}

async fn served(windows: Windows) -> Served {
    let server = RedisServer::start();
    let store = RedisState::new(
        &server.url(),
        "spillway-test",
        windows,
        Duration::from_secs(2),
    )
    .unwrap();
    store.ready(Duration::from_secs(10)).await.unwrap();
    Served { store, server }
}

async fn redis() -> Served {
    served(Windows::default()).await
}

/// The contract on Redis: each check on a store of its own server.
async fn redis_subject(windows: Windows) -> Subject {
    let Served { store, server } = served(windows).await;
    Subject::keeping(Arc::new(store), server)
}

spillway_shared::fleet_state_contract!(redis_subject);

/// The same suite through `FallbackState` on a healthy Redis, as `serve` builds it.
mod through_fallback {
    use super::*;

    async fn fallback(windows: Windows) -> Subject {
        let Served { store, server } = served(windows).await;
        let store = FallbackState::new(store, EmbeddedState::new(windows), Duration::from_secs(1));
        Subject::keeping(store, server)
    }

    spillway_shared::fleet_state_contract!(fallback);
}

/// And through `FallbackState` with Redis gone: every rule holds deciding alone.
mod through_fallback_with_redis_down {
    use super::*;

    async fn fallback_alone(windows: Windows) -> Subject {
        let Served { store, mut server } = served(windows).await;
        server.kill();
        let budget = Duration::from_millis(100);
        let store = FallbackState::new(store, EmbeddedState::new(windows), budget);
        Subject::keeping(store, server)
    }

    spillway_shared::fleet_state_contract!(fallback_alone);
}

fn small_windows() -> Windows {
    Windows {
        budget: Duration::from_millis(1_000),
        budget_buckets: 10,
        ..Windows::default()
    }
}

fn capped(tokens: u64) -> [Candidate; 1] {
    [Candidate {
        backend: BackendId::new("ptu"),
        tokens_per_window: Some(tokens),
        requests_per_window: None,
        spill_utilization: None,
        tier: 0,
        ceiling: None,
    }]
}

async fn admits(store: &RedisState, pool: &PoolName, c: &[Candidate], tokens: u64) -> bool {
    matches!(
        store.acquire(pool, c, tokens).await.unwrap(),
        Admission::Admitted { .. }
    )
}

/// A receipt charging `tokens` for `reservation`, nothing else.
fn receipt(reservation: spillway_shared::Reservation, tokens: u64) -> spillway_shared::Receipt {
    spillway_shared::Receipt {
        reservation,
        tokens,
        latency: None,
        hints: spillway_shared::UpstreamHints::default(),
        backoff: None,
    }
}

/// A receipt for an attempt that failed with a server error (backoff `ms`).
fn server_error(reservation: spillway_shared::Reservation, ms: u64) -> spillway_shared::Receipt {
    spillway_shared::Receipt {
        backoff: Some(spillway_shared::Backoff {
            duration: Duration::from_millis(ms),
            reason: spillway_shared::BackoffReason::ServerError,
        }),
        ..receipt(reservation, 0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_leaves_the_window_exactly_at_its_end_plus_the_window() {
    let store = served(small_windows()).await;
    let pool = PoolName::new("rollover");
    let t0 = 1_700_000_000_050; // inside the bucket [..._000, ..._100)
    store.set_clock_ms(t0);
    assert!(admits(&store, &pool, &capped(100), 100).await);
    store.set_clock_ms(1_700_000_001_099);
    match store.acquire(&pool, &capped(100), 1).await.unwrap() {
        Admission::Exhausted {
            retry_after,
            throttled,
        } => {
            assert_eq!(
                retry_after,
                Duration::from_millis(1),
                "the bucket leaves at ..._1_100"
            );
            assert!(throttled);
        }
        other => panic!("{other:?}"),
    }
    store.set_clock_ms(1_700_000_001_100);
    assert!(
        admits(&store, &pool, &capped(100), 100).await,
        "window rolled over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_at_a_bucket_boundary_is_charged_to_the_new_bucket() {
    let store = served(small_windows()).await;
    let pool = PoolName::new("boundary");
    store.set_clock_ms(1_700_000_000_100);
    let Admission::Admitted { reservation, .. } =
        store.acquire(&pool, &capped(100), 10).await.unwrap()
    else {
        panic!("admitted");
    };
    assert_eq!(reservation.bucket_ms, 1_700_000_000_100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_arguments_are_rejected_by_the_script() {
    let store = served(small_windows()).await;
    let keys: Vec<String> = ["pending", "backoff:a", "usage:a", "hints:a"]
        .iter()
        .map(|k| format!("spillway-test:{{p}}:{k}"))
        .collect();
    // estimate, bucket ms, window ms, clock, hint ttl ms, probe ms, reservation id; then
    // token, request and spill limits and the class ceiling; then the lease wanted.
    let args = |tokens: &str| -> Vec<String> {
        [
            tokens, "100", "1000", "", "1000", "5000", "", "-1", "-1", "-1", "-1", "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    for tokens in ["-5", "1.5", "many"] {
        let err = store
            .eval_acquire(keys.clone(), args(tokens))
            .await
            .unwrap_err();
        assert!(
            matches!(err, StateError::Protocol(ref m) if m.contains("whole number")),
            "{tokens}: {err}"
        );
    }
    assert!(
        store.eval_acquire(keys.clone(), args("0")).await.is_ok(),
        "zero tokens is a valid request"
    );
    let err = store
        .eval_acquire(keys[..2].to_vec(), args("1"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StateError::Protocol(ref m) if m.contains("3 keys")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_are_reloaded_after_redis_forgets_them() {
    let store = redis().await;
    let pool = PoolName::new("noscript");
    use fred::prelude::*;
    let _: () = store.client().script_flush(false).await.unwrap();
    assert!(
        admits(
            &store,
            &pool,
            &[Candidate::unlimited(BackendId::new("a"))],
            1
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_readable_with_plain_commands() {
    use fred::prelude::*;
    let store = redis().await;
    let pool = PoolName::new("gpt-4o");
    store.set_clock_ms(1_700_000_000_000);
    assert!(admits(&store, &pool, &capped(1_000), 42).await);
    let backoff = spillway_shared::Backoff {
        duration: Duration::from_secs(30),
        reason: spillway_shared::BackoffReason::Throttled,
    };
    store
        .backoff(&pool, &BackendId::new("ptu"), backoff)
        .await
        .unwrap();

    let usage: std::collections::HashMap<String, String> = store
        .client()
        .hgetall("spillway-test:{gpt-4o}:usage:ptu")
        .await
        .unwrap();
    assert_eq!(
        usage.get("tokens:1700000000000").map(String::as_str),
        Some("42")
    );
    assert_eq!(
        usage.get("requests:1700000000000").map(String::as_str),
        Some("1")
    );
    let backoff: std::collections::HashMap<String, String> = store
        .client()
        .hgetall("spillway-test:{gpt-4o}:backoff:ptu")
        .await
        .unwrap();
    assert_eq!(backoff.get("reason").map(String::as_str), Some("throttled"));
    assert_eq!(
        backoff.get("until_ms").map(String::as_str),
        Some("1700000030000")
    );
    let ttl: i64 = store
        .client()
        .pttl("spillway-test:{gpt-4o}:usage:ptu")
        .await
        .unwrap();
    assert!(ttl > 0, "usage keys expire by themselves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_redis_is_used_with_the_password_from_the_url() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    let url = format!("redis://:s3cret-pw@127.0.0.1:{}", server.port);
    let store = RedisState::new(
        &url,
        "spillway-test",
        Windows::default(),
        Duration::from_secs(2),
    )
    .unwrap();
    store.ready(Duration::from_secs(10)).await.unwrap();
    assert!(
        admits(
            &store,
            &PoolName::new("auth"),
            &[Candidate::unlimited(BackendId::new("a"))],
            1
        )
        .await
    );

    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}", server.port);
    let store = RedisState::new(
        &wrong,
        "spillway-test",
        Windows::default(),
        Duration::from_millis(500),
    )
    .unwrap();
    let err = store
        .ready(Duration::from_secs(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        !err.contains("wrong-pw") && !err.contains("s3cret-pw"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_cool_down_one_request_probes_and_the_rest_wait_for_it() {
    let store = redis().await;
    let pool = PoolName::new("probe");
    let c = [Candidate::unlimited(BackendId::new("a"))];
    store.set_clock_ms(1_700_000_000_000);
    let Admission::Admitted {
        backend,
        reservation,
    } = store.acquire(&pool, &c, 1).await.unwrap()
    else {
        panic!("admitted");
    };
    store
        .settle(&pool, &backend, server_error(reservation, 1_000))
        .await
        .unwrap();
    store.set_clock_ms(1_700_000_001_000);
    assert!(admits(&store, &pool, &c, 1).await, "the probe");
    match store.acquire(&pool, &c, 1).await.unwrap() {
        Admission::Exhausted { retry_after, .. } => assert_eq!(retry_after, Duration::from_secs(5)),
        other => panic!("others wait for the probe: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_rate_over_the_window_opens_the_breaker() {
    let store = served(Windows {
        breaker_failures: 1_000,
        breaker_min_requests: 10,
        ..Windows::default()
    })
    .await;
    let pool = PoolName::new("rate");
    let c = [Candidate::unlimited(BackendId::new("a"))];
    let Admission::Admitted {
        backend,
        reservation,
    } = store.acquire(&pool, &c, 1).await.unwrap()
    else {
        panic!("admitted");
    };
    let outcome = |ok: bool| spillway_shared::Receipt {
        reservation,
        tokens: 0,
        latency: ok.then_some(spillway_shared::LatencySample {
            ttfb: Duration::ZERO,
            total: Duration::ZERO,
            output_tokens: 0,
            ..Default::default()
        }),
        hints: spillway_shared::UpstreamHints::default(),
        backoff: (!ok).then_some(spillway_shared::Backoff {
            duration: Duration::from_secs(1),
            reason: spillway_shared::BackoffReason::ServerError,
        }),
    };
    for i in 0..9 {
        store
            .settle(&pool, &backend, outcome(i % 2 == 1))
            .await
            .unwrap();
    }
    assert!(admits(&store, &pool, &c, 1).await, "9 < 10 outcomes");
    store.settle(&pool, &backend, outcome(false)).await.unwrap();
    assert!(!admits(&store, &pool, &c, 1).await, "5 of 10 failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_is_settled_only_in_the_store_that_issued_it() {
    let Served { store, server } = redis().await;
    let fleet = spillway_shared::FallbackState::new(
        store,
        spillway_shared::EmbeddedState::default(),
        Duration::from_secs(1),
    );
    let pool = PoolName::new("issuer");
    let c = [Candidate::unlimited(BackendId::new("a"))];
    let done = |reservation| receipt(reservation, 20_000);
    // Redis's ledger for the member: 60,000 tokens admitted.
    for _ in 0..3 {
        let Admission::Admitted {
            backend,
            reservation,
        } = fleet.acquire(&pool, &c, 20_000).await.unwrap()
        else {
            panic!("admitted");
        };
        fleet
            .settle(&pool, &backend, done(reservation))
            .await
            .unwrap();
    }
    // A reservation this replica's embedded store issued (while degraded): ledger mark 10.
    let local = spillway_shared::EmbeddedState::default();
    let Admission::Admitted {
        backend,
        reservation,
    } = local.acquire(&pool, &c, 10).await.unwrap()
    else {
        panic!("admitted");
    };
    let hints = spillway_shared::UpstreamHints {
        remaining_tokens: Some(50_000),
        ..Default::default()
    };
    let receipt = spillway_shared::Receipt {
        hints,
        ..done(reservation)
    };
    fleet.settle(&pool, &backend, receipt).await.unwrap();
    // Settled on Redis, its mark would have subtracted Redis's whole ledger from the hint
    // (remaining 0: the member refused while it had room).
    assert!(
        matches!(
            fleet.acquire(&pool, &c, 1_000).await.unwrap(),
            Admission::Admitted { .. }
        ),
        "the member still admits"
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_applies_once_and_never_after_a_release() {
    let store = redis().await;
    let pool = PoolName::new("once");
    let c = [Candidate::unlimited(BackendId::new("a"))];
    let used = |reservation| receipt(reservation, 40);
    let Admission::Admitted {
        backend,
        reservation,
    } = store.acquire(&pool, &c, 100).await.unwrap()
    else {
        panic!("admitted");
    };
    store
        .settle(&pool, &backend, used(reservation))
        .await
        .unwrap();
    store
        .settle(&pool, &backend, used(reservation))
        .await
        .unwrap();
    let tokens = |s: spillway_shared::PoolSnapshot| s.members[0].tokens_used;
    assert_eq!(tokens(store.snapshot(&pool, &c).await.unwrap()), 40);

    // A released reservation is given back once; settling it later changes nothing.
    let Admission::Admitted { reservation, .. } = store.acquire(&pool, &c, 100).await.unwrap()
    else {
        panic!("admitted");
    };
    assert!(store.release(&pool, &c, reservation.id).await.unwrap());
    assert!(!store.release(&pool, &c, reservation.id).await.unwrap());
    store
        .settle(&pool, &backend, used(reservation))
        .await
        .unwrap();
    assert_eq!(tokens(store.snapshot(&pool, &c).await.unwrap()), 40);

    // Released before its acquire ran (the acquire was queued behind a stall): admits nothing.
    let id = store.next_reservation_id();
    assert!(!store.release(&pool, &c, id).await.unwrap());
    assert!(matches!(
        store.acquire_with_id(&pool, &c, 100, id).await.unwrap(),
        Admission::Exhausted { .. }
    ));
    assert_eq!(tokens(store.snapshot(&pool, &c).await.unwrap()), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_an_abandoned_probe_lets_the_next_request_probe() {
    let store = redis().await;
    let pool = PoolName::new("probe-release");
    let c = [Candidate::unlimited(BackendId::new("a"))];
    let Admission::Admitted {
        backend,
        reservation,
    } = store.acquire(&pool, &c, 1).await.unwrap()
    else {
        panic!("admitted");
    };
    store
        .settle(&pool, &backend, server_error(reservation, 1_000))
        .await
        .unwrap();
    store.advance_clock(Duration::from_millis(1_001));
    // The probe's acquire is abandoned by its replica (a timeout) and released.
    let id = store.next_reservation_id();
    assert!(matches!(
        store.acquire_with_id(&pool, &c, 1, id).await.unwrap(),
        Admission::Admitted { .. }
    ));
    assert!(
        !admits(&store, &pool, &c, 1).await,
        "others wait for the probe"
    );
    assert!(store.release(&pool, &c, id).await.unwrap());
    assert!(
        admits(&store, &pool, &c, 1).await,
        "the next request probes at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_sums_stay_equal_to_the_buckets_they_sum() {
    use fred::prelude::*;
    let store = served(small_windows()).await;
    let pool = PoolName::new("sums");
    let c = capped(1_000);
    let mut t = 1_700_000_000_000;
    store.set_clock_ms(t);
    let mut open = Vec::new();
    for step in 0..40u64 {
        t += 37; // crosses bucket (100 ms) and window (1 s) edges as it goes
        store.set_clock_ms(t);
        if let Admission::Admitted {
            backend,
            reservation,
        } = store.acquire(&pool, &c, 10 + step % 7).await.unwrap()
        {
            open.push((backend, reservation));
        }
        if step % 3 == 0
            && let Some((backend, reservation)) = open.pop()
        {
            store
                .settle(&pool, &backend, receipt(reservation, 3))
                .await
                .unwrap();
        }
        if step % 5 == 0
            && let Some((_, reservation)) = open.pop()
        {
            store.release(&pool, &c, reservation.id).await.unwrap();
        }
        if step % 11 == 0 {
            store.charge(&pool, &c[0].backend, 5, 1).await.unwrap();
        }
        let key = spillway_shared::KeySchema::new("spillway-test")
            .member(&pool, &c[0].backend)
            .usage;
        let fields: std::collections::HashMap<String, i64> =
            store.client().hgetall(&key).await.unwrap();
        let sum = |kind: &str| -> i64 {
            fields
                .iter()
                .filter(|(f, _)| f.starts_with(&format!("{kind}:")))
                .map(|(_, v)| *v)
                .sum()
        };
        if let Some(&sum_tokens) = fields.get("sum_tokens") {
            assert_eq!(sum_tokens, sum("tokens"), "step {step}: {fields:?}");
            assert_eq!(fields["sum_requests"], sum("requests"), "step {step}");
        }
    }
}

fn timed(reservation: spillway_shared::Reservation, total_ms: u64) -> spillway_shared::Receipt {
    spillway_shared::Receipt {
        latency: Some(spillway_shared::LatencySample {
            ttfb: Duration::from_millis(1),
            total: Duration::from_millis(total_ms),
            output_tokens: 0,
            ..Default::default()
        }),
        ..receipt(reservation, 1)
    }
}

/// Latency is read from the window's sums that settle keeps: a slot leaves them when it
/// leaves the window, and a snapshot reads a fixed set of fields, never whole hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_read_the_windows_sums_at_constant_cost() {
    let windows = Windows {
        latency: Duration::from_millis(1_000),
        latency_slots: 5,
        ..small_windows()
    };
    let store = served(windows).await;
    let pool = PoolName::new("summary");
    let c = [Candidate::unlimited(BackendId::new("a"))];
    let t0 = 1_700_000_000_000;
    let settle_at = |t: u64, total_ms: u64| {
        let store = &store;
        let (pool, c) = (&pool, &c);
        async move {
            store.set_clock_ms(t);
            let Admission::Admitted {
                backend,
                reservation,
            } = store.acquire(pool, c, 1).await.unwrap()
            else {
                panic!("admitted")
            };
            store
                .settle(pool, &backend, timed(reservation, total_ms))
                .await
                .unwrap();
        }
    };
    let totals = |s: spillway_shared::PoolSnapshot| s.members[0].latency.total_ms.clone();
    settle_at(t0, 100).await;
    settle_at(t0 + 500, 1_000).await;
    let both = totals(store.snapshot(&pool, &c).await.unwrap());
    assert_eq!(both.samples(), 2);

    // The first slot ([t0, t0 + 200)) leaves the window at t0 + 1_200: the next settle
    // takes it out of the sums.
    settle_at(t0 + 1_250, 1_000).await;
    let later = totals(store.snapshot(&pool, &c).await.unwrap());
    assert_eq!(later.samples(), 2);
    assert_eq!(
        later.quantile_ms(0.0),
        Some(1_024),
        "the 100 ms sample aged out"
    );

    // A whole window with no settle: nothing is shown.
    store.set_clock_ms(t0 + 1_250 + 1_200);
    assert_eq!(
        totals(store.snapshot(&pool, &c).await.unwrap()).samples(),
        0
    );

    // Constant cost: no hash is read whole.
    store.server.reset_stats();
    store.set_clock_ms(t0 + 1_300);
    store.snapshot(&pool, &c).await.unwrap();
    assert_eq!(store.server.calls("evalsha"), 1);
    assert_eq!(store.server.calls("hgetall"), 0);
}

/// What a replica decided alone while Redis was down reaches Redis once it answers: the usage
/// it admitted and the backoff it learned (the contract above checks the deciding alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_fallback_decided_alone_is_written_back() {
    let Served { store, mut server } = redis().await;
    let fallback = FallbackState::new(store, EmbeddedState::default(), Duration::from_millis(100));
    server.kill();
    let pool = PoolName::new("written-back");
    let members = [
        Candidate::unlimited(BackendId::new("a")),
        Candidate::unlimited(BackendId::new("b")),
    ];
    let within = Duration::from_secs(30);
    // Calls that find Redis gone turn the pool degraded (every decision local).
    for _ in 0..spillway_shared::fallback::ENTER_AFTER {
        fallback.acquire(&pool, &members, 0).await.unwrap();
    }
    tokio::time::timeout(within, fallback.wait_degraded())
        .await
        .expect("degraded");
    let Admission::Admitted {
        backend,
        reservation,
    } = fallback.acquire(&pool, &members, 100).await.unwrap()
    else {
        panic!("decided alone");
    };
    let throttled = spillway_shared::Backoff {
        duration: Duration::from_secs(60),
        reason: spillway_shared::BackoffReason::Throttled,
    };
    let receipt = spillway_shared::Receipt {
        reservation,
        tokens: 250,
        latency: None,
        hints: Default::default(),
        backoff: Some(throttled),
    };
    fallback.settle(&pool, &backend, receipt).await.unwrap();

    server.restart();
    tokio::time::timeout(within, fallback.wait_shared())
        .await
        .expect("back on Redis");
    let direct = RedisState::new(
        &server.url(),
        "spillway-test",
        Windows::default(),
        Duration::from_secs(2),
    )
    .unwrap();
    direct.ready(Duration::from_secs(10)).await.unwrap();
    let shared = direct.snapshot(&pool, &members).await.unwrap();
    let a = &shared.members[0];
    assert_eq!(a.tokens_used, 250, "the usage admitted alone");
    let backoff = a.backoff.expect("the backoff learned alone");
    assert_eq!(backoff.reason, spillway_shared::BackoffReason::Throttled);
    assert!(backoff.duration > Duration::from_secs(30), "{backoff:?}");
}

/// A restore runs once however often it is asked: the call that finds the pool's generation
/// marker missing sets it and adds the usage in one step; the same call made again (its answer
/// was lost) finds the marker and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_made_twice_counts_once() {
    let store = redis().await;
    let pool = PoolName::new("restored");
    let a = [Candidate::unlimited(BackendId::new("a"))];
    let usage = [(BackendId::new("a"), (300, 3))];
    let first = store.restore(&pool, "r1:0", &usage).await.unwrap();
    let again = store.restore(&pool, "r1:1", &usage).await.unwrap();
    assert_eq!((first.as_str(), again.as_str()), ("r1:0", "r1:0"));
    let shared = store.snapshot(&pool, &a).await.unwrap();
    assert_eq!(
        (
            shared.members[0].tokens_used,
            shared.members[0].requests_used
        ),
        (300, 3)
    );
    assert_eq!(
        store.generation(&pool).await.unwrap().as_deref(),
        Some("r1:0")
    );
}

/// Redis loses a pool's data while every replica is up and healthy (FLUSHALL stands for a
/// restart without persistence, or a failover to an empty node), and the restore's answer is
/// lost (writes paused past the call's time): the last shared view's usage is back in Redis,
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_redis_lost_unnoticed_is_restored_once() {
    let Served { store, server } = redis().await;
    let fallback = FallbackState::new(store, EmbeddedState::default(), Duration::from_millis(100));
    let pool = PoolName::new("lost");
    let members = [Candidate::unlimited(BackendId::new("a"))];
    fallback
        .charge(&pool, &members[0].backend, 500, 5)
        .await
        .unwrap();
    // The first read marks the pool's generation and is the view kept.
    let seen = fallback.snapshot(&pool, &members).await.unwrap();
    assert_eq!(seen.members[0].tokens_used, 500);

    server.cli(&["FLUSHALL"]);
    server.cli(&["CLIENT", "PAUSE", "30000", "WRITE"]);
    // Reads still answer: the marker is missing; the restore waits behind the pause.
    let emptied = fallback.snapshot(&pool, &members).await.unwrap();
    assert_eq!(emptied.members[0].tokens_used, 0);
    server.cli(&["CLIENT", "UNPAUSE"]);

    for _ in 0..3 {
        let back = fallback.snapshot(&pool, &members).await.unwrap();
        assert_eq!(
            (back.members[0].tokens_used, back.members[0].requests_used),
            (500, 5),
            "the view's usage, restored once"
        );
    }
}
