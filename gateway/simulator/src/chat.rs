//! Chat completions: the answer, or its SSE stream (content chunks, the usage chunk when
//! asked, `[DONE]`), stalls and cuts as the deployment's faults say.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::api::{
    Charge, bad_request, charge, created, output_tokens, record_served, usage, with_headers,
};
use super::deployment::{Deployment, Faults};
use super::text;
use crate::tokens;

/// The service's 400 for a message that is not an object, or content that is neither text,
/// null nor a list of parts (`invalid_type`, naming the parameter).
fn message_shape(messages: &[Value]) -> Option<Response> {
    let kind = |v: &Value| match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    let invalid = |param: String, expected: &str, got: &Value| {
        let message = format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            kind(got)
        );
        let body = json!({ "error": { "message": message, "type": "invalid_request_error",
            "param": param, "code": "invalid_type" } });
        Some((StatusCode::BAD_REQUEST, Json(body)).into_response())
    };
    for (i, message) in messages.iter().enumerate() {
        let Some(fields) = message.as_object() else {
            return invalid(format!("messages[{i}]"), "an object", message);
        };
        match fields.get("content") {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                if let Some((j, part)) = parts.iter().enumerate().find(|(_, p)| !p.is_object()) {
                    return invalid(format!("messages[{i}].content[{j}]"), "an object", part);
                }
            }
            Some(other) => {
                return invalid(
                    format!("messages[{i}].content"),
                    "one of a string or array of objects",
                    other,
                );
            }
        }
    }
    None
}

/// Chat usage, with the prompt tokens the deployment's cache served.
fn chat_usage(prompt: u64, completion: u64, cached: u64) -> Value {
    let mut usage = usage(prompt, completion);
    usage["prompt_tokens_details"] = json!({ "cached_tokens": cached });
    usage
}

/// The prompt tokens of a chat request its deployment has cached: the messages before the
/// last one are the prefix a conversation resends.
fn cached_chat_tokens(deployment: &Deployment, messages: &[Value]) -> u64 {
    let Some((_, prefix)) = messages.split_last() else {
        return 0;
    };
    let key = {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        Value::Array(prefix.to_vec()).to_string().hash(&mut hasher);
        hasher.finish()
    };
    deployment.cached_prompt_tokens(key, tokens::chat_prompt(prefix))
}

fn filter_results() -> Value {
    json!([{ "prompt_index": 0, "content_filter_results": {
        "hate": {"filtered": false, "severity": "safe"}, "self_harm": {"filtered": false, "severity": "safe"},
        "sexual": {"filtered": false, "severity": "safe"}, "violence": {"filtered": false, "severity": "safe"} } }])
}

pub(super) async fn chat(
    deployment: &Arc<Deployment>,
    request: &Value,
    api_version: &str,
    id: u64,
) -> Response {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return bad_request("'messages' is a required property");
    };
    if let Some(refusal) = message_shape(messages) {
        return refusal;
    }
    let prompt = tokens::chat_prompt(messages);
    let cached = cached_chat_tokens(deployment, messages);
    let (n, cut) = output_tokens(deployment, request);
    let headers = match charge(
        deployment,
        prompt + u64::from(n),
        "ChatCompletions_Create",
        api_version,
    ) {
        Charge::Admitted(h) => h,
        Charge::Throttled(response) => return response,
    };
    deployment.record(|s| s.cached_tokens += cached);
    let tier = service_tier(request, prompt);
    if tier == Some("priority") {
        deployment.record(|s| s.priority += 1);
    }
    let finish_reason = if cut { "length" } else { "stop" };
    let pieces = text::reply_pieces(n);
    let id = format!("chatcmpl-sim{id:08}");

    tokio::time::sleep(deployment.latency(deployment.spec.ttft_ms)).await;
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let stream = ChatStream {
            deployment: deployment.clone(),
            id,
            prompt,
            cached,
            pieces,
            finish_reason,
            include_usage,
            service_tier: tier,
        };
        return with_headers(stream.into_response(), headers);
    }

    // One sleep for the whole answer: a timer per token would cost a tick each.
    let per_token = deployment.latency(deployment.spec.ms_per_token);
    if !per_token.is_zero() {
        tokio::time::sleep(per_token * n).await;
    }
    record_served(deployment, prompt, u64::from(n));
    let mut body = json!({
        "id": id, "object": "chat.completion", "created": created(), "model": deployment.spec.model,
        "system_fingerprint": "fp_spillway_sim", "prompt_filter_results": filter_results(),
        "choices": [{ "index": 0, "finish_reason": finish_reason, "logprobs": null,
            "message": { "role": "assistant", "content": pieces.concat(), "refusal": null } }],
        "usage": chat_usage(prompt, u64::from(n), cached),
    });
    if let Some(tier) = tier {
        body["service_tier"] = json!(tier);
    }
    with_headers(Json(body).into_response(), headers)
}

/// Prompts above this many tokens are served at the standard tier even when priority
/// processing is asked for (Azure's documented downgrade of long-context requests).
pub const PRIORITY_PROMPT_LIMIT: u64 = 128_000;

