//! One fleet across regions: replicas far from Redis (a proxy adding 40 ms each way, about
//! Sweden Central to East US) decide on the fleet's state without waiting on it, on default
//! settings. Each check also runs next to Redis, so a difference is the distance's.
//! (How long requests take at each distance is measured by `scripts/bench.sh distance`,
//! never asserted here.)

use std::time::Duration;

use spillway_tests::far_fleet::{PTU_REQUESTS, PTU_TPM, fleet_at};
use spillway_tests::*;

const NEAR: Duration = Duration::ZERO;
const FAR: Duration = Duration::from_millis(40);

/// 2× the PTU's budget offered, 12 in flight over three replicas: the PTU serves its budget
/// (0.9–1.05×), PAYG the rest, no client sees an error, and the replicas decide on the
/// fleet's state: almost no decision is taken alone, and few requests wait for Redis.
async fn twice_the_budget(one_way: [Duration; 3]) {
    let fleet = fleet_at(one_way, Some(PTU_TPM)).await;
    let refs: Vec<&Replica> = fleet.replicas.iter().collect();
    let offered = 2 * PTU_REQUESTS as usize;
    let statuses = offer_load(&refs, offered, 12).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");

    let ptu = fleet.sim.stats("ptu", "gpt-4o").total_tokens;
    let alone: u64 = fleet.states.iter().map(|s| s.fallback_calls()).sum();
    let waited: u64 = fleet.states.iter().map(|s| s.acquires_waited()).sum();
    let round_trips: Vec<_> = fleet.states.iter().map(|s| s.round_trip()).collect();
    eprintln!(
        "{one_way:?}: PTU served {:.2}x its budget; {alone} decisions alone, {waited} of {offered} requests waited for Redis; round trips {round_trips:?}",
        ptu as f64 / PTU_TPM as f64
    );
    // Every replica's distance, as operators read it (`spillway state`, `spillway top`).
    let distances = spillway_shared::FleetState::replicas(&*fleet.states[0])
        .await
        .unwrap();
    let mut reported: Vec<Duration> = distances.iter().map(|d| d.round_trip).collect();
    reported.sort();
    let mut expected = one_way.to_vec();
    expected.sort();
    assert_eq!(reported.len(), 3, "{distances:?}");
    for (seen, delay) in reported.iter().zip(expected) {
        assert!(
            *seen >= 2 * delay && *seen < 2 * delay + Duration::from_millis(40),
            "{distances:?}"
        );
    }
    // Each replica measured its own distance, and waits on Redis in proportion to it.
    for (state, delay) in fleet.states.iter().zip(one_way) {
        let health = spillway_shared::FleetState::health(&**state);
        let (round_trip, timeout) = (health.round_trip.unwrap(), health.call_timeout.unwrap());
        assert!(
            round_trip >= 2 * delay,
            "{round_trip:?} at {delay:?} each way"
        );
        assert!(timeout > round_trip, "{timeout:?} for {round_trip:?}");
    }
    assert!(
        (0.9..=1.05).contains(&(ptu as f64 / PTU_TPM as f64)),
        "PTU served {ptu} tokens of a {PTU_TPM} budget"
    );
    assert!(
        alone as f64 <= offered as f64 * 0.02,
        "{alone} of {offered} decisions taken without the fleet"
    );

    // The steady state: the PTU full, every request on PAYG. Requests are admitted on leases
    // refilled ahead of demand; hardly any waits for Redis.
    let steady = PTU_REQUESTS as usize;
    let refill_waits_before: u64 = fleet.states.iter().map(|s| s.refill_waits()).sum();
    let statuses = offer_load(&refs, steady, 12).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let waited_steady = fleet
        .states
        .iter()
        .map(|s| s.acquires_waited())
        .sum::<u64>()
        - waited;
    let refill_waits =
        fleet.states.iter().map(|s| s.refill_waits()).sum::<u64>() - refill_waits_before;
    eprintln!(
        "{one_way:?}: then {waited_steady} of {steady} requests waited for Redis; {refill_waits} for a refill on its way"
    );
    assert!(
        waited_steady as f64 <= steady as f64 * 0.05,
        "{waited_steady} of {steady} requests waited for Redis in the steady state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_to_redis_the_fleet_keeps_the_budget() {
    twice_the_budget([NEAR; 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_from_redis_the_fleet_keeps_the_budget_without_waiting_on_it() {
    twice_the_budget([FAR; 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_at_mixed_distances_keep_the_budget() {
    twice_the_budget([NEAR, FAR, FAR]).await;
}

/// A 429 with a minute's retry-after, met by one replica far from Redis: after one round trip
/// plus a second the other replicas (holding leases on the PTU) send it nothing more.
async fn a_throttle_seen_by_one_is_the_fleets(one_way: [Duration; 3]) {
    let fleet = fleet_at(one_way, None).await;
    let refs: Vec<&Replica> = fleet.replicas.iter().collect();
    // Every replica admits on the PTU, on leases.
    assert!(offer_load(&refs, 90, 12).await.iter().all(|&s| s == 200));
    assert_eq!(fleet.sim.stats("payg", "gpt-4o").requests, 0);

    force(&fleet.sim, "ptu", 429, Some(60_000), None, Some(1));
    let r = chat(&fleet.replicas[0], "gpt-4o", &chat_body(false)).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-spillway-backend")),
        (200, "payg"),
        "the 429 met, and retried on PAYG"
    );
    let round_trip = one_way.iter().max().copied().unwrap_or_default() * 2;
    // The bound under test, not an event to wait for.
    tokio::time::sleep(round_trip + Duration::from_secs(1)).await;

    let ptu_before = fleet.sim.stats("ptu", "gpt-4o").requests;
    let others: Vec<&Replica> = fleet.replicas[1..].iter().collect();
    assert!(offer_load(&others, 60, 12).await.iter().all(|&s| s == 200));
    assert_eq!(
        fleet.sim.stats("ptu", "gpt-4o").requests,
        ptu_before,
        "the other replicas kept off the throttled PTU"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_to_redis_a_throttle_seen_by_one_is_the_fleets() {
    a_throttle_seen_by_one_is_the_fleets([NEAR; 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_from_redis_a_throttle_seen_by_one_is_the_fleets() {
    a_throttle_seen_by_one_is_the_fleets([FAR; 3]).await;
}
