//! Budget leases on a real `redis-server`: a busy replica admits most requests without a
//! round trip, and the fleet still never admits past a budget; what a lease does not use
//! goes back to Redis. Also: settles sent in batches add up to the same state.

use std::sync::Arc;
use std::time::Duration;

use spillway_shared::{
    Admission, BackendId, Backoff, BackoffReason, Candidate, FleetState, LatencySample,
    LeasePolicy, PoolName, Receipt, RedisState, Reservation, UpstreamHints, Windows,
};
use spillway_tests::EVENT_TIMEOUT;
use spillway_tests::redis_server::RedisServer;

fn leasing(server: &RedisServer, ttl: Duration) -> RedisState {
    RedisState::new(
        &server.url(),
        "lease-test",
        Windows::default(),
        Duration::from_secs(2),
    )
    .unwrap()
    .with_leases(LeasePolicy {
        max_requests: 32,
        ttl,
    })
}

async fn ready(store: RedisState) -> Arc<RedisState> {
    store.ready(Duration::from_secs(10)).await.unwrap();
    Arc::new(store)
}

fn ptu(tokens: Option<u64>) -> [Candidate; 1] {
    [Candidate {
        backend: BackendId::new("ptu"),
        tokens_per_window: tokens,
        requests_per_window: None,
        spill_utilization: None,
        tier: 0,
        ceiling: None,
    }]
}

fn completed(reservation: Reservation, tokens: u64) -> Receipt {
    Receipt {
        reservation,
        tokens,
        latency: Some(LatencySample {
            ttfb: Duration::from_millis(3),
            total: Duration::from_millis(20),
            output_tokens: 5,
            prompt_tokens: 2,
            cached_tokens: 1,
        }),
        hints: UpstreamHints::default(),
        backoff: None,
    }
}

async fn charged(store: &RedisState, pool: &PoolName, c: &[Candidate]) -> (u64, u64) {
    let snap = store.snapshot(pool, c).await.unwrap();
    (snap.members[0].tokens_used, snap.members[0].requests_used)
}

/// Admit `n` requests of `tokens` each, one after the other; every one must be admitted.
async fn admit_all(
    store: &RedisState,
    pool: &PoolName,
    c: &[Candidate],
    n: usize,
    tokens: u64,
) -> Vec<(BackendId, Reservation)> {
    let mut admitted = Vec::with_capacity(n);
    for _ in 0..n {
        let Admission::Admitted {
            backend,
            reservation,
        } = store.acquire(pool, c, tokens).await.unwrap()
        else {
            panic!("admitted")
        };
        admitted.push((backend, reservation));
    }
    admitted
}

