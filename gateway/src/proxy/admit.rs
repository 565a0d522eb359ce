//! Admission: client auth, body limits and parsing, pool lookup. Everything a request must
//! pass before any upstream is chosen.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, header};
use bytes::Bytes;
use serde_json::{Map, Value};
use spillway_shared::BackendId;

use super::cache_affinity;
use super::request_body;
use super::upstream_path::{OperationPath, PathRejection, QueryPairs, UpstreamApi, check_segment};
use crate::app::Gateway;
use crate::consumers::Consumer;
use crate::error::GatewayError;
use crate::fleet_view::{MemberView, output_reserve};
use crate::request_fields::{FieldsError, RequestFields};
use crate::table::Pool;
use crate::tokens::{self, Operation, TokenEstimate};

/// How the client addressed the pool, which decides the upstream path.
#[derive(Clone, Debug)]
pub enum Route {
    /// `/openai/deployments/{pool}/{operation}`: body forwarded byte for byte.
    Deployment { operation: OperationPath },
    /// `/openai/v1/{operation}` or `/v1/{operation}` with the pool in the body's `model`,
    /// rewritten to each backend's deployment name.
    V1 {
        operation: OperationPath,
        body: Map<String, Value>,
        api: UpstreamApi<'static>,
    },
    /// `/openai/v1/responses/{id}[/...]`: a stored response's own path, forwarded as sent
    /// (method and body) to the member that holds it.
    Stored {
        operation: OperationPath,
        api: UpstreamApi<'static>,
    },
}

/// A request bound to one member: the one holding the stored response it names. It is
/// never retried elsewhere (no other member knows the id).
#[derive(Clone, Debug)]
pub struct Pinned {
    pub backend: BackendId,
    pub response_id: String,
}

/// The request as the client sent it, before admission.
pub struct Inbound {
    /// `Some` for the deployments route (the path segment as sent, still encoded); `None`
    /// when the pool is the body's `model`.
    pub pool: Option<String>,
    /// Path after the pool (deployments route) or after `v1/`, as sent (still encoded).
    /// Admission validates it; nothing else reads it.
    pub operation: String,
    pub query: Option<String>,
    pub method: Method,
    /// The path names a stored response (`responses/{id}[/...]` on the v1 route): its pool
    /// and member come from the fleet's affinity record, not from a body.
    pub stored: bool,
    /// `/openai/responses...?api-version=`: the Responses API's deployment-less preview
    /// form, forwarded in that form.
    pub preview: bool,
    pub headers: HeaderMap,
    pub body: Body,
}

/// An admitted request, ready to be sent to any member of its pool (and replayed on retry).
pub struct ProxyRequest {
    pub pool: Arc<Pool>,
    pub route: Route,
    pub method: Method,
    /// Only this member may serve it (a Responses follow-up or a stored response's path).
    pub pinned: Option<Pinned>,
    /// A Responses API create that stores its response: the fleet remembers which member
    /// holds it once the answer names it.
    pub remember_response: bool,
    /// Prompt-cache affinity key (see `cache_affinity`).
    pub cache_key: Option<u64>,
    /// The consumer's budget reservation (see `consumer_budget`), taken by the attempt that
    /// delivers; released when none does.
    pub consumer_spend: std::sync::Mutex<Option<super::consumer_budget::ConsumerSpend>>,
    pub query: QueryPairs,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stream: bool,
    /// What it asks for (chat, embeddings, ...), and the output cap it names.
    pub operation: Operation,
    pub max_tokens: Option<u64>,
    /// The gateway asked upstream for the stream's usage chunk, which the client must not see.
    pub strip_usage: bool,
    /// Tokens charged against budgets before sending: prompt plus the output cap.
    pub estimate: TokenEstimate,
    pub consumer: Option<Consumer>,
    /// Regions the request may be served from (pool ∩ consumer); `None`: anywhere.
    pub regions: Option<Vec<String>>,
    /// This replica's recent copy of the pool's fleet state (scores, learned reserve).
    pub view: Arc<MemberView>,
    /// When the request arrived (its time to first token counts from here).
    pub received: tokio::time::Instant,
}

