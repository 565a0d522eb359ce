//! The gateway's prompt estimate against the simulator's count, which is written apart from
//! it (as the service's own count is): on a corpus of requests of every operation, the two
//! may differ by at most the tolerance README documents. A counting bug in either shows here.

use serde_json::{Value, json};
use spillway_gateway::proxy::request_fields::RequestFields;
use spillway_gateway::proxy::tokens::{self, Encoding, Operation};
use spillway_gateway::sim::tokens as simulated;

/// README, "Token estimates": at most 2 tokens, or 0.1 % of the prompt, apart (texts are
/// counted in pieces on the way in, and a cut between pieces may split what the service
/// counts as one token).
fn tolerance(prompt: u64) -> u64 {
    (prompt / 1000).max(2)
}

fn estimate(operation: Operation, body: &Value) -> u64 {
    let bytes = body.to_string();
    let fields = RequestFields::parse(bytes.as_bytes()).expect("a JSON object");
    tokens::estimate(
        Encoding::O200kBase,
        operation,
        Some(&fields),
        bytes.len(),
        0,
        u64::MAX,
    )
    .expect("a valid request")
    .prompt
}

/// What the simulator reports as the request's `prompt_tokens`.
fn counted(operation: Operation, body: &Value) -> u64 {
    match operation {
        Operation::ChatCompletions => simulated::chat_prompt(body["messages"].as_array().unwrap()),
        Operation::Embeddings => simulated::input(&body["input"]),
        Operation::Completions => simulated::input(&body["prompt"]),
        Operation::Responses => simulated::responses_prompt(body),
        Operation::Other => unreachable!("no prompt"),
    }
}

fn corpus() -> Vec<(Operation, Value)> {
    let long = "The quick brown fox jumps over the lazy dog. ".repeat(2_000); // 90 KB
    let unbroken = "x".repeat(40_000);
    let unicode = "Grüße aus Köln — 東京からこんにちは 🎉 ".repeat(300);
    let chat = |messages: Value| (Operation::ChatCompletions, json!({ "messages": messages }));
    vec![
        chat(json!([{ "role": "user", "content": "Hello there" }])),
        chat(json!([
            { "role": "system", "content": "Be brief. \"Quoted\", tabs\tand\nlines." },
            { "role": "user", "name": "ann", "content": "What is 2 + 2?" },
            { "role": "assistant", "content": "4" },
            { "role": "user", "content": "And times 3?" }
        ])),
        chat(json!([{ "role": "user", "content": [
            { "type": "text", "text": "What is in this picture?" },
            { "type": "image_url", "image_url": { "url": "https://example.com/a.png", "detail": "low" } },
            { "type": "image_url", "image_url": { "url": "https://example.com/b.png" } }
        ] }])),
        chat(json!([{ "role": "developer", "content": unicode }])),
        chat(json!([{ "role": "user", "content": long }])),
        chat(json!([{ "role": "user", "content": unbroken }])),
        chat(json!([])),
        (Operation::Embeddings, json!({ "input": "Hello there" })),
        (
            Operation::Embeddings,
            json!({ "input": ["one text", "and another", long] }),
        ),
        (
            Operation::Embeddings,
            json!({ "input": [[1, 2, 3], [4, 5]] }),
        ),
        (
            Operation::Completions,
            json!({ "prompt": "Once upon a time" }),
        ),
        (
            Operation::Responses,
            json!({ "input": "Hello there", "instructions": "Answer in French." }),
        ),
        (
            Operation::Responses,
            json!({ "input": [
            { "role": "user", "content": [{ "type": "input_text", "text": "Hi" }] },
            { "role": "assistant", "content": [{ "type": "output_text", "text": "Hello! How can I help?" }] },
            { "role": "user", "content": [{ "type": "input_text", "text": unicode }] }
        ] }),
        ),
        (
            Operation::Responses,
            json!({ "input": "Weather?", "tools": [{ "type": "function",
            "name": "get_weather", "parameters": { "type": "object",
            "properties": { "city": { "type": "string" } } } }] }),
        ),
    ]
}

#[test]
fn the_gateways_estimate_stays_within_tolerance_of_the_simulators_count() {
    let mut drifted = Vec::new();
    for (operation, body) in corpus() {
        let (estimated, counted) = (estimate(operation, &body), counted(operation, &body));
        assert!(counted > 0 || body["messages"] == json!([]), "{body}");
        if estimated.abs_diff(counted) > tolerance(counted) {
            let shown: String = body.to_string().chars().take(120).collect();
            drifted.push(format!(
                "{operation:?} {shown}…: estimated {estimated}, counted {counted}"
            ));
        }
    }
    assert!(drifted.is_empty(), "drifted:\n{}", drifted.join("\n"));
}

#[test]
fn a_drift_beyond_the_tolerance_is_caught() {
    // The check itself: an estimate that forgot the per-message tokens would be caught.
    let body = json!({ "messages": [{ "role": "user", "content": "Hi" }, { "role": "user", "content": "Hi" }] });
    let counted = counted(Operation::ChatCompletions, &body);
    let forgetful = counted - 6;
    assert!(forgetful.abs_diff(counted) > tolerance(counted));
}
