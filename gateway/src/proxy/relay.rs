//! Relay an upstream response to the client, body streamed chunk by chunk as it arrives,
//! metering its usage; when the body ends, or the client goes away (dropping it, which
//! cancels the upstream), the attempt is settled in the fleet state.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use futures_util::Stream;
use spillway_shared::{
    BackendId, FleetState, LatencySample, PoolName, Receipt, Reservation, UpstreamHints,
};
use tracing::warn;

use super::admit::TokenEstimate;
use super::forward::{BodyStream, Upstream};
use super::usage::UsageMeter;
use crate::headers::client_response_headers;

/// Everything needed to settle an attempt once its body has been relayed.
pub struct Settlement {
    pub fleet: Arc<dyn FleetState>,
    pub pool: PoolName,
    pub backend: BackendId,
    pub reservation: Reservation,
    pub estimate: TokenEstimate,
    pub hints: UpstreamHints,
}

/// `backend_host`: response headers naming it are not relayed.
pub fn to_client(
    upstream: Upstream,
    settlement: Settlement,
    strip_usage: bool,
    backend_host: Option<&str>,
) -> Response {
    let sse = upstream
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let metered = Metered {
        inner: upstream.body,
        meter: UsageMeter::new(sse, strip_usage),
        success: upstream.status.is_success(),
        started: upstream.started,
        ttfb: upstream.ttfb,
        settlement: Some(settlement),
        ended: false,
    };
    let mut headers = client_response_headers(&upstream.headers, backend_host);
    if sse && strip_usage {
        // Events are removed, so the upstream's length no longer holds (streams rarely send one).
        headers.remove(header::CONTENT_LENGTH);
    }
    let mut response = Response::new(Body::from_stream(metered));
    *response.status_mut() = upstream.status;
    *response.headers_mut() = headers;
    response
}

struct Metered {
    inner: BodyStream,
    meter: UsageMeter,
    success: bool,
    started: tokio::time::Instant,
    ttfb: std::time::Duration,
    settlement: Option<Settlement>,
    ended: bool,
}

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            return match self.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let out = self.meter.relay(chunk);
                    if out.is_empty() {
                        continue; // the whole chunk was held or removed: read on
                    }
                    Poll::Ready(Some(Ok(out)))
                }
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    self.settle();
                    Poll::Ready(Some(Err(std::io::Error::other(e))))
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    let rest = self.meter.flush();
                    self.settle();
                    Poll::Ready((!rest.is_empty()).then_some(Ok(rest)))
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        self.settle();
    }
}

impl Metered {
    /// Settle once: real usage when the response reported it; for a stream without usage,
    /// the prompt estimate plus the pieces relayed; nothing for answers that were not successes.
    fn settle(&mut self) {
        let Some(s) = self.settlement.take() else {
            return;
        };
        let usage = self.meter.finish();
        let (tokens, output_tokens) = match (self.success, usage) {
            (false, _) => (0, 0),
            (true, Some(u)) => (u.total_tokens, u.completion_tokens),
            (true, None) if self.meter.content_deltas() > 0 => (
                s.estimate.prompt + self.meter.content_deltas(),
                self.meter.content_deltas(),
            ),
            (true, None) => (s.estimate.total, 0),
        };
        let latency = self.success.then(|| LatencySample {
            ttfb: self.ttfb,
            total: self.started.elapsed(),
            output_tokens,
        });
        let receipt = Receipt {
            reservation: s.reservation,
            tokens,
            latency,
            hints: s.hints,
            backoff: None,
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Err(e) = s.fleet.settle(&s.pool, &s.backend, receipt).await {
                warn!(backend = %s.backend, error = %e, "could not settle a request in the fleet state");
            }
        });
    }
}
