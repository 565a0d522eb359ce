//! Admission: client auth, body limits and parsing, pool lookup. Everything a request must
//! pass before any upstream is chosen.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde_json::{Map, Value};

use crate::app::Gateway;
use crate::error::GatewayError;
use crate::headers::upstream_request_headers;
use crate::table::Pool;
use crate::tokens;

/// How the client addressed the pool, which decides the upstream path.
#[derive(Clone, Debug)]
pub enum Route {
    /// `/openai/deployments/{pool}/{operation}`: body forwarded byte for byte.
    Deployment { operation: String },
    /// `/openai/v1/{operation}` or `/v1/{operation}` with the pool in the body's `model`,
    /// rewritten to each backend's deployment name.
    V1 {
        operation: String,
        body: Map<String, Value>,
    },
}

/// The request as the client sent it, before admission.
pub struct Inbound {
    /// `Some` for the deployments route; `None` when the pool is the body's `model`.
    pub pool: Option<String>,
    /// Path after the pool (deployments route) or after `v1/`, as sent (still encoded).
    pub operation: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Body,
}

/// An admitted request, ready to be sent to any member of its pool (and replayed on retry).
pub struct ProxyRequest {
    pub pool: Arc<Pool>,
    pub route: Route,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stream: bool,
    /// Tokens charged against budgets before sending: prompt plus the output cap.
    pub estimate: TokenEstimate,
    pub consumer: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenEstimate {
    pub prompt: u64,
    pub total: u64,
}

pub async fn admit(gateway: &Gateway, inbound: Inbound) -> Result<ProxyRequest, GatewayError> {
    let consumer = gateway
        .consumers
        .authenticate(&inbound.headers)?
        .map(str::to_owned);
    let pool = match &inbound.pool {
        Some(name) => Some(lookup(gateway, name)?),
        None => None,
    };

    let body = read_body(&inbound.headers, inbound.body, gateway.max_body_bytes).await?;
    let json = parse_json(&inbound.headers, &body)?;
    let stream = json
        .as_ref()
        .and_then(|j| j.get("stream"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let total = tokens::estimate(
        &inbound.operation,
        json.as_ref(),
        body.len(),
        gateway.routing.default_max_tokens,
    );
    let output_cap = json.as_ref().map_or(0, |j| {
        tokens::max_output_tokens(j, gateway.routing.default_max_tokens)
    });
    let estimate = TokenEstimate {
        prompt: total.saturating_sub(output_cap),
        total,
    };

    let (pool, route) = match pool {
        Some(pool) => (
            pool,
            Route::Deployment {
                operation: inbound.operation,
            },
        ),
        None => {
            let body = json.ok_or_else(|| {
                GatewayError::BadRequest(
                    "This endpoint takes a JSON body with a 'model' field.".into(),
                )
            })?;
            let model = body.get("model").and_then(Value::as_str).ok_or_else(|| {
                GatewayError::BadRequest(
                    "Missing required field 'model' (the deployment to use).".into(),
                )
            })?;
            (
                lookup(gateway, model)?,
                Route::V1 {
                    operation: inbound.operation,
                    body,
                },
            )
        }
    };

    Ok(ProxyRequest {
        pool,
        route,
        query: inbound.query,
        headers: upstream_request_headers(&inbound.headers),
        body,
        stream,
        estimate,
        consumer,
    })
}

fn lookup(gateway: &Gateway, name: &str) -> Result<Arc<Pool>, GatewayError> {
    gateway
        .table
        .pool(name)
        .cloned()
        .ok_or_else(|| GatewayError::UnknownPool(name.to_owned()))
}

async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    let too_large = GatewayError::BodyTooLarge { limit_bytes: limit };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large);
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let limited = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if limited {
            too_large
        } else {
            GatewayError::BadRequest(format!("Could not read the request body: {e}"))
        }
    })
}

/// Parse JSON bodies (to validate them and read `stream` / `model`); other content types
/// (multipart audio uploads) pass through untouched.
fn parse_json(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Option<Map<String, Value>>, GatewayError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let is_json = content_type.is_empty() || content_type.to_ascii_lowercase().contains("json");
    if !is_json || (content_type.is_empty() && body.is_empty()) {
        return Ok(None);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(GatewayError::BadRequest(
            "The request body must be a JSON object.".into(),
        )),
        Err(e) => Err(GatewayError::BadRequest(format!(
            "The request body is not valid JSON: {e}"
        ))),
    }
}
