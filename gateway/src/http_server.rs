//! The connection loop both listeners run: HTTP/1.1 and HTTP/2 (h2c), with the limits an
//! exposed edge needs (request-head time, header count and size), and graceful shutdown.
//! axum's own `serve` has none of these knobs, so connections are served by hyper-util.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use crate::config::ServerConfig;

/// Per-connection limits, from `[server]`.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// The whole request head must arrive within this time; a connection that sends
    /// nothing at all is closed after it too.
    pub header_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// After the shutdown signal, open connections get this long to finish.
    pub drain_timeout: Duration,
}

impl ConnectionLimits {
    pub fn from_config(server: &ServerConfig) -> Self {
        Self {
            header_timeout: Duration::from_millis(server.header_timeout_ms),
            max_headers: server.max_headers,
            max_header_bytes: server.max_header_bytes,
            drain_timeout: Duration::from_millis(server.drain_timeout_ms),
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::from_config(&ServerConfig::default())
    }
}

/// Serve `router` on `listener` until `shutdown` resolves, then let open connections finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, router, limits, None, shutdown).await
}

/// [`serve`], over TLS: each connection's handshake must end within the head timeout.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: TlsAcceptor,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, router, limits, Some(tls), shutdown).await
}

async fn serve_with(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let builder = builder(limits);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let service = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            if !sends_within(&stream, limits.header_timeout).await {
                return; // silent connection: never reaches hyper
            }
            let Some(tls) = tls else {
                let connection =
                    builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(connection.into_owned()).await {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            };
            let stream = match tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return debug!(error = %e, "TLS handshake failed"),
                Err(_) => return debug!("TLS handshake timed out"),
            };
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // Connections finish their in-flight requests (HTTP/1 closes after the current
    // answer, HTTP/2 sends GOAWAY), within the drain timeout.
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_timeout_ms = limits.drain_timeout.as_millis() as u64,
            "drain timeout reached: closing the connections still open"
        );
    }
}

fn builder(limits: ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// True when the client sends its first byte within `timeout`. hyper's head timeout starts
/// once it reads a request; this covers the protocol sniffing before that.
async fn sends_within(stream: &TcpStream, timeout: Duration) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(timeout, stream.peek(&mut first)).await,
        Ok(Ok(n)) if n > 0
    )
}
