//! Reading a request body within the gateway's limits: size, time, and a bounded drain of an
//! oversized body so the client, still sending, gets to read its 413 instead of a reset.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::config::ServerConfig;
use crate::error::GatewayError;

#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// An oversized body is read and discarded up to this many bytes in all.
    pub max_drain_bytes: usize,
    /// The whole body (or the drain) must arrive within this time.
    pub timeout: Duration,
}

impl BodyLimits {
    pub fn from_config(server: &ServerConfig) -> Self {
        Self {
            max_bytes: server.max_body_bytes,
            max_drain_bytes: server.max_drain_bytes,
            timeout: Duration::from_millis(server.body_timeout_ms),
        }
    }
}

pub async fn read(
    headers: &HeaderMap,
    body: Body,
    limits: BodyLimits,
) -> Result<Bytes, GatewayError> {
    let too_large = GatewayError::BodyTooLarge {
        limit_bytes: limits.max_bytes,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        // A client waiting for `100 Continue` has sent nothing yet: answer at once. Otherwise
        // take what it is sending, if that is within the drain bound.
        let waits = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits && declared.is_some_and(|n| n <= limits.max_drain_bytes as u64) {
            let _ = tokio::time::timeout(limits.timeout, drain(body, limits.max_drain_bytes)).await;
        }
        return Err(too_large);
    }
    let read = async {
        let mut body = body;
        let mut collected = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                GatewayError::BadRequest(format!("Could not read the request body: {e}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            if collected.len() + data.len() > limits.max_bytes {
                drain(body, limits.max_drain_bytes.saturating_sub(collected.len())).await;
                return Err(too_large);
            }
            collected.extend_from_slice(&data);
        }
        Ok(collected.freeze())
    };
    tokio::time::timeout(limits.timeout, read)
        .await
        .map_err(|_| GatewayError::BodyTimeout {
            timeout_ms: limits.timeout.as_millis() as u64,
        })?
}

/// Read and discard up to `budget` bytes (the rest of an oversized body).
async fn drain(mut body: Body, budget: usize) {
    let mut left = budget;
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.len() > left {
            return;
        }
        left -= data.len();
    }
}
