//! Streaming: SSE relayed chunk by chunk, failover before the first byte, and a client that
//! goes away cancels the upstream stream.

use futures_util::StreamExt;
use serde_json::Value;
use spillway_gateway::sim::{DeploymentKind, DeploymentSpec};
use spillway_tests::*;

/// Read SSE events from a response until `done` returns true for one; returns all read.
async fn read_events_until(
    body: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buffer: &mut String,
    mut done: impl FnMut(&str) -> bool,
) -> Vec<String> {
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let event = buffer[..end].to_string();
            buffer.drain(..end + 2);
            let stop = done(&event);
            events.push(event);
            if stop {
                return events;
            }
        }
        let chunk = tokio::time::timeout(EVENT_TIMEOUT, body.next())
            .await
            .expect("next chunk arrives")
            .expect("stream not ended")
            .expect("chunk ok");
        buffer.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

fn is_content(event: &str) -> bool {
    event
        .strip_prefix("data: ")
        .and_then(|json| serde_json::from_str::<Value>(json).ok())
        .and_then(|v| {
            v.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(|s| !s.is_empty())
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_chunk_reaches_the_client_before_the_upstream_stream_ends() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&backend(&sim, "ptu", 1)).await;
    // The upstream holds its stream open after three events (filter, role, first token).
    sim.set_faults(
        "ptu",
        "gpt-4o",
        Faults {
            stall_after_chunks: Some(3),
            ..Faults::default()
        },
    );

    let r = chat(&gw, "gpt-4o", &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    assert_eq!(header(&r, "x-spillway-backend"), "ptu");
    let mut body = r.bytes_stream();
    let mut buffer = String::new();
    let first = read_events_until(&mut body, &mut buffer, is_content).await;
    assert_eq!(first.len(), 3);

    let stats = sim.stats("ptu", "gpt-4o");
    assert_eq!(
        (stats.streams_started, stats.streams_completed),
        (1, 0),
        "upstream still streaming"
    );

    sim.set_faults("ptu", "gpt-4o", Faults::default());
    let rest = read_events_until(&mut body, &mut buffer, |e| e == "data: [DONE]").await;
    let tokens = first.iter().chain(&rest).filter(|e| is_content(e)).count();
    assert_eq!(tokens, 8, "every token of max_tokens = 8 arrives");
    assert!(
        sim.wait_until(EVENT_TIMEOUT, |s| s
            .stats("ptu", "gpt-4o")
            .streams_completed
            == 1)
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_the_upstream_stream() {
    let sim = start_sim(vec![resource("ptu", vec![long_stream_deployment()])]).await;
    let gw = start_single(&backend(&sim, "ptu", 1)).await;

    let mut body = chat_body(true);
    body["max_tokens"] = 5_000.into();
    let r = chat(&gw, "gpt-4o", &body).await;
    let mut stream = r.bytes_stream();
    let mut buffer = String::new();
    read_events_until(&mut stream, &mut buffer, is_content).await;
    drop(stream);

    let cancelled = sim
        .wait_until(EVENT_TIMEOUT, |s| {
            s.stats("ptu", "gpt-4o").streams_cancelled == 1
        })
        .await;
    assert!(
        cancelled,
        "upstream saw the cancellation: {:?}",
        sim.stats("ptu", "gpt-4o")
    );
    assert_eq!(sim.stats("ptu", "gpt-4o").streams_completed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_fails_over_when_the_first_member_throttles() {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + &backend(&sim, "payg", 2))).await;
    force(&sim, "ptu", 429, Some(2_000), None, Some(1));

    let r = chat(&gw, "gpt-4o", &chat_body(true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-spillway-backend"), "payg");
    assert_eq!(header(&r, "x-spillway-attempts"), "2");
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(sim.stats("payg", "gpt-4o").streams_completed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stalls_before_its_first_byte_fails_over() {
    let stalled = DeploymentSpec {
        ttft_ms: 30_000,
        ..instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)
    };
    let sim = start_sim(vec![
        resource("ptu", vec![stalled]),
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
    let config = backend(&sim, "ptu", 1)
        + &backend(&sim, "payg", 2)
        + "[routing]\nstream_first_byte_timeout_ms = 200\n";
    let gw = start_single(&config).await;

    let r = chat(&gw, "gpt-4o", &chat_body(true)).await;
    assert_eq!(
        (r.status().as_u16(), header(&r, "x-spillway-backend")),
        (200, "payg")
    );
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    // A plain request is not held to the streaming limit.
    let config = backend(&sim, "payg", 1) + "[routing]\nstream_first_byte_timeout_ms = 1\n";
    let gw = start_single(&config).await;
    assert_eq!(chat(&gw, "gpt-4o", &chat_body(false)).await.status(), 200);
}
