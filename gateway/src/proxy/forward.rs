//! One upstream attempt: build the request for a member, add its credential, wait for the
//! response head and (for successes) its first body chunk.

use std::pin::Pin;
use std::time::Duration;

use axum::http::{HeaderMap, Request, StatusCode};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::BodyDataStream;

use super::admit::{ProxyRequest, Route};
use super::outgoing_body::Chunks;
use super::upstream_client::{self, SendError, UpstreamClient};
use super::upstream_path::{UpstreamApi, upstream_uri};
use crate::routing_table::Member;

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, hyper::Error>> + Send>>;

/// A response head from upstream with its body still streaming.
pub struct Upstream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body's first chunk, already read (success responses), then the rest.
    pub first: Option<Bytes>,
    pub body: BodyStream,
    /// When the attempt started, and how long until the first body byte (or the head,
    /// for answers that are not successes).
    pub started: tokio::time::Instant,
    pub ttfb: Duration,
}

/// The attempt got no usable response.
#[derive(Debug)]
pub struct TransportFailure {
    pub kind: FailureKind,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Refused, reset, TLS or protocol failure.
    Connection,
    /// Nothing within the attempt's time.
    Timeout,
    /// No credential could be had for the backend (token endpoint down).
    Credential,
}

/// Send `request` to `member`. Success responses are committed only once their first body
/// chunk has arrived, so a backend that fails before sending anything can still be retried.
pub async fn send(
    http: &UpstreamClient,
    member: &Member,
    request: &ProxyRequest,
    timeout: Duration,
    span: &tracing::Span,
) -> Result<Upstream, TransportFailure> {
    let started = tokio::time::Instant::now();
    let attempt = async {
        let credential =
            member
                .backend
                .credential
                .header()
                .await
                .map_err(|detail| TransportFailure {
                    kind: FailureKind::Credential,
                    detail,
                })?;
        let mut outgoing = build(member, request, span);
        if let Some((name, value)) = credential {
            outgoing.headers_mut().insert(name, value);
        }
        let response = http.send(outgoing).await.map_err(transport)?;
        let (head, incoming) = response.into_parts();
        let (status, headers) = (head.status, head.headers);
        let mut body: BodyStream = Box::pin(BodyDataStream::new(incoming));
        let mut first = None;
        if status.is_success()
            && let Some(chunk) = body.next().await
        {
            first = Some(chunk.map_err(broken_body)?);
        }
        Ok(Upstream {
            status,
            headers,
            first,
            body,
            started,
            ttfb: started.elapsed(),
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(TransportFailure {
            kind: FailureKind::Timeout,
            detail: format!("no response within {} ms", timeout.as_millis()),
        }),
    }
}

/// The request for `member`: its URL, the client's forwarded headers and this member's body.
fn build(member: &Member, request: &ProxyRequest, span: &tracing::Span) -> Request<Chunks> {
    let base = &member.backend.upstream;
    let uri = match &request.route {
        Route::Deployment { operation } => upstream_uri(
            base,
            UpstreamApi::Deployment(&member.deployment),
            operation,
            &request.query,
        ),
        Route::V1 { operation, api } | Route::Stored { operation, api } => {
            upstream_uri(base, *api, operation, &request.query)
        }
    };
    // The shared body bytes, with this member's deployment as `model` on the v1 route, and
    // priority processing asked of a priority member.
    let priority = member.backend.kind == crate::config::BackendKind::Priority;
    let mut outgoing = Request::new(request.body.for_member(&member.deployment, priority));
    *outgoing.method_mut() = request.method.clone();
    *outgoing.uri_mut() = uri;
    // The backend continues the attempt's trace (the client's, when it is not exported).
    let headers = outgoing.headers_mut();
    headers.clone_from(&request.headers);
    super::trace::inject(span, headers);
    outgoing
}

fn transport(e: SendError) -> TransportFailure {
    let kind = if upstream_client::timed_out(&e) {
        FailureKind::Timeout
    } else {
        FailureKind::Connection
    };
    let what = if e.is_connect() {
        "connection failed"
    } else if kind == FailureKind::Timeout {
        "timed out"
    } else {
        "request failed"
    };
    TransportFailure {
        kind,
        detail: describe(what, &e),
    }
}

/// The answer's head came, then its body broke before its first chunk.
fn broken_body(e: hyper::Error) -> TransportFailure {
    TransportFailure {
        kind: FailureKind::Connection,
        detail: describe("response body failed", &e),
    }
}

/// Error text for logs and client messages: the kind of failure and its root cause, never a
/// credential (no error here carries a header).
fn describe(kind: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut source = e.source();
    let mut root = None;
    while let Some(s) = source {
        root = Some(s.to_string());
        source = s.source();
    }
    match root {
        Some(root) => format!("{kind}: {root}"),
        None => format!("{kind}: {e}"),
    }
}
