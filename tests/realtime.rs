//! The Realtime API through the gateway: the session's member is chosen at the handshake by
//! the usual policy, a refused upstream handshake fails over before the client's upgrade
//! completes, frames are relayed unchanged, and each response's usage is charged to the
//! member's budget.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use spillway_shared::EmbeddedState;
use spillway_tests::*;
use tokio_tungstenite::tungstenite::Message;

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open a session; the member that serves it.
async fn open(gateway: &Replica, path: &str) -> (Client, String) {
    let url = format!("{}{path}", gateway.url.replacen("http://", "ws://", 1));
    let (client, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the session opens");
    let backend = response
        .headers()
        .get("x-spillway-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (client, backend)
}

async fn next_event(client: &mut Client) -> Value {
    loop {
        let message = tokio::time::timeout(EVENT_TIMEOUT, client.next())
            .await
            .expect("an event arrives")
            .expect("the session is open")
            .expect("a frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).expect("events are JSON");
        }
    }
}

/// Ask for one response; its `response.done` event.
async fn one_response(client: &mut Client, text: &str) -> Value {
    let item = json!({ "type": "conversation.item.create", "item": { "type": "message",
        "role": "user", "content": [{ "type": "input_text", "text": text }] } });
    client
        .send(Message::Text(item.to_string().into()))
        .await
        .unwrap();
    let create = json!({ "type": "response.create" });
    client
        .send(Message::Text(create.to_string().into()))
        .await
        .unwrap();
    loop {
        let event = next_event(client).await;
        if event["type"] == "response.done" {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_relayed_and_each_response_is_charged_to_its_member() {
    let sim = tiers_a_and_b().await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    let config = backend(&sim, "a", 1) + &backend(&sim, "b", 2);
    let gw = start_gateway(&config, fleet.clone()).await;

    let (mut client, member) = open(
        &gw,
        "/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o",
    )
    .await;
    assert_eq!(member, "a", "PTU first");
    assert_eq!(next_event(&mut client).await["type"], "session.created");
    let mut total = 0;
    for turn in ["Hello there", "And again"] {
        let done = one_response(&mut client, turn).await;
        total += done["response"]["usage"]["total_tokens"].as_u64().unwrap();
    }
    fleet.charged(2).await;
    let served = sim.stats("a", "gpt-4o");
    assert_eq!(served.total_tokens, total, "relayed unchanged");
    let (charged, _) = charged(&*fleet.inner, "a").await;
    assert_eq!(charged, total, "each response charged to the member");
    client.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_fails_over_before_the_client_upgrade_completes() {
    let sim = tiers_a_and_b().await;
    let gw = start_single(&(backend(&sim, "a", 1) + &backend(&sim, "b", 2))).await;
    force(&sim, "a", 429, Some(30_000), None, Some(1));
    let (mut client, member) = open(&gw, "/openai/v1/realtime?model=gpt-4o").await;
    assert_eq!(member, "b", "the PTU refused the handshake");
    assert_eq!(next_event(&mut client).await["type"], "session.created");
    let done = one_response(&mut client, "Hello there").await;
    assert_eq!(done["response"]["status"], "completed");
    assert_eq!(sim.stats("a", "gpt-4o").forced, 1);

    // Both members refuse: the client gets the 429 as an HTTP answer, never an upgrade.
    force(&sim, "b", 429, Some(30_000), None, Some(1));
    let url = format!(
        "{}/openai/v1/realtime?model=gpt-4o",
        gw.url.replacen("http://", "ws://", 1)
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            assert!(response.headers().contains_key("retry-after"));
        }
        other => panic!("expected a 429, got {:?}", other.map(|(_, r)| r.status())),
    }
}
