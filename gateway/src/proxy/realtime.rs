//! The Realtime API: a WebSocket session, bound at its handshake to one member chosen by the
//! same loop as any request (`proxy::route`: tiers, backoff, breaker, budgets, residency,
//! retry budget, `max_attempts`, `request_timeout`). The upstream handshake is the attempt,
//! made first, so a refused one (429, 5xx, unreachable) fails over to the next member
//! before the client's upgrade completes. Then frames are relayed both ways, and each
//! `response.done` event's usage is charged to the member's budget.
//!
//! A session stays inside its consumer's limits: it holds one of the replica's request slots
//! until it ends; messages are at most `server.max_ws_message_bytes`; each `response.create`
//! is admitted against the consumer's budget and quota before it is relayed, and a consumer's
//! `max_tokens` is the session's `max_response_output_tokens` (set by the gateway when the
//! session opens; a larger value asked later is refused). A refused event is answered with
//! an `error` event in the Realtime shape and the session stays open (`relay::refusal_event`
//! lists the codes).

mod relay;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::WebSocketUpgrade;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use spillway_shared::{BackendId, FleetState, PoolName, QuotaCounter, Receipt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{Instrument, warn};

use super::classify::{
    BackoffPolicy, Verdict, classify_response, classify_transport_failure, upstream_hints,
};
use super::forward::FailureKind;
use super::settlement::OpenReservation;
use super::upstream_path::{QueryPairs, realtime_url};
use super::{AttemptFailure, Attempts, Outcome, Placement, Step, trace};
use super::{consumer_budget, consumer_quota};
use crate::auth::consumers::Consumer;
use crate::config::RoutingConfig;
use crate::edge::load_shed::HeldSlot;
use crate::error::GatewayError;
use crate::path_segment::check_segment;
use crate::proxy::Gateway;
use crate::proxy::fleet_view::MemberView;
use crate::proxy::tokens::{Operation, TokenEstimate};
use crate::routing_table::{Member, Pool};

type Upstream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A session's upstream, connected.
struct Session {
    upstream: Upstream,
    charges: Charges,
    /// Who opened it (its limits apply to every response).
    consumer: Option<Consumer>,
}

/// Where each completed response of a session is charged.
#[derive(Clone)]
struct Charges {
    fleet: Arc<dyn FleetState>,
    pool: PoolName,
    backend: BackendId,
    /// The consumer's budget, charged with each response too.
    consumer_budget: Option<(PoolName, BackendId)>,
    /// The consumer's quota counter (of the period the session began in).
    consumer_quota: Option<QuotaCounter>,
    /// Where each response's tokens go in the cost ledger.
    costing: Option<(Arc<crate::cost::Costing>, crate::ops::metrics::AnswerLabels)>,
}

impl Charges {
    /// Charge a response's tokens to the member, and to the consumer's budget and quota, in
    /// a task of its own (the relay does not wait for the fleet state); count them in the
    /// cost ledger.
    fn charge(&self, usage: relay::ResponseUsage) {
        if let Some((costing, labels)) = &self.costing {
            let counts = spillway_shared::ledger::SpendCounts {
                input: usage.input,
                cached: usage.cached,
                output: usage.output,
                requests: 1,
            };
            costing.count(labels, false, counts);
        }
        let tokens = usage.total;
        let Charges {
            fleet,
            pool,
            backend,
            consumer_budget,
            consumer_quota,
            costing: _,
        } = self.clone();
        tokio::spawn(async move {
            if let Err(e) = fleet.charge(&pool, &backend, tokens, 1).await {
                warn!(error = %e, %backend, "a realtime response was not charged");
            }
            if let Some((pool, budget)) = consumer_budget
                && let Err(e) = fleet.charge(&pool, &budget, tokens, 1).await
            {
                warn!(error = %e, %pool, "a realtime response was not charged to its consumer");
            }
            if let Some(counter) = consumer_quota
                && let Err(e) = fleet.spend_quota(&counter, tokens).await
            {
                warn!(error = %e, quota = counter.name, "a realtime response was not counted on its consumer's quota");
            }
        });
    }
}

/// A Realtime handshake as the client sent it.
pub struct RealtimeRequest {
    /// `/openai/v1/realtime?model=` rather than `/openai/realtime?deployment=`.
    pub v1: bool,
    pub query: Option<String>,
    pub headers: HeaderMap,
    /// Who opened it (authenticated before it took a slot).
    pub consumer: Option<Consumer>,
    /// The request slot the session holds until it ends.
    pub slot: Option<HeldSlot>,
}

/// `GET /openai/realtime?deployment=<pool>` (`v1`: `/openai/v1/realtime?model=<pool>`).
pub async fn handle(
    gateway: Arc<Gateway>,
    upgrade: WebSocketUpgrade,
    request: RealtimeRequest,
) -> Response {
    let RealtimeRequest {
        v1,
        query,
        headers,
        consumer,
        slot,
    } = request;
    let mut attempts = Attempts::default();
    let opened = async {
        let own = consumer.as_ref().and_then(|c| c.class.as_deref());
        let class = gateway.classes.of_request(own, &headers, None)?;
        let mut admitted = admit_session(
            &gateway,
            v1,
            query.as_deref(),
            &headers,
            (consumer, &class.name),
        )
        .await?;
        let placement = Placement {
            pool: &admitted.pool,
            regions: admitted.regions.as_deref(),
            pinned: None,
            // The session's responses are charged as they complete; the handshake reserves none.
            estimate: TokenEstimate::default(),
            cache_key: None,
            view: &admitted.view,
            operation: Operation::Other,
            class: &class,
            consumer: None,
        };
        let opened =
            super::route(&gateway, &placement, &mut admitted.handshake, &mut attempts).await?;
        Ok::<_, GatewayError>((opened, admitted, class))
    }
    .await;
    let (session, backend) = match opened {
        Ok((Opened::Session(upstream, backend), admitted, class)) => {
            let member = admitted.pool.member(&backend);
            let costing = member.map(|member| {
                let costing = crate::cost::Costing {
                    book: gateway.spend.clone(),
                    prices: gateway.prices.clone(),
                    tier: member.backend.kind,
                };
                let labels = crate::ops::metrics::AnswerLabels {
                    pool: admitted.pool.name.clone(),
                    backend: backend.clone(),
                    tier: member.backend.priority,
                    consumer: admitted.consumer.as_ref().map(|c| c.name.clone()),
                    class: class.name.clone(),
                };
                (Arc::new(costing), labels)
            });
            let charges = Charges {
                fleet: gateway.fleet.clone(),
                pool: admitted.pool.name.clone(),
                backend: backend.clone(),
                consumer_budget: consumer_budget::charge_target(admitted.consumer.as_ref()),
                consumer_quota: admitted.quota,
                costing,
            };
            let session = Session {
                upstream: *upstream,
                charges,
                consumer: admitted.consumer,
            };
            (session, backend)
        }
        Ok((Opened::Refused(response), _, _)) => return with_attempts(response, &attempts),
        Err(refusal) => return with_attempts(refusal.into_response(), &attempts),
    };
    // The session holds its request slot until it ends (it counts in max_concurrent_requests).
    let slot = slot.and_then(|s| s.take());
    let limit = gateway.config.server.max_ws_message_bytes;
    let mut response = upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |client| relay::relay(client, session, gateway, slot));
    if let Ok(backend) = HeaderValue::from_str(backend.as_str()) {
        response.headers_mut().insert("x-spillway-backend", backend);
    }
    with_attempts(response, &attempts)
}