/// The tier that served a request that named one (`None`: it named none, and the answer
/// says nothing): `priority` when asked and the prompt is within the limit, else `default`.
fn service_tier(request: &Value, prompt: u64) -> Option<&'static str> {
    let asked = request.get("service_tier")?.as_str()?;
    Some(if asked == "priority" && prompt <= PRIORITY_PROMPT_LIMIT {
        "priority"
    } else {
        "default"
    })
}

/// A chat completion streamed as Azure does: a prompt-filter event, a role event, one event
/// per token, a finish event, an optional usage event, then `[DONE]`.
struct ChatStream {
    deployment: Arc<Deployment>,
    id: String,
    prompt: u64,
    cached: u64,
    pieces: Vec<&'static str>,
    finish_reason: &'static str,
    include_usage: bool,
    /// The tier that serves it, when the request named one (every chunk says it).
    service_tier: Option<&'static str>,
}

impl ChatStream {
    fn chunk(&self, choices: Value) -> String {
        let mut chunk = json!({ "id": self.id, "object": "chat.completion.chunk", "created": created(),
            "model": self.deployment.spec.model, "system_fingerprint": "fp_spillway_sim", "choices": choices });
        // With include_usage, every chunk but the last carries `"usage": null` (as OpenAI documents).
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        if let Some(tier) = self.service_tier {
            chunk["service_tier"] = json!(tier);
        }
        format!("data: {chunk}\n\n")
    }

    fn into_response(self) -> Response {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        self.deployment.record(|s| s.streams_started += 1);
        tokio::spawn(self.produce(tx));
        let body = Body::from_stream(ReceiverStream::new(rx));
        let mut response = Response::new(body);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }

    async fn produce(self, tx: mpsc::Sender<Result<Bytes, std::io::Error>>) {
        let deployment = self.deployment.clone();
        let mut faults = deployment.watch_faults();
        let mut sent_tokens = 0u64;
        let mut events = vec![
            format!("data: {}\n\n", json!({ "id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": filter_results() })),
            self.chunk(json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null }])),
        ];
        let first_token = events.len();
        for piece in &self.pieces {
            events.push(self.chunk(
                json!([{ "index": 0, "delta": { "content": piece }, "finish_reason": null }]),
            ));
        }
        events.push(
            self.chunk(json!([{ "index": 0, "delta": {}, "finish_reason": self.finish_reason }])),
        );
        if self.include_usage {
            let completion = self.pieces.len() as u64;
            let mut chunk = json!({ "id": self.id, "object": "chat.completion.chunk", "created": created(),
                "model": deployment.spec.model, "choices": [], "usage": chat_usage(self.prompt, completion, self.cached) });
            chunk["system_fingerprint"] = json!("fp_spillway_sim");
            if let Some(tier) = self.service_tier {
                chunk["service_tier"] = json!(tier);
            }
            events.push(format!("data: {chunk}\n\n"));
        }
        events.push("data: [DONE]\n\n".into());

        for (i, event) in events.into_iter().enumerate() {
            let is_token = i >= first_token && i < first_token + self.pieces.len();
            let delay = if is_token {
                deployment.latency(deployment.spec.ms_per_token)
            } else {
                Duration::ZERO
            };
            let gone = tokio::select! {
                _ = tx.closed() => true,
                stalled = wait_while_stalled(&mut faults, i as u32, delay) => stalled.is_err(),
            };
            if faults
                .borrow()
                .cut_after_chunks
                .is_some_and(|after| i as u32 >= after)
            {
                // An error item makes the server abort the response mid-body.
                let _ = tx
                    .send(Err(std::io::Error::other("simulated stream reset")))
                    .await;
                deployment.record(|s| {
                    s.streams_cut += 1;
                    s.prompt_tokens += self.prompt;
                    s.completion_tokens += sent_tokens;
                    s.total_tokens += self.prompt + sent_tokens;
                });
                return;
            }
            let event = if faults.borrow().sse_crlf {
                event.replace('\n', "\r\n")
            } else {
                event
            };
            if gone || tx.send(Ok(Bytes::from(event))).await.is_err() {
                deployment.record(|s| {
                    s.streams_cancelled += 1;
                    s.prompt_tokens += self.prompt;
                    s.completion_tokens += sent_tokens;
                    s.total_tokens += self.prompt + sent_tokens;
                });
                return;
            }
            if is_token {
                sent_tokens += 1;
            }
        }
        record_served(&deployment, self.prompt, sent_tokens);
        deployment.record(|s| s.streams_completed += 1);
    }
}

/// Sleep `delay`, then hold while a `stall_after_chunks` fault covers event `index`.
async fn wait_while_stalled(
    faults: &mut tokio::sync::watch::Receiver<Faults>,
    index: u32,
    delay: Duration,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    tokio::time::sleep(delay).await;
    faults
        .wait_for(|f| f.stall_after_chunks.is_none_or(|after| index < after))
        .await
        .map(|_| ())
}