pub async fn admit(gateway: &Gateway, inbound: Inbound) -> Result<ProxyRequest, GatewayError> {
    let received = tokio::time::Instant::now();
    let consumer = gateway
        .consumers
        .authenticate(&inbound.headers)
        .await?
        .cloned();
    // Path confinement: the operation is validated here, once, and only its segments are
    // ever used to build an upstream URL.
    let operation = OperationPath::parse(&inbound.operation).map_err(GatewayError::InvalidPath)?;
    if inbound.stored {
        return admit_stored(gateway, inbound, operation, consumer).await;
    }
    // The deployments route names its pool in the path: unknown pools fail before the body is read.
    let named_pool = inbound
        .pool
        .as_deref()
        .map(|name| {
            check_segment(name, 0)
                .map_err(|_| GatewayError::InvalidPath(PathRejection::DeploymentName))?;
            lookup(gateway, name)
        })
        .transpose()?;

    if let Some(pool) = &named_pool {
        check_pool_allowed(consumer.as_ref(), pool)?;
    }
    let body = request_body::read(&inbound.headers, inbound.body, gateway.body_limits).await?;
    let fields = read_fields(&inbound.headers, &body)?;
    let pool = match named_pool {
        Some(pool) => pool,
        None => {
            let fields = fields.as_ref().ok_or_else(|| {
                GatewayError::BadRequest(
                    "This endpoint takes a JSON body with a 'model' field.".into(),
                )
            })?;
            let model = fields.model().ok_or_else(|| {
                GatewayError::BadRequest(
                    "Missing required field 'model' (the deployment to use).".into(),
                )
            })?;
            let pool = lookup(gateway, model)?;
            check_pool_allowed(consumer.as_ref(), &pool)?;
            pool
        }
    };

    let stream = fields.as_ref().is_some_and(RequestFields::stream);
    let max_tokens = fields.as_ref().and_then(RequestFields::output_cap);
    let kind = Operation::of(operation.segments());
    // A request that names no output cap is charged what the pool's answers really take
    // (learned fleet-wide); `default_max_tokens` until enough answers were seen.
    let view = gateway.view.get(&gateway.fleet, &pool);
    let output_reserve = output_reserve(&view).unwrap_or(gateway.routing.default_max_tokens);
    let estimate = tokens::estimate(
        pool.encoding,
        kind,
        fields.as_ref(),
        body.len(),
        output_reserve,
    );
    // A stream only reports its usage when asked: ask upstream, and hide the answer from a
    // client that did not ask, so it gets exactly the stream it requested.
    let add_stream_usage = stream
        && kind == Operation::ChatCompletions
        && fields.as_ref().is_some_and(|f| !f.asks_stream_usage());
    if let Some(consumer) = &consumer {
        check_consumer_limits(consumer, kind, &operation, fields.as_ref(), estimate)?;
    }
    let is_json = fields.is_some();
    let cache_key = fields
        .as_ref()
        .and_then(|f| cache_affinity::cache_key(f, estimate.prompt));
    // Responses API: a follow-up goes to the member holding what it continues; a create
    // that stores its response is remembered once answered.
    let creates_response = kind == Operation::Responses && operation.segments().len() == 1;
    let remember_response =
        creates_response && fields.as_ref().is_some_and(|f| f.store.0 != Some(false));
    let previous = fields
        .as_ref()
        .filter(|_| creates_response)
        .and_then(|f| f.previous_response_id.get())
        .map(|id| id.as_str().to_owned());
    drop(fields);
    let pinned = match previous {
        Some(id) => pinned_member(gateway, &pool, id).await?,
        None => None,
    };

    // Only a body the gateway edits (the v1 route's `model`, a stream's usage option) is
    // read whole; the deployments route forwards the others byte for byte.
    let v1 = inbound.pool.is_none();
    let (route, body, strip_usage) = if v1 || add_stream_usage {
        let mut json = match parse_object(&body)? {
            Some(json) => json,
            None if v1 => unreachable!("the v1 route resolved its pool from the JSON body"),
            None => {
                return Err(GatewayError::BadRequest(
                    "The request body must be a JSON object.".into(),
                ));
            }
        };
        let strip_usage = add_stream_usage && request_stream_usage(&mut json);
        if v1 {
            (
                Route::V1 {
                    api: upstream_api(inbound.preview),
                    operation,
                    body: json,
                },
                body,
                strip_usage,
            )
        } else {
            let edited = if strip_usage {
                Bytes::from(serde_json::to_vec(&json).expect("a JSON map always serializes"))
            } else {
                body
            };
            (Route::Deployment { operation }, edited, strip_usage)
        }
    } else {
        debug_assert!(is_json || !add_stream_usage);
        (Route::Deployment { operation }, body, false)
    };

    let regions = allowed_regions(
        pool.regions.as_deref(),
        consumer.as_ref().and_then(|c| c.regions.as_deref()),
    );
    Ok(ProxyRequest {
        regions,
        pool,
        route,
        method: inbound.method,
        pinned,
        remember_response,
        cache_key,
        consumer_spend: Default::default(),
        query: QueryPairs::parse(inbound.query.as_deref()),
        headers: gateway.headers.upstream_request(&inbound.headers),
        body,
        stream,
        operation: kind,
        max_tokens,
        strip_usage,
        estimate,
        consumer,
        view,
        received,
    })
}