/// Poll until `f` holds (the give-back of a lease is a background call), or fail.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_replica_admits_most_requests_without_a_round_trip() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_secs(30))).await;
    let pool = PoolName::new("busy");
    let c = ptu(None);
    server.reset_stats();
    for _ in 0..200 {
        let admission = store.acquire(&pool, &c, 10).await.unwrap();
        assert!(matches!(admission, Admission::Admitted { .. }));
    }
    let calls = server.calls("evalsha");
    assert!(
        (1..30).contains(&calls),
        "200 admissions took {calls} acquire calls (one each without leases)"
    );
    // Redis holds the charge of every admission (and of the lease's unused rest).
    let (tokens, requests) = charged(&store, &pool, &c).await;
    assert!(
        requests >= 200 && tokens >= 2_000,
        "{tokens} tokens, {requests} requests"
    );
    // Held unused: the refill sent ahead of demand, and what was left of the lease it
    // replaced (given back in the background).
    assert!(
        requests < 200 + 2 * 32,
        "at most a lease and another's rest: {requests}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_leasing_replicas_never_admit_past_the_budget_and_use_all_of_it() {
    let server = RedisServer::start();
    let budget = 10_000;
    let c = ptu(Some(budget));
    let pool = PoolName::new("shared");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(ready(leasing(&server, Duration::from_secs(30))).await);
    }
    let mut tasks = Vec::new();
    for store in &replicas {
        let (store, pool, c) = (store.clone(), pool.clone(), c.clone());
        tasks.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            // Until this replica is refused: its lease is empty and Redis says no.
            for _ in 0..10_000 {
                match store.acquire(&pool, &c, 10).await.unwrap() {
                    Admission::Admitted { .. } => admitted += 10,
                    Admission::Exhausted { .. } => break,
                }
            }
            admitted
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.unwrap();
    }
    assert!(admitted <= budget, "admitted {admitted} of {budget}");
    assert!(
        admitted >= budget - 3 * 10,
        "leases left unused at most a request's worth each: {admitted} of {budget}"
    );
    // A refill sent ahead of demand may land after its replica's last admission: stopping
    // gives it back, and Redis then counts exactly what was admitted.
    for store in &replicas {
        store.close().await;
    }
    assert_eq!(charged(&replicas[0], &pool, &c).await.0, admitted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_holds_more_than_an_eighth_of_what_is_left() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_secs(30))).await;
    let pool = PoolName::new("eighth");
    let c = ptu(Some(1_000));
    // Demand first (on another pool: leases are sized by this replica's traffic).
    let busy = PoolName::new("elsewhere");
    admit_all(&store, &busy, &ptu(None), 40, 1).await;
    let mut admitted = 0;
    while let Admission::Admitted { .. } = store.acquire(&pool, &c, 10).await.unwrap() {
        admitted += 10;
        let (tokens, _) = charged(&store, &pool, &c).await;
        let unused = tokens - admitted;
        assert!(
            unused <= (1_000 - (tokens - unused)) / 8 + 10,
            "a lease of {unused} tokens with {} left",
            1_000 - tokens
        );
    }
    assert_eq!(
        admitted, 1_000,
        "the edge of the budget is decided request by request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_ends_the_lease_and_gives_back_what_it_did_not_use() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_secs(30))).await;
    let pool = PoolName::new("failure");
    let c = ptu(None);
    let last = admit_all(&store, &pool, &c, 40, 10).await.pop();
    let (_, before) = charged(&store, &pool, &c).await;
    assert!(before > 40, "a lease is out: {before} requests charged");
    let (backend, reservation) = last.unwrap();
    let failed = Receipt {
        backoff: Some(Backoff {
            duration: Duration::from_millis(1_000),
            reason: BackoffReason::ServerError,
        }),
        ..completed(reservation, 0)
    };
    store.settle(&pool, &backend, failed).await.unwrap();
    eventually("the lease's rest is given back", || async {
        charged(&store, &pool, &c).await.1 == 40
    })
    .await;
    assert!(
        matches!(
            store.acquire(&pool, &c, 10).await.unwrap(),
            Admission::Exhausted { .. }
        ),
        "the member is in backoff: no lease admits on it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_given_back() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_millis(50))).await;
    let pool = PoolName::new("expiry");
    let c = ptu(None);
    admit_all(&store, &pool, &c, 20, 10).await;
    tokio::time::sleep(Duration::from_millis(60)).await; // the lease's time to live
    store
        .heartbeat("replica", Duration::from_secs(5))
        .await
        .unwrap();
    eventually("Redis holds exactly the admitted requests", || async {
        charged(&store, &pool, &c).await == (200, 20)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_gives_back_its_leases() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_secs(30))).await;
    let pool = PoolName::new("stopping");
    let c = ptu(None);
    admit_all(&store, &pool, &c, 40, 10).await;
    assert!(charged(&store, &pool, &c).await.1 > 40, "a lease is out");
    store.close().await;
    assert_eq!(charged(&store, &pool, &c).await, (400, 40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_is_never_a_lease() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_secs(30))).await;
    let pool = PoolName::new("probe");
    let c = ptu(None);
    let (backend, reservation) = admit_all(&store, &pool, &c, 40, 1).await.pop().unwrap();
    let failed = Receipt {
        backoff: Some(Backoff {
            duration: Duration::from_millis(200),
            reason: BackoffReason::ServerError,
        }),
        ..completed(reservation, 0)
    };
    store.settle(&pool, &backend, failed).await.unwrap();
    // After the cool-down (Redis's own clock), one request probes; the others wait for it,
    // however busy this replica was.
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Admission::Admitted { .. } = store.acquire(&pool, &c, 1).await.unwrap() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker never let a probe through"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        matches!(
            store.acquire(&pool, &c, 1).await.unwrap(),
            Admission::Exhausted { .. }
        ),
        "the probe went alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_sent_together_add_up_to_the_same_state() {
    let server = RedisServer::start();
    let store = ready(
        RedisState::new(
            &server.url(),
            "batch-test",
            Windows::default(),
            Duration::from_secs(2),
        )
        .unwrap(),
    )
    .await;
    let pool = PoolName::new("batch");
    let c = ptu(None);
    let admitted = admit_all(&store, &pool, &c, 200, 100).await;
    // All at once, as 200 requests ending together: they queue behind the first call.
    server.reset_stats();
    let mut settles = Vec::new();
    for (backend, reservation) in admitted {
        let store = store.clone();
        let pool = pool.clone();
        settles.push(tokio::spawn(async move {
            store
                .settle(&pool, &backend, completed(reservation, 7))
                .await
        }));
    }
    for settle in settles {
        settle.await.unwrap().unwrap();
    }
    let snap = store.snapshot(&pool, &c).await.unwrap();
    let member = &snap.members[0];
    assert_eq!((member.tokens_used, member.requests_used), (1_400, 200));
    assert_eq!(member.latency.total_ms.samples(), 200);
    assert_eq!(member.latency.output_tokens.samples(), 200);
    assert_eq!(
        (member.estimated_tokens, member.actual_tokens),
        (20_000, 1_400)
    );
    let calls = server.calls("evalsha");
    assert!(
        (1..100).contains(&calls),
        "200 settles ending together took {calls} script calls (one each unbatched)"
    );
}

