//! The HTTP client of the hot path: hyper-util's pooled client over a rustls connector
//! (HTTP/1.1, and HTTP/2 where the backend offers it by ALPN). reqwest, built on the same
//! two crates, stays where its conveniences matter (Entra and identity tokens, JWKS); here it
//! cost a redirect layer that parses every request's URL twice (about a quarter of the
//! gateway's instructions per request) and a task of its own per connection set-up.
//!
//! Like the reqwest client it replaces: redirects are never followed (the client gets the
//! 3xx; a request and its credential go only where the routing table says), idle connections
//! are kept 60 s, connecting has its own timeout, and certificates are checked by the same
//! platform verifier (the system's trust roots; `SSL_CERT_FILE` / `SSL_CERT_DIR` honoured).

use std::time::Duration;

use axum::http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::outgoing_body::Chunks;

/// A pooled client for upstream calls; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<HttpsConnector<HttpConnector>, Chunks>,
}

/// The attempt got no response head (connecting, TLS, writing the request or reading the
/// head failed).
pub type SendError = hyper_util::client::legacy::Error;

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> Result<Self, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false); // the TLS layer above takes https URLs
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let https = HttpsConnectorBuilder::new()
            .with_provider_and_platform_verifier(provider)
            .map_err(|e| format!("cannot set up upstream TLS: {e}"))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Self { inner })
    }

    /// Send `request`; the answer's head, its body still streaming.
    pub async fn send(&self, request: Request<Chunks>) -> Result<Response<Incoming>, SendError> {
        self.inner.request(request).await
    }
}

/// Whether a send failed because connecting took longer than the connect timeout.
pub fn timed_out(e: &SendError) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        source = s.source();
    }
    false
}
