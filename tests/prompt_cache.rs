//! Prompt-cache affinity: requests sharing a long prompt prefix (or a `prompt_cache_key`)
//! keep to one member of their tier, where the service's prompt cache has their prefix, and
//! the tokens it served from cache are not charged to a provisioned member's budget.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::json;
use spillway_gateway::sim::{DeploymentKind, SimHandle};
use spillway_shared::EmbeddedState;
use spillway_tests::*;

/// Two PTU resources of the same tier.
async fn two_ptus() -> (SimHandle, String) {
    let sim = start_sim(vec![
        resource(
            "p1",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Ptu,
                10_000_000,
            )],
        ),
        resource(
            "p2",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Ptu,
                10_000_000,
            )],
        ),
    ])
    .await;
    let ptu =
        |id: &str| backend(&sim, id, 1).replace("deployments =", "kind = \"ptu\"\ndeployments =");
    let config = ptu("p1") + &ptu("p2");
    (sim, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_keeps_to_one_member_and_its_cached_tokens_cost_the_ptu_nothing() {
    let (sim, config) = two_ptus().await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let gw = start_gateway(&config, fleet.clone()).await;
    let system = "You answer questions about the attached handbook. ".repeat(200);

    let mut served_by = HashSet::new();
    for i in 0..10 {
        let body = json!({ "messages": [{ "role": "system", "content": system },
            { "role": "user", "content": format!("Question {i}?") }], "max_tokens": 5 });
        let answer = chat(&gw, "gpt-4o", &body).await;
        assert_eq!(answer.status(), 200);
        served_by.insert(header(&answer, "x-spillway-backend").to_owned());
        answer.bytes().await.unwrap();
        fleet.settled(i + 1).await;
    }
    assert_eq!(served_by.len(), 1, "one member: {served_by:?}");
    let member = served_by.into_iter().next().unwrap();
    let stats = sim.stats(&member, "gpt-4o");
    assert!(
        stats.cached_tokens >= 9 * 1_024,
        "the 9 later requests hit the cache: {stats:?}"
    );
    let state = member_snapshot(&*fleet.inner, &member).await;
    assert_eq!(
        state.actual_tokens,
        stats.total_tokens - stats.cached_tokens,
        "cached tokens are not charged to a PTU"
    );

    // Operators see the hit share per pool in `spillway state`.
    let table =
        spillway_gateway::ops::state_table::render(&gw.gateway.table, &*fleet.inner, 60_000)
            .await
            .unwrap();
    let line = table
        .lines()
        .find(|l| l.contains("prompt cache:"))
        .expect("a prompt cache line");
    let share: u64 = line
        .split("prompt cache: ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|n| n.parse().ok())
        .expect("a share in percent");
    assert!((80..=90).contains(&share), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_prompt_cache_key_keeps_to_one_member_and_keys_spread() {
    let (_sim, config) = two_ptus().await;
    let gw = start_single(&config).await;
    let mut by_key: HashMap<String, HashSet<String>> = HashMap::new();
    for round in 0..2 {
        for k in 0..16 {
            let key = format!("tenant-{k}");
            let body = json!({ "messages": [{ "role": "user", "content": format!("Hi {round}") }],
                "max_tokens": 2, "prompt_cache_key": key });
            let answer = chat(&gw, "gpt-4o", &body).await;
            assert_eq!(answer.status(), 200);
            let backend = header(&answer, "x-spillway-backend").to_owned();
            by_key.entry(key).or_default().insert(backend);
        }
    }
    assert!(
        by_key.values().all(|members| members.len() == 1),
        "a key keeps to its member: {by_key:?}"
    );
    let used: HashSet<&String> = by_key.values().flatten().collect();
    assert_eq!(used.len(), 2, "keys spread over the tier: {by_key:?}");
}
