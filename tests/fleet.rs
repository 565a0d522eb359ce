//! A fleet of replicas deciding as one through Redis: shared backoff, shared budgets (and the
//! overshoot without sharing), Redis dying under load, and a Redis Cluster.

use std::time::Duration;

use spillway_shared::{BackendId, Candidate, FleetState, PoolName};
use spillway_tests::redis_server::{RedisCluster, RedisServer};
use spillway_tests::*;

/// Every request is charged and uses 9 prompt + 8 output tokens.
const TOKENS_PER_REQUEST: u64 = 17;
/// The PTU budget: 100 requests' worth.
const PTU_TPM: u64 = 100 * TOKENS_PER_REQUEST;

fn two_tiers(sim: &spillway_gateway::sim::SimHandle, ptu_tpm: Option<u64>) -> String {
    let ptu = backend(sim, "ptu", 1);
    let ptu = match ptu_tpm {
        Some(tpm) => ptu.replace("id = \"ptu\"\n", &format!("id = \"ptu\"\ntpm = {tpm}\n")),
        None => ptu,
    };
    ptu + &backend(sim, "payg", 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_seen_by_one_replica_holds_back_the_whole_fleet() {
    let redis = RedisServer::start();
    let sim = ptu_and_payg().await;
    let config = two_tiers(&sim, None) + &redis_section(&redis.url(), "");
    let (a, _) = start_on_redis(&config).await;
    let (b, _) = start_on_redis(&config).await;
    let (c, fleet) = start_on_redis(&config).await;

    force(&sim, "ptu", 429, Some(3_000), Some(3), Some(1));
    let r = chat(&a, "gpt-4o", &chat_body(false)).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-spillway-backend")),
        (200, "payg")
    );

    for replica in [&b, &c, &b, &c, &b, &c] {
        let r = chat(replica, "gpt-4o", &chat_body(false)).await;
        assert_eq!(
            header(&r, "x-spillway-backend"),
            "payg",
            "B and C honour A's backoff"
        );
    }
    assert_eq!(
        sim.stats("ptu", "gpt-4o").requests,
        1,
        "PTU got nothing after its 429"
    );

    // After the shared deadline, B and C use the PTU again.
    let pool = PoolName::new("gpt-4o");
    let snapshot = fleet
        .snapshot(&pool, &[Candidate::unlimited(BackendId::new("ptu"))])
        .await
        .unwrap();
    let remaining = snapshot.members[0]
        .backoff
        .expect("shared backoff")
        .duration;
    tokio::time::sleep(remaining + Duration::from_millis(20)).await; // a deadline, not an event
    for replica in [&b, &c] {
        let r = chat(replica, "gpt-4o", &chat_body(false)).await;
        assert_eq!(header(&r, "x-spillway-backend"), "ptu");
    }
    assert!(!fleet.is_degraded());
}

/// Offer three replicas twice the PTU budget; returns (tokens the PTU served, client 429s).
async fn twice_the_budget(
    replicas: &[&Replica],
    sim: &spillway_gateway::sim::SimHandle,
) -> (u64, usize) {
    let statuses = offer_load(replicas, 200, 12).await;
    let throttled = statuses.iter().filter(|&&s| s == 429).count();
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );
    assert_eq!(
        sim.stats("ptu", "gpt-4o").throttled,
        0,
        "the simulator's own limit never binds"
    );
    (sim.stats("ptu", "gpt-4o").total_tokens, throttled)
}

fn assert_within_budget(ptu_tokens: u64) {
    let (low, high) = (PTU_TPM as f64 * 0.95, PTU_TPM as f64 * 1.02);
    assert!(
        (low..=high).contains(&(ptu_tokens as f64)),
        "PTU served {ptu_tokens} tokens for a budget of {PTU_TPM}"
    );
}

