//! What every token cost, fleet-wide: three replicas on one Redis count every answer's
//! tokens in the hourly cost ledger, and `spillway cost`'s report prices them exactly:
//! standard and priority tokens at their prices, a PTU hour shared by its users' tokens.
//! A consumer with a spending limit is refused (403) once it is spent.
//!
//! Prices are set high (a dollar a token) so a cent is a real difference. Every request is
//! 9 prompt and 8 output tokens, none cached.

use std::collections::HashMap;

use spillway_gateway::auth::consumers::key_sha256_hex;
use spillway_gateway::sim::SimHandle;
use spillway_tests::redis_server::RedisServer;
use spillway_tests::*;

const PROMPT: f64 = 9.0;
const OUTPUT: f64 = 8.0;
const PTU_PER_HOUR: f64 = 100.0;

fn config(sim: &SimHandle, redis: &str) -> String {
    format!(
        "[[backends]]\nid = \"a\"\nurl = \"{a}\"\npriority = 1\nkind = \"ptu\"\ntpm = 170\n\
         deployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n\
         [[backends]]\nid = \"p\"\nurl = \"{p}\"\npriority = 2\nkind = \"priority\"\n\
         deployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n{b}\
         [[classes]]\nname = \"interactive\"\nrank = 100\npriority_tier = true\n\
         [[classes]]\nname = \"batch\"\nrank = 10\n\
         [[prices]]\nkind = \"payg\"\npool = \"gpt-4o\"\ninput_per_1m = 1000000\noutput_per_1m = 2000000\n\
         [[prices]]\nkind = \"priority\"\npool = \"*\"\ninput_per_1m = 2000000\noutput_per_1m = 4000000\n\
         [[prices]]\nkind = \"ptu\"\nbackend = \"a\"\nper_hour = {PTU_PER_HOUR}\n\
         [[consumers]]\nname = \"app\"\nkey_sha256 = \"{app}\"\n\
         [[consumers]]\nname = \"jobs\"\nclass = \"batch\"\nkey_sha256 = \"{jobs}\"\n\
         [[consumers]]\nname = \"capped\"\nmax_spend_usd = 60\nmax_spend_period = \"daily\"\nkey_sha256 = \"{capped}\"\n{redis}",
        a = sim.url("a"),
        p = sim.url("p"),
        b = backend(sim, "b", 3),
        app = key_sha256_hex("app-key"),
        jobs = key_sha256_hex("jobs-key"),
        capped = key_sha256_hex("capped-key"),
        redis = redis_section(redis, ""),
    )
}

