//! Smart routing scenarios against the simulator: a noisy neighbour, PTU saturation with
//! proactive spill-over, a regional outage and the fleet-wide breaker, and data residency.
//! They assert outcomes (where traffic went, what clients saw), never timings.

use std::time::Duration;

use spillway_gateway::sim::{DeploymentKind, DeploymentSpec, ResourceSpec, SimHandle};
use spillway_shared::{BackendId, BackoffReason, Candidate, FleetState, PoolName};
use spillway_tests::redis_server::RedisServer;
use spillway_tests::*;

fn spec(kind: DeploymentKind, tpm: u64) -> DeploymentSpec {
    DeploymentSpec {
        ttft_ms: 20,
        ms_per_token: 3,
        jitter: 0.0,
        ..DeploymentSpec::new("gpt-4o", kind, tpm)
    }
}

fn in_region(name: &str, region: &str, spec: DeploymentSpec) -> ResourceSpec {
    ResourceSpec {
        region: Some(region.into()),
        ..resource(name, vec![spec])
    }
}

/// `[[backends]]` for the simulated resources, with their regions and priorities.
fn backends(sim: &SimHandle, members: &[(&str, &str, u32)]) -> String {
    members
        .iter()
        .map(|(id, region, priority)| {
            backend(sim, id, *priority)
                .replace("priority =", &format!("region = \"{region}\"\npriority ="))
        })
        .collect()
}

/// Send `n` requests one after another; return the backend that served each.
async fn served_by(gw: &Replica, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = chat(gw, "gpt-4o", &chat_body(false)).await;
        assert_eq!(r.status(), 200);
        out.push(header(&r, "x-spillway-backend").to_string());
        r.bytes().await.unwrap();
    }
    out
}