// The default window (a minute): the load completes within it, so one window's admissions
// are measured.
const WINDOW: &str = "";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_redis_fill_the_ptu_budget_exactly_once() {
    let redis = RedisServer::start();
    let sim = ptu_and_payg().await;
    let config = two_tiers(&sim, Some(PTU_TPM)) + &redis_section(&redis.url(), WINDOW);
    let (a, fa) = start_on_redis(&config).await;
    let (b, fb) = start_on_redis(&config).await;
    let (c, fc) = start_on_redis(&config).await;

    let (ptu_tokens, client_429s) = twice_the_budget(&[&a, &b, &c], &sim).await;
    assert_within_budget(ptu_tokens);
    assert_eq!(client_429s, 0, "PAYG had room");
    assert_eq!(
        sim.stats("payg", "gpt-4o").succeeded + sim.stats("ptu", "gpt-4o").succeeded,
        200
    );
    for fleet in [fa, fb, fc] {
        assert_eq!(fleet.fallback_calls(), 0, "every decision was shared");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_shared_state_each_replica_spends_the_budget_again() {
    let sim = ptu_and_payg().await;
    let config = two_tiers(&sim, Some(PTU_TPM)) + "[state]\n" + WINDOW;
    let (a, b, c) = (
        start_single(&config).await,
        start_single(&config).await,
        start_single(&config).await,
    );

    let (ptu_tokens, _) = twice_the_budget(&[&a, &b, &c], &sim).await;
    assert!(
        ptu_tokens as f64 > PTU_TPM as f64 * 1.5,
        "three embedded stores admit up to 3x the budget: PTU served {ptu_tokens} for {PTU_TPM}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_holds_on_a_three_master_cluster() {
    let cluster = RedisCluster::start();
    let sim = ptu_and_payg().await;
    let config = two_tiers(&sim, Some(PTU_TPM)) + &redis_section(&cluster.url(), WINDOW);
    let (a, fa) = start_on_redis(&config).await;
    let (b, _) = start_on_redis(&config).await;
    let (c, _) = start_on_redis(&config).await;

    let (ptu_tokens, client_429s) = twice_the_budget(&[&a, &b, &c], &sim).await;
    assert_within_budget(ptu_tokens);
    assert_eq!(client_429s, 0);
    assert_eq!(fa.fallback_calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dying_under_load_fails_no_request_and_the_fleet_returns_to_it() {
    let mut redis = RedisServer::start();
    let sim = ptu_and_payg().await;
    let config = two_tiers(&sim, None) + &redis_section(&redis.url(), "");
    let (a, fa) = start_on_redis(&config).await;
    let (b, fb) = start_on_redis(&config).await;
    let (c, fc) = start_on_redis(&config).await;
    let replicas = [&a, &b, &c];
    let fleets = [&fa, &fb, &fc];

    assert!(offer_load(&replicas, 30, 6).await.iter().all(|&s| s == 200));
    let pool = PoolName::new("gpt-4o");
    let ptu = [Candidate::unlimited(BackendId::new("ptu"))];
    let mut viewed = 0; // requests in the replicas' last shared views, with their leases
    for fleet in fleets {
        let view = fleet.snapshot(&pool, &ptu).await.unwrap();
        viewed = viewed.max(view.members[0].requests_used);
    }
    redis.kill();
    assert!(
        offer_load(&replicas, 60, 6).await.iter().all(|&s| s == 200),
        "no request fails while Redis is down"
    );
    for fleet in fleets {
        tokio::time::timeout(EVENT_TIMEOUT, fleet.wait_degraded())
            .await
            .expect("each replica noticed");
    }
    redis.restart();
    for fleet in fleets {
        tokio::time::timeout(EVENT_TIMEOUT, fleet.wait_shared())
            .await
            .expect("each replica is back on Redis");
    }
    let before = fleets.map(|f| f.fallback_calls());
    assert!(offer_load(&replicas, 30, 6).await.iter().all(|&s| s == 200));
    assert_eq!(
        fleets.map(|f| f.fallback_calls()),
        before,
        "decisions are shared again"
    );

    // The restarted (empty) Redis holds all the fleet did: the 30 requests before the
    // outage (restored from the last shared view), the 60 admitted while it was down
    // (written back on return) and the 30 after, once the replicas have given back their
    // leases. The view restored also counted the leases out before the outage, whose unused
    // part could not be given back to the Redis that died: the fleet errs on the side of
    // spending less, by at most what those leases held.
    for fleet in fleets {
        fleet.close().await;
    }
    let snap = fa.snapshot(&pool, &ptu).await.unwrap();
    let charged = snap.members[0].requests_used;
    assert!(
        (120..=viewed + 90).contains(&charged),
        "{charged} requests charged for 120 served ({viewed} in the last view before the outage)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_read_the_fleet_table_from_redis() {
    let redis = RedisServer::start();
    let sim = ptu_and_payg().await;
    let config_text = two_tiers(&sim, Some(PTU_TPM)) + &redis_section(&redis.url(), "");
    let config = spillway_gateway::config::Config::from_toml(&config_text).unwrap();
    let fleet = spillway_gateway::server::redis_fleet(&config, &redis.url()).unwrap();
    let observed = ObservedState::new(fleet);
    let gw = start_gateway(&config_text, observed.clone()).await;
    force(&sim, "payg", 503, None, None, None);
    for n in 1..=3 {
        chat(&gw, "gpt-4o", &chat_body(false))
            .await
            .bytes()
            .await
            .unwrap();
        observed.settled(n).await;
    }
    // PAYG is put in backoff through the settle of a failed attempt.
    sim.set_faults(
        "ptu",
        "gpt-4o",
        Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
    );
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 502);

    // A separate reader, as `spillway state` is.
    let reader = spillway_gateway::server::redis_state(&config, &redis.url()).unwrap();
    reader.ready(Duration::from_secs(5)).await.unwrap();
    let table = spillway_gateway::ops::state_table::render(&gw.gateway.table, &reader, 20_000)
        .await
        .unwrap();
    let ptu = table
        .lines()
        .find(|l| l.trim_start().starts_with("ptu "))
        .expect("ptu row");
    assert!(ptu.contains(&format!("51/{PTU_TPM}")), "{table}");
    assert!(ptu.contains("server_error"), "{table}");
    let payg = table
        .lines()
        .find(|l| l.trim_start().starts_with("payg "))
        .expect("payg row");
    assert!(payg.contains("server_error"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_requests_failures_and_a_degraded_replica() {
    let mut redis = RedisServer::start();
    let sim = ptu_and_payg().await;
    let config = two_tiers(&sim, None) + &redis_section(&redis.url(), "");
    let (gw, fleet) = start_on_redis(&config).await;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}/metrics", admin.local_addr().unwrap());
    let router = spillway_gateway::admin(gw.gateway.clone());
    tokio::spawn(spillway_gateway::edge::http_server::serve(
        admin,
        router,
        Default::default(),
        std::future::pending(),
    ));

    force(&sim, "ptu", 503, None, None, Some(1));
    assert_eq!(chat(&gw, "gpt-4o", &chat_body(false)).await.status(), 200);
    redis.kill();
    // A replica turns degraded after a few failed decisions in a row, not one.
    for _ in 0..spillway_shared::fallback::ENTER_AFTER {
        assert_eq!(chat(&gw, "gpt-4o", &chat_body(false)).await.status(), 200);
    }
    tokio::time::timeout(EVENT_TIMEOUT, fleet.wait_degraded())
        .await
        .expect("degraded");

    let text = client()
        .get(&admin_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("spillway_fleet_state_degraded 1"), "{text}");
    let line = |name: &str, needle: &str| {
        text.lines()
            .any(|l| l.starts_with(name) && l.contains(needle))
    };
    assert!(line("spillway_requests_total", "status=\"200\""), "{text}");
    assert!(
        line(
            "spillway_upstream_failures_total",
            "reason=\"server_error\""
        ),
        "{text}"
    );
    assert!(
        !text.lines().any(
            |l| l.starts_with("spillway_fleet_state_fallback_decisions ") && l.ends_with(" 0")
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_tokens_by_tier_latencies_budget_use_and_held_back_members() {
    let sim = ptu_and_payg().await;
    let fleet = ObservedState::new(std::sync::Arc::new(
        spillway_shared::EmbeddedState::default(),
    ));
    let gw = start_gateway(&two_tiers(&sim, Some(PTU_TPM)), fleet.clone()).await;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}/metrics", admin.local_addr().unwrap());
    tokio::spawn(spillway_gateway::edge::http_server::serve(
        admin,
        spillway_gateway::admin(gw.gateway.clone()),
        Default::default(),
        std::future::pending(),
    ));

    // Two answers from the PTU (tier 1), a stream among them; then it fails once, is held
    // back, and PAYG (tier 2) answers.
    for stream in [false, true] {
        let r = chat(&gw, "gpt-4o", &chat_body(stream)).await;
        assert_eq!(header(&r, "x-spillway-backend"), "ptu");
        r.bytes().await.unwrap();
    }
    force(&sim, "ptu", 503, None, None, Some(1));
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(header(&r, "x-spillway-backend"), "payg");
    r.bytes().await.unwrap();
    // Answers are measured as they are settled: 3 answers, 1 failed attempt.
    fleet.settled(4).await;

    let text = client()
        .get(&admin_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str, needles: &[&str]| -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .reduce(f64::max)
    };
    let ptu_tokens = value(
        "spillway_tokens_total{",
        &[
            "backend=\"ptu\"",
            "tier=\"1\"",
            "direction=\"output\"",
            "consumer=\"none\"",
        ],
    );
    assert!(ptu_tokens >= Some(16.0), "{text}");
    assert!(
        value(
            "spillway_tokens_total{",
            &["backend=\"payg\"", "tier=\"2\"", "direction=\"input\""]
        ) > Some(0.0),
        "{text}"
    );
    for histogram in [
        "spillway_request_duration_seconds_bucket{",
        "spillway_time_to_first_token_seconds_bucket{",
        "spillway_token_estimate_ratio_bucket{",
    ] {
        assert!(
            value(histogram, &["pool=\"gpt-4o\""]) > Some(0.0),
            "{histogram}\n{text}"
        );
    }
    assert!(
        value(
            "spillway_fleet_state_call_seconds_count",
            &["op=\"acquire\""]
        ) >= Some(3.0),
        "{text}"
    );
    let used = value("spillway_budget_used_ratio", &["backend=\"ptu\""]).expect("budget use");
    assert!(used > 0.0 && used < 1.0, "{text}");
    assert!(
        value("spillway_member_held_back_seconds", &["backend=\"ptu\""]) > Some(0.0),
        "{text}"
    );
    assert_eq!(
        value("spillway_member_held_back_seconds", &["backend=\"payg\""]),
        Some(0.0),
        "{text}"
    );
    // A 503 is a failure: the PTU's breaker counts as open while it is held back.
    assert_eq!(
        value("spillway_member_breaker_open", &["backend=\"ptu\""]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value("spillway_member_breaker_open", &["backend=\"payg\""]),
        Some(0.0),
        "{text}"
    );
}
