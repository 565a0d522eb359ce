//! Relay an upstream response to the client, body streamed chunk by chunk as it arrives,
//! metering its usage; when the body ends, or the client goes away (dropping it, which
//! cancels the upstream), the attempt is settled in the fleet state.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use bytes::Bytes;
use futures_util::Stream;
use spillway_shared::ledger::SpendCounts;
use spillway_shared::{Backoff, BackoffReason, LatencySample, Receipt, UpstreamHints};

use super::forward::{BodyStream, Upstream};
use super::settlement::OpenReservation;
use super::usage::UsageMeter;
use crate::edge::headers::client_response_headers;
use crate::proxy::tokens::TokenEstimate;

/// Everything needed to settle an attempt once its body has been relayed.
pub struct Settlement {
    pub open: OpenReservation,
    pub estimate: TokenEstimate,
    /// Backoff for a body the upstream breaks off (the breaker decides whether it applies).
    pub failure_backoff: std::time::Duration,
    pub hints: UpstreamHints,
    /// Served by Azure's spillover deployment: nothing is charged to this member.
    pub spilled: bool,
    /// A Responses API create that stores its response: remember, for this long, that this
    /// member holds it. The answer's last bytes wait for the record, so a follow-up sent
    /// the moment the client has its answer finds it.
    pub remember_response: Option<std::time::Duration>,
    /// The tag of the consumer the stored response belongs to (see `consumers::owner_tag`).
    pub owner: Option<String>,
    /// A provisioned member: prompt tokens it served from its cache cost it nothing.
    pub provisioned: bool,
    /// The consumer's budget reservation and quota, settled with every token served.
    pub consumer: Option<super::consumer_budget::ConsumerSpend>,
    /// The request's and the delivering attempt's spans: open until the answer ends.
    pub spans: super::trace::AnswerSpans,
    /// Who served it, for the metrics its end records.
    pub labels: crate::ops::metrics::AnswerLabels,
    /// Rules in shadow mode that would have refused it, for its access log line.
    pub shadow: Option<String>,
    /// Where its tokens are counted, and at what price.
    pub costing: crate::cost::Costing,
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
    let mut headers = client_response_headers(&upstream.headers, backend_host);
    if sse && strip_usage {
        // Events are removed, so the upstream's length no longer holds (streams rarely send one).
        headers.remove(header::CONTENT_LENGTH);
    }
    // With a length, the server stops reading the body at its last byte and drops it: the
    // relay must see completion there, not at an end-of-stream it is never asked for.
    let remaining = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let metered = Metered {
        first: upstream.first,
        inner: upstream.body,
        meter: UsageMeter::new(sse, strip_usage),
        success: upstream.status.is_success(),
        started: upstream.started,
        ttfb: upstream.ttfb,
        settlement: Some(settlement),
        ended: false,
        remaining,
        pinning: None,
    };
    let mut response = Response::new(Body::from_stream(metered));
    *response.status_mut() = upstream.status;
    *response.headers_mut() = headers;
    response
}

struct Metered {
    /// The chunk forward read before committing to this upstream, relayed first.
    first: Option<Bytes>,
    inner: BodyStream,
    meter: UsageMeter,
    success: bool,
    started: tokio::time::Instant,
    ttfb: std::time::Duration,
    settlement: Option<Settlement>,
    ended: bool,
    /// Bytes still to come when the upstream declared a length.
    remaining: Option<u64>,
    /// The response's affinity being recorded, and the last bytes held until it is.
    pinning: Option<(PinRecord, Bytes)>,
}

/// A stored response's affinity being written to the fleet state.
type PinRecord = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some((pin, _)) = self.pinning.as_mut() {
                std::task::ready!(pin.as_mut().poll(cx));
                let (_, last) = self.pinning.take().expect("pinning was just polled");
                return Poll::Ready((!last.is_empty()).then_some(Ok(last)));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            let next = match self.first.take() {
                Some(chunk) => Poll::Ready(Some(Ok(chunk))),
                None => self.inner.as_mut().poll_next(cx),
            };
            return match next {
                Poll::Ready(Some(Ok(chunk))) => {
                    let len = chunk.len() as u64;
                    let mut out = self.meter.relay(chunk);
                    if let Some(remaining) = self.remaining.as_mut() {
                        *remaining = remaining.saturating_sub(len);
                        if *remaining == 0 {
                            self.ended = true;
                            let rest = self.meter.flush();
                            out = [out, rest].concat().into();
                            if let Some(pin) = self.settle(Ending::Completed) {
                                self.pinning = Some((pin, out));
                                continue;
                            }
                            return Poll::Ready((!out.is_empty()).then_some(Ok(out)));
                        }
                    }
                    if out.is_empty() {
                        continue; // the whole chunk was held or removed: read on
                    }
                    Poll::Ready(Some(Ok(out)))
                }
                Poll::Ready(Some(Err(e))) => {
                    self.ended = true;
                    drop(self.settle(Ending::UpstreamBroke));
                    Poll::Ready(Some(Err(std::io::Error::other(e))))
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    let rest = self.meter.flush();
                    if let Some(pin) = self.settle(Ending::Completed) {
                        self.pinning = Some((pin, rest));
                        continue;
                    }
                    Poll::Ready((!rest.is_empty()).then_some(Ok(rest)))
                }
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // A client gone before the end takes no affinity record with it.
        drop(self.settle(Ending::ClientGone));
    }
}

