//! The request's life, phase by phase: admit → (select → forward → classify)* → relay.
//! `route` is the only place that loops over attempts, for every operation: the attempt is
//! a [`Step`] (an HTTP send here, a WebSocket handshake in `realtime`), and the candidates,
//! retry budget, `max_attempts`, `request_timeout` and the error when none answers are
//! `route`'s alone.

mod admit;
mod cache_affinity;
mod class_rules;
mod classify;
mod consumer_budget;
mod consumer_quota;
pub mod fleet_view;
mod forward;
mod gateway;
mod http_attempt;
mod json_fields;
mod outgoing_body;
mod queue_wait;
mod realtime;
mod relay;
mod request_body;
pub mod request_fields;
pub mod retry_budget;
mod select;
mod settlement;
mod shadow;
mod sse;
pub mod tokens;
mod trace;
pub mod traffic_class;
mod upstream_client;
mod upstream_path;
mod usage;

pub use realtime::{RealtimeRequest, handle as realtime};
pub use settlement::all_settled;

/// The parsers `crate::fuzzing` drives.
#[doc(hidden)]
pub mod fuzz_access {
    pub use super::classify::{BackoffPolicy, classify_response, retry_after, upstream_hints};
    pub use super::upstream_path::OperationPath;
    pub use super::usage::UsageMeter;
}
/// The pure steps the micro-benchmarks (`tests/benches`) time.
#[doc(hidden)]
pub mod bench_access {
    pub use super::select::{Preferences, candidate_order};
}
pub use crate::path_segment::{PathRejection, check_segment};
pub use gateway::{ConsumerHeaderNames, Gateway};
pub use request_body::BodyLimits;
pub use upstream_path::OperationPath;

use std::collections::HashSet;
use std::time::Duration;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use settlement::OpenReservation;
use spillway_shared::{Admission, BackendId, BackoffReason, Receipt, UpstreamHints};
use tokio::time::Instant;
use tracing::{Instrument, warn};

pub use admit::Inbound;
use admit::{ProxyRequest, admit};
use classify::BackoffPolicy;
use consumer_budget::ConsumerSpend;
use http_attempt::HttpSend;

use crate::config::RoutingConfig;
use crate::error::GatewayError;
use crate::proxy::fleet_view::MemberView;
use crate::proxy::tokens::{Operation, TokenEstimate};
use crate::routing_table::{Member, Pool};
use traffic_class::Class;

/// What survives across attempts of one request (pingora's per-request context).
#[derive(Default)]
struct Attempts {
    /// The pool and the consumer, once admission resolved them.
    pool: Option<spillway_shared::PoolName>,
    consumer: Option<String>,
    count: u32,
    last_backend: Option<BackendId>,
    failures: Vec<Failure>,
    /// Its traffic class, once admission knew it.
    class: Option<std::sync::Arc<str>>,
    /// Rules in shadow mode it crossed.
    marks: std::sync::Arc<shadow::Marks>,
}

struct Failure {
    backend: BackendId,
    reason: BackoffReason,
    /// How long the member was backed off for it.
    backoff: Duration,
    detail: String,
}

