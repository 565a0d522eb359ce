//! The simulated Responses API of one resource: create (JSON and the SSE event stream),
//! retrieve, delete, input items and cancel. Responses are stateful and stored per resource,
//! as Azure stores them: a follow-up naming a `previous_response_id` this resource did not
//! create gets 400 `previous_response_not_found`, which is why a gateway must pin a
//! conversation to the member that started it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{Value, json};

use super::api::{
    Charge, ResourceState, authorized, azure_error, bad_request, charge, created, injected_failure,
    record_served, unauthorized, with_headers,
};
use super::text;
use crate::tokens;

/// Responses this resource created and stored (`"store": false` ones are not).
#[derive(Default)]
pub struct StoredResponses(Mutex<HashMap<String, Stored>>);

struct Stored {
    response: Value,
    input_items: Vec<Value>,
}

impl StoredResponses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Stored>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, id: &str) -> Option<Value> {
        self.lock().get(id).map(|s| s.response.clone())
    }

    fn input_items(&self, id: &str) -> Option<Vec<Value>> {
        self.lock().get(id).map(|s| s.input_items.clone())
    }

    fn insert(&self, id: String, stored: Stored) {
        self.lock().insert(id, stored);
    }

    fn remove(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }
}

/// `POST /openai/v1/responses` (and the preview form `/openai/responses?api-version=`).
/// A create the service takes: authorized, JSON, a known deployment, an `input`, and no
/// injected failure this time (the request counts on the deployment either way). The error
/// is the answer itself, handed straight back by the handler.
#[allow(clippy::result_large_err)]
fn accepted(
    state: &ResourceState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Value, Arc<super::deployment::Deployment>), Response> {
    if !authorized(state, headers) {
        return Err(unauthorized());
    }
    let Ok(request @ Value::Object(_)) = serde_json::from_slice::<Value>(body) else {
        return Err(bad_request(
            "We could not parse the JSON body of your request.",
        ));
    };
    let Some(model) = request.get("model").and_then(Value::as_str) else {
        return Err(bad_request("'model' is a required property"));
    };
    let Some(deployment) = state.deployments.get(model).cloned() else {
        return Err(azure_error(
            StatusCode::NOT_FOUND,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
        ));
    };
    if request.get("input").is_none() {
        return Err(bad_request("Missing required parameter: 'input'."));
    }
    deployment.record(|s| s.requests += 1);
    if let Some(failure) = injected_failure(&deployment) {
        return Err(failure);
    }
    Ok((request, deployment))
}

pub async fn create(
    State(state): State<Arc<ResourceState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, deployment) = match accepted(&state, &headers, &body) {
        Ok(accepted) => accepted,
        Err(refusal) => return refusal,
    };

    // The service reads the whole conversation: a follow-up's input includes what came
    // before it, which only this resource knows.
    let previous = request.get("previous_response_id").and_then(Value::as_str);
    let earlier_tokens = match previous {
        None => 0,
        Some(id) => match state.responses.get(id) {
            Some(earlier) => earlier
                .pointer("/usage/total_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            None => return previous_response_not_found(id),
        },
    };
    let prompt = tokens::responses_prompt(&request) + earlier_tokens;
    let cap = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|field| request.get(*field).and_then(Value::as_u64));
    let spec_tokens = u64::from(deployment.spec.output_tokens);
    let (n, cut) = match cap {
        Some(cap) if cap < spec_tokens => (cap, true),
        _ => (spec_tokens, false),
    };
    let headers = match charge(&deployment, prompt + n, "Responses_Create", "v1") {
        Charge::Admitted(h) => h,
        Charge::Throttled(response) => return response,
    };

    let number = state.next_id.fetch_add(1, Ordering::Relaxed);
    // Ids are unique across resources, as Azure's are.
    let resource: String = state
        .name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let id = format!("resp_sim_{resource}_{number:08}");
    let pieces = text::reply_pieces(n as u32);
    let store = request.get("store").and_then(Value::as_bool) != Some(false);
    let response = json!({
        "id": id, "object": "response", "created_at": created(),
        "status": if cut { "incomplete" } else { "completed" },
        "incomplete_details": if cut { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "error": null, "model": deployment.spec.model,
        "instructions": request.get("instructions").cloned().unwrap_or(Value::Null),
        "max_output_tokens": cap, "previous_response_id": previous,
        "output": [{ "type": "message", "id": format!("msg_sim{number:08}"), "status": "completed",
            "role": "assistant",
            "content": [{ "type": "output_text", "text": pieces.concat(), "annotations": [] }] }],
        "parallel_tool_calls": true, "store": store, "temperature": 1.0, "top_p": 1.0,
        "tool_choice": "auto", "tools": [], "text": { "format": { "type": "text" } },
        "truncation": "disabled", "metadata": {},
        "usage": { "input_tokens": prompt, "input_tokens_details": { "cached_tokens": 0 },
            "output_tokens": n, "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": prompt + n },
    });
    if store {
        let stored = Stored {
            response: response.clone(),
            input_items: input_items(&request),
        };
        state.responses.insert(id.clone(), stored);
    }

    tokio::time::sleep(deployment.latency(deployment.spec.ttft_ms)).await;
    let per_token = deployment.latency(deployment.spec.ms_per_token);
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        if !per_token.is_zero() {
            tokio::time::sleep(per_token * n as u32).await;
        }
        record_served(&deployment, prompt, n);
        return with_headers(Json(response).into_response(), headers);
    }
    record_served(&deployment, prompt, n);
    with_headers(event_stream(response, pieces, per_token), headers)
}