/// How a relayed body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// The upstream's body ended normally.
    Completed,
    /// The upstream's body failed mid-way (reset, cut connection): a failure for the breaker.
    UpstreamBroke,
    /// The client went away first: no fault of the member's, and no latency to learn from.
    ClientGone,
}

impl Metered {
    /// Settle once: real usage when the response reported it; for a stream without usage,
    /// the prompt estimate plus the pieces relayed; nothing for answers that were not successes.
    /// Only a completed body is a latency sample (and a success for the breaker); one the
    /// upstream broke off counts as a failure.
    ///
    /// Returns the recording of a stored response's affinity, when one is due.
    fn settle(&mut self, ending: Ending) -> Option<PinRecord> {
        let s = self.settlement.take()?;
        let usage = self.meter.finish();
        let reported = usage.map(|u| (u.prompt_tokens, u.completion_tokens));
        let first_byte = self.started + self.ttfb;
        s.spans
            .record_end(reported, Some(first_byte), self.meter.model());
        let latency = s.spans.started.elapsed();
        let first_token = first_byte.saturating_duration_since(s.spans.started);
        let reported = reported.filter(|_| self.success);
        crate::ops::metrics::answer_finished(
            &s.labels,
            latency,
            Some(first_token),
            reported,
            s.estimate.prompt,
        );
        crate::ops::access_log::write(&crate::ops::access_log::AccessRecord {
            consumer: s.labels.consumer.as_deref(),
            pool: Some(s.labels.pool.as_str()),
            backend: Some(s.labels.backend.as_str()),
            tier: Some(s.labels.tier),
            attempts: s.spans.attempts,
            status: s.spans.status,
            tokens: reported,
            latency,
            time_to_first_token: Some(first_token),
            error: None,
            class: Some(&s.labels.class),
            shadow: s.shadow.as_deref(),
        });
        let (tokens, output_tokens) = match (self.success, usage) {
            (false, _) => (0, 0),
            (true, Some(u)) => {
                crate::ops::metrics::prompt_tokens(s.open.pool(), u.prompt_tokens, u.cached_tokens);
                let free = if s.provisioned { u.cached_tokens } else { 0 };
                (u.total_tokens.saturating_sub(free), u.completion_tokens)
            }
            (true, None) if self.meter.content_deltas() > 0 => (
                s.estimate.prompt + self.meter.content_deltas(),
                self.meter.content_deltas(),
            ),
            (true, None) => (s.estimate.total(), 0),
        };
        // What was served, as the cost ledger counts it.
        let served = match (self.success, usage) {
            (false, _) => None,
            (true, Some(u)) => Some(SpendCounts {
                input: u.prompt_tokens,
                cached: u.cached_tokens,
                output: u.completion_tokens,
                requests: 1,
            }),
            // No usage reported: the prompt as estimated and the pieces relayed (the budget
            // keeps the whole estimate; the ledger counts no output it did not see).
            (true, None) => Some(SpendCounts {
                input: s.estimate.prompt,
                cached: 0,
                output: output_tokens,
                requests: 1,
            }),
        };
        let cost = served.and_then(|counts| s.costing.count(&s.labels, s.spilled, counts));
        if let Some(usd) = cost {
            s.spans.request.record("spillway.cost_usd", usd);
        }
        if let Some(consumer) = s.consumer {
            let served = match usage {
                Some(u) if self.success => u.total_tokens,
                _ => tokens,
            };
            consumer.settle(served, cost);
        }
        let tokens = if s.spilled { 0 } else { tokens };
        let completed = self.success && ending == Ending::Completed && !s.spilled;
        let latency = completed.then(|| LatencySample {
            ttfb: self.ttfb,
            total: self.started.elapsed(),
            output_tokens,
            prompt_tokens: usage.map_or(0, |u| u.prompt_tokens),
            cached_tokens: usage.map_or(0, |u| u.cached_tokens),
        });
        let backoff = (self.success && ending == Ending::UpstreamBroke).then_some(Backoff {
            duration: s.failure_backoff,
            reason: BackoffReason::StreamCut,
        });
        let receipt = Receipt {
            latency,
            hints: s.hints,
            backoff,
            ..s.open.receipt(tokens)
        };
        let pin = match (s.remember_response, self.meter.response_id()) {
            (Some(ttl), Some(id)) if completed => {
                Some(
                    Box::pin(s.open.pin_response(id.to_owned(), ttl, s.owner.clone())) as PinRecord,
                )
            }
            _ => None,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            drop(s.open.settle(receipt));
        }
        pin
    }
}
