//! The Responses API through the gateway: created as JSON and as the named-event stream,
//! relayed unchanged, estimated like chat and settled with the usage of the final event. And
//! the simulator's statefulness that makes affinity necessary: a follow-up only works on the
//! resource that created the response it names.

use std::sync::Arc;

use serde_json::{Value, json};
use spillway_gateway::sim::DeploymentKind;
use spillway_shared::EmbeddedState;
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