/// Every handshake answer says how many members were tried, like any request's.
fn with_attempts(mut response: Response, attempts: &Attempts) -> Response {
    response
        .headers_mut()
        .insert("x-spillway-attempts", HeaderValue::from(attempts.count));
    response
}

/// A session admitted: the pool it may open on, and what its handshakes send.
struct AdmittedSession {
    pool: Arc<Pool>,
    regions: Option<Vec<String>>,
    view: Arc<MemberView>,
    handshake: Handshake,
    consumer: Option<Consumer>,
    /// The consumer's quota counter (of the period the session began in).
    quota: Option<QuotaCounter>,
}

/// The attempt of a session: an upstream WebSocket handshake.
struct Handshake {
    pool: PoolName,
    v1: bool,
    query: QueryPairs,
    client_headers: HeaderMap,
    max_message: usize,
}

/// The handshake's admission: the pool named in the query, the consumer's pools, regions,
/// quota and budget. A consumer whose budget is spent opens no session; the handshake
/// counts one request (the reservation is released at once, its responses are charged as
/// they complete).
async fn admit_session(
    gateway: &Gateway,
    v1: bool,
    query: Option<&str>,
    headers: &HeaderMap,
    (consumer, class): (Option<Consumer>, &str),
) -> Result<AdmittedSession, GatewayError> {
    let query = QueryPairs::parse(query);
    let named = if v1 { "model" } else { "deployment" };
    let name = query.get(named).ok_or_else(|| {
        GatewayError::BadRequest(format!(
            "The realtime endpoint takes the deployment to use as '?{named}=<name>'."
        ))
    })?;
    check_segment(name, 0).map_err(|_| {
        GatewayError::InvalidPath(crate::path_segment::PathRejection::DeploymentName)
    })?;
    let pool = super::admit::lookup(gateway, consumer.as_ref(), name)?;
    let (pool_name, consumer_name) = (
        pool.name.as_str(),
        consumer.as_ref().map(|c| c.name.as_str()),
    );
    let shadow = |rule: super::shadow::Rule| {
        move || super::shadow::Marks::default().would_refuse(rule, pool_name, consumer_name, class)
    };
    let quota = consumer_quota::check(
        gateway,
        consumer.as_ref(),
        shadow(super::shadow::Rule::Quota),
    )
    .await?;
    let budget = consumer_budget::reserve(
        gateway,
        consumer.as_ref(),
        0,
        shadow(super::shadow::Rule::Budget),
    );
    drop(budget.await?);
    let regions = super::admit::allowed_regions(
        pool.regions.as_deref(),
        consumer.as_ref().and_then(|c| c.regions.as_deref()),
    );
    Ok(AdmittedSession {
        view: gateway.view.get(&gateway.fleet, &pool),
        regions,
        handshake: Handshake {
            pool: pool.name.clone(),
            v1,
            query,
            client_headers: gateway.headers.upstream_request(headers),
            max_message: gateway.config.server.max_ws_message_bytes,
        },
        pool,
        consumer,
        quota,
    })
}