/// The input as stored items: a text input is one user message.
fn input_items(request: &Value) -> Vec<Value> {
    match request.get("input") {
        Some(Value::String(text)) => vec![json!({ "type": "message", "role": "user",
            "content": [{ "type": "input_text", "text": text }] })],
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    }
}

fn previous_response_not_found(id: &str) -> Response {
    let body = json!({ "error": { "message": format!("Previous response with id '{id}' not found."),
        "type": "invalid_request_error", "param": "previous_response_id",
        "code": "previous_response_not_found" } });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

fn not_found(id: &str) -> Response {
    let body = json!({ "error": { "message": format!("Response with id '{id}' not found."),
        "type": "invalid_request_error", "param": null, "code": null } });
    (StatusCode::NOT_FOUND, Json(body)).into_response()
}

/// The named-event SSE stream of a created response: created, in progress, the output item
/// and its text deltas, and the final `response.completed` (or `.incomplete`) with usage.
fn event_stream(response: Value, pieces: Vec<&'static str>, per_token: Duration) -> Response {
    let mut pending = response.clone();
    pending["status"] = json!("in_progress");
    pending["output"] = json!([]);
    pending["usage"] = Value::Null;
    let item = &response["output"][0];
    let item_id = item["id"].clone();
    let final_kind = if response["status"] == "incomplete" {
        "response.incomplete"
    } else {
        "response.completed"
    };
    let mut events: Vec<(Value, bool)> = vec![
        (
            json!({ "type": "response.created", "response": pending }),
            false,
        ),
        (
            json!({ "type": "response.in_progress", "response": pending }),
            false,
        ),
        (
            json!({ "type": "response.output_item.added", "output_index": 0,
            "item": { "type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": [] } }),
            false,
        ),
        (
            json!({ "type": "response.content_part.added", "item_id": item_id, "output_index": 0, "content_index": 0,
            "part": { "type": "output_text", "text": "", "annotations": [] } }),
            false,
        ),
    ];
    for piece in &pieces {
        events.push((
            json!({ "type": "response.output_text.delta", "item_id": item_id,
            "output_index": 0, "content_index": 0, "delta": piece }),
            true,
        ));
    }
    let text = pieces.concat();
    events.push((
        json!({ "type": "response.output_text.done", "item_id": item_id, "output_index": 0,
        "content_index": 0, "text": text }),
        false,
    ));
    events.push((
        json!({ "type": "response.content_part.done", "item_id": item_id, "output_index": 0,
        "content_index": 0, "part": item["content"][0] }),
        false,
    ));
    events.push((
        json!({ "type": "response.output_item.done", "output_index": 0, "item": item }),
        false,
    ));
    events.push((json!({ "type": final_kind, "response": response }), false));

    let stream = futures_util::stream::iter(events.into_iter().enumerate()).then(
        move |(sequence, (mut event, is_token))| async move {
            if is_token && !per_token.is_zero() {
                tokio::time::sleep(per_token).await;
            }
            event["sequence_number"] = json!(sequence);
            let kind = event["type"].as_str().unwrap_or_default().to_owned();
            Ok::<_, std::io::Error>(Bytes::from(format!("event: {kind}\ndata: {event}\n\n")))
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /openai/v1/responses/{id}`.
pub async fn retrieve(
    State(state): State<Arc<ResourceState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state.responses.get(&id) {
        Some(response) => Json(response).into_response(),
        None => not_found(&id),
    }
}

/// `DELETE /openai/v1/responses/{id}`.
pub async fn delete(
    State(state): State<Arc<ResourceState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if !state.responses.remove(&id) {
        return not_found(&id);
    }
    Json(json!({ "id": id, "object": "response.deleted", "deleted": true })).into_response()
}

/// `GET /openai/v1/responses/{id}/input_items`.
pub async fn input_items_of(
    State(state): State<Arc<ResourceState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let Some(items) = state.responses.input_items(&id) else {
        return not_found(&id);
    };
    let data: Vec<Value> = items
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            item["id"] = json!(format!("{id}_in{i}"));
            item
        })
        .collect();
    let first = data.first().map(|i| i["id"].clone());
    let last = data.last().map(|i| i["id"].clone());
    Json(json!({ "object": "list", "data": data, "first_id": first, "last_id": last, "has_more": false }))
        .into_response()
}

/// `POST /openai/v1/responses/{id}/cancel`: simulated responses are complete once created,
/// so a stored one is answered as it is.
pub async fn cancel(
    state: State<Arc<ResourceState>>,
    id: Path<String>,
    headers: HeaderMap,
) -> Response {
    retrieve(state, id, headers).await
}