/// Not within a minute of the hour's end: the test's answers fall in one ledger hour.
async fn away_from_the_hour_boundary() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let left = 3_600_000 - now % 3_600_000;
    if left < 60_000 {
        tokio::time::sleep(std::time::Duration::from_millis(left + 100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cost_report_equals_tokens_times_prices_to_the_cent() {
    away_from_the_hour_boundary().await;
    let sim = three_tiers().await;
    let redis = RedisServer::start();
    let config = config(&sim, &redis.url());
    let (r1, _) = start_on_redis(&config).await;
    let (r2, _) = start_on_redis(&config).await;
    let (r3, _) = start_on_redis(&config).await;
    let fleet = [&r1, &r2, &r3];

    // Interactive fills the PTU (170 tokens: 10 requests) and spills to priority; batch
    // skips priority for standard PAYG. Who served what is read from the answers.
    let mut served: HashMap<(&str, String), u64> = HashMap::new();
    for (i, key) in ["app-key"; 16].iter().chain(&["jobs-key"; 4]).enumerate() {
        let answer = client()
            .post(chat_url(&fleet[i % 3].url))
            .header("api-key", *key)
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let backend = header(&answer, "x-spillway-backend").to_owned();
        answer.bytes().await.unwrap();
        *served
            .entry((key.trim_end_matches("-key"), backend))
            .or_default() += 1;
    }
    assert!(spillway_gateway::proxy::all_settled(EVENT_TIMEOUT).await);
    for replica in fleet {
        replica.gateway.spend.flush().await;
    }

    let report = spillway_gateway::cost::report::read(
        &*r1.gateway.fleet,
        &r1.gateway.prices,
        std::time::Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let row = |consumer: &str, tier: &str| {
        report
            .rows
            .iter()
            .find(|r| r.consumer == consumer && r.tier == tier)
            .cloned()
    };
    let n = |consumer: &str, backend: &str| {
        served
            .get(&(consumer, backend.to_owned()))
            .copied()
            .unwrap_or(0)
    };
    let cents = |usd: f64| (usd * 100.0).round() as i64;
    // Standard: $1 an input token, $2 an output token; priority twice that.
    let payg = PROMPT + 2.0 * OUTPUT;
    for (consumer, tier, backend, each) in [
        ("app", "priority", "p", 2.0 * payg),
        ("jobs", "payg", "b", payg),
    ] {
        let count = n(consumer, backend);
        assert!(count > 0, "{served:?}");
        let row = row(consumer, tier).expect("a row");
        assert_eq!(row.requests, count);
        assert_eq!(
            (row.input_tokens, row.output_tokens),
            (count * 9, count * 8)
        );
        assert_eq!(
            cents(row.cost_usd.unwrap()),
            cents(count as f64 * each),
            "{row:?}"
        );
    }
    // The PTU's hour is shared by its users' tokens: here every PTU token was app's.
    let ptu_requests: u64 = ["app", "jobs"].iter().map(|c| n(c, "a")).sum();
    assert_eq!(ptu_requests, n("app", "a"));
    let ptu = row("app", "ptu").expect("app used the PTU");
    assert_eq!(ptu.requests, ptu_requests);
    assert_eq!(cents(ptu.cost_usd.unwrap()), cents(PTU_PER_HOUR));
    assert_eq!(
        cents(ptu.payg_equivalent_usd.unwrap()),
        cents(ptu_requests as f64 * payg),
        "PTU tokens valued at PAYG prices"
    );
    let total = PTU_PER_HOUR + n("app", "p") as f64 * 2.0 * payg + n("jobs", "b") as f64 * payg;
    assert_eq!(cents(report.total_usd), cents(total));
    assert_eq!(
        cents(report.saved_by_ptu_usd),
        cents(ptu_requests as f64 * payg - PTU_PER_HOUR)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_past_its_spending_limit_gets_403_until_the_period_ends() {
    let sim = three_tiers().await;
    let redis = RedisServer::start();
    let config = config(&sim, &redis.url()).replace("tpm = 170", "tpm = 1");
    let (r1, _) = start_on_redis(&config).await;
    let (r2, _) = start_on_redis(&config).await;

    // The PTU admits one request (its window is empty), counted at the reservation's price
    // per token at full use ($100 an hour over 60 tokens: $28.33); then priority at $50:
    // $78 is past $60, and the next request is refused whichever replica takes it.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let answer = chat_as([&r1, &r2][i % 2], "capped-key").await.unwrap();
        statuses.push(answer.status().as_u16());
        let body: serde_json::Value = answer.json().await.unwrap();
        if statuses.last() == Some(&403) {
            assert_eq!(body["error"]["code"], "spend_limit_exceeded", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("60.00 USD per day")
            );
        }
        assert!(spillway_gateway::proxy::all_settled(EVENT_TIMEOUT).await);
    }
    assert_eq!(statuses, [200, 200, 403, 403]);
}

/// A Realtime session's responses are in the cost ledger too, with their input and output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_responses_are_in_the_cost_ledger() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    away_from_the_hour_boundary().await;
    let sim = three_tiers().await;
    let redis = RedisServer::start();
    let (gw, _) = start_on_redis(&config(&sim, &redis.url())).await;
    let url = format!(
        "{}/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o",
        gw.url.replacen("http://", "ws://", 1)
    );
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("api-key", "jobs-key".parse().unwrap());
    let (mut session, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the session opens");
    for event in [
        r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"Hello there"}]}}"#,
        r#"{"type":"response.create"}"#,
    ] {
        session.send(Message::Text(event.into())).await.unwrap();
    }
    let usage = loop {
        let frame = session.next().await.unwrap().unwrap();
        let event: serde_json::Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if event["type"] == "response.done" {
            break event["response"]["usage"].clone();
        }
    };
    gw.gateway.spend.flush().await;
    let report = spillway_gateway::cost::report::read(
        &*gw.gateway.fleet,
        &gw.gateway.prices,
        std::time::Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let row = report
        .rows
        .iter()
        .find(|r| r.consumer == "jobs")
        .expect("the session's response is in the ledger");
    assert_eq!((row.class.as_str(), row.tier.as_str()), ("batch", "ptu"));
    assert_eq!(row.requests, 1);
    assert_eq!(
        (row.input_tokens, row.output_tokens),
        (
            usage["input_tokens"].as_u64().unwrap(),
            usage["output_tokens"].as_u64().unwrap()
        )
    );
}
