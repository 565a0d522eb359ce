//! The Responses API through the gateway: created as JSON and as the named-event stream,
//! relayed unchanged, estimated like chat and settled with the usage of the final event. And
//! the simulator's statefulness that makes affinity necessary: a follow-up only works on the
//! resource that created the response it names.

use std::sync::Arc;

use serde_json::{Value, json};
use spillway_gateway::sim::DeploymentKind;
use spillway_shared::EmbeddedState;
use spillway_tests::redis_server::RedisServer;
use spillway_tests::*;

async fn create(base: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{base}/openai/v1/responses"))
        .json(body)
        .send()
        .await
        .expect("answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_settled_with_the_usage_of_the_answer_json_and_streamed() {
    let sim = ptu_and_payg().await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let gw = start_gateway(&backend(&sim, "ptu", 1), fleet.clone()).await;

    // Capped below the simulator's answer: the output is exactly the cap, so the estimate
    // (input, instructions, cap) is exact.
    let first = json!({ "model": "gpt-4o", "instructions": "Be brief.",
        "input": [{ "role": "user", "content": [{ "type": "input_text", "text": "Hello there" }] }],
        "max_output_tokens": 4 });
    let answer = create(&gw.url, &first).await;
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["object"], "response");
    fleet.settled(1).await;
    let state = member_snapshot(&*fleet.inner, "ptu").await;
    assert_eq!(
        state.estimated_tokens, state.actual_tokens,
        "estimate is exact"
    );
    assert_eq!(
        Some(state.actual_tokens),
        answer["usage"]["total_tokens"].as_u64()
    );

    // Streamed, as a follow-up (same member: the pool has one).
    let follow_up = json!({ "model": "gpt-4o", "input": "And again?", "stream": true,
        "previous_response_id": answer["id"] });
    let stream = create(&gw.url, &follow_up).await;
    assert_eq!(stream.status(), 200);
    assert_eq!(header(&stream, "content-type"), "text/event-stream");
    let text = stream.text().await.unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"));
    assert!(kinds.contains(&"response.output_text.delta"));
    fleet.settled(2).await;

    let served = sim.stats("ptu", "gpt-4o");
    let state = member_snapshot(&*fleet.inner, "ptu").await;
    assert_eq!(served.succeeded, 2);
    assert_eq!(
        state.actual_tokens, served.total_tokens,
        "settled == served, the stream included"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_only_works_on_the_resource_that_created_the_response() {
    let sim = start_sim(vec![
        resource(
            "east",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        ),
        resource(
            "west",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        ),
    ])
    .await;
    let east = sim.url("east");
    let west = sim.url("west");
    let body = json!({ "model": "gpt-4o", "input": "Hello there" });
    let created: Value = create(&east, &body).await.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();

    let follow_up = json!({ "model": "gpt-4o", "input": "More?", "previous_response_id": id });
    assert_eq!(create(&east, &follow_up).await.status(), 200);
    let elsewhere = create(&west, &follow_up).await;
    assert_eq!(elsewhere.status(), 400);
    let error: Value = elsewhere.json().await.unwrap();
    assert_eq!(error["error"]["code"], "previous_response_not_found");

    // Stored responses: retrieved and listed where they were made, unknown elsewhere.
    let retrieve = |base: &str| {
        client()
            .get(format!("{base}/openai/v1/responses/{id}"))
            .send()
    };
    assert_eq!(retrieve(&east).await.unwrap().status(), 200);
    assert_eq!(retrieve(&west).await.unwrap().status(), 404);
    let items: Value = client()
        .get(format!("{east}/openai/v1/responses/{id}/input_items"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(items["data"][0]["content"][0]["text"], "Hello there");

    // `store: false` keeps nothing; a deleted response is gone.
    let unstored: Value = create(
        &east,
        &json!({ "model": "gpt-4o", "input": "x", "store": false }),
    )
    .await
    .json()
    .await
    .unwrap();
    let unstored_id = unstored["id"].as_str().unwrap();
    let follow = json!({ "model": "gpt-4o", "input": "y", "previous_response_id": unstored_id });
    assert_eq!(create(&east, &follow).await.status(), 400);
    let deleted = client()
        .delete(format!("{east}/openai/v1/responses/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(retrieve(&east).await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_keeps_to_its_member_across_replicas_on_redis() {
    let sim = tiers_a_and_b().await;
    let redis = RedisServer::start();
    let config = backend(&sim, "a", 1) + &backend(&sim, "b", 2) + &redis_section(&redis.url(), "");
    let (r1, f1) = start_on_redis(&config).await;
    let (r2, f2) = start_on_redis(&config).await;
    let (r3, f3) = start_on_redis(&config).await;
    let replicas = [&r1, &r2, &r3];

    // The PTU refuses the first turn once (for a moment): the conversation starts on `b`.
    // Every later turn would go to the PTU again, unless the fleet remembers where it is.
    force(&sim, "a", 429, Some(1), None, Some(1));
    let mut previous: Option<String> = None;
    let mut ids = Vec::new();
    for turn in 0..10 {
        let replica = replicas[turn % 3];
        let mut body = json!({ "model": "gpt-4o", "input": format!("Turn {turn}"),
            "stream": turn % 2 == 1 });
        if let Some(id) = &previous {
            body["previous_response_id"] = json!(id);
        }
        let answer = create(&replica.url, &body).await;
        assert_eq!(answer.status(), 200, "turn {turn}");
        assert_eq!(header(&answer, "x-spillway-backend"), "b", "turn {turn}");
        let id = if turn % 2 == 1 {
            let text = answer.text().await.unwrap();
            let created = text
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("a first event");
            serde_json::from_str::<Value>(created).unwrap()["response"]["id"]
                .as_str()
                .unwrap()
                .to_owned()
        } else {
            let answer: Value = answer.json().await.unwrap();
            answer["id"].as_str().unwrap().to_owned()
        };
        ids.push(id.clone());
        previous = Some(id);
    }
    assert_eq!(sim.stats("b", "gpt-4o").succeeded, 10);

    // Each response is retrievable through any replica, and its input items too.
    for id in &ids {
        for replica in replicas {
            let got = client()
                .get(format!("{}/openai/v1/responses/{id}", replica.url))
                .send()
                .await
                .unwrap();
            assert_eq!(got.status(), 200, "{id}");
            let got: Value = got.json().await.unwrap();
            assert_eq!(got["id"], json!(id));
        }
    }
    let items = client()
        .get(format!("{}/v1/responses/{}/input_items", r2.url, ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(items.status(), 200);

    // An id the fleet never saw: 404 in Azure's error shape, nothing sent upstream.
    let before = sim.stats("a", "gpt-4o").requests + sim.stats("b", "gpt-4o").requests;
    let unknown = client()
        .get(format!("{}/openai/v1/responses/resp_unknown", r1.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let error: Value = unknown.json().await.unwrap();
    assert_eq!(error["error"]["code"], "response_not_found");
    let after = sim.stats("a", "gpt-4o").requests + sim.stats("b", "gpt-4o").requests;
    assert_eq!(before, after);
    // Every decision was the fleet's: no call fell back to a replica's own share (a
    // zero-token retrieval once broke acquire.lua, which the fallback hid).
    for fleet in [&f1, &f2, &f3] {
        assert_eq!(fleet.fallback_calls(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_waits_for_its_throttled_member_and_never_goes_elsewhere() {
    let sim = tiers_a_and_b().await;
    let gw = start_single(&(backend(&sim, "a", 1) + &backend(&sim, "b", 2))).await;
    let first: Value = create(&gw.url, &json!({ "model": "gpt-4o", "input": "Hi" }))
        .await
        .json()
        .await
        .unwrap();
    let follow_up =
        json!({ "model": "gpt-4o", "input": "More", "previous_response_id": first["id"] });

    // The PTU that holds the conversation is throttled for 30 s.
    force(&sim, "a", 429, None, Some(30), Some(1));
    for _ in 0..2 {
        let refused = create(&gw.url, &follow_up).await;
        assert_eq!(refused.status(), 429);
        let wait: u64 = header(&refused, "retry-after").parse().unwrap();
        assert!((25..=30).contains(&wait), "retry-after {wait}");
        let error: Value = refused.json().await.unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains("holds response"),
            "{error}"
        );
    }
    // The first follow-up met the 429; the second was refused without an upstream call.
    assert_eq!(sim.stats("a", "gpt-4o").requests, 2);
    assert_eq!(sim.stats("b", "gpt-4o").requests, 0, "never elsewhere");

    // A new conversation still spills over as usual.
    let fresh = create(&gw.url, &json!({ "model": "gpt-4o", "input": "New" })).await;
    assert_eq!(fresh.status(), 200);
    assert_eq!(header(&fresh, "x-spillway-backend"), "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preview_form_is_forwarded_in_its_form_and_pinned_the_same() {
    let sim = tiers_a_and_b().await;
    let gw = start_single(&(backend(&sim, "a", 1) + &backend(&sim, "b", 2))).await;
    let preview = |path: &str| format!("{}/openai/{path}?api-version=2025-04-01-preview", gw.url);
    force(&sim, "a", 429, Some(1), None, Some(1));
    let first: Value = client()
        .post(preview("responses"))
        .json(&json!({ "model": "gpt-4o", "input": "Hi" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    let follow_up = client()
        .post(preview("responses"))
        .json(&json!({ "model": "gpt-4o", "input": "More", "previous_response_id": id }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        follow_up.status(),
        200,
        "pinned to `b`, where the response lives"
    );
    let got = client()
        .get(preview(&format!("responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);

    let paths: Vec<String> = sim
        .received("b")
        .into_iter()
        .map(|r| r.path_and_query)
        .collect();
    assert!(
        paths.iter().all(|p| p.starts_with("/openai/responses")
            && p.ends_with("?api-version=2025-04-01-preview")),
        "{paths:?}"
    );
}

/// Every consumer reaches Azure with the same backend credential, so the gateway decides
/// whose a stored response is: only its creator may read, list, cancel, delete or continue
/// it; any other key gets the answer an unknown id gets (404 `response_not_found`), on every
/// replica, and nothing is sent upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_belongs_to_the_consumer_that_created_it() {
    let hash = spillway_gateway::auth::consumers::key_sha256_hex;
    let consumers = format!(
        "[[consumers]]\nname = \"alice\"\nkey_sha256 = \"{}\"\n\
         [[consumers]]\nname = \"bob\"\nkey_sha256 = \"{}\"\n",
        hash("alice-key"),
        hash("bob-key")
    );
    let sim = tiers_a_and_b().await;
    let redis = RedisServer::start();
    let config = backend(&sim, "a", 1) + &consumers + &redis_section(&redis.url(), "");
    let (r1, _f1) = start_on_redis(&config).await;
    let (r2, _f2) = start_on_redis(&config).await;

    let created = client()
        .post(format!("{}/openai/v1/responses", r1.url))
        .header("api-key", "alice-key")
        .json(&json!({ "model": "gpt-4o", "input": "Remember this." }))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let id = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let upstream = || sim.stats("a", "gpt-4o").requests;
    let sent_before = upstream();

    let request = |replica: &Replica, key: &str, method: reqwest::Method, path: &str| {
        client()
            .request(method, format!("{}/openai/v1/{path}", replica.url))
            .header("api-key", key)
            .send()
    };
    let not_found = |answer: reqwest::Response| async move {
        let status = answer.status().as_u16();
        let body: Value = answer.json().await.unwrap();
        (
            status,
            body["error"]["code"].as_str().unwrap_or("").to_owned(),
        )
    };
    let gone = (404, "response_not_found".to_owned());
    use reqwest::Method;
    for replica in [&r1, &r2] {
        for (method, path) in [
            (Method::GET, format!("responses/{id}")),
            (Method::GET, format!("responses/{id}/input_items")),
            (Method::POST, format!("responses/{id}/cancel")),
            (Method::DELETE, format!("responses/{id}")),
        ] {
            let answer = request(replica, "bob-key", method.clone(), &path)
                .await
                .unwrap();
            assert_eq!(not_found(answer).await, gone, "bob: {method} {path}");
        }
        // Continuing it is refused the same way.
        let follow_up = client()
            .post(format!("{}/openai/v1/responses", replica.url))
            .header("api-key", "bob-key")
            .json(&json!({ "model": "gpt-4o", "input": "And?", "previous_response_id": id }))
            .send()
            .await
            .unwrap();
        assert_eq!(not_found(follow_up).await, gone, "bob continues");
    }
    assert_eq!(upstream(), sent_before, "nothing of bob's went upstream");

    // Its creator reaches it through any replica.
    for replica in [&r1, &r2] {
        let mine = request(
            replica,
            "alice-key",
            Method::GET,
            &format!("responses/{id}"),
        )
        .await
        .unwrap();
        assert_eq!(mine.status(), 200);
    }
    let follow_up = client()
        .post(format!("{}/openai/v1/responses", r2.url))
        .header("api-key", "alice-key")
        .json(&json!({ "model": "gpt-4o", "input": "And?", "previous_response_id": id }))
        .send()
        .await
        .unwrap();
    assert_eq!(follow_up.status(), 200);
    // The fleet's record names a tag of the creator, never the name or the key.
    let keys = redis.cli(&["KEYS", &format!("*:response:{id}")]);
    let key = keys
        .lines()
        .next()
        .expect("the fleet remembers the response");
    let record = redis.cli(&["HGETALL", key]);
    assert!(!record.contains("alice"), "{record}");
    assert!(
        record.contains(&spillway_gateway::auth::consumers::owner_tag("alice")),
        "{record}"
    );
}
