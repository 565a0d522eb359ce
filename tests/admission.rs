//! Requests the gateway refuses itself: each gets Azure OpenAI's error shape and status.

use serde_json::{Value, json};
use spillway_tests::*;

async fn error_of(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    assert_eq!(header(&response, "content-type"), "application/json");
    let body: Value = response.json().await.expect("error body is JSON");
    let code = body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string();
    let message = body["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_string();
    (status, code, message)
}

async fn gateway_with(extra: &str) -> (spillway_gateway::sim::SimHandle, Replica) {
    let sim = ptu_and_payg().await;
    let gw = start_single(&(backend(&sim, "ptu", 1) + extra)).await;
    (sim, gw)
}

fn chat_url(gw: &Replica, pool: &str) -> String {
    format!(
        "{}/openai/deployments/{pool}/chat/completions?api-version=2024-10-21",
        gw.url
    )
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let (sim, gw) = gateway_with("").await;
    let r = client()
        .post(chat_url(&gw, "gpt-4o"))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "x-spillway-attempts"), "0");
    let (status, code, message) = error_of(r).await;
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(message.contains("not valid JSON"), "{message}");

    let r = client()
        .post(chat_url(&gw, "gpt-4o"))
        .json(&json!([1, 2]))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 400);
    assert_eq!(
        sim.stats("ptu", "gpt-4o").requests,
        0,
        "nothing reached upstream"
    );
}

/// Bodies a chat or Responses request cannot have are refused by the gateway, naming where
/// (never echoing the content), and never forwarded: messages that are not objects, content
/// that is neither text nor a list of parts, parts that are not objects, a field given twice,
/// nesting deeper than 128 levels, token-id inputs holding objects.
#[tokio::test]
async fn bodies_of_the_wrong_shape_are_400_and_never_forwarded() {
    let (sim, gw) = gateway_with("").await;
    let deep = format!(
        "{{\"messages\":[],\"x\":{}{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    let cases = [
        (
            "chat/completions",
            r#"{"messages":[1,1,1]}"#.to_owned(),
            "'messages[0]'",
        ),
        (
            "chat/completions",
            r#"{"messages":[{"role":"user","content":"hi"},"hi"]}"#.to_owned(),
            "'messages[1]'",
        ),
        (
            "chat/completions",
            r#"{"messages":[{"role":"user","content":{"text":"hi"}}]}"#.to_owned(),
            "content must be text or a list",
        ),
        (
            "chat/completions",
            r#"{"messages":[{"role":"user","content":[{"type":"text","text":"a"},7]}]}"#.to_owned(),
            "content parts must be objects",
        ),
        (
            "chat/completions",
            r#"{"messages":"hello"}"#.to_owned(),
            "must be a list of message objects",
        ),
        (
            "chat/completions",
            r#"{"max_tokens":1,"max_tokens":100000,"messages":[]}"#.to_owned(),
            "duplicate field",
        ),
        ("chat/completions", deep, "deeper than 128"),
        (
            "embeddings",
            r#"{"input":[1,2,{"a":1}]}"#.to_owned(),
            "'input' must be",
        ),
    ];
    for (operation, body, says) in cases {
        let r = client()
            .post(format!(
                "{}/openai/deployments/gpt-4o/{operation}?api-version=2024-10-21",
                gw.url
            ))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let (status, code, message) = error_of(r).await;
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "{body}");
        assert!(message.contains(says), "{message} for {body}");
    }
    let responses = client()
        .post(format!("{}/openai/v1/responses", gw.url))
        .json(&json!({ "model": "gpt-4o", "input": [{ "role": "user", "content": "hi" }, 3] }))
        .send()
        .await
        .unwrap();
    let (status, _, message) = error_of(responses).await;
    assert_eq!(status, 400);
    assert!(message.contains("'input[1]'"), "{message}");
    assert_eq!(sim.received_total(), 0, "nothing reached upstream");

    // The simulated service refuses the same messages itself, as Azure does.
    for body in [
        json!({ "messages": [1, 1] }),
        json!({ "messages": [{ "role": "user", "content": { "text": "hi" } }] }),
        json!({ "messages": [{ "role": "user", "content": ["hi"] }] }),
    ] {
        let direct = client()
            .post(format!(
                "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                sim.url("ptu")
            ))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(direct.status(), 400, "{body}");
        let error: Value = direct.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_type", "{body}");
    }
}

#[tokio::test]
async fn an_unknown_pool_is_a_404_deployment_not_found() {
    let (_sim, gw) = gateway_with("").await;
    let r = chat(&gw, "gpt-5-turbo-ultra", &chat_body(false)).await;
    let (status, code, message) = error_of(r).await;
    assert_eq!((status, code.as_str()), (404, "DeploymentNotFound"));
    assert!(message.contains("gpt-5-turbo-ultra"));

    let mut body = chat_body(false);
    body["model"] = "nope".into();
    let r = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.1, "DeploymentNotFound");
}

#[tokio::test]
async fn a_v1_request_without_model_is_a_400() {
    let (_sim, gw) = gateway_with("").await;
    let r = client()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    let (status, _, message) = error_of(r).await;
    assert_eq!(status, 400);
    assert!(message.contains("'model'"), "{message}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413() {
    let (sim, gw) = gateway_with("[server]\nmax_body_bytes = 1024\n").await;
    let big = json!({ "messages": [{ "role": "user", "content": "x".repeat(2_000) }] });
    let r = chat(&gw, "gpt-4o", &big).await;
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (413, "request_too_large"));

    // Without a Content-Length (chunked upload) the limit still holds.
    let chunks =
        futures_util::stream::iter(vec![Ok::<_, std::io::Error>(big.to_string().into_bytes())]);
    let r = client()
        .post(chat_url(&gw, "gpt-4o"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 413);
    assert_eq!(sim.stats("ptu", "gpt-4o").requests, 0);

    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    assert_eq!(r.status(), 200, "bodies under the limit pass");
}

#[tokio::test]
async fn unknown_paths_are_404_in_azure_shape_and_probes_answer() {
    let (_sim, gw) = gateway_with("").await;
    let r = client()
        .get(format!("{}/nope", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.0, 404);
    for path in [
        "/openai/deployments/gpt-4o/chat/completions",
        "/openai/v1/chat/completions",
    ] {
        let r = client()
            .get(format!("{}{path}", gw.url))
            .send()
            .await
            .unwrap();
        assert_eq!(header(&r, "allow"), "POST");
        assert_eq!(&error_of(r).await.1, "405", "GET {path}");
    }
    assert_eq!(
        client()
            .get(format!("{}/healthz", gw.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .get(format!("{}/readyz", gw.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn embeddings_and_other_operations_are_forwarded() {
    let (sim, gw) = gateway_with("").await;
    let r = client()
        .post(format!(
            "{}/openai/deployments/gpt-4o/embeddings?api-version=2024-10-21",
            gw.url
        ))
        .json(&json!({ "input": ["Hello there", "Hello"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(sim.stats("ptu", "gpt-4o").prompt_tokens, 3);
}

#[tokio::test]
async fn a_pool_with_no_member_in_its_regions_is_a_403() {
    let (sim, gw) = gateway_with("\n[pools.gpt-4o]\nregions = [\"westeurope\"]\n").await;
    let r = chat(&gw, "gpt-4o", &chat_body(false)).await;
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (403, "region_not_allowed"));
    assert_eq!(sim.received_total(), 0);
}