/// A request on a stored response's own path: it goes to the member holding it, in the
/// pool it was created in, or is answered 404 when the fleet does not know the id.
async fn admit_stored(
    gateway: &Gateway,
    inbound: Inbound,
    operation: OperationPath,
    consumer: Option<Consumer>,
) -> Result<ProxyRequest, GatewayError> {
    let received = tokio::time::Instant::now();
    let id = operation
        .segments()
        .get(1)
        .cloned()
        .ok_or(GatewayError::NotFound)?;
    let owner = gateway
        .fleet
        .response_owner(&id)
        .await?
        .ok_or_else(|| GatewayError::UnknownResponse(id.clone()))?;
    let pool = gateway
        .table
        .pool(owner.pool.as_str())
        .cloned()
        .ok_or_else(|| GatewayError::UnknownResponse(id.clone()))?;
    if pool.member(&owner.backend).is_none() {
        return Err(GatewayError::UnknownResponse(id));
    }
    check_pool_allowed(consumer.as_ref(), &pool)?;
    let body = request_body::read(&inbound.headers, inbound.body, gateway.body_limits).await?;
    let view = gateway.view.get(&gateway.fleet, &pool);
    let regions = allowed_regions(
        pool.regions.as_deref(),
        consumer.as_ref().and_then(|c| c.regions.as_deref()),
    );
    Ok(ProxyRequest {
        regions,
        route: Route::Stored {
            operation,
            api: upstream_api(inbound.preview),
        },
        method: inbound.method,
        pinned: Some(Pinned {
            backend: owner.backend,
            response_id: id,
        }),
        remember_response: false,
        cache_key: None,
        consumer_spend: Default::default(),
        query: QueryPairs::parse(inbound.query.as_deref()),
        headers: gateway.headers.upstream_request(&inbound.headers),
        estimate: TokenEstimate {
            prompt: body.len() as u64 / 4,
            output: 0,
        },
        body,
        stream: false,
        operation: Operation::Responses,
        max_tokens: None,
        strip_usage: false,
        consumer,
        view,
        pool,
        received,
    })
}

