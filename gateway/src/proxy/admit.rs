//! Admission: client auth, body limits and parsing, pool lookup. Everything a request must
//! pass before any upstream is chosen.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde_json::{Map, Value};

use super::request_body;
use super::upstream_path::{OperationPath, PathRejection, QueryPairs, check_segment};
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
    },
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
    pub headers: HeaderMap,
    pub body: Body,
}

/// An admitted request, ready to be sent to any member of its pool (and replayed on retry).
pub struct ProxyRequest {
    pub pool: Arc<Pool>,
    pub route: Route,
    pub query: QueryPairs,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stream: bool,
    /// The gateway asked upstream for the stream's usage chunk, which the client must not see.
    pub strip_usage: bool,
    /// Tokens charged against budgets before sending: prompt plus the output cap.
    pub estimate: TokenEstimate,
    pub consumer: Option<Consumer>,
    /// Regions the request may be served from (pool ∩ consumer); `None`: anywhere.
    pub regions: Option<Vec<String>>,
    /// This replica's recent copy of the pool's fleet state (scores, learned reserve).
    pub view: Arc<MemberView>,
}

pub async fn admit(gateway: &Gateway, inbound: Inbound) -> Result<ProxyRequest, GatewayError> {
    let consumer = gateway.consumers.authenticate(&inbound.headers)?.cloned();
    // Path confinement: the operation is validated here, once, and only its segments are
    // ever used to build an upstream URL.
    let operation = OperationPath::parse(&inbound.operation).map_err(GatewayError::InvalidPath)?;
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
            lookup(gateway, model)?
        }
    };

    let stream = fields.as_ref().is_some_and(RequestFields::stream);
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
    let is_json = fields.is_some();
    drop(fields);

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
        query: QueryPairs::parse(inbound.query.as_deref()),
        headers: gateway.headers.upstream_request(&inbound.headers),
        body,
        stream,
        strip_usage,
        estimate,
        consumer,
        view,
    })
}

/// Where a request may go: inside both the pool's and the consumer's regions, when set.
fn allowed_regions(pool: Option<&[String]>, consumer: Option<&[String]>) -> Option<Vec<String>> {
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
