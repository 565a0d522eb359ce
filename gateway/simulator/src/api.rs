//! The simulated Azure OpenAI HTTP API of one resource: chat completions (JSON and SSE),
//! the Responses API (in `responses`),
//! completions, embeddings, quota headers and 429s, plus `/sim/stats` and `/sim/faults`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};

use super::config::DeploymentKind;
use super::deployment::{Deployment, DeploymentStats, Faults, ForcedResponse};
use super::journal::{self, Journal};
use super::limiter::Decision;
use super::realtime;
use super::responses::{self, StoredResponses};
use super::text;
use crate::tokens;

pub struct ResourceState {
    pub name: String,
    pub api_key: Option<String>,
    pub deployments: BTreeMap<String, Arc<Deployment>>,
    /// Every request that arrived, whatever its path.
    pub journal: Journal,
    pub(super) next_id: AtomicU64,
    /// Responses API objects this resource created.
    pub(super) responses: StoredResponses,
}

impl ResourceState {
    pub fn new(
        name: &str,
        api_key: Option<String>,
        deployments: BTreeMap<String, Arc<Deployment>>,
    ) -> Self {
        Self {
            name: name.into(),
            api_key,
            deployments,
            journal: Journal::default(),
            next_id: AtomicU64::new(1),
            responses: StoredResponses::default(),
        }
    }
}

pub fn router(state: Arc<ResourceState>) -> Router {
    Router::new()
        .route(
            "/openai/deployments/{deployment}/{*operation}",
            post(by_path),
        )
        .route("/openai/v1/responses", post(responses::create))
        .route("/openai/responses", post(responses::create))
        .route(
            "/openai/v1/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route(
            "/openai/v1/responses/{id}/input_items",
            get(responses::input_items_of),
        )
        .route("/openai/v1/responses/{id}/cancel", post(responses::cancel))
        .route(
            "/openai/responses/{id}",
            get(responses::retrieve).delete(responses::delete),
        )
        .route(
            "/openai/responses/{id}/input_items",
            get(responses::input_items_of),
        )
        .route("/openai/responses/{id}/cancel", post(responses::cancel))
        .route("/openai/realtime", get(realtime::upgrade))
        .route("/openai/v1/realtime", get(realtime::upgrade))
        .route("/openai/v1/{*operation}", post(by_model))
        .route("/sim/stats", get(stats))
        .route("/sim/faults", post(set_faults))
        .fallback(|| async { azure_error(StatusCode::NOT_FOUND, "404", "Resource not found") })
        .with_state(state.clone())
        .layer(axum::middleware::from_fn_with_state(
            state.journal.clone(),
            journal::record,
        ))
}

pub(super) fn azure_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

pub(super) fn authorized(state: &ResourceState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.api_key else {
        return true;
    };
    let api_key = headers.get("api-key").and_then(|v| v.to_str().ok());
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    api_key.or(bearer) == Some(expected.as_str())
}

pub(super) fn unauthorized() -> Response {
    azure_error(
        StatusCode::UNAUTHORIZED,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
    )
}

async fn by_path(
    State(state): State<Arc<ResourceState>>,
    Path((deployment, operation)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let Some(api_version) = query.get("api-version") else {
        return azure_error(StatusCode::NOT_FOUND, "404", "Resource not found");
    };
    serve(&state, &deployment, &operation, api_version, body).await
}

async fn by_model(
    State(state): State<Arc<ResourceState>>,
    Path(operation): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let model = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("model").and_then(Value::as_str).map(str::to_owned));
    match model {
        Some(model) => serve(&state, &model, &operation, "v1", body).await,
        None => bad_request("'model' is a required property"),
    }
}