/// 403 when the consumer's `pools` leave this one out.
pub(super) fn check_pool_allowed(
    consumer: Option<&Consumer>,
    pool: &Pool,
) -> Result<(), GatewayError> {
    match consumer {
        Some(c) if !c.may_use(pool.name.as_str()) => Err(GatewayError::PoolNotAllowed {
            pool: pool.name.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The consumer's per-request limits: its largest prompt, and the most output a request may
/// ask for (which it must then ask for explicitly, or the limit would not bound anything).
fn check_consumer_limits(
    consumer: &Consumer,
    kind: Operation,
    operation: &OperationPath,
    fields: Option<&RequestFields>,
    estimate: TokenEstimate,
) -> Result<(), GatewayError> {
    if let Some(cap) = consumer.max_prompt_tokens
        && estimate.prompt > cap
    {
        return Err(GatewayError::BadRequest(format!(
            "The prompt is about {} tokens; this key may send at most {cap} tokens per request.",
            estimate.prompt
        )));
    }
    let generates = match kind {
        Operation::ChatCompletions | Operation::Completions => true,
        Operation::Responses => operation.segments().len() == 1,
        Operation::Embeddings | Operation::Other => false,
    };
    let Some(cap) = consumer.max_tokens.filter(|_| generates) else {
        return Ok(());
    };
    match fields.and_then(RequestFields::output_cap) {
        Some(asked) if asked <= cap => Ok(()),
        Some(asked) => Err(GatewayError::BadRequest(format!(
            "max_tokens of {asked} is above this key's limit of {cap} tokens per request."
        ))),
        None => Err(GatewayError::BadRequest(format!(
            "This key must set max_tokens (or max_completion_tokens, max_output_tokens) to at most {cap}."
        ))),
    }
}

/// The upstream form of a request whose deployment is named in its body.
fn upstream_api(preview: bool) -> UpstreamApi<'static> {
    if preview {
        UpstreamApi::Preview
    } else {
        UpstreamApi::V1
    }
}

/// The member a follow-up must go to: the one holding `previous` when the fleet remembers
/// it in this pool; otherwise normal routing (the backend answers an id it does not know).
async fn pinned_member(
    gateway: &Gateway,
    pool: &Pool,
    previous: String,
) -> Result<Option<Pinned>, GatewayError> {
    let owner = gateway.fleet.response_owner(&previous).await?;
    Ok(owner
        .filter(|o| o.pool == pool.name && pool.member(&o.backend).is_some())
        .map(|o| Pinned {
            backend: o.backend,
            response_id: previous,
        }))
}

/// Where a request may go: inside both the pool's and the consumer's regions, when set.
pub(super) fn allowed_regions(
    pool: Option<&[String]>,
    consumer: Option<&[String]>,
) -> Option<Vec<String>> {
    match (pool, consumer) {
        (None, None) => None,
        (Some(only), None) | (None, Some(only)) => Some(only.to_vec()),
        (Some(a), Some(b)) => Some(a.iter().filter(|r| b.contains(r)).cloned().collect()),
    }
}

/// Set `stream_options.include_usage`; true when the client had not asked for it.
fn request_stream_usage(body: &mut Map<String, Value>) -> bool {
    let asked = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    if asked {
        return false;
    }
    let options = body
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    match options {
        Value::Object(options) => {
            options.insert("include_usage".into(), Value::Bool(true));
            true
        }
        // A malformed stream_options is the upstream's to reject, unchanged.
        _ => false,
    }
}

fn lookup(gateway: &Gateway, name: &str) -> Result<Arc<Pool>, GatewayError> {
    gateway
        .table
        .pool(name)
        .cloned()
        .ok_or_else(|| GatewayError::UnknownPool(name.to_owned()))
}

/// Read the fields of JSON bodies (validating them); other content types (multipart audio
/// uploads) pass through untouched.
fn read_fields<'a>(
    headers: &HeaderMap,
    body: &'a Bytes,
) -> Result<Option<RequestFields<'a>>, GatewayError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let is_json = content_type.is_empty()
        || crate::headers::contains_ignoring_case(content_type.as_bytes(), b"json");
    if !is_json || (content_type.is_empty() && body.is_empty()) {
        return Ok(None);
    }
    match RequestFields::parse(body) {
        Ok(fields) => Ok(Some(fields)),
        Err(FieldsError::NotAnObject) => Err(GatewayError::BadRequest(
            "The request body must be a JSON object.".into(),
        )),
        Err(FieldsError::Json(e)) => Err(GatewayError::BadRequest(format!(
            "The request body is not valid JSON: {e}"
        ))),
    }
}

/// The whole body as a JSON object, for the routes that edit it (already validated).
fn parse_object(body: &Bytes) -> Result<Option<Map<String, Value>>, GatewayError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Ok(None),
        Err(e) => Err(GatewayError::BadRequest(format!(
            "The request body is not valid JSON: {e}"
        ))),
    }
}
