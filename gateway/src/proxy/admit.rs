//! Admission: client auth, body limits and parsing, pool lookup. Everything a request must
//! pass before any upstream is chosen.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, header};
use bytes::Bytes;
use spillway_shared::{BackendId, QuotaCounter, ResponseOwner};

use super::outgoing_body::OutgoingBody;
use super::request_body::{self, BodyPermit};
use super::upstream_path::{
    OperationPath, PathRejection, QueryPairs, QueryRule, UpstreamApi, check_segment,
};
use super::{Attempts, cache_affinity, consumer_budget, consumer_quota};
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
    /// Who sent it (authenticated before it took a slot: `app::Caller`).
    pub consumer: Option<Consumer>,
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
    /// The body as received (held once, shared by every attempt) and the gateway's edits.
    pub body: OutgoingBody,
    /// The body's share of the replica's bytes in flight, returned when the request is done.
    pub _body_permit: BodyPermit,
    /// The consumer's quota counter for this period, when it has a quota (checked not spent).
    pub quota: Option<QuotaCounter>,
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

pub async fn admit(
    gateway: &Gateway,
    mut inbound: Inbound,
    attempts: &mut Attempts,
) -> Result<ProxyRequest, GatewayError> {
    let received = tokio::time::Instant::now();
    let consumer = inbound.consumer.take();
    attempts.consumer = consumer.as_ref().map(|c| c.name.clone());
    // Path confinement: the operation is validated here, once, and only its segments are
    // ever used to build an upstream URL.
    let operation = OperationPath::parse(&inbound.operation).map_err(GatewayError::InvalidPath)?;
    let query_rule = QueryRule::of(&inbound.method, &operation);
    if inbound.stored {
        return admit_stored(gateway, inbound, operation, consumer, attempts).await;
    }
    // The deployments route names its pool in the path: unknown pools fail before the body is read.
    let named_pool = inbound
        .pool
        .as_deref()
        .map(|name| {
            check_segment(name, 0)
                .map_err(|_| GatewayError::InvalidPath(PathRejection::DeploymentName))?;
            lookup(gateway, consumer.as_ref(), name)
        })
        .transpose()?;
    let (body, body_permit) =
        request_body::read(&inbound.headers, inbound.body, &gateway.body_limits).await?;
    let kind = Operation::of(operation.segments());
    let creates_response = kind == Operation::Responses && operation.segments().len() == 1;
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
            lookup(gateway, consumer.as_ref(), model)?
        }
    };
    attempts.pool = Some(pool.name.clone());

    let stream = fields.as_ref().is_some_and(RequestFields::stream);
    let max_tokens = fields.as_ref().and_then(RequestFields::output_cap);
    // The consumer's allowances before its prompt is counted: a spent key costs no counting.
    let quota = consumer_quota::check(gateway, consumer.as_ref()).await?;
    consumer_budget::check_spent(gateway, consumer.as_ref(), body.len()).await?;
    // A request that names no output cap is charged what the pool's answers really take
    // (learned fleet-wide); `default_max_tokens` until enough answers were seen.
    let view = gateway.view.get(&gateway.fleet, &pool);
    let output_reserve = output_reserve(&view).unwrap_or(gateway.routing.default_max_tokens);
    let prompt_limit = consumer
        .as_ref()
        .and_then(|c| c.max_prompt_tokens)
        .unwrap_or(u64::MAX);
    let estimate = tokens::estimate(
        pool.encoding,
        kind,
        fields.as_ref(),
        body.len(),
        output_reserve,
        prompt_limit,
    )
    .map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    if let Some(consumer) = &consumer {
        check_consumer_limits(consumer, kind, &operation, fields.as_ref(), estimate)?;
    }
    // A stream only reports its usage when asked: ask upstream, and hide the answer from a
    // client that did not ask, so it gets exactly the stream it requested.
    let add_stream_usage = stream
        && kind == Operation::ChatCompletions
        && fields.as_ref().is_some_and(|f| !f.asks_stream_usage());
    let cache_key = fields
        .as_ref()
        .and_then(|f| cache_affinity::cache_key(f, estimate.prompt));
    // Responses API: a follow-up goes to the member holding what it continues; a create
    // that stores its response is remembered once answered.
    let remember_response =
        creates_response && fields.as_ref().is_some_and(|f| f.store.0 != Some(false));
    let previous = fields
        .as_ref()
        .filter(|_| creates_response)
        .and_then(|f| f.previous_response_id.get())
        .map(|id| id.as_str().to_owned());

    // The body is forwarded as received; the v1 route writes each member's deployment into
    // `model`, and a stream's usage option is added: byte edits, never a re-serialized tree.
    let v1 = inbound.pool.is_none();
    let (route, body, strip_usage) = match &fields {
        Some(fields) => {
            let mut out = if v1 {
                OutgoingBody::with_model(body.clone(), fields)
            } else {
                OutgoingBody::unchanged(body.clone())
            };
            let strip_usage = add_stream_usage && out.request_stream_usage(fields);
            let route = if v1 {
                Route::V1 {
                    api: upstream_api(inbound.preview),
                    operation,
                }
            } else {
                Route::Deployment { operation }
            };
            (route, out, strip_usage)
        }
        None => (
            Route::Deployment { operation },
            OutgoingBody::unchanged(body.clone()),
            false,
        ),
    };
    drop(fields);
    let pinned = match previous {
        Some(id) => pinned_member(gateway, &pool, consumer.as_ref(), id).await?,
        None => None,
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
        query: QueryPairs::parse(inbound.query.as_deref()).allowed(query_rule),
        headers: gateway.headers.upstream_request(&inbound.headers),
        body,
        _body_permit: body_permit,
        quota,
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
/// pool it was created in, or is answered 404 when the fleet does not know the id or it
/// belongs to another consumer (the same answer: ids are not confirmed to strangers).
async fn admit_stored(
    gateway: &Gateway,
    inbound: Inbound,
    operation: OperationPath,
    consumer: Option<Consumer>,
    attempts: &mut Attempts,
) -> Result<ProxyRequest, GatewayError> {
    let received = tokio::time::Instant::now();
    let query_rule = QueryRule::of(&inbound.method, &operation);
    let id = operation
        .segments()
        .get(1)
        .cloned()
        .ok_or(GatewayError::NotFound)?;
    let owner = gateway
        .fleet
        .response_owner(&id)
        .await?
        .filter(|owner| owns(owner, consumer.as_ref()))
        .ok_or_else(|| GatewayError::UnknownResponse(id.clone()))?;
    let pool = gateway
        .table
        .pool(owner.pool.as_str())
        .cloned()
        .filter(|pool| may_use(consumer.as_ref(), pool))
        .ok_or_else(|| GatewayError::UnknownResponse(id.clone()))?;
    if pool.member(&owner.backend).is_none() {
        return Err(GatewayError::UnknownResponse(id));
    }
    attempts.pool = Some(pool.name.clone());
    let (body, body_permit) =
        request_body::read(&inbound.headers, inbound.body, &gateway.body_limits).await?;
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
        query: QueryPairs::parse(inbound.query.as_deref()).allowed(query_rule),
        headers: gateway.headers.upstream_request(&inbound.headers),
        estimate: TokenEstimate {
            prompt: body.len() as u64 / 4,
            output: 0,
        },
        body: OutgoingBody::unchanged(body),
        _body_permit: body_permit,
        quota: None,
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

/// A stored response belongs to the consumer that created it (any request, when the gateway
/// authenticates no one).
fn owns(owner: &ResponseOwner, consumer: Option<&Consumer>) -> bool {
    owner.consumer == consumer.map(|c| crate::consumers::owner_tag(&c.name))
}

/// The consumer may use this pool (its `pools`, when set, name it).
pub(super) fn may_use(consumer: Option<&Consumer>, pool: &Pool) -> bool {
    consumer.is_none_or(|c| c.may_use(pool.name.as_str()))
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
    // Each of `n` choices may generate up to the cap: the request asks for all of them.
    let choices = fields.and_then(|f| f.n.0).unwrap_or(1).max(1);
    match fields.and_then(RequestFields::output_cap) {
        Some(asked) if asked.saturating_mul(choices) <= cap => Ok(()),
        Some(asked) if choices > 1 => Err(GatewayError::BadRequest(format!(
            "max_tokens of {asked} for each of n = {choices} choices is above this key's limit of {cap} tokens per request."
        ))),
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
/// Another consumer's response is 404, as for an id the fleet does not know.
async fn pinned_member(
    gateway: &Gateway,
    pool: &Pool,
    consumer: Option<&Consumer>,
    previous: String,
) -> Result<Option<Pinned>, GatewayError> {
    let Some(owner) = gateway.fleet.response_owner(&previous).await? else {
        return Ok(None);
    };
    if !owns(&owner, consumer) {
        return Err(GatewayError::UnknownResponse(previous));
    }
    Ok(
        (owner.pool == pool.name && pool.member(&owner.backend).is_some()).then_some(Pinned {
            backend: owner.backend,
            response_id: previous,
        }),
    )
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

/// The pool named `name`, if the consumer may use it: a pool outside its `pools` is
/// answered like an unknown one (404), so a key cannot enumerate the gateway's pools.
pub(super) fn lookup(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    name: &str,
) -> Result<Arc<Pool>, GatewayError> {
    gateway
        .table
        .pool(name)
        .filter(|pool| may_use(consumer, pool))
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
    // The shapes of messages and inputs are checked as they are counted (`tokens::estimate`
    // walks them strictly), before anything is forwarded.
    match RequestFields::parse(body) {
        Ok(fields) => Ok(Some(fields)),
        Err(FieldsError::NotAnObject) => Err(GatewayError::BadRequest(
            "The request body must be a JSON object.".into(),
        )),
        Err(FieldsError::TooDeep) => Err(GatewayError::BadRequest(format!(
            "The request body nests arrays and objects deeper than {} levels.",
            crate::request_fields::MAX_NESTING
        ))),
        Err(FieldsError::Json(e)) => Err(GatewayError::BadRequest(format!(
            "The request body is not valid JSON: {e}"
        ))),
    }
}
