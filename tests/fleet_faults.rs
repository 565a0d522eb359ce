//! Fleet consistency under faults: settlements are never lost to a client that goes away,
//! and a member that breaks its streams off is treated as failing.

use std::sync::Arc;

use futures_util::StreamExt;
use spillway_gateway::sim::{DeploymentKind, DeploymentSpec, Faults};
use spillway_shared::{BackendId, Candidate, EmbeddedState, FleetState, PoolName};
use spillway_tests::redis_server::RedisServer;
use spillway_tests::*;
use std::time::Duration;

/// A PTU deployment that takes 30 s to its response head: a client can leave before it.
fn slow_head_deployment() -> DeploymentSpec {
    DeploymentSpec {
        ttft_ms: 30_000,
        ms_per_token: 0,
        jitter: 0.0,
        ..DeploymentSpec::new("gpt-4o", DeploymentKind::Ptu, 1_000_000)
    }
}

async fn leaves_before_the_head_and_budgets_stay_exact(fleet: Arc<dyn FleetState>) {
    let sim = start_sim(vec![resource("ptu", vec![slow_head_deployment()])]).await;
    let observed = ObservedState::new(fleet.clone());
    let gw = start_gateway(&backend(&sim, "ptu", 1), observed.clone()).await;

    let client_request = tokio::spawn({
        let url = format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            gw.url
        );
        async move { client().post(url).json(&chat_body(false)).send().await }
    });
    assert!(
        sim.wait_until(EVENT_TIMEOUT, |s| s.stats("ptu", "gpt-4o").requests == 1)
            .await,
        "the request reached the member"
    );
    let (reserved, _) = charged(&*fleet, "ptu").await;
    assert!(
        reserved > 0,
        "the estimate is reserved while the request is out"
    );

    client_request.abort(); // the client goes away before any response head
    observed.settled(1).await;
    assert_eq!(
        charged(&*fleet, "ptu").await.0,
        0,
        "the abandoned reservation is released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_head_releases_its_reservation_embedded() {
    leaves_before_the_head_and_budgets_stay_exact(Arc::new(EmbeddedState::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_head_releases_its_reservation_on_redis() {
    let redis = RedisServer::start();
    let config = redis_section(&redis.url(), "");
    let config = spillway_gateway::config::Config::from_toml(&(config + "[[backends]]\nid = \"x\"\nurl = \"http://127.0.0.1:1\"\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }\n")).unwrap();
    let store = spillway_gateway::server::redis_state(&config, &redis.url()).unwrap();
    store.ready(EVENT_TIMEOUT).await.unwrap();
    leaves_before_the_head_and_budgets_stay_exact(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_cuts_streams_mid_way_is_backed_off() {
    let sim = ptu_and_payg().await;
    let fleet: Arc<dyn FleetState> = Arc::new(EmbeddedState::default());
    let observed = ObservedState::new(fleet.clone());
    // Default settings: one failure opens the breaker (`routing.breaker_failures = 1`).
    let gw = start_gateway(
        &(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2)),
        observed.clone(),
    )
    .await;
    sim.set_faults(
        "ptu",
        "gpt-4o",
        Faults {
            cut_after_chunks: Some(4),
            ..Faults::default()
        },
    );

    let response = chat(&gw, "gpt-4o", &chat_body(true)).await;
    assert_eq!(header(&response, "x-spillway-backend"), "ptu");
    let mut body = response.bytes_stream();
    let mut broke = false;
    while let Some(chunk) = body.next().await {
        if chunk.is_err() {
            broke = true;
            break;
        }
    }
    assert!(broke, "the client sees the stream break, not a clean end");
    observed.settled(1).await;
    assert_eq!(sim.stats("ptu", "gpt-4o").streams_cut, 1);

    let snapshot = fleet
        .snapshot(
            &PoolName::new("gpt-4o"),
            &[Candidate::unlimited(BackendId::new("ptu"))],
        )
        .await
        .unwrap();
    let member = &snapshot.members[0];
    assert_eq!(
        member.backoff.map(|b| b.reason.as_str()),
        Some("stream_cut"),
        "{member:?}"
    );
    assert_eq!(
        member.latency.ttfb_ms.samples(),
        0,
        "a broken stream leaves no latency sample"
    );
    let next = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(header(&next, "x-spillway-backend"), "payg");
}

/// Every request is charged and uses 9 prompt + 8 output tokens.
const TOKENS_PER_REQUEST: u64 = 17;
/// The PTU budget: 100 requests' worth.
const PTU_TPM: u64 = 100 * TOKENS_PER_REQUEST;

fn ptu_with_budget_and_payg(sim: &spillway_gateway::sim::SimHandle) -> String {
    backend(sim, "ptu", 1).replace(
        "id = \"ptu\"\n",
        &format!("id = \"ptu\"\ntpm = {PTU_TPM}\n"),
    ) + &backend(sim, "payg", 2)
}

async fn three_replicas(config: &str) -> (Vec<Replica>, Vec<Arc<spillway_shared::FallbackState>>) {
    let mut replicas = Vec::new();
    let mut fleets = Vec::new();
    for _ in 0..3 {
        let (replica, fleet) = start_on_redis(config).await;
        replicas.push(replica);
        fleets.push(fleet);
    }
    (replicas, fleets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_hold_while_redis_stalls_again_and_again() {
    let redis = Arc::new(RedisServer::start());
    // Answers take 40 ms, so the load spans several stalls.
    let paced = |kind| DeploymentSpec {
        ttft_ms: 40,
        ms_per_token: 0,
        jitter: 0.0,
        ..DeploymentSpec::new("gpt-4o", kind, 1_000_000)
    };
    let sim = start_sim(vec![
        resource("ptu", vec![paced(DeploymentKind::Ptu)]),
        resource("payg", vec![paced(DeploymentKind::Payg)]),
    ])
    .await;
    // Default settings but the Redis URL: the default redis_timeout_ms, windows and breaker.
    let config = ptu_with_budget_and_payg(&sim) + &redis_section(&redis.url(), "");
    let (replicas, fleets) = three_replicas(&config).await;
    for fleet in &fleets {
        assert_eq!(fleet.announce().await, 3, "heartbeats count the fleet");
    }

    // Redis stops answering for 150 ms every half second while the load runs.
    let stalls = tokio::spawn({
        let redis = redis.clone();
        async move {
            for _ in 0..40 {
                let r = redis.clone();
                tokio::task::spawn_blocking(move || r.cli(&["CLIENT", "PAUSE", "150", "ALL"]))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(500)).await; // the fault's rhythm
            }
        }
    });
    let refs: Vec<&Replica> = replicas.iter().collect();
    let started = tokio::time::Instant::now();
    let statuses = offer_load(&refs, 400, 8).await;
    let took = started.elapsed();
    stalls.abort();

    assert!(
        statuses.iter().all(|&s| s == 200),
        "no client error: {statuses:?}"
    );
    let ptu_tokens = sim.stats("ptu", "gpt-4o").total_tokens;
    let local: u64 = fleets.iter().map(|f| f.fallback_calls()).sum();
    eprintln!(
        "stalls: PTU served {ptu_tokens} tokens of a {PTU_TPM} budget; {local} local decisions; load took {} ms",
        took.as_millis()
    );
    assert!(
        ptu_tokens as f64 <= PTU_TPM as f64 * 1.05,
        "PTU served {ptu_tokens} tokens for a budget of {PTU_TPM}"
    );
    assert!(
        fleets.iter().any(|f| f.fallback_calls() > 0),
        "the stalls were felt (else this test proves nothing)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_replicas_learn_while_redis_is_down_survives_its_restart_empty() {
    let mut redis = RedisServer::start();
    let sim = ptu_and_payg().await;
    let config = ptu_with_budget_and_payg(&sim) + &redis_section(&redis.url(), "");
    let (replicas, fleets) = three_replicas(&config).await;
    let refs: Vec<&Replica> = replicas.iter().collect();
    for fleet in &fleets {
        fleet.announce().await;
    }
    let pool = PoolName::new("gpt-4o");
    let members = [
        Candidate::unlimited(BackendId::new("ptu")),
        Candidate::unlimited(BackendId::new("payg")),
    ];

    // A third of the PTU budget is spent while Redis is up; every replica has seen it.
    assert!(offer_load(&refs, 30, 6).await.iter().all(|&s| s == 200));
    for fleet in &fleets {
        fleet.snapshot(&pool, &members).await.unwrap();
    }

    redis.kill();
    for (replica, fleet) in replicas.iter().zip(&fleets) {
        for _ in 0..spillway_shared::fallback::ENTER_AFTER {
            assert_eq!(
                chat(replica, "gpt-4o", &chat_body(false)).await.status(),
                200
            );
        }
        tokio::time::timeout(EVENT_TIMEOUT, fleet.wait_degraded())
            .await
            .expect("degraded");
    }
    // Replica A alone meets a 429 from the PTU with a minute's retry-after.
    force(&sim, "ptu", 429, Some(60_000), None, Some(1));
    let r = chat(&replicas[0], "gpt-4o", &chat_body(false)).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-spillway-backend")),
        (200, "payg")
    );
    assert!(offer_load(&refs, 60, 6).await.iter().all(|&s| s == 200));

    redis.restart();
    for fleet in &fleets {
        tokio::time::timeout(EVENT_TIMEOUT, fleet.wait_shared())
            .await
            .expect("back on Redis");
    }
    // The backoff A learned is the fleet's now: B and C keep off the PTU until its deadline.
    let shared = fleets[1].snapshot(&pool, &members).await.unwrap();
    let backoff = shared.members[0]
        .backoff
        .expect("the 429 backoff was written back");
    assert_eq!(backoff.reason.as_str(), "throttled");
    assert!(backoff.duration > Duration::from_secs(30), "{backoff:?}");
    let ptu_before = sim.stats("ptu", "gpt-4o").requests;
    for replica in &replicas[1..] {
        let r = chat(replica, "gpt-4o", &chat_body(false)).await;
        assert_eq!(header(&r, "x-spillway-backend"), "payg");
    }
    assert_eq!(sim.stats("ptu", "gpt-4o").requests, ptu_before);

    // And the budget: what was spent before and during the outage still counts.
    let ptu_tokens = sim.stats("ptu", "gpt-4o").total_tokens;
    let used = shared.members[0].tokens_used;
    eprintln!("restart: PTU served {ptu_tokens} tokens, Redis counts {used}, budget {PTU_TPM}");
    assert!(
        used as f64 >= ptu_tokens as f64 * 0.95,
        "Redis counts {used} of the {ptu_tokens} tokens the PTU served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_abandoned_during_a_stall_leaves_no_reservation_behind() {
    let redis = Arc::new(RedisServer::start_with(&["--enable-debug-command", "yes"]));
    let defaults = spillway_gateway::config::Config::from_toml(
        "[[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:1\"\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }\n",
    )
    .unwrap();
    let store = spillway_gateway::server::redis_state(&defaults, &redis.url()).unwrap();
    store.ready(EVENT_TIMEOUT).await.unwrap();
    let fleet = spillway_shared::FallbackState::new(
        store,
        EmbeddedState::default(),
        Duration::from_millis(defaults.state.redis_timeout_ms),
    );
    let pool = PoolName::new("abandoned");
    let c = [Candidate {
        tokens_per_window: Some(1_000_000),
        ..Candidate::unlimited(BackendId::new("a"))
    }];

    // Redis stops for 300 ms (a slow fork, a long script) while requests keep coming.
    let sleeper = tokio::task::spawn_blocking({
        let redis = redis.clone();
        move || redis.cli(&["DEBUG", "SLEEP", "0.3"])
    });
    let mut shared_tokens = 0;
    let mut abandoned = false;
    for _ in 0..100_000 {
        match fleet.acquire(&pool, &c, 100).await.unwrap() {
            spillway_shared::Admission::Admitted { reservation, .. }
                if reservation.issuer == spillway_shared::Issuer::Redis =>
            {
                shared_tokens += 100;
            }
            _ => {
                abandoned = true; // the stall has begun: this one was decided locally
                break;
            }
        }
    }
    assert!(abandoned, "the stall was felt");
    assert_eq!(sleeper.await.unwrap().trim(), "OK");
    // On the same connection, after the abandoned script and its release have run.
    let snapshot = fleet.snapshot(&pool, &c).await.unwrap();
    assert_eq!(
        snapshot.members[0].tokens_used, shared_tokens,
        "only the reservations the replica knows of are charged in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_is_charged_what_was_relayed() {
    let sim = start_sim(vec![resource("ptu", vec![long_stream_deployment()])]).await;
    let fleet: Arc<dyn FleetState> = Arc::new(EmbeddedState::default());
    let observed = ObservedState::new(fleet.clone());
    let gw = start_gateway(&backend(&sim, "ptu", 1), observed.clone()).await;

    let mut body = chat_body(true);
    body["max_tokens"] = 5_000.into();
    let response = chat(&gw, "gpt-4o", &body).await;
    let mut stream = response.bytes_stream();
    let mut relayed = 0;
    while relayed < 20 {
        let chunk = stream.next().await.expect("more").expect("chunk");
        relayed += String::from_utf8_lossy(&chunk)
            .matches("\"content\":\"")
            .count();
    }
    drop(stream); // the client goes away mid-stream

    observed.settled(1).await;
    assert!(
        sim.wait_until(EVENT_TIMEOUT, |s| s
            .stats("ptu", "gpt-4o")
            .streams_cancelled
            == 1)
            .await
    );
    let served = sim.stats("ptu", "gpt-4o");
    let (charged, requests) = charged(&*fleet, "ptu").await;
    eprintln!(
        "mid-stream: charged {charged}, upstream counted {}",
        served.total_tokens
    );
    assert_eq!(requests, 1);
    // Charged: the prompt plus the pieces relayed, never the 5,000-token reservation.
    assert!(charged < 200, "charged {charged}");
    assert!(
        charged.abs_diff(served.total_tokens) <= 10,
        "charged {charged}, upstream counted {}",
        served.total_tokens
    );
}

/// A replica started while Redis is down (a rollout during a Redis restart) serves on its
/// share, and joins the fleet as soon as Redis answers: its decisions then reach Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_before_redis_joins_the_fleet_when_it_answers() {
    let mut redis = RedisServer::start();
    redis.kill();
    let sim = tiers_a_and_b().await;
    let config = backend(&sim, "a", 1) + &redis_section(&redis.url(), "");
    let parsed = spillway_gateway::config::Config::from_toml(&config).unwrap();
    let fleet = spillway_gateway::server::redis_fleet(&parsed, &redis.url()).unwrap();
    assert!(
        !fleet.wait_ready(Duration::from_millis(500)).await,
        "nothing listens yet"
    );
    let gw = start_gateway(&config, fleet.clone()).await;
    assert_eq!(
        chat(&gw, "gpt-4o", &chat_body(false)).await.status(),
        200,
        "served on its share"
    );
    assert!(fleet.is_degraded());

    redis.restart();
    tokio::time::timeout(EVENT_TIMEOUT, fleet.wait_shared())
        .await
        .expect("the replica reconnects and decides on Redis again");
    redis.reset_stats();
    assert_eq!(chat(&gw, "gpt-4o", &chat_body(false)).await.status(), 200);
    assert!(redis.calls("evalsha") > 0, "the decision was Redis's");
}

/// Tokens served while Redis was away are in the replica's own ledger meanwhile, and in
/// Redis's once it is back (written before the replica counts itself back on shared state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_ledger_written_while_redis_was_away_reaches_it_when_it_is_back() {
    let mut redis = RedisServer::start();
    let sim = tiers_a_and_b().await;
    let config = backend(&sim, "a", 1) + &redis_section(&redis.url(), "");
    let (gw, fleet) = start_on_redis(&config).await;
    let served = |n| {
        let gw = &gw;
        async move {
            for _ in 0..n {
                assert_eq!(chat(gw, "gpt-4o", &chat_body(false)).await.status(), 200);
            }
            assert!(spillway_gateway::proxy::all_settled(EVENT_TIMEOUT).await);
            gw.gateway.spend.flush().await;
        }
    };
    let requests = |hours: &[spillway_shared::ledger::HourLedger]| -> u64 {
        hours
            .iter()
            .flat_map(|(_, lines)| lines.values())
            .map(|c| c.requests)
            .sum()
    };
    let now = spillway_shared::ledger::hour_of(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    );
    let hours = (
        now - spillway_shared::ledger::HOUR_MS,
        now + spillway_shared::ledger::HOUR_MS,
    );

    served(2).await;
    redis.kill();
    served(spillway_shared::fallback::ENTER_AFTER as usize + 3).await;
    tokio::time::timeout(EVENT_TIMEOUT, fleet.wait_degraded())
        .await
        .expect("degraded");
    let local = fleet.spend_between(hours.0, hours.1).await.unwrap();
    assert!(
        requests(&local) >= 3,
        "kept by the replica meanwhile: {local:?}"
    );

    redis.restart();
    tokio::time::timeout(EVENT_TIMEOUT, fleet.wait_shared())
        .await
        .expect("back on Redis");
    // Redis lost everything with its restart: what it holds now is what was owed.
    let shared = fleet.spend_between(hours.0, hours.1).await.unwrap();
    assert_eq!(requests(&shared), requests(&local), "{shared:?}");
}
