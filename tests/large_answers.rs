//! An answer of any size is charged its real `usage`: the gateway reads the fields it needs
//! as the answer streams past instead of holding it, so a 1.5 MiB answer (beyond the 1 MiB
//! an earlier reader held) spends the consumer's budget and the member's by what it used,
//! not by its estimate. Chat, embeddings and the Responses API alike.

use std::sync::Arc;

use axum::http::header;
use bytes::Bytes;
use serde_json::{Value, json};
use spillway_shared::EmbeddedState;
use spillway_tests::*;

/// An upstream that answers every request with `answer` (JSON), whatever it was asked.
async fn upstream_answering(answer: Bytes) -> String {
    let app = axum::Router::new().fallback(move || {
        let answer = answer.clone();
        async move { ([(header::CONTENT_TYPE, "application/json")], answer) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// 1.5 MiB of text the answer carries before its usage.
fn filler() -> String {
    "lorem ipsum ".repeat(3 << 17)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_is_charged_its_usage_not_its_estimate() {
    let chat = json!({ "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o",
        "choices": [{ "index": 0, "finish_reason": "length",
            "message": { "role": "assistant", "content": filler() } }],
        "usage": { "prompt_tokens": 9, "completion_tokens": 2991, "total_tokens": 3000 } });
    let embeddings = json!({ "object": "list", "model": "text-embedding-3-large",
        "data": [{ "object": "embedding", "index": 0, "embedding": filler() }],
        "usage": { "prompt_tokens": 3000, "total_tokens": 3000 } });
    let response = json!({ "id": "resp_big", "object": "response", "model": "gpt-4o",
        "output": [{ "type": "message", "role": "assistant",
            "content": [{ "type": "output_text", "text": filler() }] }],
        "usage": { "input_tokens": 9, "output_tokens": 2991, "total_tokens": 3000 } });
    let cases = [
        (
            "openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            json!({ "messages": [{ "role": "user", "content": "Write a lot." }], "max_tokens": 100 }),
            chat,
        ),
        (
            "openai/deployments/gpt-4o/embeddings?api-version=2024-10-21",
            json!({ "input": "Hello there" }),
            embeddings,
        ),
        (
            "openai/v1/responses",
            json!({ "model": "gpt-4o", "input": "Write a lot.", "max_output_tokens": 100 }),
            response,
        ),
    ];
    let consumer = format!(
        "[[consumers]]\nname = \"metered\"\ntpm = 3000\nkey_sha256 = \"{}\"\n",
        spillway_gateway::auth::consumers::key_sha256_hex("metered-key")
    );
    for (path, body, answer) in cases {
        let answer = Bytes::from(answer.to_string());
        assert!(answer.len() > 3 << 19, "a 1.5 MiB answer");
        let upstream = upstream_answering(answer.clone()).await;
        let fleet = ObservedState::new(Arc::new(EmbeddedState::default()));
        let gw = start_gateway(
            &(backend_at("big", &upstream, 1) + &consumer),
            fleet.clone(),
        )
        .await;
        let send = || {
            client()
                .post(format!("{}/{path}", gw.url))
                .header("api-key", "metered-key")
                .json(&body)
                .send()
        };
        let served = send().await.unwrap();
        assert_eq!(served.status(), 200, "{path}");
        assert_eq!(
            served.bytes().await.unwrap(),
            answer,
            "relayed whole: {path}"
        );
        fleet.all_settled().await;
        let (tokens, requests) = charged(&*fleet.inner, "big").await;
        assert_eq!(
            (tokens, requests),
            (3000, 1),
            "the member is charged the usage: {path}"
        );
        // The consumer's 3,000 tokens are spent by that one answer.
        let refused = send().await.unwrap();
        assert_eq!(refused.status(), 429, "{path}");
        let error: Value = refused.json().await.unwrap();
        assert_eq!(error["error"]["code"], "429");
    }
}
