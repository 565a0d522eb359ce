//! Admission: client auth, body limits and parsing, pool lookup. Everything a request must
//! pass before any upstream is chosen.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Method, header};
use bytes::Bytes;
use spillway_shared::{BackendId, QuotaCounter, ResponseOwner};

use super::outgoing_body::OutgoingBody;
use super::request_body::{self, BodyPermit};
use super::shadow::{Marks, Rule};
use super::traffic_class::Class;
use super::upstream_path::{OperationPath, QueryPairs, QueryRule, UpstreamApi};
use super::{Attempts, cache_affinity, consumer_budget, consumer_quota};
use crate::auth::consumers::Consumer;
use crate::error::GatewayError;
use crate::path_segment::{PathRejection, check_segment};
use crate::proxy::Gateway;
use crate::proxy::fleet_view::{MemberView, output_reserve};
use crate::proxy::request_fields::{FieldsError, RequestFields};
use crate::proxy::tokens::{self, Operation, TokenEstimate};
use crate::routing_table::Pool;

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
    pub query: QueryPairs,
    pub headers: HeaderMap,
    /// The body as received (held once, shared by every attempt) and the gateway's edits.
    pub body: OutgoingBody,
    /// The body's share of the replica's bytes in flight, returned when the request is done.
    pub _body_permit: BodyPermit,
    /// The consumer's quota counter for this period, when it has a quota (checked not spent).
    pub quota: Option<QuotaCounter>,
    /// The consumer's spending counter for this period, when it has a limit (checked).
    pub spend_cap: Option<QuotaCounter>,
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
    /// Its traffic class.
    pub class: Arc<Class>,
}

/// Admission as a straight line of steps, each computed once and handed on by value: the
/// operation (path, query, headers) → where it goes (a pool, or the member holding a stored
/// response) → the body → what it asks for (fields, estimate, the consumer's limits) → the
/// body's edits.
pub async fn admit(
    gateway: &Gateway,
    inbound: Inbound,
    attempts: &mut Attempts,
) -> Result<ProxyRequest, GatewayError> {
    let received = tokio::time::Instant::now();
    let Inbound {
        consumer,
        pool: named,
        operation,
        query,
        method,
        stored,
        preview,
        headers,
        body,
    } = inbound;
    attempts.consumer = consumer.as_ref().map(|c| c.name.clone());

    // Path confinement: the operation is validated here, once, and only its segments are
    // ever used to build an upstream URL.
    let operation = OperationPath::parse(&operation).map_err(GatewayError::InvalidPath)?;
    let query = QueryPairs::parse(query.as_deref()).allowed(QueryRule::of(&method, &operation));
    let upstream_headers = gateway.headers.upstream_request(&headers);
    let api = if preview {
        UpstreamApi::Preview
    } else {
        UpstreamApi::V1
    };

    // Where it goes, when the path says: unknown pools and responses fail before the body
    // is read.
    let addressed = match (stored, named) {
        (true, _) => stored_owner(gateway, consumer.as_ref(), &operation).await?,
        (false, Some(name)) => {
            check_segment(&name, 0)
                .map_err(|_| GatewayError::InvalidPath(PathRejection::DeploymentName))?;
            Addressed::Deployment(lookup(gateway, consumer.as_ref(), &name)?)
        }
        (false, None) => Addressed::Model,
    };
    if let Addressed::Deployment(pool) | Addressed::Stored { pool, .. } = &addressed {
        attempts.pool = Some(pool.name.clone());
    }

    let (body, body_permit) = request_body::read(&headers, body, &gateway.body_limits).await?;

    let target = match addressed {
        Addressed::Stored { pool, pinned } => {
            let view = gateway.view.get(&gateway.fleet, &pool);
            let own = consumer.as_ref().and_then(|c| c.class.as_deref());
            let class = gateway.classes.of_request(own, &headers, None)?;
            Ok(Admitted::stored(
                (pool, view, class),
                pinned,
                operation,
                api,
                body.clone(),
            ))
        }
        Addressed::Deployment(pool) => Err((Some(pool), Route::Deployment { operation })),
        Addressed::Model => Err((None, Route::V1 { operation, api })),
    };
    let admitted = match target {
        Ok(stored) => stored,
        Err(target) => {
            let consumer = consumer.as_ref();
            read_and_ask(gateway, consumer, target, &headers, &body, attempts).await?
        }
    };
    Ok(admitted.into_request(Envelope {
        method,
        query,
        headers: upstream_headers,
        body_permit,
        consumer,
        received,
    }))
}

/// What the request carries whatever it asks for.
struct Envelope {
    method: Method,
    query: QueryPairs,
    headers: HeaderMap,
    body_permit: BodyPermit,
    consumer: Option<Consumer>,
    received: tokio::time::Instant,
}

/// Where the path says a request goes.
enum Addressed {
    /// `/openai/deployments/{pool}/...`.
    Deployment(Arc<Pool>),
    /// `/openai/v1/...`: the pool is the body's `model`.
    Model,
    /// `/openai/v1/responses/{id}[/...]`: the member holding that response, in the pool it
    /// was created in.
    Stored { pool: Arc<Pool>, pinned: Pinned },
}

