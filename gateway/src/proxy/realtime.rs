//! The Realtime API: a WebSocket session, bound at its handshake to one member chosen by the
//! same policy as any request (tiers, backoff, breaker, budgets, residency). The upstream
//! handshake is made first, so a refused one (429, 5xx, unreachable) fails over to the next
//! member before the client's upgrade completes. Then frames are relayed both ways unchanged,
//! and each `response.done` event's usage is charged to the member's budget.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use spillway_shared::{
    Admission, BackendId, BackoffReason, Candidate, FleetState, PoolName, QuotaCounter, Receipt,
};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::warn;

use super::classify::{
    BackoffPolicy, Verdict, classify_response, classify_transport_failure, upstream_hints,
};
use super::forward::FailureKind;
use super::select;
use super::settlement::OpenReservation;
use super::upstream_path::{QueryPairs, check_segment, realtime_url};
use super::{consumer_budget, consumer_quota};
use crate::app::Gateway;
use crate::error::GatewayError;
use crate::table::Member;

type Upstream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A session's upstream, connected.
struct Session {
    upstream: Upstream,
    fleet: Arc<dyn FleetState>,
    pool: PoolName,
    backend: BackendId,
    /// The consumer's budget, charged with each response too.
    consumer_budget: Option<(PoolName, BackendId)>,
    /// The consumer's quota counter (of the period the session began in).
    consumer_quota: Option<QuotaCounter>,
}

/// `GET /openai/realtime?deployment=<pool>` (`v1`: `/openai/v1/realtime?model=<pool>`).
pub async fn handle(
    gateway: Arc<Gateway>,
    upgrade: WebSocketUpgrade,
    v1: bool,
    query: Option<String>,
    headers: HeaderMap,
) -> Response {
    let session = match connect(&gateway, v1, query.as_deref(), &headers).await {
        Ok(session) => session,
        Err(refusal) => return refusal,
    };
    let backend = HeaderValue::from_str(session.backend.as_str()).ok();
    let mut response = upgrade.on_upgrade(move |client| relay(client, session));
    if let Some(backend) = backend {
        response.headers_mut().insert("x-spillway-backend", backend);
    }
    response
}

