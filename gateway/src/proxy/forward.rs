//! One upstream attempt: build the request for a member, add its credential, wait for the
//! response head and (for successes) its first body chunk.

use std::pin::Pin;
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use super::admit::{ProxyRequest, Route};
use super::upstream_path::{UpstreamApi, upstream_url};
use crate::routing_table::Member;

pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

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
    http: &reqwest::Client,
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
        let mut builder = build(http, member, request, span);
        if let Some((name, value)) = credential {
            builder = builder.header(name, value);
        }
        let mut response = builder.send().await.map_err(transport)?;
        let status = response.status();
        let headers = std::mem::take(response.headers_mut());
        let mut body: BodyStream = Box::pin(response.bytes_stream());
        let mut first = None;
        if status.is_success()
            && let Some(chunk) = body.next().await
        {
            first = Some(chunk.map_err(transport)?);
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

fn build(
    http: &reqwest::Client,
    member: &Member,
    request: &ProxyRequest,
    span: &tracing::Span,
) -> reqwest::RequestBuilder {
    let base = &member.backend.base_url;
    let url = match &request.route {
        Route::Deployment { operation } => upstream_url(
            base,
            UpstreamApi::Deployment(&member.deployment),
            operation,
            &request.query,
        ),
        Route::V1 { operation, api } | Route::Stored { operation, api } => {
            upstream_url(base, *api, operation, &request.query)
        }
    };
    // The shared body bytes, with this member's deployment as `model` on the v1 route.
    let body = request.body.for_member(&member.deployment);
    // The backend continues the attempt's trace (the client's, when it is not exported).
    let mut headers = request.headers.clone();
    super::trace::inject(span, &mut headers);
    http.request(request.method.clone(), url)
        .headers(headers)
        .body(body)
}

fn transport(e: reqwest::Error) -> TransportFailure {
    let kind = if e.is_timeout() {
        FailureKind::Timeout
    } else {
        FailureKind::Connection
    };
    TransportFailure {
        kind,
        detail: describe(&e),
    }
}

/// Error text for logs and client messages: the kind of failure, never a credential.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "response body failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut root = None;
    while let Some(s) = source {
        root = Some(s.to_string());
        source = s.source();
    }
    match root {
        Some(root) => format!("{kind}: {root}"),
        None => kind.to_string(),
    }
}
