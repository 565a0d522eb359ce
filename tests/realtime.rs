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

/// Open a session as `key`; the upgrade's error status when it is refused.
async fn open_as(gateway: &Replica, key: &str) -> Result<Client, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/openai/realtime?api-version=2024-10-01-preview&deployment=gpt-4o",
        gateway.url.replacen("http://", "ws://", 1)
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("api-key", key.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok((client, _)) => Ok(client),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(e) => panic!("the handshake failed: {e}"),
    }
}

async fn send_event(client: &mut Client, event: Value) {
    client
        .send(Message::Text(event.to_string().into()))
        .await
        .unwrap();
}

/// The next event of type `kind`, skipping others.
async fn event_of(client: &mut Client, kind: &str) -> Value {
    loop {
        let event = next_event(client).await;
        if event["type"] == kind {
            return event;
        }
    }
}

fn consumer(name: &str, extra: &str) -> String {
    format!(
        "[[consumers]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n{extra}",
        spillway_gateway::auth::consumers::key_sha256_hex(&format!("{name}-key"))
    )
}

/// Budget, quota and `max_tokens` bind a Realtime session as they bind requests: each
/// `response.create` is admitted before it is relayed (refused: an `error` event, and the
/// session stays open), and the key's `max_tokens` is the session's output cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_inside_its_consumers_limits() {
    let sim = tiers_a_and_b().await;
    let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
    // The simulator answers 24 tokens unless capped; this key may ask for 5 per response,
    // and make 2 requests a minute: the handshake and one response spend them.
    let config = backend(&sim, "a", 1) + &consumer("voice", "max_tokens = 5\nrpm = 2\n");
    let gw = start_gateway(&config, fleet.clone()).await;
    let mut client = open_as(&gw, "voice-key").await.expect("the session opens");
    assert_eq!(next_event(&mut client).await["type"], "session.created");
    // The gateway set the session's cap to the key's max_tokens.
    let updated = event_of(&mut client, "session.updated").await;
    assert_eq!(updated["session"]["max_response_output_tokens"], 5);

    // Asking for more than the key may: refused, never relayed.
    for event in [
        json!({ "type": "response.create", "event_id": "evt_1",
            "response": { "max_output_tokens": 100 } }),
        json!({ "type": "session.update", "session": { "max_response_output_tokens": "inf" } }),
    ] {
        send_event(&mut client, event).await;
        let refused = event_of(&mut client, "error").await;
        assert_eq!(refused["error"]["code"], "max_tokens_exceeded", "{refused}");
    }
    assert_eq!(sim.stats("a", "gpt-4o").succeeded, 0);

    // A response is capped at 5 tokens, and charged to the member and to the key.
    let done = one_response(&mut client, "Hello there").await;
    assert_eq!(done["response"]["usage"]["output_tokens"], 5);
    fleet.charged(2).await;

    // The key's budget is spent: the next response is refused, the session stays open.
    send_event(
        &mut client,
        json!({ "type": "response.create", "event_id": "evt_2" }),
    )
    .await;
    let refused = event_of(&mut client, "error").await;
    assert_eq!(refused["error"]["code"], "rate_limit_exceeded");
    assert_eq!(refused["error"]["event_id"], "evt_2");
    send_event(
        &mut client,
        json!({ "type": "conversation.item.create", "item": { "type": "message", "role": "user",
            "content": [{ "type": "input_text", "text": "Still here?" }] } }),
    )
    .await;
    event_of(&mut client, "conversation.item.created").await;
    assert_eq!(sim.stats("a", "gpt-4o").succeeded, 1, "one response served");
}

/// A session holds one of the replica's request slots until it ends, and a message over
/// `server.max_ws_message_bytes` closes it (1009). Both settings are the point here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_count_as_requests_and_their_messages_are_bounded() {
    let sim = tiers_a_and_b().await;
    let config = "[server]\nmax_concurrent_requests = 2\nmax_ws_message_bytes = 65536\n".to_owned()
        + &backend(&sim, "a", 1)
        + &consumer("voice", "");
    let gw = start_single(&config).await;
    let mut first = open_as(&gw, "voice-key").await.expect("first session");
    let _second = open_as(&gw, "voice-key").await.expect("second session");
    assert_eq!(next_event(&mut first).await["type"], "session.created");
    assert_eq!(
        gw.gateway.slots.available(),
        0,
        "each open session holds a slot"
    );
    assert_eq!(open_as(&gw, "voice-key").await.err(), Some(503));

    // A message over the limit closes the session with 1009 (message too big).
    let big = json!({ "type": "input_audio_buffer.append", "audio": "A".repeat(100_000) });
    first
        .send(Message::Text(big.to_string().into()))
        .await
        .unwrap();
    let closed = loop {
        match tokio::time::timeout(EVENT_TIMEOUT, first.next())
            .await
            .expect("the gateway answers")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => break None,
        }
    };
    assert_eq!(closed, Some(1009));
    // Its slot is free again once the session is over.
    tokio::time::timeout(EVENT_TIMEOUT, gw.gateway.slots.freed())
        .await
        .expect("the closed session frees its slot");
    let mut third = open_as(&gw, "voice-key")
        .await
        .expect("a slot is free again");
    assert_eq!(next_event(&mut third).await["type"], "session.created");
}