/// Serve one data-plane request; every response carries `x-spillway-backend` and
/// `x-spillway-attempts`.
pub async fn handle(gateway: &Gateway, inbound: Inbound) -> Response {
    let span = trace::request_span(&inbound.method, &inbound.headers);
    let received = Instant::now();
    let mut attempts = Attempts::default();
    let result = async {
        // Admission records the pool and consumer in `attempts` as soon as it knows them, so
        // a refusal is logged and counted with them.
        let mut request = admit(gateway, inbound, &mut attempts).await?;
        trace::record_admission(&tracing::Span::current(), &request);
        attempts.class = Some(request.class.name.clone());
        let quota = request.quota.take();
        let spend_cap = request.spend_cap.take();
        let consumer = request.consumer.as_ref();
        let budget = consumer_budget::reserve(gateway, consumer, request.estimate.total(), || {
            let name = consumer.map(|c| c.name.as_str());
            let (pool, class) = (request.pool.name.as_str(), &*request.class.name);
            attempts
                .marks
                .would_refuse(shadow::Rule::Budget, pool, name, class);
        })
        .await?;
        // The consumer's spend goes with the attempt that delivers (and is charged when its
        // answer ends); dropped unsettled when none does.
        let spend = ConsumerSpend {
            budget,
            quota: quota.map(|counter| (gateway.fleet.clone(), counter)),
            spend_cap: spend_cap.map(|counter| (gateway.fleet.clone(), counter)),
        };
        let mut send = HttpSend {
            request: &request,
            spend: Some(spend),
            marks: attempts.marks.clone(),
        };
        let placement = request.placement();
        let mut response = route(gateway, &placement, &mut send, &mut attempts).await?;
        consumer_budget::remaining_headers(
            gateway,
            request.consumer.as_ref(),
            response.headers_mut(),
        )
        .await;
        Ok::<_, GatewayError>(response)
    }
    .instrument(span.clone())
    .await;

    let error_code = result.as_ref().err().map(GatewayError::code);
    if let Err(refusal) = &result {
        log_refusal(refusal, &attempts, received);
    }
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    let backend = attempts
        .last_backend
        .as_ref()
        .map_or("none", BackendId::as_str);
    trace::record_response(
        &span,
        response.status().as_u16(),
        attempts.count,
        error_code,
    );
    if let Some(pool) = &attempts.pool {
        crate::ops::metrics::request_served(
            pool,
            attempts.last_backend.as_ref(),
            response.status().as_u16(),
            attempts.count,
        );
    }
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(backend) {
        headers.insert("x-spillway-backend", value);
    }
    headers.insert("x-spillway-attempts", HeaderValue::from(attempts.count));
    response
}

/// A refused request's access line and refusal time (a delivered one's are written when its
/// answer ends).
fn log_refusal(refusal: &GatewayError, attempts: &Attempts, received: Instant) {
    if let Some(pool) = &attempts.pool {
        crate::ops::metrics::refusal_duration(pool, received.elapsed());
    }
    crate::ops::access_log::write(&crate::ops::access_log::AccessRecord {
        consumer: attempts.consumer.as_deref(),
        pool: attempts.pool.as_ref().map(|p| p.as_str()),
        backend: attempts.last_backend.as_ref().map(BackendId::as_str),
        tier: None,
        attempts: attempts.count,
        status: refusal.status().as_u16(),
        tokens: None,
        latency: received.elapsed(),
        time_to_first_token: None,
        error: Some(refusal.code()),
        class: attempts.class.as_deref(),
        shadow: attempts.marks.names().as_deref(),
    });
}

/// Where a request may be placed and what it will cost: what `route` needs from any
/// operation, HTTP or Realtime.
struct Placement<'a> {
    pub pool: &'a Pool,
    /// Regions it may be served from (pool ∩ consumer); `None`: anywhere.
    pub regions: Option<&'a [String]>,
    /// Only this member may serve it.
    pub pinned: Option<&'a admit::Pinned>,
    pub estimate: TokenEstimate,
    pub cache_key: Option<u64>,
    pub view: &'a MemberView,
    pub operation: Operation,
    /// Its traffic class: the members it may use, its line on a PTU.
    pub class: &'a Class,
    /// Who sent it (for what shadow mode counts).
    pub consumer: Option<&'a str>,
}

/// One upstream attempt on a member `route` reserved: an HTTP send, or a WebSocket
/// handshake. Everything else (candidates, budgets, timeouts, backoff) is `route`'s.
trait Step {
    /// What a successful attempt hands back.
    type Delivered;
    /// How long the attempt may wait for its first byte (an answer, a stream's first chunk,
    /// an upgrade).
    fn first_byte_ms(&self, routing: &RoutingConfig) -> u64;
    fn attempt(
        &mut self,
        gateway: &Gateway,
        member: &Member,
        open: OpenReservation,
        timeout: Duration,
        policy: BackoffPolicy,
        traced: trace::Attempt,
    ) -> impl Future<Output = Result<Outcome<Self::Delivered>, GatewayError>> + Send;
}