/// Choose a member and open its upstream WebSocket, failing over like any request.
async fn connect(
    gateway: &Gateway,
    v1: bool,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Session, Response> {
    let refuse = |e: GatewayError| e.into_response();
    let consumer = gateway
        .consumers
        .authenticate(headers)
        .await
        .map_err(refuse)?;
    let query = QueryPairs::parse(query);
    let named = if v1 { "model" } else { "deployment" };
    let name = query.get(named).ok_or_else(|| {
        refuse(GatewayError::BadRequest(format!(
            "The realtime endpoint takes the deployment to use as '?{named}=<name>'."
        )))
    })?;
    check_segment(name, 0).map_err(|_| {
        refuse(GatewayError::InvalidPath(
            super::PathRejection::DeploymentName,
        ))
    })?;
    let pool = super::admit::lookup(gateway, consumer, name).map_err(refuse)?;
    let consumer_quota = consumer_quota::check(gateway, consumer)
        .await
        .map_err(refuse)?;
    // A consumer whose budget is spent opens no session; the handshake counts one request
    // (the reservation is released at once, its responses are charged as they complete).
    drop(
        consumer_budget::reserve(gateway, consumer, 0)
            .await
            .map_err(refuse)?,
    );
    let consumer_budget = consumer_budget::charge_target(consumer);
    let regions = super::admit::allowed_regions(
        pool.regions.as_deref(),
        consumer.and_then(|c| c.regions.as_deref()),
    );
    let members: Vec<&Member> = pool.members_in(regions.as_deref()).collect();
    if members.is_empty() {
        return Err(refuse(GatewayError::NoMemberInRegions {
            pool: pool.name.to_string(),
        }));
    }
    let routing = &gateway.routing;
    let policy = BackoffPolicy {
        default: Duration::from_millis(routing.default_backoff_ms),
        max: Duration::from_millis(routing.max_backoff_ms),
    };
    let view = gateway.view.get(&gateway.fleet, &pool);
    let preferences = select::Preferences {
        own_region: gateway.region.clone(),
        explore_share: routing.explore_share,
        ..Default::default()
    };
    let client_headers = gateway.headers.upstream_request(headers);
    let mut tried = HashSet::new();
    let mut throttled = None;
    let mut held_back = None;
    let mut failures = Vec::new();
    while tried.len() < members.len() {
        let order =
            select::candidate_order(&members, &tried, &view, &preferences, &mut rand::rng());
        let candidates: Vec<Candidate> = order.iter().map(|m| pool.candidate(m)).collect();
        // The session's responses are charged as they complete; the handshake reserves none.
        let admission = gateway
            .fleet
            .acquire(&pool.name, &candidates, 0)
            .await
            .map_err(|e| refuse(e.into()))?;
        let (backend, reservation) = match admission {
            Admission::Admitted {
                backend,
                reservation,
            } => (backend, reservation),
            Admission::Exhausted {
                retry_after,
                throttled: by_throttling,
            } => {
                if by_throttling || throttled.is_some() {
                    throttled =
                        Some(throttled.map_or(retry_after, |t: Duration| t.min(retry_after)));
                }
                held_back = Some(retry_after);
                break;
            }
        };
        let Some(member) = pool.member(&backend) else {
            break;
        };
        tried.insert(backend.clone());
        let open = OpenReservation::new(
            gateway.fleet.clone(),
            pool.name.clone(),
            backend.clone(),
            reservation,
        );
        let url = realtime_url(&member.backend.base_url, v1, &member.deployment, &query);
        let timeout = Duration::from_millis(routing.stream_first_byte_timeout_ms);
        let backoff = match handshake(member, url.as_str(), &client_headers, timeout).await {
            Ok((upstream, response_headers)) => {
                let hints = upstream_hints(&response_headers, tokio::time::Instant::now());
                let receipt = Receipt {
                    hints,
                    ..open.receipt(0)
                };
                drop(open.settle(receipt));
                return Ok(Session {
                    upstream,
                    fleet: gateway.fleet.clone(),
                    pool: pool.name.clone(),
                    backend,
                    consumer_budget,
                    consumer_quota,
                });
            }
            Err(Refused::Http(status, response_headers, body)) => {
                match classify_response(status, &response_headers, SystemTime::now(), policy) {
                    // The client's own error (400, 404): theirs to read, unchanged.
                    Verdict::Deliver => {
                        let receipt = open.receipt(0);
                        drop(open.settle(receipt));
                        return Err((status, response_headers, body).into_response());
                    }
                    Verdict::Retry(backoff) => backoff,
                }
            }
            Err(Refused::Transport(kind)) => classify_transport_failure(kind, policy),
        };
        warn!(backend = %backend, reason = %backoff.reason, "realtime handshake refused; trying the next member");
        crate::metrics::upstream_failure(
            pool.name.as_str(),
            backend.as_str(),
            backoff.reason.as_str(),
        );
        if backoff.reason == BackoffReason::Throttled {
            throttled = Some(throttled.map_or(backoff.duration, |t| t.min(backoff.duration)));
        }
        failures.push(format!("{backend}: {}", backoff.reason));
        let receipt = Receipt {
            backoff: Some(backoff),
            ..open.receipt(0)
        };
        drop(open.settle(receipt));
    }
    let pool_name = pool.name.to_string();
    Err(refuse(match throttled {
        Some(retry_after) => GatewayError::Throttled {
            pool: pool_name,
            retry_after: retry_after.max(Duration::from_millis(1)),
        },
        None if failures.is_empty() => GatewayError::Unavailable {
            pool: pool_name,
            retry_after: held_back
                .unwrap_or(Duration::from_secs(1))
                .max(Duration::from_millis(1)),
        },
        None => GatewayError::BadGateway(failures.join("; ")),
    }))
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
    match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request)).await {
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

/// Relay frames both ways until either side closes; charge each completed response.
async fn relay(client: WebSocket, session: Session) {
    let Session {
        upstream,
        fleet,
        pool,
        backend,
        consumer_budget,
        consumer_quota,
    } = session;
    let (mut to_upstream, mut from_upstream) = upstream.split();
    let (mut to_client, mut from_client) = client.split();
    let client_to_upstream = async {
        while let Some(Ok(message)) = from_client.next().await {
            let closing = matches!(message, ws::Message::Close(_));
            if to_upstream.send(upstream_message(message)).await.is_err() || closing {
                break;
            }
        }
        let _ = to_upstream.close().await;
    };
    let upstream_to_client = async {
        while let Some(Ok(message)) = from_upstream.next().await {
            if let Message::Text(text) = &message
                && let Some(tokens) = response_done_tokens(text.as_str())
            {
                let (fleet, pool, backend) = (fleet.clone(), pool.clone(), backend.clone());
                let consumer_budget = consumer_budget.clone();
                let consumer_quota = consumer_quota.clone();
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
            let Some(message) = client_message(message) else {
                continue;
            };
            let closing = matches!(message, ws::Message::Close(_));
            if to_client.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = to_client.close().await;
    };
    tokio::select! {
        () = client_to_upstream => {}
        () = upstream_to_client => {}
    }
}

/// The usage of a `response.done` event (its total tokens), read without building the event.
fn response_done_tokens(text: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Event {
        #[serde(rename = "type")]
        kind: String,
        response: Option<Done>,
    }
    #[derive(Deserialize)]
    struct Done {
        usage: Option<Usage>,
    }
    #[derive(Deserialize)]
    struct Usage {
        total_tokens: u64,
    }
    if !text.contains("response.done") {
        return None;
    }
    let event: Event = serde_json::from_str(text).ok()?;
    (event.kind == "response.done").then_some(event.response?.usage?.total_tokens)
}

fn upstream_message(message: ws::Message) -> Message {
    match message {
        ws::Message::Text(text) => Message::Text(text.as_str().into()),
        ws::Message::Binary(bytes) => Message::Binary(bytes),
        ws::Message::Ping(bytes) => Message::Ping(bytes),
        ws::Message::Pong(bytes) => Message::Pong(bytes),
        ws::Message::Close(frame) => {
            Message::Close(frame.map(|f| tungstenite::protocol::CloseFrame {
                code: f.code.into(),
                reason: f.reason.as_str().into(),
            }))
        }
    }
}

fn client_message(message: Message) -> Option<ws::Message> {
    Some(match message {
        Message::Text(text) => ws::Message::Text(text.as_str().into()),
        Message::Binary(bytes) => ws::Message::Binary(bytes),
        Message::Ping(bytes) => ws::Message::Ping(bytes),
        Message::Pong(bytes) => ws::Message::Pong(bytes),
        Message::Close(frame) => ws::Message::Close(frame.map(|f| ws::CloseFrame {
            code: f.code.into(),
            reason: f.reason.as_str().into(),
        })),
        Message::Frame(_) => return None,
    })
}