/// Read a JSON body's fields (the pool is its `model` when the path named none), then what
/// it asks for, then its edits.
async fn read_and_ask(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    (named, route): (Option<Arc<Pool>>, Route),
    headers: &HeaderMap,
    body: &Bytes,
    attempts: &mut Attempts,
) -> Result<Admitted, GatewayError> {
    let fields = read_fields(headers, body)?;
    let pool = match named {
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
            let pool = lookup(gateway, consumer, model)?;
            attempts.pool = Some(pool.name.clone());
            pool
        }
    };
    let view = gateway.view.get(&gateway.fleet, &pool);
    let service_tier = fields.as_ref().and_then(RequestFields::service_tier);
    let class = gateway.classes.of_request(
        consumer.and_then(|c| c.class.as_deref()),
        headers,
        service_tier.as_ref().map(|t| t.as_str()),
    )?;
    let operation = match &route {
        Route::Deployment { operation }
        | Route::V1 { operation, .. }
        | Route::Stored { operation, .. } => operation,
    };
    let asked = ask(
        gateway,
        consumer,
        (&pool, &view, class, &attempts.marks),
        (operation, fields.as_ref(), body),
    )
    .await?;
    Admitted::asked(gateway, consumer, (pool, view, route), fields, body, asked).await
}

/// What a request asks for, read from its fields once.
struct Asked {
    operation: Operation,
    stream: bool,
    max_tokens: Option<u64>,
    /// Tokens charged against budgets before sending: prompt plus the output cap.
    estimate: TokenEstimate,
    /// The consumer's quota counter for this period (checked, not spent).
    quota: Option<QuotaCounter>,
    spend_cap: Option<QuotaCounter>,
    cache_key: Option<u64>,
    /// A Responses API create that stores its response.
    remember_response: bool,
    /// The response a Responses API create continues.
    previous: Option<String>,
    /// A stream that did not ask for its usage: the gateway asks (and hides it).
    add_stream_usage: bool,
    /// Its traffic class.
    class: Arc<Class>,
}

