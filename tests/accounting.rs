//! Token accounting: estimates match the service's prompt counts, streams are settled with
//! their exact usage (asked for upstream when the client did not ask, and hidden from it), and
//! a stream cut off mid-way is settled with what was relayed.

use std::sync::Arc;

use futures_util::StreamExt;
use serde_json::json;
use spillway_gateway::sim::DeploymentKind;
use spillway_shared::EmbeddedState;
use spillway_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_tokens_equal_the_tokens_served_for_every_kind_of_request() {
    let sim = ptu_and_payg().await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let gw = start_gateway(&backend(&sim, "ptu", 1), fleet.clone()).await;

    let mut asked = chat_body(true);
    asked["stream_options"] = json!({ "include_usage": true });
    let mut n = 0;
    for body in [chat_body(false), chat_body(true), asked] {
        for _ in 0..3 {
            chat(&gw, "gpt-4o", &body).await.bytes().await.unwrap();
            n += 1;
            fleet.settled(n).await;
        }
    }
    let served = sim.stats("ptu", "gpt-4o");
    let state = member_snapshot(&*fleet.inner, "ptu").await;
    assert_eq!(served.succeeded, 9);
    assert_eq!(
        state.tokens_used, served.total_tokens,
        "settled == served, streams included"
    );
    assert_eq!(state.actual_tokens, served.total_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimates_match_the_service_prompt_counts_exactly() {
    let sim = ptu_and_payg().await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let gw = start_gateway(&backend(&sim, "ptu", 1), fleet.clone()).await;
    let conversations = [
        json!([{ "role": "user", "content": "Hello there" }]),
        json!([{ "role": "system", "content": "You are terse." }, { "role": "user", "content": "Why is the sky blue?" }]),
        json!([{ "role": "user", "name": "ada", "content": "Ünïcödé, emoji 🚀 and\nnew lines" },
               { "role": "assistant", "content": "Noted." }, { "role": "user", "content": "" }]),
    ];
    for (i, messages) in conversations.iter().enumerate() {
        // max_tokens below the simulator's reply length: output is exactly max_tokens.
        let body = json!({ "messages": messages, "max_tokens": 5 });
        chat(&gw, "gpt-4o", &body).await.bytes().await.unwrap();
        fleet.settled(i as u64 + 1).await;
    }
    let state = member_snapshot(&*fleet.inner, "ptu").await;
    assert_eq!(
        state.estimated_tokens, state.actual_tokens,
        "no estimation error on plain chat"
    );
    assert_eq!(state.actual_tokens, sim.stats("ptu", "gpt-4o").total_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gets_exactly_the_stream_it_asked_for() {
    exactly_the_stream_asked_for(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crlf_framed_stream_is_relayed_and_metered_the_same() {
    exactly_the_stream_asked_for(true).await;
}

async fn exactly_the_stream_asked_for(crlf: bool) {
    // Two identical fresh deployments: one behind the gateway, one asked directly.
    let sim = start_sim(vec![
        resource(
            "ptu",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        ),
        resource(
            "direct",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        ),
    ])
    .await;
    for resource in ["ptu", "direct"] {
        sim.set_faults(
            resource,
            "gpt-4o",
            spillway_gateway::sim::Faults {
                sse_crlf: crlf,
                ..Default::default()
            },
        );
    }
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let gw = start_gateway(&backend(&sim, "ptu", 1), fleet.clone()).await;
    let via_gateway = chat(&gw, "gpt-4o", &chat_body(true))
        .await
        .text()
        .await
        .unwrap();
    let direct = client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            sim.url("direct")
        ))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Only the wall-clock `created` second may differ between two responses.
    let created = |s: &str| {
        s.split("\"created\":")
            .enumerate()
            .map(|(i, part)| {
                if i == 0 {
                    part.to_string()
                } else {
                    part.trim_start_matches(|c: char| c.is_ascii_digit())
                        .to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\"created\":_")
    };
    assert!(
        !via_gateway.contains("usage"),
        "no usage chunk nor usage:null reached the client"
    );
    assert_eq!(created(&via_gateway), created(&direct));
    assert_eq!(via_gateway.contains("\r\n"), crlf);
    let upstream_asked = sim.stats("ptu", "gpt-4o");
    assert_eq!(upstream_asked.streams_completed, 1);
    // The usage the gateway asked for was read, whatever the framing: exact settlement.
    fleet.settled(1).await;
    let state = member_snapshot(&*fleet.inner, "ptu").await;
    assert_eq!(state.tokens_used, upstream_asked.total_tokens);
    assert_eq!(state.actual_tokens, upstream_asked.total_tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_off_midway_is_settled_with_what_was_relayed() {
    let sim = start_sim(vec![resource("ptu", vec![long_stream_deployment()])]).await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let gw = start_gateway(&backend(&sim, "ptu", 1), fleet.clone()).await;

    let mut body = chat_body(true);
    body["max_tokens"] = 5_000.into();
    let mut stream = chat(&gw, "gpt-4o", &body).await.bytes_stream();
    let mut seen = 0;
    let mut text = String::new();
    while seen < 20 {
        let chunk = stream.next().await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        seen = text.matches("\"content\":\"").count().saturating_sub(1); // the role event has content ""
    }
    drop(stream);
    fleet.settled(1).await;

    let state = member_snapshot(&*fleet.inner, "ptu").await;
    assert!(
        sim.wait_until(EVENT_TIMEOUT, |s| s
            .stats("ptu", "gpt-4o")
            .streams_cancelled
            == 1)
            .await
    );
    let served = sim.stats("ptu", "gpt-4o");
    let prompt = served.prompt_tokens;
    assert!(
        state.tokens_used >= prompt + seen as u64,
        "at least what the client saw: {} < {}",
        state.tokens_used,
        prompt + seen as u64
    );
    assert!(
        state.tokens_used <= served.total_tokens,
        "at most what upstream sent: {} > {}",
        state.tokens_used,
        served.total_tokens
    );
    assert!(state.tokens_used < prompt + 5_000, "not the whole estimate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_served_by_azure_spillover_are_not_charged_to_the_ptu() {
    // A PTU with Azure's spillover behind it.
    let sim = start_sim(vec![
        resource(
            "ptu",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        ),
        resource(
            "payg",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Payg,
                1_000_000,
            )],
        ),
    ])
    .await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let config = backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2);
    let gw = start_gateway(&config, fleet.clone()).await;

    // One request the PTU serves, then one it would answer 429 and Azure spills over.
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(header(&r, "x-ms-is-spilled-over"), "");
    r.bytes().await.unwrap();
    fleet.settled(1).await;
    sim.set_faults(
        "ptu",
        "gpt-4o",
        spillway_gateway::sim::Faults {
            azure_spillover: true,
            respond_with: Some(ForcedResponse {
                status: 429,
                retry_after_ms: Some(1_000),
                times: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-ms-is-spilled-over")),
        (200, "true")
    );
    assert_eq!(header(&r, "x-spillway-backend"), "ptu");
    r.bytes().await.unwrap();
    fleet.settled(2).await;
    // The spilled answer says the PTU is full: the next request goes to PAYG.
    let next = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(header(&next, "x-spillway-backend"), "payg");

    let served = sim.stats("ptu", "gpt-4o");
    assert_eq!((served.succeeded, served.spilled), (2, 1));
    let state = member_snapshot(&*fleet.inner, "ptu").await;
    assert_eq!(
        state.tokens_used,
        served.total_tokens - served.spilled_tokens,
        "only the PTU's own tokens are charged to it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_answers_without_max_tokens_are_charged_a_learned_reserve() {
    use spillway_gateway::sim::DeploymentSpec;
    let redis = spillway_tests::redis_server::RedisServer::start();
    // Answers of 600 tokens to a 9-token prompt; 50 ms to the head keeps requests in flight.
    let long = |kind| DeploymentSpec {
        ttft_ms: 50,
        ms_per_token: 0,
        jitter: 0.0,
        output_tokens: 600,
        ..DeploymentSpec::new("gpt-4o", kind, 100_000_000)
    };
    let sim = start_sim(vec![
        resource("ptu", vec![long(DeploymentKind::Ptu)]),
        resource("payg", vec![long(DeploymentKind::Payg)]),
    ])
    .await;
    const ANSWER: u64 = 609;
    const BUDGET: u64 = 60 * ANSWER;
    let config = backend(&sim, "ptu", 1)
        .replace("id = \"ptu\"\n", &format!("id = \"ptu\"\ntpm = {BUDGET}\n"))
        + &backend(&sim, "payg", 2)
        + &redis_section(&redis.url(), "");
    let parsed = spillway_gateway::config::Config::from_toml(&config).unwrap();
    let mut replicas = Vec::new();
    let mut observed = Vec::new();
    for _ in 0..3 {
        let fleet = spillway_gateway::server::redis_fleet(&parsed, &redis.url()).unwrap();
        fleet.wait_ready(EVENT_TIMEOUT).await;
        let fleet = ObservedState::new(fleet);
        replicas.push(start_gateway(&config, fleet.clone()).await);
        observed.push(fleet);
    }
    let no_cap = json!({ "messages": [{ "role": "user", "content": "Hello there" }] });

    // Warm-up, one request at a time: the pool learns what its answers take.
    for n in 1..=25 {
        let r = chat(&replicas[0], "gpt-4o", &no_cap).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        observed[0].settled(n).await;
    }
    let pool = replicas[0].gateway.table.pool("gpt-4o").unwrap().clone();
    for r in &replicas {
        r.gateway.view.refresh(&*r.gateway.fleet, &pool).await;
        let view = r.gateway.view.get(&r.gateway.fleet, &pool);
        assert_eq!(
            spillway_gateway::proxy::fleet_view::output_reserve(&view, 256),
            1_024,
            "every replica charges the learned reserve (600 → its 1,024 bucket)"
        );
    }

    // Concurrent load, three replicas, twice what the PTU has left.
    let http = client();
    let statuses: Vec<u16> = futures_util::stream::iter(0..140)
        .map(|i| {
            let url = format!(
                "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                replicas[i % 3].url
            );
            let (http, body) = (http.clone(), no_cap.clone());
            async move {
                let r = http.post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                r.bytes().await.unwrap();
                status
            }
        })
        .buffer_unordered(24)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let served = sim.stats("ptu", "gpt-4o").total_tokens;
    eprintln!("learned reserve: PTU served {served} of a {BUDGET} budget");
    assert!(
        served as f64 <= BUDGET as f64 * 1.05,
        "PTU served {served} for a budget of {BUDGET}"
    );
    assert!(
        served as f64 >= BUDGET as f64 * 0.6,
        "PTU served only {served} of {BUDGET}"
    );
}

/// A cold fleet (a fresh Redis) learns what its answers take from the first ones: after one
/// long answer per replica, a burst of uncapped requests is charged at least that much each,
/// so the PTU is not overrun while they are in flight (with the fixed 256-token default it
/// served 1.35× its budget, issue 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_fleet_reserves_what_its_first_answers_took() {
    use spillway_gateway::sim::DeploymentSpec;
    let redis = spillway_tests::redis_server::RedisServer::start();
    let long = |kind| DeploymentSpec {
        ttft_ms: 50,
        ms_per_token: 0,
        jitter: 0.0,
        output_tokens: 600,
        ..DeploymentSpec::new("gpt-4o", kind, 100_000_000)
    };
    let sim = start_sim(vec![
        resource("ptu", vec![long(DeploymentKind::Ptu)]),
        resource("payg", vec![long(DeploymentKind::Payg)]),
    ])
    .await;
    const ANSWER: u64 = 609;
    const BUDGET: u64 = 10 * ANSWER;
    let config = backend(&sim, "ptu", 1)
        .replace("id = \"ptu\"\n", &format!("id = \"ptu\"\ntpm = {BUDGET}\n"))
        + &backend(&sim, "payg", 2)
        + &redis_section(&redis.url(), "");
    let parsed = spillway_gateway::config::Config::from_toml(&config).unwrap();
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let fleet = spillway_gateway::server::redis_fleet(&parsed, &redis.url()).unwrap();
        fleet.wait_ready(EVENT_TIMEOUT).await;
        let fleet = ObservedState::new(fleet);
        let replica = start_gateway(&config, fleet.clone()).await;
        replicas.push((replica, fleet));
    }
    let no_cap = json!({ "messages": [{ "role": "user", "content": "Hello there" }] });

    // One answer per replica, then each replica's view of the pool as it refreshes it.
    for (replica, fleet) in &replicas {
        let r = chat(replica, "gpt-4o", &no_cap).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        fleet.settled(1).await;
    }
    let pool = replicas[0].0.gateway.table.pool("gpt-4o").unwrap().clone();
    for (replica, _) in &replicas {
        let gateway = &replica.gateway;
        gateway.view.refresh(&*gateway.fleet, &pool).await;
    }

    // The burst: 30 requests, 15 in flight, spread over the three replicas.
    let http = client();
    let statuses: Vec<u16> = futures_util::stream::iter(0..30)
        .map(|i| {
            let url = format!(
                "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                replicas[i % 3].0.url
            );
            let (http, body) = (http.clone(), no_cap.clone());
            async move {
                let r = http.post(url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                r.bytes().await.unwrap();
                status
            }
        })
        .buffer_unordered(15)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let served = sim.stats("ptu", "gpt-4o").total_tokens;
    eprintln!("cold start: PTU served {served} of a {BUDGET} budget");
    assert!(
        served as f64 <= BUDGET as f64 * 1.05,
        "PTU served {served} for a budget of {BUDGET}"
    );
}