fn count(list: &[String], backend: &str) -> usize {
    list.iter().filter(|b| *b == backend).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_neighbour_loses_its_traffic_and_regains_it_when_it_recovers() {
    let sim = start_sim(vec![
        in_region("ptu-a", "eastus", spec(DeploymentKind::Ptu, 10_000_000)),
        in_region("ptu-b", "eastus", spec(DeploymentKind::Ptu, 10_000_000)),
    ])
    .await;
    let config = backends(&sim, &[("ptu-a", "eastus", 1), ("ptu-b", "eastus", 1)])
        + "[state]\nlatency_window_ms = 2000\n[routing]\nview_refresh_ms = 50\n";
    let gw = start_single(&config).await;

    let warm = served_by(&gw, 30).await;
    assert!(
        count(&warm, "ptu-a") >= 5 && count(&warm, "ptu-b") >= 5,
        "both measured: {warm:?}"
    );

    // ptu-a slows to five times its latency.
    sim.set_faults(
        "ptu-a",
        "gpt-4o",
        Faults {
            slowdown: 5.0,
            ..Faults::default()
        },
    );
    let during = served_by(&gw, 50).await;
    let late = &during[30..];
    assert!(
        count(late, "ptu-a") <= 4,
        "traffic moved off the slow member: {late:?}"
    );

    // It recovers; once its slow samples leave the latency window, traffic returns.
    sim.set_faults("ptu-a", "gpt-4o", Faults::default());
    tokio::time::sleep(Duration::from_millis(2_500)).await; // the latency window's length, not an event
    let after = served_by(&gw, 40).await;
    assert!(
        count(&after[20..], "ptu-a") >= 5,
        "traffic returned: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptu_saturation_spills_to_payg_before_ptu_throttles() {
    let redis = RedisServer::start();
    // Two small PTUs (1,000 tokens per 10 s each: about 60 requests, then 6 a second) and a
    // large PAYG; instant answers so the offered load is far above PTU capacity.
    let ptu = |name: &str| {
        in_region(
            name,
            "eastus",
            DeploymentSpec {
                window_ms: 10_000,
                ..instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000)
            },
        )
    };
    let sim = start_sim(vec![
        ptu("ptu-1"),
        ptu("ptu-2"),
        in_region(
            "payg",
            "eastus",
            instant_deployment("gpt-4o", DeploymentKind::Payg, 10_000_000),
        ),
    ])
    .await;
    let config = backends(
        &sim,
        &[
            ("ptu-1", "eastus", 1),
            ("ptu-2", "eastus", 1),
            ("payg", "eastus", 2),
        ],
    ) + &redis_section(&redis.url(), "");
    let (a, _) = start_on_redis(&config).await;
    let (b, _) = start_on_redis(&config).await;
    let (c, _) = start_on_redis(&config).await;

    let statuses = offer_load(&[&a, &b, &c], 600, 8).await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "clients never saw a 429 while PAYG had room"
    );
    let ptu_served =
        sim.stats("ptu-1", "gpt-4o").succeeded + sim.stats("ptu-2", "gpt-4o").succeeded;
    let ptu_429s = sim.stats("ptu-1", "gpt-4o").throttled + sim.stats("ptu-2", "gpt-4o").throttled;
    assert!(
        ptu_served >= 100,
        "PTU was used to capacity first: {ptu_served}"
    );
    assert!(
        sim.stats("payg", "gpt-4o").succeeded > 0,
        "PAYG took the overflow"
    );
    // Measured: without the capacity hints this load draws about 25; with them, 0 to 3.
    assert!(
        ptu_429s <= 10,
        "PTU answered only a handful of 429s: {ptu_429s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regional_outage_opens_the_breaker_fleet_wide_and_recovery_closes_it() {
    let redis = RedisServer::start();
    let sim = start_sim(vec![
        in_region(
            "east-1",
            "eastus",
            instant_deployment("gpt-4o", DeploymentKind::Ptu, 10_000_000),
        ),
        in_region(
            "east-2",
            "eastus",
            instant_deployment("gpt-4o", DeploymentKind::Ptu, 10_000_000),
        ),
        in_region(
            "west-1",
            "westus",
            instant_deployment("gpt-4o", DeploymentKind::Ptu, 10_000_000),
        ),
    ])
    .await;
    let config = backends(
        &sim,
        &[
            ("east-1", "eastus", 1),
            ("east-2", "eastus", 1),
            ("west-1", "westus", 1),
        ],
    ) + &redis_section(&redis.url(), "")
        + "[routing]\ndefault_backoff_ms = 1000\nbreaker_probe_ms = 300\n";
    let (a, fleet) = start_on_redis(&config).await;
    let (b, _) = start_on_redis(&config).await;
    let (c, _) = start_on_redis(&config).await;

    for east in ["east-1", "east-2"] {
        sim.set_faults(
            east,
            "gpt-4o",
            Faults {
                error_rate: 1.0,
                ..Faults::default()
            },
        );
    }
    let statuses = offer_load(&[&a, &b, &c], 90, 3).await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "every request was served from the other region"
    );
    let east_tries =
        sim.stats("east-1", "gpt-4o").requests + sim.stats("east-2", "gpt-4o").requests;
    assert!(
        east_tries <= 8,
        "the fleet stopped sending to the failing region: {east_tries} tries"
    );
    let pool = PoolName::new("gpt-4o");
    let east = [
        Candidate::unlimited(BackendId::new("east-1")),
        Candidate::unlimited(BackendId::new("east-2")),
    ];
    let snapshot = fleet.snapshot(&pool, &east).await.unwrap();
    for m in &snapshot.members {
        let reason = m.backoff.map(|b| b.reason);
        assert!(
            matches!(
                reason,
                Some(BackoffReason::ServerError | BackoffReason::Probing)
            ),
            "{:?} open: {reason:?}",
            m.backend
        );
    }

    // The region recovers: after the cool-down a probe succeeds and the breaker closes.
    for east in ["east-1", "east-2"] {
        sim.set_faults(east, "gpt-4o", Faults::default());
    }
    let longest = snapshot
        .members
        .iter()
        .filter_map(|m| m.backoff.map(|b| b.duration))
        .max()
        .unwrap_or_default();
    tokio::time::sleep(longest + Duration::from_millis(50)).await; // the cool-down, not an event
    let before = sim.stats("east-1", "gpt-4o").succeeded + sim.stats("east-2", "gpt-4o").succeeded;
    let statuses = offer_load(&[&a, &b, &c], 60, 3).await;
    assert!(statuses.iter().all(|&s| s == 200));
    let after = sim.stats("east-1", "gpt-4o").succeeded + sim.stats("east-2", "gpt-4o").succeeded;
    assert!(
        after - before >= 10,
        "traffic returned to the recovered region: {}",
        after - before
    );
    let snapshot = fleet.snapshot(&pool, &east).await.unwrap();
    assert!(
        snapshot.members.iter().all(|m| m.backoff.is_none()),
        "breakers closed: {snapshot:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_restricted_to_eu_regions_never_reaches_a_us_member() {
    let sim = start_sim(vec![
        in_region(
            "eu",
            "swedencentral",
            instant_deployment("gpt-4o", DeploymentKind::Ptu, 10_000_000),
        ),
        in_region(
            "us",
            "eastus",
            instant_deployment("gpt-4o", DeploymentKind::Payg, 10_000_000),
        ),
    ])
    .await;
    let config = backends(&sim, &[("eu", "swedencentral", 1), ("us", "eastus", 2)])
        + "[pools.gpt-4o]\nregions = [\"swedencentral\", \"francecentral\"]\n";
    let gw = start_single(&config).await;

    assert_eq!(count(&served_by(&gw, 5).await, "eu"), 5);
    // Saturated: the EU member throttles. The request is refused rather than sent to the US.
    force(&sim, "eu", 429, Some(5_000), None, None);
    for _ in 0..5 {
        let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
        assert_eq!(r.status(), 429);
    }
    assert_eq!(
        sim.stats("us", "gpt-4o").requests,
        0,
        "no request ever left the EU"
    );
}
