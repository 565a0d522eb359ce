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
//! an `error` event in the Realtime shape and the session stays open ([`refusal_event`]
//! lists the codes).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use spillway_shared::{BackendId, FleetState, PoolName, QuotaCounter, Receipt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{Instrument, warn};

use super::classify::{
    BackoffPolicy, Verdict, classify_response, classify_transport_failure, upstream_hints,
};
use super::forward::FailureKind;
use super::settlement::OpenReservation;
use super::upstream_path::{QueryPairs, check_segment, realtime_url};
use super::{AttemptFailure, Attempts, Outcome, Placement, Step, trace};
use super::{consumer_budget, consumer_quota};
use crate::app::Gateway;
use crate::config::RoutingConfig;
use crate::consumers::Consumer;
use crate::error::GatewayError;
use crate::fleet_view::MemberView;
use crate::load_shed::HeldSlot;
use crate::request_fields::{Lenient, Object, Text};
use crate::table::{Member, Pool};
use crate::tokens::{Operation, TokenEstimate};

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
    /// Who opened it (its limits apply to every response).
    consumer: Option<Consumer>,
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
        let admitted = admit_session(&gateway, v1, query.as_deref(), &headers, consumer).await?;
        let opened = super::route(&gateway, &admitted, &mut attempts).await?;
        Ok::<_, GatewayError>((opened, admitted))
    }
    .await;
    let (session, backend) = match opened {
        Ok((Opened::Session(upstream, backend), admitted)) => {
            let session = Session {
                upstream: *upstream,
                fleet: gateway.fleet.clone(),
                pool: admitted.pool.name.clone(),
                backend: backend.clone(),
                consumer_budget: consumer_budget::charge_target(admitted.consumer.as_ref()),
                consumer_quota: admitted.quota,
                consumer: admitted.consumer,
            };
            (session, backend)
        }
        Ok((Opened::Refused(response), _)) => return with_attempts(response, &attempts),
        Err(refusal) => return with_attempts(refusal.into_response(), &attempts),
    };
    // The session holds its request slot until it ends (it counts in max_concurrent_requests).
    let slot = slot.and_then(|s| s.take());
    let limit = gateway.config.server.max_ws_message_bytes;
    let mut response = upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |client| relay(client, session, gateway, slot));
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
    v1: bool,
    query: QueryPairs,
    client_headers: HeaderMap,
    max_message: usize,
    consumer: Option<Consumer>,
    /// The consumer's quota counter (of the period the session began in).
    quota: Option<QuotaCounter>,
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
    consumer: Option<Consumer>,
) -> Result<AdmittedSession, GatewayError> {
    let query = QueryPairs::parse(query);
    let named = if v1 { "model" } else { "deployment" };
    let name = query.get(named).ok_or_else(|| {
        GatewayError::BadRequest(format!(
            "The realtime endpoint takes the deployment to use as '?{named}=<name>'."
        ))
    })?;
    check_segment(name, 0)
        .map_err(|_| GatewayError::InvalidPath(super::PathRejection::DeploymentName))?;
    let pool = super::admit::lookup(gateway, consumer.as_ref(), name)?;
    let quota = consumer_quota::check(gateway, consumer.as_ref()).await?;
    drop(consumer_budget::reserve(gateway, consumer.as_ref(), 0).await?);
    let regions = super::admit::allowed_regions(
        pool.regions.as_deref(),
        consumer.as_ref().and_then(|c| c.regions.as_deref()),
    );
    Ok(AdmittedSession {
        view: gateway.view.get(&gateway.fleet, &pool),
        regions,
        pool,
        v1,
        query,
        client_headers: gateway.headers.upstream_request(headers),
        max_message: gateway.config.server.max_ws_message_bytes,
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

impl Step for AdmittedSession {
    type Delivered = Opened;

    fn placement(&self) -> Placement<'_> {
        Placement {
            pool: &self.pool,
            regions: self.regions.as_deref(),
            pinned: None,
            // The session's responses are charged as they complete; the handshake reserves none.
            estimate: TokenEstimate::default(),
            cache_key: None,
            view: &self.view,
            operation: Operation::Other,
        }
    }

    fn first_byte_ms(&self, routing: &RoutingConfig) -> u64 {
        routing.stream_first_byte_timeout_ms
    }

    async fn attempt(
        &self,
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
                        let headers = crate::headers::client_response_headers(
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
        super::fail(&self.pool.name, open, failed, &span).await
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

/// Relay frames both ways until either side closes; charge each completed response. Client
/// events pass the consumer's limits first (see [`admit_event`]).
async fn relay(
    client: WebSocket,
    session: Session,
    gateway: Arc<Gateway>,
    _slot: Option<OwnedSemaphorePermit>,
) {
    let Session {
        upstream,
        fleet,
        pool,
        backend,
        consumer_budget,
        consumer_quota,
        consumer,
    } = session;
    let (mut to_upstream, mut from_upstream) = upstream.split();
    let (mut to_client, mut from_client) = client.split();
    // The consumer's output cap is the session's from the start.
    let cap = consumer.as_ref().and_then(|c| c.max_tokens);
    if let Some(cap) = cap {
        let update = serde_json::json!({ "type": "session.update",
            "event_id": "evt_spillway_max_tokens",
            "session": { "max_response_output_tokens": cap } });
        if to_upstream
            .send(Message::Text(update.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    // Everything for the client goes through one writer: the upstream's events and the
    // gateway's own refusals. The upstream side holds the only strong sender, so the writer
    // ends (and closes the client) when the upstream does.
    let (to_writer, mut for_client) = mpsc::channel::<ws::Message>(64);
    let refusals = to_writer.downgrade();
    let (written, mut writer_done) = tokio::sync::watch::channel(false);
    let write_client = async {
        while let Some(message) = for_client.recv().await {
            let closing = matches!(message, ws::Message::Close(_));
            if to_client.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = to_client.close().await;
        written.send_replace(true);
    };
    let client_to_upstream = async {
        loop {
            let message = match from_client.next().await {
                Some(Ok(message)) => message,
                // Past `server.max_ws_message_bytes`: closed with 1009, said to the client.
                Some(Err(e)) if too_big(&e) => {
                    let close = ws::Message::Close(Some(ws::CloseFrame {
                        code: 1009,
                        reason: "message larger than server.max_ws_message_bytes".into(),
                    }));
                    if let Some(writer) = refusals.upgrade()
                        && writer.send(close).await.is_ok()
                    {
                        drop(writer);
                        let flushed = writer_done.wait_for(|done| *done);
                        let _ = tokio::time::timeout(Duration::from_secs(1), flushed).await;
                    }
                    break;
                }
                Some(Err(_)) | None => break,
            };
            if let ws::Message::Text(text) = &message
                && let Err(refusal) = admit_event(&gateway, consumer.as_ref(), text.as_str()).await
            {
                let Some(writer) = refusals.upgrade() else {
                    break;
                };
                if writer.send(refusal).await.is_err() {
                    break;
                }
                continue;
            }
            let closing = matches!(message, ws::Message::Close(_));
            if to_upstream.send(upstream_message(message)).await.is_err() || closing {
                break;
            }
        }
        let _ = to_upstream.close().await;
    };
    let upstream_to_client = async move {
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
            if to_writer.send(message).await.is_err() || closing {
                break;
            }
        }
    };
    tokio::select! {
        () = client_to_upstream => {}
        ((), ()) = async { tokio::join!(upstream_to_client, write_client) } => {}
    }
}

/// A client message over the size limit (the WebSocket's capacity error).
fn too_big(error: &axum::Error) -> bool {
    std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<tungstenite::Error>())
        .is_some_and(|e| matches!(e, tungstenite::Error::Capacity(_)))
}

/// What the gateway reads of a client event.
#[derive(Deserialize)]
struct ClientEvent<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Lenient<Text<'a>>,
    #[serde(default, borrow)]
    event_id: Lenient<Text<'a>>,
    #[serde(default)]
    session: Object<OutputCaps>,
    #[serde(default)]
    response: Object<OutputCaps>,
}

/// The output caps a `session.update` or `response.create` may set (`inf` or a count).
#[derive(Default, Deserialize)]
struct OutputCaps {
    #[serde(default)]
    max_response_output_tokens: Option<serde_json::Value>,
    #[serde(default)]
    max_output_tokens: Option<serde_json::Value>,
}

/// A client event passes when it is within the consumer's limits: a `session.update` or
/// `response.create` asks for no more output than its `max_tokens`, and a `response.create`
/// is admitted against its budget and quota (the response is charged when it is done).
/// Events the gateway cannot read pass unchanged (the upstream answers them).
async fn admit_event(
    gateway: &Gateway,
    consumer: Option<&Consumer>,
    text: &str,
) -> Result<(), ws::Message> {
    let Some(consumer) = consumer else {
        return Ok(());
    };
    if !text.contains("session.update") && !text.contains("response.create") {
        return Ok(());
    }
    let Ok(event) = serde_json::from_str::<ClientEvent>(text) else {
        return Ok(());
    };
    let kind = event.kind.get().map(Text::as_str);
    let client_event = event.event_id.get().map(|t| t.as_str().to_owned());
    let refuse = |code: &str, message: String, param: Option<&str>| {
        refusal_event(code, &message, param, client_event.as_deref())
    };
    if !matches!(kind, Some("session.update" | "response.create")) {
        return Ok(());
    }
    if let Some(cap) = consumer.max_tokens {
        let (object, caps) = match kind {
            Some("session.update") => ("session", event.session.get()),
            _ => ("response", event.response.get()),
        };
        for (field, asked) in caps.into_iter().flat_map(|c| {
            [
                ("max_response_output_tokens", &c.max_response_output_tokens),
                ("max_output_tokens", &c.max_output_tokens),
            ]
        }) {
            let Some(asked) = asked else { continue };
            if asked.as_u64().is_none_or(|n| n > cap) {
                return Err(refuse(
                    "max_tokens_exceeded",
                    format!("{object}.{field} may be at most {cap} for this key."),
                    Some(&format!("{object}.{field}")),
                ));
            }
        }
    }
    if kind != Some("response.create") {
        return Ok(());
    }
    // Unreachable fleet state is no refusal: the response is served (and charged when
    // done), as an HTTP request would be on the replica's own share.
    if let Err(GatewayError::QuotaExceeded { .. }) =
        consumer_quota::check(gateway, Some(consumer)).await
    {
        return Err(refuse(
            "quota_exceeded",
            "This key's token quota for the period is used up; the session stays open.".into(),
            None,
        ));
    }
    if consumer_budget::spent(gateway, consumer).await {
        return Err(refuse(
            "rate_limit_exceeded",
            "This key's rate limit is reached; the session stays open. Please retry the response later."
                .into(),
            None,
        ));
    }
    Ok(())
}

/// A refused client event, answered in the Realtime API's error shape:
/// `{"type":"error","error":{"type":"invalid_request_error","code":…,"message":…,"param":…,
/// "event_id":<the client's event>}}`. Codes: `max_tokens_exceeded` (a cap above the key's
/// `max_tokens`), `rate_limit_exceeded` (its budget is spent for now), `quota_exceeded` (its
/// token quota is spent for the period).
fn refusal_event(
    code: &str,
    message: &str,
    param: Option<&str>,
    client_event: Option<&str>,
) -> ws::Message {
    let kind = if code == "max_tokens_exceeded" {
        "invalid_request_error"
    } else {
        "rate_limit_error"
    };
    let event = serde_json::json!({ "type": "error", "event_id": "evt_spillway_refusal",
        "error": { "type": kind, "code": code, "message": message, "param": param,
            "event_id": client_event } });
    ws::Message::Text(event.to_string().into())
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
