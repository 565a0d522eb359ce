//! Routing: priority order, failover on 429 / 5xx / connect errors, pass-through of client
//! errors, and what clients get when no member can serve.

use std::time::Duration;

use serde_json::Value;
use spillway_shared::{BackendId, BackoffReason, Candidate, PoolName};
use spillway_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_one_takes_all_traffic_while_it_has_room() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2))).await;
    for _ in 0..20 {
        let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-spillway-backend"), "ptu");
        assert_eq!(header(&r, "x-spillway-attempts"), "1");
    }
    assert_eq!(sim.stats("ptu", "gpt-4o").succeeded, 20);
    assert_eq!(sim.stats("payg", "gpt-4o").requests, 0);
}

async fn backoff_of(gw: &Replica, backend: &str) -> Option<spillway_shared::Backoff> {
    let snap = gw
        .gateway
        .fleet
        .snapshot(
            &PoolName::new("gpt-4o"),
            &[Candidate::unlimited(BackendId::new(backend))],
        )
        .await
        .unwrap();
    snap.members[0].backoff
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_fails_over_and_honours_retry_after_ms() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2))).await;
    force(&sim, "ptu", 429, Some(3_000), Some(3), Some(1));

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 200, "the client never sees the 429");
    assert_eq!(header(&r, "x-spillway-backend"), "payg");
    assert_eq!(header(&r, "x-spillway-attempts"), "2");

    let backoff = backoff_of(&gw, "ptu").await.expect("ptu is in backoff");
    assert_eq!(backoff.reason, BackoffReason::Throttled);
    assert!(
        backoff.duration <= Duration::from_millis(3_000)
            && backoff.duration > Duration::from_millis(2_000),
        "{backoff:?}"
    );

    // While the deadline holds, the PTU gets nothing, though it would now answer.
    for _ in 0..5 {
        let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
        assert_eq!(header(&r, "x-spillway-backend"), "payg");
    }
    assert_eq!(sim.stats("ptu", "gpt-4o").requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_without_retry_after_ms_uses_retry_after_seconds() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2))).await;
    force(&sim, "ptu", 429, None, Some(7), Some(1));

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 200);
    let backoff = backoff_of(&gw, "ptu").await.expect("ptu is in backoff");
    assert!(
        backoff.duration <= Duration::from_secs(7) && backoff.duration > Duration::from_secs(6),
        "{backoff:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_fails_over_to_the_next_member() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2))).await;
    fail_every_request(&sim, "ptu");

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-spillway-backend"), "payg");
    assert_eq!(sim.stats("ptu", "gpt-4o").failed, 1);
    assert_eq!(
        backoff_of(&gw, "ptu").await.unwrap().reason,
        BackoffReason::ServerError
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_error_fails_over_to_the_next_member() {
    let sim = ptu_and_payg().await;
    let dead = closed_port_url().await;
    let gw = start_single(&(backend_at("gone", &dead, 1) + &backend(&sim, "payg", 2))).await;

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-spillway-backend"), "payg");
    assert_eq!(header(&r, "x-spillway-attempts"), "2");
    assert_eq!(
        backoff_of(&gw, "gone").await.unwrap().reason,
        BackoffReason::Unreachable
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_throttled_gives_429_with_the_earliest_retry_time() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2))).await;
    force(&sim, "ptu", 429, Some(9_000), None, None);
    force(&sim, "payg", 429, Some(4_000), None, None);

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-spillway-attempts"), "2");
    assert_eq!(header(&r, "retry-after"), "4");
    let retry_ms: u64 = header(&r, "retry-after-ms").parse().unwrap();
    assert!(
        (3_000..=4_000).contains(&retry_ms),
        "retry-after-ms {retry_ms}"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "429");

    // The next request is answered from the shared state without touching either member.
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-spillway-attempts"), "0");
    assert_eq!(
        sim.stats("ptu", "gpt-4o").requests + sim.stats("payg", "gpt-4o").requests,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_pass_through_without_retry_or_backoff() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2))).await;
    sim.set_faults(
        "ptu",
        "gpt-4o",
        Faults {
            respond_with: Some(ForcedResponse {
                status: 400,
                code: Some("content_filter".into()),
                ..Default::default()
            }),
            ..Faults::default()
        },
    );

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-spillway-backend"), "ptu");
    assert_eq!(header(&r, "x-spillway-attempts"), "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"]["code"], "content_filter",
        "the upstream body is relayed unchanged"
    );
    assert_eq!(sim.stats("payg", "gpt-4o").requests, 0);
    assert!(backoff_of(&gw, "ptu").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_failing_gives_502_naming_each_failure() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2))).await;
    for r in ["ptu", "payg"] {
        fail_every_request(&sim, r);
    }
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 502);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_gateway");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("ptu: HTTP 500") && message.contains("payg: HTTP 500"),
        "{message}"
    );

    // Both members are now held back by failures, not throttling: 503 with a retry time.
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "retry-after"), "10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_does_not_answer_in_time_gives_504() {
    let slow = spillway_gateway::sim::DeploymentSpec {
        ttft_ms: 30_000,
        ..instant_deployment(
            "gpt-4o",
            spillway_gateway::sim::DeploymentKind::Payg,
            1_000_000,
        )
    };
    let sim = start_sim(vec![resource("slow", vec![slow])]).await;
    let config = backend(&sim, "slow", 1) + "[routing]\nattempt_timeout_ms = 200\n";
    let gw = start_single(&config).await;

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 504);
    assert_eq!(
        backoff_of(&gw, "slow").await.unwrap().reason,
        BackoffReason::Timeout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_bounds_the_retries() {
    let sim = start_sim(vec![
        resource(
            "a",
            vec![instant_deployment(
                "gpt-4o",
                spillway_gateway::sim::DeploymentKind::Ptu,
                1_000_000,
            )],
        ),
        resource(
            "b",
            vec![instant_deployment(
                "gpt-4o",
                spillway_gateway::sim::DeploymentKind::Ptu,
                1_000_000,
            )],
        ),
        resource(
            "c",
            vec![instant_deployment(
                "gpt-4o",
                spillway_gateway::sim::DeploymentKind::Payg,
                1_000_000,
            )],
        ),
    ])
    .await;
    for r in ["a", "b", "c"] {
        fail_every_request(&sim, r);
    }
    let config = backend(&sim, "a", 1)
        + &backend(&sim, "b", 1)
        + &backend(&sim, "c", 2)
        + "[routing]\nmax_attempts = 2\n";
    let gw = start_single(&config).await;
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-spillway-attempts"), "2");
    assert_eq!(
        sim.stats("c", "gpt-4o").requests,
        0,
        "the third member was never tried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_v1_route_takes_the_pool_from_the_model_field() {
    let sim = ptu_and_payg().await;
    let config =
        "[[backends]]\nid = \"ptu\"\nurl = \"URL\"\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }\n"
            .replace("URL", &sim.url("ptu"));
    let gw = start_single(&config).await;
    for path in ["/openai/v1/chat/completions", "/v1/chat/completions"] {
        let mut body = chat_body(false);
        body["model"] = "gpt-4o".into();
        let r = client()
            .post(format!("{}{path}", gw.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
    }
    assert_eq!(sim.stats("ptu", "gpt-4o").succeeded, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_retry_budget_stops_failover() {
    let sim = ptu_and_payg().await;
    // No credit per request and no floor: only the initial 10 retries. A breaker that never
    // opens keeps the failing PTU first in line, so every request needs a retry.
    let config = backend(&sim, "ptu", 1)
        + &backend(&sim, "payg", 2)
        + "[routing]\nretry_ratio = 0.0\nmin_retries_per_second = 0.0\nbreaker_failures = 1000\n";
    let gw = start_single(&config).await;
    fail_every_request(&sim, "ptu");
    for _ in 0..10 {
        let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
        assert_eq!(
            (r.status().as_u16(), header(&r, "x-spillway-attempts")),
            (200, "2")
        );
    }
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-spillway-attempts")),
        (502, "1"),
        "no retry left"
    );
    assert_eq!(sim.stats("payg", "gpt-4o").requests, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spilling_over_after_a_429_spends_no_retry_budget() {
    let sim = ptu_and_payg().await;
    // No retry credit at all: only spill-over may move a request to the next member.
    let config = backend(&sim, "ptu", 1)
        + &backend(&sim, "payg", 2)
        + "[routing]\nretry_ratio = 0.0\nmin_retries_per_second = 0.0\n";
    let gw = start_single(&config).await;
    for _ in 0..20 {
        force(&sim, "ptu", 429, Some(1), None, None);
        let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
        assert_eq!(
            (r.status().as_u16(), header(&r, "x-spillway-backend")),
            (200, "payg")
        );
    }
    // More spill-overs than the budget's initial 10 retries: none of them was charged.
    assert!(sim.stats("ptu", "gpt-4o").forced > 10);
}
