//! The HTTP attempt: send an admitted request to the member `route` reserved, classify the
//! answer, and hand one worth delivering to the relay (which settles when its body ends).

use std::time::{Duration, SystemTime};

use axum::response::Response;
use spillway_shared::UpstreamHints;
use tracing::Instrument;

use super::admit::ProxyRequest;
use super::classify::{
    BackoffPolicy, Verdict, azure_spilled_over, classify_response, classify_transport_failure,
    upstream_hints,
};
use super::consumer_budget::ConsumerSpend;
use super::settlement::OpenReservation;
use super::{AttemptFailure, Gateway, GatewayError, Outcome, Step, fail, forward, relay, trace};
use crate::config::RoutingConfig;
use crate::routing_table::Member;

/// The HTTP attempt: send the request to a member. The attempt that delivers takes the
/// consumer's spend with its answer.
pub(super) struct HttpSend<'a> {
    pub request: &'a ProxyRequest,
    pub spend: Option<ConsumerSpend>,
    /// Rules in shadow mode this request crossed.
    pub marks: std::sync::Arc<super::shadow::Marks>,
}

impl Step for HttpSend<'_> {
    type Delivered = Response;

    fn first_byte_ms(&self, routing: &RoutingConfig) -> u64 {
        // A stream's first byte should come soon; a plain answer's comes after the whole reply.
        if self.request.stream {
            routing.stream_first_byte_timeout_ms
        } else {
            routing.attempt_timeout_ms
        }
    }

    async fn attempt(
        &mut self,
        gateway: &Gateway,
        member: &Member,
        open: OpenReservation,
        timeout: Duration,
        policy: BackoffPolicy,
        traced: trace::Attempt,
    ) -> Result<Outcome<Response>, GatewayError> {
        let outcome = send(gateway, self.request, member, open, timeout, policy, traced).await?;
        Ok(match outcome {
            Outcome::Delivered(answer) => Outcome::Delivered(deliver(
                gateway,
                self.request,
                member,
                answer,
                policy,
                (self.spend.take(), self.marks.names()),
            )),
            Outcome::Failed(failure) => Outcome::Failed(failure),
        })
    }
}

/// One upstream attempt on `member` under its open reservation: deliver, or settle the
/// failure (release and backoff in one round trip) and report it.
async fn send(
    gateway: &Gateway,
    request: &ProxyRequest,
    member: &Member,
    open: OpenReservation,
    timeout: Duration,
    policy: BackoffPolicy,
    traced: trace::Attempt,
) -> Result<Outcome<Answer>, GatewayError> {
    let trace::Attempt { number, span } = traced;
    let sent = forward::send(&gateway.http, member, request, timeout, &span)
        .instrument(span.clone())
        .await;
    let answered = sent.is_ok();
    let (backoff, hints, detail) = match sent {
        Ok(upstream) => {
            trace::record_status(&span, upstream.status.as_u16());
            let hints = upstream_hints(&upstream.headers, upstream.started + upstream.ttfb);
            match classify_response(
                upstream.status,
                &upstream.headers,
                SystemTime::now(),
                policy,
            ) {
                Verdict::Deliver => {
                    let remember = request
                        .remember_response
                        .then(|| Duration::from_secs(gateway.routing.response_affinity_ttl_s));
                    let parent = tracing::Span::current();
                    trace::record_member(&parent, member);
                    let spans = trace::AnswerSpans {
                        request: parent,
                        attempt: span,
                        started: request.received,
                        attempts: number,
                        status: upstream.status.as_u16(),
                    };
                    let answer = Answer {
                        open,
                        upstream,
                        hints,
                        remember_response: remember,
                        spans,
                    };
                    return Ok(Outcome::Delivered(answer));
                }
                Verdict::Retry(backoff) => (backoff, hints, format!("HTTP {}", upstream.status)),
            }
        }
        Err(failure) => (
            classify_transport_failure(failure.kind, policy),
            UpstreamHints::default(),
            failure.detail,
        ),
    };
    let failed = AttemptFailure {
        backoff,
        hints,
        detail,
        answered,
    };
    fail(&request.pool.name, open, failed, &span).await
}

/// An upstream answer to deliver, with what its end must record.
struct Answer {
    /// The member's reservation, settled when the answer ends.
    open: OpenReservation,
    upstream: forward::Upstream,
    hints: UpstreamHints,
    /// Remember for this long that the member holds the Responses API object it creates.
    remember_response: Option<Duration>,
    spans: trace::AnswerSpans,
}

/// Hand an answer to the relay, which settles the reservation when its body ends.
fn deliver(
    gateway: &Gateway,
    request: &ProxyRequest,
    member: &Member,
    answer: Answer,
    policy: BackoffPolicy,
    (consumer, shadow): (Option<ConsumerSpend>, Option<String>),
) -> Response {
    let Answer {
        open,
        upstream,
        hints,
        remember_response,
        spans,
    } = answer;
    // Azure's own spillover answered: the tokens are the standard deployment's, and the PTU
    // is full.
    let spilled = azure_spilled_over(&upstream.headers);
    let hints = if spilled {
        UpstreamHints {
            remaining_tokens: Some(0),
            utilization: Some(1.0),
            ..hints
        }
    } else {
        hints
    };
    if request.stream || spilled {
        open.observe_now(hints);
    }
    let settlement = relay::Settlement {
        open,
        estimate: request.estimate,
        failure_backoff: policy.default,
        hints,
        spilled,
        remember_response,
        owner: request
            .consumer
            .as_ref()
            .map(|c| crate::auth::consumers::owner_tag(&c.name)),
        provisioned: member.backend.provisioned(),
        consumer,
        spans,
        labels: crate::ops::metrics::AnswerLabels {
            pool: request.pool.name.clone(),
            backend: member.backend.id.clone(),
            tier: member.backend.priority,
            consumer: request.consumer.as_ref().map(|c| c.name.clone()),
            class: request.class.name.clone(),
        },
        shadow,
        costing: crate::cost::Costing {
            book: gateway.spend.clone(),
            prices: gateway.prices.clone(),
            tier: member.backend.kind,
        },
    };
    relay::to_client(
        upstream,
        settlement,
        request.strip_usage,
        member.backend.base_url.host_str(),
    )
}