/// Try members until one answers with something to deliver, within the attempt and time
/// budgets. Failed members are put in backoff in the shared state before moving on.
async fn route<S: Step>(
    gateway: &Gateway,
    placement: &Placement<'_>,
    step: &mut S,
    attempts: &mut Attempts,
) -> Result<S::Delivered, GatewayError> {
    let routing = &gateway.routing;
    let pool = placement.pool;
    let policy = BackoffPolicy {
        default: Duration::from_millis(routing.default_backoff_ms),
        max: Duration::from_millis(routing.max_backoff_ms),
    };
    let members = placement.members()?;
    let max_attempts = routing
        .max_attempts
        .map_or(members.len(), |n| n as usize)
        .min(members.len());
    let preferences = select::Preferences {
        own_region: gateway.region.clone(),
        explore_share: routing.explore_share,
        expected_output_tokens: placement.estimate.output,
        cache_key: placement.cache_key,
    };
    let deadline = Instant::now() + Duration::from_millis(routing.request_timeout_ms);
    let mut tried = HashSet::new();
    let mut refusal = None;

    gateway.retry_budget.deposit();
    while (attempts.count as usize) < max_attempts {
        // Moving on from a 429 is spill-over, the gateway's purpose, not a retry: only
        // failures spend the retry budget.
        let after_failure = attempts
            .failures
            .last()
            .is_some_and(|f| f.reason != BackoffReason::Throttled);
        if after_failure && !gateway.retry_budget.try_withdraw() {
            warn!(pool = %pool.name, "retry budget spent: not failing over this request");
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(GatewayError::GatewayTimeout(format!(
                "request timeout of {} ms reached after {} attempts",
                routing.request_timeout_ms, attempts.count
            )));
        }
        let order = select::candidate_order(
            &members,
            &tried,
            placement.view,
            &preferences,
            &mut rand::rng(),
        );
        let open = match reserve(gateway, placement, &order, (&attempts.marks, deadline)).await? {
            Ok(open) => open,
            Err(refused) => {
                refusal = Some(refused);
                break;
            }
        };
        let backend = open.backend().clone();
        let Some(member) = pool.member(&backend) else {
            break; // a store returning a non-candidate is a bug; never loop on it
        };
        tried.insert(backend.clone());
        attempts.count += 1;
        attempts.last_backend = Some(backend.clone());

        let timeout = remaining.min(Duration::from_millis(step.first_byte_ms(routing)));
        let traced = trace::attempt_span(
            &tracing::Span::current(),
            placement.operation,
            member,
            attempts.count,
        );
        match step
            .attempt(gateway, member, open, timeout, policy, traced)
            .await?
        {
            Outcome::Delivered(delivered) => return Ok(delivered),
            Outcome::Failed(failure) => attempts.failures.push(failure),
        }
    }
    Err(exhausted(placement, attempts, refusal))
}

impl Placement<'_> {
    /// The members it may go to. Data residency: members outside the allowed regions are
    /// never candidates. A pinned request has one: the member holding the response it names.
    /// Its class decides the rest (priority members, PAYG for a class that stays on PTU).
    fn members(&self) -> Result<Vec<&Member>, GatewayError> {
        let has_ptu = self.pool.members.iter().any(|m| m.backend.provisioned());
        let members: Vec<&Member> = self
            .pool
            .members_in(self.regions)
            .filter(|m| self.pinned.is_none_or(|p| p.backend == m.backend.id))
            .filter(|m| self.pinned.is_some() || self.class.may_use(m, has_ptu))
            .collect();
        if members.is_empty() {
            return Err(GatewayError::NoMemberInRegions {
                pool: self.pool.name.to_string(),
            });
        }
        Ok(members)
    }
}

/// Reserve the estimate on the first of `order` the fleet state admits it to, or say why
/// none would take it.
async fn reserve(
    gateway: &Gateway,
    placement: &Placement<'_>,
    order: &[&Member],
    (marks, deadline): (&shadow::Marks, Instant),
) -> Result<Result<OpenReservation, Refusal>, GatewayError> {
    let pool = placement.pool;
    let admission = class_rules::acquire(gateway, placement, order, (marks, deadline)).await?;
    Ok(match admission {
        Admission::Admitted {
            backend,
            reservation,
        } => Ok(OpenReservation::new(
            gateway.fleet.clone(),
            pool.name.clone(),
            backend,
            reservation,
        )),
        Admission::Exhausted {
            retry_after,
            throttled,
        } => Err(Refusal {
            retry_after,
            throttled,
        }),
    })
}