/// Completed requests on a lease are summed per member before they reach Redis: the state is
/// the one every receipt would have left, and the newest hints win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_summed_on_the_way_leave_the_same_state() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_secs(30))).await;
    let pool = PoolName::new("summed");
    let c = ptu(None);
    let admitted = admit_all(&store, &pool, &c, 200, 100).await;
    let on_leases = admitted.iter().filter(|(_, r)| r.id == 0).count();
    assert!(on_leases > 150, "{on_leases} of 200 on leases");
    let start = tokio::time::Instant::now();
    server.reset_stats();
    let mut settles = Vec::new();
    for (i, (backend, reservation)) in admitted.into_iter().enumerate() {
        let (store, pool) = (store.clone(), pool.clone());
        // Observed in order, 5 ms apart: the last one (utilization 0.199) is the newest.
        // Redis places a hint by its age, sent in whole milliseconds: hints 1 ms apart are at
        // that resolution, and two calls' could swap.
        let hints = UpstreamHints {
            remaining_tokens: None,
            utilization: Some(i as f64 / 1000.0),
            observed: Some(start - Duration::from_millis(5 * (200 - i as u64))),
        };
        settles.push(tokio::spawn(async move {
            let receipt = Receipt {
                hints,
                ..completed(reservation, 7)
            };
            store.settle(&pool, &backend, receipt).await
        }));
    }
    for settle in settles {
        settle.await.unwrap().unwrap();
    }
    let calls = server.calls("evalsha");
    assert!(
        (1..20).contains(&calls),
        "{calls} settle calls for 200 receipts"
    );
    store.close().await; // the last lease's rest
    let snap = store.snapshot(&pool, &c).await.unwrap();
    let member = &snap.members[0];
    assert_eq!((member.tokens_used, member.requests_used), (1_400, 200));
    assert_eq!(member.latency.ttfb_ms.samples(), 200);
    assert_eq!(member.latency.output_tokens.samples(), 200);
    assert_eq!(
        (member.estimated_tokens, member.actual_tokens),
        (20_000, 1_400)
    );
    assert_eq!((member.prompt_tokens, member.cached_tokens), (400, 200));
    assert_eq!(member.hints.utilization, Some(0.199));
}

fn member(name: &str, tier: u32) -> Candidate {
    Candidate {
        tier,
        ..Candidate::unlimited(BackendId::new(name))
    }
}

/// Inside a tier the order is advice: a lease on any of its members admits without a round
/// trip. A later tier's lease never admits before Redis has refused the earlier tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_serves_its_whole_tier_but_never_jumps_a_tier() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_secs(30))).await;
    let pool = PoolName::new("tiers");
    let (a, b) = (member("ptu-a", 1), member("ptu-b", 1));
    // Build demand and a lease on ptu-a.
    admit_all(&store, &pool, &[a.clone(), b.clone()], 40, 10).await;

    let waited = store.acquires_waited();
    let Admission::Admitted { backend, .. } = store
        .acquire(&pool, &[b.clone(), a.clone()], 10)
        .await
        .unwrap()
    else {
        panic!("admitted")
    };
    assert_eq!(backend.as_str(), "ptu-a", "admitted on the tier's lease");
    // (A refill may leave in the background; the request did not wait for one.)
    assert_eq!(store.acquires_waited(), waited, "no round trip");

    // PAYG (tier 2) holds a lease; a PTU of tier 1 holds none and was never passed over.
    let payg = member("payg", 2);
    let other_pool = PoolName::new("tiers-payg");
    admit_all(&store, &other_pool, std::slice::from_ref(&payg), 40, 10).await;
    let ptu = member("ptu-c", 1);
    let waited = store.acquires_waited();
    let Admission::Admitted { backend, .. } = store
        .acquire(&other_pool, &[ptu.clone(), payg.clone()], 10)
        .await
        .unwrap()
    else {
        panic!("admitted")
    };
    assert_eq!(
        backend.as_str(),
        "ptu-c",
        "Redis was asked about the PTU first"
    );
    assert_eq!(store.acquires_waited(), waited + 1);
}

/// A lower traffic class's line is decided in Redis, one request at a time: it never takes
/// from a lease the busy top class holds, nor is granted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_below_a_line_is_never_admitted_on_a_lease() {
    let server = RedisServer::start();
    let store = ready(leasing(&server, Duration::from_secs(30))).await;
    let pool = PoolName::new("lined");
    let top = ptu(Some(1_000_000));
    let below_line = [Candidate {
        ceiling: Some(500_000),
        ..top[0].clone()
    }];
    // The top class gets busy enough to hold a lease.
    admit_all(&store, &pool, &top, 100, 10).await;
    let waited = store.acquires_waited();
    admit_all(&store, &pool, &top, 1, 10).await;
    assert_eq!(
        store.acquires_waited(),
        waited,
        "the top class admits on its lease"
    );

    server.reset_stats();
    admit_all(&store, &pool, &below_line, 20, 10).await;
    assert_eq!(
        server.calls("evalsha"),
        20,
        "each lower-class request is one acquire.lua call"
    );
}