/// Read what the request asks for and check it against the consumer's allowances: its
/// quota and budget before its prompt is counted (a spent key costs no counting), then its
/// per-request limits.
async fn ask(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    (pool, view, class, marks): (&Pool, &MemberView, Arc<Class>, &Marks),
    (operation, fields, body): (&OperationPath, Option<&RequestFields<'_>>, &Bytes),
) -> Result<Asked, GatewayError> {
    let kind = Operation::of(operation.segments());
    let creates_response = kind == Operation::Responses && operation.segments().len() == 1;
    let quota = consumer_quota::check(gateway, consumer, || {
        let name = consumer.map(|c| c.name.as_str());
        marks.would_refuse(Rule::Quota, pool.name.as_str(), name, &class.name);
    })
    .await?;
    let spend_cap = consumer_quota::check_spend(gateway, consumer, || {
        let name = consumer.map(|c| c.name.as_str());
        marks.would_refuse(Rule::Spend, pool.name.as_str(), name, &class.name);
    })
    .await?;
    consumer_budget::check_spent(gateway, consumer, body.len()).await?;
    // A request that names no output cap is charged what the pool's answers really take
    // (learned fleet-wide, from its first answers on; see `fleet_view::output_reserve`).
    let output_reserve = output_reserve(view, gateway.routing.default_max_tokens);
    let prompt_limit = consumer
        .and_then(|c| c.max_prompt_tokens)
        .unwrap_or(u64::MAX);
    let estimate = tokens::estimate(
        pool.encoding,
        kind,
        fields,
        body.len(),
        output_reserve,
        prompt_limit,
    )
    .map_err(|e| GatewayError::BadRequest(e.to_string()))?;
    if let Some(consumer) = consumer {
        check_consumer_limits(consumer, kind, operation, fields, estimate)?;
    }
    let stream = fields.is_some_and(RequestFields::stream);
    Ok(Asked {
        operation: kind,
        stream,
        max_tokens: fields.and_then(RequestFields::output_cap),
        estimate,
        quota,
        spend_cap,
        cache_key: fields.and_then(|f| cache_affinity::cache_key(f, estimate.prompt)),
        // Responses API: a create that stores its response is remembered once answered; a
        // follow-up goes to the member holding what it continues.
        remember_response: creates_response && fields.is_some_and(|f| f.store.0 != Some(false)),
        previous: fields
            .filter(|_| creates_response)
            .and_then(|f| f.previous_response_id.get())
            .map(|id| id.as_str().to_owned()),
        // A stream only reports its usage when asked: ask upstream, and hide the answer from
        // a client that did not ask, so it gets exactly the stream it requested.
        add_stream_usage: stream
            && kind == Operation::ChatCompletions
            && fields.is_some_and(|f| !f.asks_stream_usage()),
        class,
    })
}

/// A request admitted to its pool, with its body as it will be forwarded.
struct Admitted {
    pool: Arc<Pool>,
    /// This replica's recent copy of the pool's fleet state.
    view: Arc<MemberView>,
    route: Route,
    pinned: Option<Pinned>,
    body: OutgoingBody,
    strip_usage: bool,
    asked: Asked,
}

impl Admitted {
    /// The request ready for `route`: it may be served inside both the pool's and the
    /// consumer's regions.
    fn into_request(self, envelope: Envelope) -> ProxyRequest {
        let Admitted {
            pool,
            view,
            route,
            pinned,
            body,
            strip_usage,
            asked,
        } = self;
        let consumer = envelope.consumer;
        let regions = allowed_regions(
            pool.regions.as_deref(),
            consumer.as_ref().and_then(|c| c.regions.as_deref()),
        );
        ProxyRequest {
            view,
            regions,
            pool,
            route,
            method: envelope.method,
            pinned,
            remember_response: asked.remember_response,
            cache_key: asked.cache_key,
            query: envelope.query,
            headers: envelope.headers,
            body,
            _body_permit: envelope.body_permit,
            quota: asked.quota,
            spend_cap: asked.spend_cap,
            stream: asked.stream,
            operation: asked.operation,
            max_tokens: asked.max_tokens,
            strip_usage,
            estimate: asked.estimate,
            consumer,
            received: envelope.received,
            class: asked.class,
        }
    }

    /// A request on a stored response's own path: forwarded as sent (method and body) to
    /// the member holding it; it generates nothing.
    fn stored(
        (pool, view, class): (Arc<Pool>, Arc<MemberView>, Arc<Class>),
        pinned: Pinned,
        operation: OperationPath,
        api: UpstreamApi<'static>,
        body: Bytes,
    ) -> Self {
        let asked = Asked {
            operation: Operation::Responses,
            stream: false,
            max_tokens: None,
            estimate: TokenEstimate {
                prompt: body.len() as u64 / 4,
                output: 0,
            },
            quota: None,
            spend_cap: None,
            cache_key: None,
            remember_response: false,
            previous: None,
            add_stream_usage: false,
            class,
        };
        Self {
            pool,
            view,
            route: Route::Stored { operation, api },
            pinned: Some(pinned),
            body: OutgoingBody::unchanged(body),
            strip_usage: false,
            asked,
        }
    }

    /// A request whose fields were read: its body's edits (byte splices, never a
    /// re-serialized tree: the v1 route writes each member's deployment into `model`, and a
    /// stream's usage option is added), and the member a Responses follow-up must go to.
    async fn asked(
        gateway: &Gateway,
        consumer: Option<&Consumer>,
        (pool, view, route): (Arc<Pool>, Arc<MemberView>, Route),
        fields: Option<RequestFields<'_>>,
        body: &Bytes,
        asked: Asked,
    ) -> Result<Self, GatewayError> {
        let (body, strip_usage) = match &fields {
            Some(fields) => {
                let mut out = match route {
                    Route::V1 { .. } => OutgoingBody::with_model(body.clone(), fields),
                    _ => OutgoingBody::unchanged(body.clone()),
                };
                let strip_usage = asked.add_stream_usage && out.request_stream_usage(fields);
                out.mark_service_tier(fields);
                (out, strip_usage)
            }
            None => (OutgoingBody::unchanged(body.clone()), false),
        };
        drop(fields);
        let pinned = match &asked.previous {
            Some(id) => pinned_member(gateway, &pool, consumer, id.clone()).await?,
            None => None,
        };
        Ok(Self {
            pool,
            view,
            route,
            pinned,
            body,
            strip_usage,
            asked,
        })
    }
}

/// The member holding the stored response a path names, in the pool it was created in; 404
/// when the fleet does not know the id or it belongs to another consumer (the same answer:
/// ids are not confirmed to strangers).
async fn stored_owner(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    operation: &OperationPath,
) -> Result<Addressed, GatewayError> {
    let id = operation
        .segments()
        .get(1)
        .cloned()
        .ok_or(GatewayError::NotFound)?;
    let owner = gateway
        .fleet
        .response_owner(&id)
        .await?
        .filter(|owner| owns(owner, consumer))
        .ok_or_else(|| GatewayError::UnknownResponse(id.clone()))?;
    let pool = lookup(gateway, consumer, owner.pool.as_str())
        .map_err(|_| GatewayError::UnknownResponse(id.clone()))?;
    if pool.member(&owner.backend).is_none() {
        return Err(GatewayError::UnknownResponse(id));
    }
    Ok(Addressed::Stored {
        pool,
        pinned: Pinned {
            backend: owner.backend,
            response_id: id,
        },
    })
}

/// A stored response belongs to the consumer that created it (any request, when the gateway
/// authenticates no one).
fn owns(owner: &ResponseOwner, consumer: Option<&Consumer>) -> bool {
    owner.consumer == consumer.map(|c| crate::auth::consumers::owner_tag(&c.name))
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
        || crate::edge::headers::contains_ignoring_case(content_type.as_bytes(), b"json");
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
            crate::proxy::request_fields::MAX_NESTING
        ))),
        Err(FieldsError::Json(e)) => Err(GatewayError::BadRequest(format!(
            "The request body is not valid JSON: {e}"
        ))),
    }
}