/// What became of one attempt.
enum Outcome<D> {
    /// Something to deliver (a success, or the client's own error): for HTTP the response,
    /// its body still streaming.
    Delivered(D),
    /// The member failed; it is backed off and its reservation released.
    Failed(Failure),
}

impl ProxyRequest {
    fn placement(&self) -> Placement<'_> {
        Placement {
            pool: &self.pool,
            regions: self.regions.as_deref(),
            pinned: self.pinned.as_ref(),
            estimate: self.estimate,
            cache_key: self.cache_key,
            view: &self.view,
            operation: self.operation,
            class: &self.class,
            consumer: self.consumer.as_ref().map(|c| c.name.as_str()),
        }
    }
}

/// Why an attempt failed, and what the member said on the way.
struct AttemptFailure {
    pub backoff: spillway_shared::Backoff,
    pub hints: UpstreamHints,
    pub detail: String,
    /// The member answered (with a status that is retried), rather than not at all.
    pub answered: bool,
}

/// Record a failed attempt, back its member off and release its reservation (one round
/// trip, in a task of its own so a client going away now cannot lose the backoff).
async fn fail<D>(
    pool: &spillway_shared::PoolName,
    open: OpenReservation,
    failed: AttemptFailure,
    span: &tracing::Span,
) -> Result<Outcome<D>, GatewayError> {
    let AttemptFailure {
        backoff,
        hints,
        detail,
        answered,
    } = failed;
    let backend = open.backend().clone();
    trace::record_failure(span, backoff.reason.as_str(), answered);
    warn!(
        parent: span,
        backend = %backend,
        reason = %backoff.reason,
        backoff_ms = backoff.duration.as_millis() as u64,
        %detail,
        "upstream attempt failed; backing off and trying the next member"
    );
    crate::ops::metrics::upstream_failure(pool.as_str(), backend.as_str(), backoff.reason.as_str());
    let receipt = Receipt {
        hints,
        backoff: Some(backoff),
        ..open.receipt(0)
    };
    open.settle(receipt).await?;
    Ok(Outcome::Failed(Failure {
        backend,
        reason: backoff.reason,
        backoff: backoff.duration,
        detail,
    }))
}

/// The error for a request no member would take: 429 when throttling or budgets are why
/// (with the time the first member frees up), 502/504 when this request's attempts failed,
/// 503 when every member is held back by earlier failures. No store call: the members this
/// request tried carry their backoffs, and the refusal covers the others.
fn exhausted(request: &Placement, attempts: &Attempts, refusal: Option<Refusal>) -> GatewayError {
    let retry_after = attempts
        .failures
        .iter()
        .map(|f| f.backoff)
        .chain(refusal.map(|r| r.retry_after))
        .filter(|d| !d.is_zero())
        .min()
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_millis(1));
    let name = request.pool.name.to_string();
    // Nowhere else to go: a pinned request waits for its member, whatever held it back.
    if let Some(pinned) = request.pinned {
        let held_back = attempts
            .failures
            .last()
            .is_none_or(|f| f.reason == BackoffReason::Throttled);
        if held_back {
            return GatewayError::OwnerBusy {
                response: pinned.response_id.clone(),
                retry_after,
            };
        }
    }

    let throttled = attempts
        .failures
        .iter()
        .any(|f| f.reason == BackoffReason::Throttled)
        || refusal.is_some_and(|r| r.throttled);
    if throttled && request.class.stays_on_ptu() {
        return GatewayError::ClassThrottled {
            pool: name,
            class: request.class.name.to_string(),
            retry_after,
        };
    }
    if throttled {
        return GatewayError::Throttled {
            pool: name,
            retry_after,
        };
    }
    let Some(last) = attempts.failures.last() else {
        return GatewayError::Unavailable {
            pool: name,
            retry_after,
        };
    };
    let summary = attempts
        .failures
        .iter()
        .map(|f| format!("{}: {}", f.backend, f.detail))
        .collect::<Vec<_>>()
        .join("; ");
    if last.reason == BackoffReason::Timeout {
        GatewayError::GatewayTimeout(summary)
    } else {
        GatewayError::BadGateway(summary)
    }
}

/// Why the fleet state admitted none of the remaining candidates.
#[derive(Clone, Copy, Debug)]
struct Refusal {
    retry_after: Duration,
    throttled: bool,
}