/// What a handshake that was answered brings back.
enum Opened {
    /// The upstream upgraded: the session's member and its socket.
    Session(Box<Upstream>, BackendId),
    /// The member refused with the client's own error (400, 404): theirs to read, its
    /// headers filtered like any answer's (no cookies, nothing naming the backend).
    Refused(Response),
}

impl Step for Handshake {
    type Delivered = Opened;

    fn first_byte_ms(&self, routing: &RoutingConfig) -> u64 {
        routing.stream_first_byte_timeout_ms
    }

    async fn attempt(
        &mut self,
        _gateway: &Gateway,
        member: &Member,
        open: OpenReservation,
        timeout: Duration,
        policy: BackoffPolicy,
        traced: trace::Attempt,
    ) -> Result<Outcome<Opened>, GatewayError> {
        let span = traced.span;
        let url = realtime_url(
            &member.backend.base_url,
            self.v1,
            &member.deployment,
            &self.query,
        );
        let handshake = handshake(
            member,
            url.as_str(),
            &self.client_headers,
            timeout,
            self.max_message,
        );
        let failed = match handshake.instrument(span.clone()).await {
            Ok((upstream, response_headers)) => {
                trace::record_status(&span, 101);
                let hints = upstream_hints(&response_headers, tokio::time::Instant::now());
                let receipt = Receipt {
                    hints,
                    ..open.receipt(0)
                };
                let backend = open.backend().clone();
                drop(open.settle(receipt));
                return Ok(Outcome::Delivered(Opened::Session(
                    Box::new(upstream),
                    backend,
                )));
            }
            Err(Refused::Http(status, response_headers, body)) => {
                trace::record_status(&span, status.as_u16());
                match classify_response(status, &response_headers, SystemTime::now(), policy) {
                    Verdict::Deliver => {
                        let receipt = open.receipt(0);
                        drop(open.settle(receipt));
                        let headers = crate::edge::headers::client_response_headers(
                            &response_headers,
                            member.backend.base_url.host_str(),
                        );
                        let refused = (status, headers, body).into_response();
                        return Ok(Outcome::Delivered(Opened::Refused(refused)));
                    }
                    Verdict::Retry(backoff) => AttemptFailure {
                        backoff,
                        hints: upstream_hints(&response_headers, tokio::time::Instant::now()),
                        detail: format!("handshake answered HTTP {status}"),
                        answered: true,
                    },
                }
            }
            Err(Refused::Transport(kind)) => AttemptFailure {
                backoff: classify_transport_failure(kind, policy),
                hints: Default::default(),
                detail: format!("handshake failed: {kind:?}"),
                answered: false,
            },
        };
        super::fail(&self.pool, open, failed, &span).await
    }
}

/// Why an upstream handshake did not open a session.
enum Refused {
    /// It answered HTTP instead of upgrading.
    Http(StatusCode, HeaderMap, Vec<u8>),
    Transport(FailureKind),
}

/// The upstream WebSocket handshake, with the member's credential in place of the client's.
async fn handshake(
    member: &Member,
    url: &str,
    client_headers: &HeaderMap,
    timeout: Duration,
    max_message: usize,
) -> Result<(Upstream, HeaderMap), Refused> {
    let credential = member
        .backend
        .credential
        .header()
        .await
        .map_err(|_| Refused::Transport(FailureKind::Credential))?;
    let mut request = url
        .into_client_request()
        .map_err(|_| Refused::Transport(FailureKind::Connection))?;
    for (name, value) in client_headers {
        request.headers_mut().append(name, value.clone());
    }
    if let Some((name, value)) = credential {
        request.headers_mut().insert(name, value);
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(config), false);
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok((upstream, response))) => Ok((upstream, response.headers().clone())),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let (parts, body) = response.into_parts();
            Err(Refused::Http(
                parts.status,
                parts.headers,
                body.unwrap_or_default(),
            ))
        }
        Ok(Err(_)) => Err(Refused::Transport(FailureKind::Connection)),
        Err(_) => Err(Refused::Transport(FailureKind::Timeout)),
    }
}
