//! Token budgets: requests are charged their estimate, settled with the real `usage`, and a
//! member whose budget is spent is skipped before it ever answers 429.

use std::sync::Arc;

use spillway_shared::EmbeddedState;
use spillway_tests::*;

fn with_tpm(config: String, backend: &str, tpm: u64) -> String {
    config.replace(
        &format!("id = \"{backend}\"\n"),
        &format!("id = \"{backend}\"\ntpm = {tpm}\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_settled_with_the_tokens_really_used() {
    let sim = ptu_and_payg().await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let gw = start_gateway(&backend(&sim, "ptu", 1), fleet.clone()).await;

    // Plain JSON, a stream with a usage chunk, and a stream without one.
    chat(&gw, "gpt-4o", &chat_body(false))
        .await
        .bytes()
        .await
        .unwrap();
    fleet.settled(1).await;
    let mut with_usage = chat_body(true);
    with_usage["stream_options"] = serde_json::json!({ "include_usage": true });
    chat(&gw, "gpt-4o", &with_usage)
        .await
        .bytes()
        .await
        .unwrap();
    fleet.settled(2).await;
    chat(&gw, "gpt-4o", &chat_body(true))
        .await
        .bytes()
        .await
        .unwrap();
    fleet.settled(3).await;

    let served = sim.stats("ptu", "gpt-4o");
    assert_eq!(served.succeeded, 3);
    assert_eq!(
        charged(&*fleet.inner, "ptu").await,
        (served.total_tokens, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_ptu_budget_spills_to_payg_without_a_429() {
    let sim = ptu_and_payg().await;
    // Each request is charged 9 prompt + 8 output = 17 tokens; 100 hold five of them.
    let config = with_tpm(
        backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2),
        "ptu",
        100,
    );
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let gw = start_gateway(&config, fleet.clone()).await;

    let mut served_by = Vec::new();
    for n in 1..=8 {
        let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
        assert_eq!(r.status(), 200);
        served_by.push(header(&r, "x-spillway-backend").to_string());
        r.bytes().await.unwrap();
        fleet.settled(n).await;
    }
    assert_eq!(
        served_by,
        ["ptu", "ptu", "ptu", "ptu", "ptu", "payg", "payg", "payg"]
    );
    assert_eq!(
        sim.stats("ptu", "gpt-4o").throttled,
        0,
        "PTU never had to refuse"
    );
    assert_eq!(charged(&*fleet.inner, "ptu").await, (85, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_budget_spent_gives_429_with_the_time_budget_frees_up() {
    let sim = ptu_and_payg().await;
    let config = with_tpm(backend(&sim, "ptu", 1), "ptu", 20)
        + "[state]\nwindow_ms = 30000\nwindow_buckets = 30\n";
    let gw = start_single(&config).await;
    assert_eq!(chat(&gw, "gpt-4o", &chat_body(false)).await.status(), 200);

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(header(&r, "x-spillway-attempts"), "0");
    let seconds: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((29..=31).contains(&seconds), "retry-after {seconds}");
    assert_eq!(sim.stats("ptu", "gpt-4o").requests, 1);
}
