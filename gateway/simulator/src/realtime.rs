//! The simulated Realtime API of one resource, text only: a WebSocket at
//! `/openai/realtime?api-version=...&deployment=...` (and `/openai/v1/realtime?model=...`).
//! The handshake is refused like any request (401, 404, the deployment's injected faults);
//! then `session.created`, and for each `response.create` a response streamed as events and
//! closed by `response.done` with its usage. Tokens are counted as the service counts them
//! (input: the conversation's text so far); faults apply at the handshake.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::api::{
    ResourceState, authorized, azure_error, injected_failure, record_served, unauthorized,
};
use super::deployment::Deployment;
use super::text;
use crate::tokens;

/// `GET /openai/realtime` and `/openai/v1/realtime`, upgraded to a WebSocket.
pub async fn upgrade(
    State(state): State<Arc<ResourceState>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let name = query.get("deployment").or_else(|| query.get("model"));
    let Some(deployment) = name.and_then(|n| state.deployments.get(n)).cloned() else {
        return azure_error(
            StatusCode::NOT_FOUND,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist.",
        );
    };
    deployment.record(|s| s.requests += 1);
    if let Some(failure) = injected_failure(&deployment) {
        return failure;
    }
    let session = state.next_id.fetch_add(1, Ordering::Relaxed);
    ws.on_upgrade(move |socket| serve(socket, deployment, session))
}

async fn serve(mut socket: WebSocket, deployment: Arc<Deployment>, session: u64) {
    let created = json!({ "type": "session.created", "event_id": format!("event_sim{session}_0"),
        "session": { "id": format!("sess_sim{session:08}"), "object": "realtime.session",
            "model": deployment.spec.model, "modalities": ["text"] } });
    if send(&mut socket, &created).await.is_err() {
        return;
    }
    // The conversation's text so far: every response reads all of it.
    let mut conversation_tokens = 0u64;
    let mut responses = 0u64;
    // The session's output cap (`session.update`'s `max_response_output_tokens`, "inf": none).
    let mut session_cap: Option<u64> = None;
    while let Some(Ok(message)) = socket.recv().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(event) = serde_json::from_str::<Value>(text.as_str()) else {
            let error = json!({ "type": "error", "error": { "type": "invalid_request_error",
                "code": "invalid_json", "message": "The event is not valid JSON." } });
            if send(&mut socket, &error).await.is_err() {
                return;
            }
            continue;
        };
        match event["type"].as_str() {
            Some("conversation.item.create") => {
                conversation_tokens += item_tokens(&event["item"]);
                let ack = json!({ "type": "conversation.item.created", "item": event["item"] });
                if send(&mut socket, &ack).await.is_err() {
                    return;
                }
            }
            Some("session.update") => {
                if let Some(cap) = event["session"].get("max_response_output_tokens") {
                    session_cap = cap.as_u64();
                }
                let updated = json!({ "type": "session.updated",
                    "session": { "id": format!("sess_sim{session:08}"),
                        "max_response_output_tokens": session_cap.map_or(json!("inf"), |c| json!(c)) } });
                if send(&mut socket, &updated).await.is_err() {
                    return;
                }
            }
            Some("response.create") => {
                responses += 1;
                let id = format!("resp_rt{session}_{responses}");
                // A response's own cap, else the session's.
                let asked = &event["response"];
                let cap = asked
                    .get("max_output_tokens")
                    .or_else(|| asked.get("max_response_output_tokens"))
                    .map_or(session_cap, Value::as_u64);
                let Ok(output) =
                    respond(&mut socket, &deployment, &id, conversation_tokens, cap).await
                else {
                    return;
                };
                conversation_tokens += output;
            }
            _ => {}
        }
    }
}

/// Stream one response: created, its text deltas, and `response.done` with usage. Returns
/// the output tokens (they join the conversation).
async fn respond(
    socket: &mut WebSocket,
    deployment: &Deployment,
    id: &str,
    input: u64,
    cap: Option<u64>,
) -> Result<u64, axum::Error> {
    let n = u64::from(deployment.spec.output_tokens).min(cap.unwrap_or(u64::MAX));
    let pieces = text::reply_pieces(n as u32);
    send(
        socket,
        &json!({ "type": "response.created", "response": { "id": id, "status": "in_progress" } }),
    )
    .await?;
    for piece in &pieces {
        let delta =
            json!({ "type": "response.output_text.delta", "response_id": id, "delta": piece });
        send(socket, &delta).await?;
    }
    record_served(deployment, input, n);
    let status = if cap.is_some_and(|c| c < u64::from(deployment.spec.output_tokens)) {
        "incomplete"
    } else {
        "completed"
    };
    let done = json!({ "type": "response.done", "response": { "id": id, "object": "realtime.response",
        "status": status,
        "output": [{ "type": "message", "role": "assistant",
            "content": [{ "type": "output_text", "text": pieces.concat() }] }],
        "usage": { "total_tokens": input + n, "input_tokens": input, "output_tokens": n,
            "input_token_details": { "text_tokens": input, "audio_tokens": 0, "cached_tokens": 0 },
            "output_token_details": { "text_tokens": n, "audio_tokens": 0 } } } });
    send(socket, &done).await?;
    Ok(n)
}

/// Tokens of a conversation item's text (`input_text` / `text` parts).
fn item_tokens(item: &Value) -> u64 {
    item["content"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|part| part["text"].as_str())
        .map(tokens::count)
        .sum()
}

async fn send(socket: &mut WebSocket, event: &Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(event.to_string().into())).await
}
