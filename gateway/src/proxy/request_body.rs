//! Reading a request body within the gateway's limits: size, time, the replica's bytes in
//! flight, and a bounded drain of an oversized body so the client, still sending, gets to
//! read its 413 instead of a reset.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::ServerConfig;
use crate::error::GatewayError;

#[derive(Clone, Debug)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// An oversized body is read and discarded up to this many bytes in all.
    pub max_drain_bytes: usize,
    /// The whole body (or the drain) must arrive within this time.
    pub timeout: Duration,
    /// Bytes of request bodies this replica holds at once, shared by every request.
    in_flight: Arc<Semaphore>,
}

impl BodyLimits {
    pub fn from_config(server: &ServerConfig) -> Self {
        Self {
            max_bytes: server.max_body_bytes,
            max_drain_bytes: server.max_drain_bytes,
            timeout: Duration::from_millis(server.body_timeout_ms),
            in_flight: Arc::new(Semaphore::new(
                server.max_inflight_body_bytes.min(Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// These limits, counting bodies in flight with `running`'s budget (a reload keeps the
    /// replica's one count of what it holds).
    pub fn sharing_budget_with(mut self, running: &Self) -> Self {
        self.in_flight = running.in_flight.clone();
        self
    }

    /// Bytes of body the replica could still take (tests, metrics).
    pub fn available_bytes(&self) -> usize {
        self.in_flight.available_permits()
    }

    /// Take `bytes` of the replica's body budget, or refuse the request (503) before
    /// reading them.
    fn reserve(&self, bytes: usize) -> Result<BodyPermit, GatewayError> {
        let n = u32::try_from(bytes).map_err(|_| GatewayError::BodiesInFlight)?;
        self.in_flight
            .clone()
            .try_acquire_many_owned(n)
            .map(|p| BodyPermit(Some(p)))
            .map_err(|_| {
                crate::ops::metrics::request_shed();
                GatewayError::BodiesInFlight
            })
    }
}

/// A request body's share of the replica's bytes in flight, given back when the request
/// (which holds its body) is done.
#[derive(Debug, Default)]
pub struct BodyPermit(Option<OwnedSemaphorePermit>);

impl BodyPermit {
    fn add(&mut self, more: BodyPermit) {
        match (&mut self.0, more.0) {
            (Some(held), Some(more)) => held.merge(more),
            (held @ None, more) => *held = more,
            (Some(_), None) => {}
        }
    }
}

/// Read the whole body within the limits; it is held (and counted in the replica's bytes in
/// flight) until the returned permit is dropped.
pub async fn read(
    headers: &HeaderMap,
    body: Body,
    limits: &BodyLimits,
) -> Result<(Bytes, BodyPermit), GatewayError> {
    let too_large = GatewayError::BodyTooLarge {
        limit_bytes: limits.max_bytes,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A refusal before the body is read: a client waiting for `100 Continue` has sent
    // nothing yet and is answered at once; otherwise what it is sending is read and
    // discarded (never held), within the drain bound, so it gets to read the answer.
    let refuse = |body: Body, error: GatewayError| async move {
        let waits = headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if !waits && declared.is_some_and(|n| n <= limits.max_drain_bytes as u64) {
            let _ = tokio::time::timeout(limits.timeout, drain(body, limits.max_drain_bytes)).await;
        }
        Err(error)
    };
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return refuse(body, too_large).await;
    }
    // A declared length is taken from the budget at once (and the buffer sized to it);
    // a chunked body takes its share frame by frame.
    let declared = declared.map(|n| n as usize);
    let mut permit = match declared.map(|n| limits.reserve(n)) {
        Some(Ok(permit)) => permit,
        Some(Err(busy)) => return refuse(body, busy).await,
        None => BodyPermit::default(),
    };
    let read = async {
        let mut body = body;
        let mut collected = BytesMut::with_capacity(declared.unwrap_or(0));
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
            let beyond_declared =
                (collected.len() + data.len()).saturating_sub(declared.unwrap_or(0));
            if beyond_declared > 0 {
                permit.add(limits.reserve(beyond_declared.min(data.len()))?);
            }
            collected.extend_from_slice(&data);
        }
        Ok(collected.freeze())
    };
    let bytes = tokio::time::timeout(limits.timeout, read)
        .await
        .map_err(|_| GatewayError::BodyTimeout {
            timeout_ms: limits.timeout.as_millis() as u64,
        })??;
    Ok((bytes, permit))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_sharing_a_budget_count_the_same_bytes() {
        let server = ServerConfig::default();
        let running = BodyLimits::from_config(&server);
        let reloaded = BodyLimits::from_config(&ServerConfig {
            max_body_bytes: 1024,
            ..server.clone()
        })
        .sharing_budget_with(&running);
        let held = running.reserve(1000).unwrap();
        assert_eq!(
            reloaded.available_bytes(),
            server.max_inflight_body_bytes - 1000
        );
        assert_eq!(reloaded.max_bytes, 1024, "its own limits");
        drop(held);
        assert_eq!(reloaded.available_bytes(), server.max_inflight_body_bytes);
    }
}
