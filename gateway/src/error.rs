//! `GatewayError`: every error Spillway itself answers, and the only place that turns one
//! into HTTP (Azure OpenAI's `{"error":{"code","message"}}` shape).

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(String),
    #[error("The request path is not allowed: {0}.")]
    InvalidPath(crate::path_segment::PathRejection),
    #[error(
        "Access denied due to a missing or invalid key. Send your Spillway key in the 'api-key' header or as 'Authorization: Bearer <key>'."
    )]
    Unauthorized,
    #[error("The API deployment '{0}' does not exist on this gateway.")]
    UnknownPool(String),
    #[error("Resource not found.")]
    NotFound,
    #[error(
        "No stored response '{0}' is known to this gateway: it was not created through it, was created with \"store\": false, or is older than its affinity time (routing.response_affinity_ttl_s)."
    )]
    UnknownResponse(String),
    #[error(
        "The deployment that holds response '{response}' is rate limited or unavailable, and no other deployment knows it. Please retry after {} seconds.", retry_seconds(*.retry_after)
    )]
    OwnerBusy {
        response: String,
        retry_after: Duration,
    },
    #[error("This path takes {allow} requests only.")]
    MethodNotAllowed { allow: &'static str },
    #[error(
        "The realtime endpoint takes a WebSocket upgrade (GET with `connection: upgrade`, `upgrade: websocket`)."
    )]
    UpgradeRequired,
    #[error("No deployment of '{pool}' is in a region this request may use (data residency).")]
    NoMemberInRegions { pool: String },
    #[error("This key's rate limit is reached. Please retry after {} seconds.", retry_seconds(*.retry_after))]
    ConsumerThrottled { retry_after: Duration },
    #[error(
        "This key's token quota of {quota} tokens per {unit} is used up. It renews at {renews_at}."
    )]
    QuotaExceeded {
        quota: u64,
        unit: &'static str,
        /// RFC 3339, UTC.
        renews_at: String,
        retry_after: Duration,
    },
    #[error(
        "This key's spending limit of {limit_usd:.2} USD per {unit} is used up. It renews at {renews_at}."
    )]
    SpendExceeded {
        limit_usd: f64,
        unit: &'static str,
        /// RFC 3339, UTC.
        renews_at: String,
        retry_after: Duration,
    },
    #[error("Request body is larger than the {limit_bytes}-byte limit of this gateway.")]
    BodyTooLarge { limit_bytes: usize },
    #[error("The request body did not arrive within {timeout_ms} ms.")]
    BodyTimeout { timeout_ms: u64 },
    #[error(
        "This gateway replica is at its limit of concurrent requests. Please retry after 1 second."
    )]
    Overloaded,
    #[error(
        "This gateway replica holds as many request bodies as its memory allows (server.max_inflight_body_bytes). Please retry after 1 second."
    )]
    BodiesInFlight,
    #[error("A valid admin bearer token is required.")]
    AdminUnauthorized,
    #[error(
        "This admin listener answers requests addressed to its IP address, localhost or a name in server.admin_hosts."
    )]
    AdminHost,
    #[error("This endpoint takes 'content-type: application/json'.")]
    NotJson,
    #[error("Every deployment of '{pool}' is rate limited. Please retry after {} seconds.", retry_seconds(*.retry_after))]
    Throttled { pool: String, retry_after: Duration },
    #[error("The provisioned capacity of '{pool}' has no room for traffic class '{class}' now (its share is below the reserve kept for higher classes). Please retry after {} seconds.", retry_seconds(*.retry_after))]
    ClassThrottled {
        pool: String,
        class: String,
        retry_after: Duration,
    },
    #[error("No deployment of '{pool}' is available. Please retry after {} seconds.", retry_seconds(*.retry_after))]
    Unavailable { pool: String, retry_after: Duration },
    #[error("All upstream attempts failed: {0}")]
    BadGateway(String),
    #[error("Upstream did not answer in time: {0}")]
    GatewayTimeout(String),
    #[error("Fleet state is unavailable.")]
    State(#[from] spillway_shared::StateError),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::InvalidPath(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NoMemberInRegions { .. }
            | Self::QuotaExceeded { .. }
            | Self::SpendExceeded { .. } => StatusCode::FORBIDDEN,
            Self::UnknownPool(_) | Self::NotFound | Self::UnknownResponse(_) => {
                StatusCode::NOT_FOUND
            }
            Self::OwnerBusy { .. } | Self::ConsumerThrottled { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded | Self::BodiesInFlight => StatusCode::SERVICE_UNAVAILABLE,
            Self::AdminUnauthorized => StatusCode::UNAUTHORIZED,
            Self::AdminHost => StatusCode::FORBIDDEN,
            Self::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Throttled { .. } | Self::ClassThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } | Self::State(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::BadGateway(_) => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Machine-readable code; Azure's own codes where clients already know them.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "invalid_request",
            Self::InvalidPath(_) => "invalid_path",
            Self::Unauthorized => "401",
            Self::NoMemberInRegions { .. } => "region_not_allowed",
            Self::UnknownPool(_) => "DeploymentNotFound",
            Self::NotFound => "404",
            Self::UnknownResponse(_) => "response_not_found",
            Self::OwnerBusy { .. } | Self::ConsumerThrottled { .. } => "429",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::SpendExceeded { .. } => "spend_limit_exceeded",
            Self::MethodNotAllowed { .. } => "405",
            Self::UpgradeRequired => "upgrade_required",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::BodyTimeout { .. } => "request_timeout",
            Self::Overloaded | Self::BodiesInFlight => "overloaded",
            Self::AdminUnauthorized => "401",
            Self::AdminHost => "host_not_allowed",
            Self::NotJson => "unsupported_media_type",
            Self::Throttled { .. } | Self::ClassThrottled { .. } => "429",
            Self::Unavailable { .. } => "no_backend_available",
            Self::BadGateway(_) => "bad_gateway",
            Self::GatewayTimeout(_) => "gateway_timeout",
            Self::State(_) => "state_unavailable",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. }
            | Self::ClassThrottled { retry_after, .. }
            | Self::Unavailable { retry_after, .. }
            | Self::OwnerBusy { retry_after, .. }
            | Self::ConsumerThrottled { retry_after }
            | Self::QuotaExceeded { retry_after, .. }
            | Self::SpendExceeded { retry_after, .. } => Some(*retry_after),
            Self::Overloaded | Self::BodiesInFlight => Some(Duration::from_secs(1)),
            _ => None,
        }
    }
}

/// Whole seconds for `retry-after`, rounded up and at least 1 so clients do wait.
pub fn retry_seconds(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Self::MethodNotAllowed { allow } = self {
            response
                .headers_mut()
                .insert("allow", HeaderValue::from_static(allow));
        }
        if let Some(after) = self.retry_after() {
            let headers = response.headers_mut();
            headers.insert("retry-after", HeaderValue::from(retry_seconds(after)));
            headers.insert(
                "retry-after-ms",
                HeaderValue::from(after.as_millis().max(1) as u64),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_sets_both_retry_headers_rounding_seconds_up() {
        let err = GatewayError::Throttled {
            pool: "gpt-4o".into(),
            retry_after: Duration::from_millis(2_300),
        };
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "3");
        assert_eq!(response.headers()["retry-after-ms"], "2300");
    }
}