pub(super) fn bad_request(message: &str) -> Response {
    // Azure's 400s carry OpenAI's fields: type, param, code (often null).
    let body = json!({ "error": { "message": message, "type": "invalid_request_error", "param": null, "code": null } });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

/// Serve one operation of deployment `name`, adding the `response_headers` fault's headers.
async fn serve(
    state: &ResourceState,
    name: &str,
    operation: &str,
    api_version: &str,
    body: Bytes,
) -> Response {
    let extra = state
        .deployments
        .get(name)
        .map(|d| d.faults().response_headers)
        .unwrap_or_default();
    let mut response = serve_operation(state, name, operation, api_version, body).await;
    for (name, value) in extra {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

async fn serve_operation(
    state: &ResourceState,
    name: &str,
    operation: &str,
    api_version: &str,
    body: Bytes,
) -> Response {
    let Some(deployment) = state.deployments.get(name).cloned() else {
        return azure_error(
            StatusCode::NOT_FOUND,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. If you created the deployment within the last 5 minutes, please wait a moment and try again.",
        );
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return bad_request("We could not parse the JSON body of your request."),
    };
    deployment.record(|s| s.requests += 1);
    if let Some(failure) = injected_failure(&deployment) {
        return failure;
    }
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    match operation {
        "chat/completions" => super::chat::chat(&deployment, &request, api_version, id).await,
        "completions" => completions(&deployment, &request, api_version, id).await,
        "embeddings" => embeddings(&deployment, &request, api_version).await,
        _ => azure_error(StatusCode::NOT_FOUND, "404", "Resource not found"),
    }
}

/// The failure the deployment's faults inject into this request, if any: a forced
/// response, or a random 500 at the error rate. A forced 429 on a PTU with Azure spillover
/// is what spillover exists for: served, marked as spilled.
pub(super) fn injected_failure(deployment: &Deployment) -> Option<Response> {
    let mut spill = false;
    if let Some(forced) = deployment.take_forced() {
        deployment.record(|s| s.forced += 1);
        spill = forced.status == 429 && deployment.faults().azure_spillover;
        if !spill {
            return Some(forced_response(&forced));
        }
    }
    if rand::rng().random_bool(deployment.faults().error_rate.clamp(0.0, 1.0)) {
        deployment.record(|s| s.failed += 1);
        return Some(azure_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "The server had an error while processing your request. Sorry about that!",
        ));
    }
    if spill {
        deployment.spill_next();
    }
    None
}

fn forced_response(forced: &ForcedResponse) -> Response {
    let status = StatusCode::from_u16(forced.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let code = forced
        .code
        .clone()
        .unwrap_or_else(|| status.as_u16().to_string());
    let message = format!("Simulated {} response.", status.as_u16());
    let mut response = azure_error(status, &code, &message);
    let headers = response.headers_mut();
    if let Some(ms) = forced.retry_after_ms {
        headers.insert("retry-after-ms", HeaderValue::from(ms));
    }
    if let Some(s) = forced.retry_after_s {
        headers.insert("retry-after", HeaderValue::from(s));
    }
    response
}

/// Outcome of charging a request's estimate against the quota.
pub(super) enum Charge {
    /// Serve it, with these quota headers.
    Admitted(HeaderMap),
    /// The 429 to send instead.
    Throttled(Response),
}

pub(super) fn charge(
    deployment: &Deployment,
    estimate: u64,
    operation: &str,
    api_version: &str,
) -> Charge {
    let decision = deployment.admit(estimate);
    let (remaining_tokens, remaining_requests) = match decision {
        Decision::Admit {
            remaining_tokens,
            remaining_requests,
        }
        | Decision::Reject {
            remaining_tokens,
            remaining_requests,
            ..
        } => (remaining_tokens, remaining_requests),
    };
    let mut headers = HeaderMap::new();
    if let Some(requests) = remaining_requests {
        headers.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from(requests),
        );
    }
    headers.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from(remaining_tokens),
    );
    if deployment.spec.kind == DeploymentKind::Ptu {
        let percent = format!("{:.1}%", deployment.utilization() * 100.0);
        headers.insert(
            "azure-openai-deployment-utilization",
            HeaderValue::from_str(&percent).expect("ascii"),
        );
    }
    let spill = deployment.take_spill_next();
    let retry_after = match decision {
        Decision::Reject { retry_after, .. } => retry_after,
        Decision::Admit { .. } if !spill => return Charge::Admitted(headers),
        Decision::Admit { .. } => std::time::Duration::ZERO,
    };
    if spill || deployment.faults().azure_spillover {
        // Served by the standard deployment behind the PTU: a 200, marked.
        deployment.record(|s| {
            s.spilled += 1;
            s.spilled_tokens += estimate;
        });
        headers.insert("x-ms-is-spilled-over", HeaderValue::from_static("true"));
        if let Ok(name) = HeaderValue::from_str(&deployment.spec.name) {
            headers.insert("x-ms-spillover-from-deployment", name);
        }
        return Charge::Admitted(headers);
    }

    deployment.record(|s| s.throttled += 1);
    let seconds = retry_after.as_millis().div_ceil(1000).max(1) as u64;
    let message = format!(
        "Requests to the {operation} Operation under Azure OpenAI API version {api_version} have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after {seconds} seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
    );
    let mut response = azure_error(StatusCode::TOO_MANY_REQUESTS, "429", &message);
    headers.insert("retry-after", HeaderValue::from(seconds));
    headers.insert(
        "retry-after-ms",
        HeaderValue::from(retry_after.as_millis().max(1) as u64),
    );
    response.headers_mut().extend(headers);
    Charge::Throttled(response)
}

pub(super) fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Tokens to generate: the deployment's reply length, cut by `max_tokens` /
/// `max_completion_tokens`; true when the cut applied (`finish_reason: length`).
pub(super) fn output_tokens(deployment: &Deployment, request: &Value) -> (u32, bool) {
    let cap = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| request.get(*k).and_then(Value::as_u64))
        .map(|n| n.min(u32::MAX as u64) as u32);
    match cap {
        Some(cap) if cap < deployment.spec.output_tokens => (cap, true),
        _ => (deployment.spec.output_tokens, false),
    }
}

