//! Consumer budgets, fleet-wide: a consumer's tokens per window are spent once across every
//! replica sharing Redis; over it, 429 with `retry-after`; every answer carries what it has
//! left; other consumers are unaffected. A consumer's long token quota is counted the same
//! way; spent, it is 403 until its period renews.

use spillway_tests::redis_server::RedisServer;
use spillway_tests::*;

// `printf metered-key | sha256sum`, `printf free-key | sha256sum`.
const CONSUMERS: &str = "[[consumers]]\nname = \"metered\"\ntpm = 100\n\
    key_sha256 = \"ac2ace6e2a297dfc3eff691c6a5cb93b8bc570798658f08dcce75d0029f98d84\"\n\
    [[consumers]]\nname = \"free\"\n\
    key_sha256 = \"0c7e232ca6aa55ab05a0287b1c4198c7b4275500bce25c40b5a6aa7d564d3c45\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_budget_is_spent_once_across_the_fleet() {
    let sim = tiers_a_and_b().await;
    let redis = RedisServer::start();
    let config = backend(&sim, "a", 1) + CONSUMERS + &redis_section(&redis.url(), "");
    let (r1, f1) = start_on_redis(&config).await;
    let (r2, f2) = start_on_redis(&config).await;

    // Each request is 9 prompt + 8 output tokens: five fit in 100, the sixth does not,
    // whichever replica takes it.
    let mut remaining = Vec::new();
    for i in 0..5 {
        let replica = if i % 2 == 0 { &r1 } else { &r2 };
        let answer = chat_as(replica, "metered-key").await.unwrap();
        assert_eq!(answer.status(), 200, "request {i}");
        remaining.push(header(&answer, "x-ratelimit-remaining-tokens").to_owned());
        answer.bytes().await.unwrap();
    }
    assert_eq!(remaining, ["83", "66", "49", "32", "15"]);
    for replica in [&r1, &r2] {
        let refused = chat_as(replica, "metered-key").await.unwrap();
        assert_eq!(refused.status(), 429);
        assert!(header(&refused, "retry-after").parse::<u64>().unwrap() >= 1);
    }
    assert_eq!(
        sim.stats("a", "gpt-4o").requests,
        5,
        "refusals never go upstream"
    );

    // Another consumer is unaffected, and gets the deployment's own headers.
    let other = chat_as(&r1, "free-key").await.unwrap();
    assert_eq!(other.status(), 200);
    assert_ne!(header(&other, "x-ratelimit-remaining-tokens"), "15");
    for fleet in [&f1, &f2] {
        assert_eq!(fleet.fallback_calls(), 0, "every decision was the fleet's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_responses_spend_the_consumer_budget_too() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let sim = tiers_a_and_b().await;
    let fleet = ObservedState::new(std::sync::Arc::new(
        spillway_shared::EmbeddedState::default(),
    ));
    let gw = start_gateway(&(backend(&sim, "a", 1) + CONSUMERS), fleet.clone()).await;
    let url = format!(
        "{}/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o",
        gw.url.replacen("http://", "ws://", 1)
    );
    let handshake = || {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("api-key", "metered-key".parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };

    // Responses until the session has spent the consumer's 100 tokens.
    let (mut session, _) = handshake().await.expect("the session opens");
    let (mut spent, mut responses) = (0, 0);
    while spent < 100 {
        for event in [
            r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"Hello there"}]}}"#,
            r#"{"type":"response.create"}"#,
        ] {
            session.send(Message::Text(event.into())).await.unwrap();
        }
        loop {
            let frame = session.next().await.unwrap().unwrap();
            let event: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
            if event["type"] == "response.done" {
                spent += event["response"]["usage"]["total_tokens"].as_u64().unwrap();
                responses += 1;
                break;
            }
        }
    }
    // The member and the consumer are charged for each response.
    fleet.charged(2 * responses).await;
    match handshake().await {
        Err(tokio_tungstenite::tungstenite::Error::Http(refused)) => {
            assert_eq!(refused.status(), 429);
            assert!(refused.headers().contains_key("retry-after"));
        }
        other => panic!("expected a 429, got {:?}", other.map(|(_, r)| r.status())),
    }
}

// `printf quota-key | sha256sum`.
const QUOTA_CONSUMERS: &str = "[[consumers]]\nname = \"quota\"\n\
    token_quota = 40\ntoken_quota_period = \"daily\"\n\
    key_sha256 = \"QUOTA_HASH\"\n\
    [[consumers]]\nname = \"free\"\n\
    key_sha256 = \"0c7e232ca6aa55ab05a0287b1c4198c7b4275500bce25c40b5a6aa7d564d3c45\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_token_quota_is_403_on_every_replica_until_the_period_renews() {
    let sim = tiers_a_and_b().await;
    let redis = RedisServer::start();
    let consumers = QUOTA_CONSUMERS.replace(
        "QUOTA_HASH",
        &spillway_gateway::auth::consumers::key_sha256_hex("quota-key"),
    );
    let config = backend(&sim, "a", 1) + &consumers + &redis_section(&redis.url(), "");
    let replica = || async {
        let observed = ObservedState::new(redis_fleet(&config).await);
        (start_gateway(&config, observed.clone()).await, observed)
    };
    let ((r1, o1), (r2, o2)) = (replica().await, replica().await);

    // 17 tokens a request: after two (34) the quota of 40 is not yet reached, so a third is
    // served whole (51); then it is spent, on both replicas.
    for (replica, observed, spends) in [(&r1, &o1, 1), (&r2, &o2, 1), (&r1, &o1, 2)] {
        let answer = chat_as(replica, "quota-key").await.unwrap();
        assert_eq!(answer.status(), 200);
        answer.bytes().await.unwrap();
        observed.quota_spent(spends).await;
    }
    let tomorrow = (time::OffsetDateTime::now_utc() + time::Duration::DAY).date();
    for replica in [&r1, &r2] {
        let refused = chat_as(replica, "quota-key").await.unwrap();
        assert_eq!(refused.status(), 403);
        let retry_after: u64 = header(&refused, "retry-after").parse().unwrap();
        assert!((1..=86_400).contains(&retry_after), "{retry_after}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "quota_exceeded");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("40 tokens per day") && message.contains(&tomorrow.to_string()),
            "{message}"
        );
    }
    assert_eq!(
        sim.stats("a", "gpt-4o").requests,
        3,
        "refusals never go upstream"
    );
    // The Realtime handshake is refused the same way.
    let url = format!(
        "{}/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o",
        r2.url.replacen("http://", "ws://", 1)
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    request
        .headers_mut()
        .insert("api-key", "quota-key".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(refused)) => {
            assert_eq!(refused.status(), 403)
        }
        other => panic!("expected a 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    // Another consumer is unaffected.
    assert_eq!(chat_as(&r2, "free-key").await.unwrap().status(), 200);
}