/// A handshake the backend refuses with the client's own error (400) is answered with that
/// error, its headers filtered like any answer's: no cookie, nothing naming the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_is_relayed_with_its_headers_filtered() {
    let app = axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::BAD_REQUEST,
            [
                ("set-cookie", "ARRAffinity=backend-7; Path=/"),
                (
                    "location",
                    "https://backend-7.internal.example/openai/realtime",
                ),
                ("x-ms-region", "East US"),
                ("content-type", "application/json"),
            ],
            r#"{"error":{"code":"BadRequest","message":"Unsupported api-version."}}"#,
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let gw = start_single(&backend_at("a", &upstream, 1)).await;
    let url = format!(
        "{}/openai/realtime?api-version=1999-01-01&deployment=gpt-4o",
        gw.url.replacen("http://", "ws://", 1)
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
            let headers = response.headers();
            assert!(headers.get("set-cookie").is_none(), "{headers:?}");
            assert!(headers.get("location").is_none(), "{headers:?}");
            assert_eq!(headers["x-ms-region"], "East US");
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("Unsupported api-version"), "{body}");
        }
        other => panic!("expected the 400, got {:?}", other.map(|(_, r)| r.status())),
    }
}

/// The status of a handshake the gateway refuses, and how many members it tried.
async fn refused_handshake(gateway: &Replica) -> (u16, String) {
    let url = format!(
        "{}/openai/v1/realtime?model=gpt-4o",
        gateway.url.replacen("http://", "ws://", 1)
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let attempts = response
                .headers()
                .get("x-spillway-attempts")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            (response.status().as_u16(), attempts)
        }
        other => panic!(
            "expected a refusal, got {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
}

/// Handshakes go through the same loop as any request: `routing.max_attempts` caps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_makes_at_most_max_attempts() {
    let sim = tiers_a_and_b().await;
    let config = backend(&sim, "a", 1) + &backend(&sim, "b", 2) + "[routing]\nmax_attempts = 1\n";
    let gw = start_single(&config).await;
    force(&sim, "a", 429, Some(30_000), None, Some(1));
    assert_eq!(refused_handshake(&gw).await, (429, "1".to_owned()));
    assert_eq!(sim.stats("b", "gpt-4o").requests, 0, "one attempt only");
}

/// A failed handshake spends the retry budget like a failed request: with none left, the
/// next member is not tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_fails_over_only_within_the_retry_budget() {
    let sim = tiers_a_and_b().await;
    let config = backend(&sim, "a", 1)
        + &backend(&sim, "b", 2)
        + "[routing]\nretry_ratio = 0.0\nmin_retries_per_second = 0.0\nbreaker_failures = 1000\n";
    let gw = start_single(&config).await;
    fail_every_request(&sim, "a");
    // The budget starts with 10 retries (see tests/routing.rs): each handshake spends one.
    for _ in 0..10 {
        let (_client, member) = open(&gw, "/openai/v1/realtime?model=gpt-4o").await;
        assert_eq!(member, "b");
    }
    let (status, attempts) = refused_handshake(&gw).await;
    assert_eq!((status, attempts.as_str()), (502, "1"), "no retry left");
    assert_eq!(sim.stats("b", "gpt-4o").requests, 10);
}

/// `routing.request_timeout_ms` bounds the whole handshake, across members: a member that
/// accepts the connection and never answers uses it up, and the client gets 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_ends_at_the_request_timeout() {
    let sim = tiers_a_and_b().await;
    // Accepts connections and never answers: the upgrade hangs.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let config = backend_at("a", &silent_url, 1)
        + &backend(&sim, "b", 2)
        + "[routing]\nrequest_timeout_ms = 300\n";
    let gw = start_single(&config).await;
    let (status, attempts) = refused_handshake(&gw).await;
    assert_eq!((status, attempts.as_str()), (504, "1"));
    assert_eq!(sim.stats("b", "gpt-4o").requests, 0, "no time left for b");
    accepting.abort();
}