pub(super) fn usage(prompt: u64, completion: u64) -> Value {
    json!({ "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion })
}

pub(super) fn record_served(deployment: &Deployment, prompt: u64, completion: u64) {
    deployment.record(|s: &mut DeploymentStats| {
        s.succeeded += 1;
        s.prompt_tokens += prompt;
        s.completion_tokens += completion;
        s.total_tokens += prompt + completion;
    });
}

pub(super) fn with_headers(mut response: Response, headers: HeaderMap) -> Response {
    response.headers_mut().extend(headers);
    response
}

async fn completions(
    deployment: &Arc<Deployment>,
    request: &Value,
    api_version: &str,
    id: u64,
) -> Response {
    let Some(prompt_value) = request.get("prompt") else {
        return bad_request("'prompt' is a required property");
    };
    let prompt = tokens::input(prompt_value);
    let (n, cut) = output_tokens(deployment, request);
    let headers = match charge(
        deployment,
        prompt + u64::from(n),
        "Completions_Create",
        api_version,
    ) {
        Charge::Admitted(h) => h,
        Charge::Throttled(response) => return response,
    };
    tokio::time::sleep(
        deployment.latency(deployment.spec.ttft_ms + deployment.spec.ms_per_token * u64::from(n)),
    )
    .await;
    record_served(deployment, prompt, u64::from(n));
    let body = json!({
        "id": format!("cmpl-sim{id:08}"), "object": "text_completion", "created": created(),
        "model": deployment.spec.model,
        "choices": [{ "text": text::reply_pieces(n).concat(), "index": 0, "logprobs": null,
            "finish_reason": if cut { "length" } else { "stop" } }],
        "usage": usage(prompt, u64::from(n)),
    });
    with_headers(Json(body).into_response(), headers)
}

async fn embeddings(deployment: &Arc<Deployment>, request: &Value, api_version: &str) -> Response {
    let inputs: Vec<Value> = match request.get("input") {
        Some(Value::Array(items)) if !items.is_empty() && !items.iter().all(Value::is_number) => {
            items.clone()
        }
        Some(v @ (Value::String(_) | Value::Array(_))) => vec![v.clone()],
        _ => return bad_request("'input' is a required property"),
    };
    let prompt: u64 = inputs.iter().map(tokens::input).sum();
    let headers = match charge(deployment, prompt, "Embeddings_Create", api_version) {
        Charge::Admitted(h) => h,
        Charge::Throttled(response) => return response,
    };
    tokio::time::sleep(deployment.latency(deployment.spec.ttft_ms)).await;
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, input)| {
            let vector = embedding_of(&input.to_string(), deployment.spec.embedding_dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({ "object": "embedding", "index": index, "embedding": embedding })
        })
        .collect();
    record_served(deployment, prompt, 0);
    let body = json!({ "object": "list", "data": data, "model": deployment.spec.model,
        "usage": { "prompt_tokens": prompt, "total_tokens": prompt } });
    with_headers(Json(body).into_response(), headers)
}

/// A deterministic unit vector derived from the text (same text, same vector).
fn embedding_of(text: &str, dims: usize) -> Vec<f32> {
    let mut seed = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let raw: Vec<f32> = (0..dims)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 2_000) as f32 / 1_000.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    raw.into_iter().map(|x| x / norm).collect()
}

async fn stats(State(state): State<Arc<ResourceState>>) -> Json<Value> {
    let deployments: BTreeMap<&str, DeploymentStats> = state
        .deployments
        .iter()
        .map(|(name, d)| (name.as_str(), d.stats()))
        .collect();
    Json(json!({ "resource": state.name, "deployments": deployments }))
}

/// `POST /sim/faults` body: `{"deployment": "gpt-4o", "faults": {"error_rate": 1.0}}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsRequest {
    /// Deployment to change; every deployment of the resource when absent.
    #[serde(default)]
    deployment: Option<String>,
    faults: Faults,
}

async fn set_faults(State(state): State<Arc<ResourceState>>, body: Bytes) -> Response {
    let request: FaultsRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&format!("invalid faults: {e}")),
    };
    let targets: Vec<&Arc<Deployment>> = match &request.deployment {
        Some(name) => match state.deployments.get(name) {
            Some(d) => vec![d],
            None => {
                return azure_error(
                    StatusCode::NOT_FOUND,
                    "DeploymentNotFound",
                    "no such simulated deployment",
                );
            }
        },
        None => state.deployments.values().collect(),
    };
    for deployment in targets {
        deployment.set_faults(request.faults.clone());
    }
    StatusCode::NO_CONTENT.into_response()
}
