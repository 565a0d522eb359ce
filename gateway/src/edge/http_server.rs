//! The connection loop both listeners run: HTTP/1.1 and HTTP/2 (h2c), with the limits an
//! exposed edge needs (request-head time, header count and size, connections at once, idle
//! connections closed), and graceful shutdown. axum's own `serve` has none of these knobs, so
//! connections are served by hyper-util.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
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
    /// Connections served at once; past it the listener stops accepting (the kernel's
    /// backlog holds the rest) until one closes.
    pub max_connections: usize,
    /// A connection (HTTP/1.1 or HTTP/2) with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    pub fn from_config(server: &ServerConfig) -> Self {
        Self {
            header_timeout: Duration::from_millis(server.header_timeout_ms),
            max_headers: server.max_headers,
            max_header_bytes: server.max_header_bytes,
            drain_timeout: Duration::from_millis(server.drain_timeout_ms),
            max_connections: server.max_connections,
            idle_timeout: Duration::from_millis(server.idle_timeout_ms),
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
    // One permit per open connection: the cap, and (all permits back) the end of the drain.
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let open = Arc::new(Semaphore::new(max));
    let (stopping, stop) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit.expect("never closed"),
            () = &mut shutdown => break,
        };
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
        let (builder, router, tls, stop) =
            (builder.clone(), router.clone(), tls.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut stopping = stop.clone();
            tokio::select! {
                sends = sends_within(&stream, limits.header_timeout) => if !sends {
                    return; // silent connection: never reaches hyper
                },
                // Stopping: a connection that has sent nothing yet is simply closed.
                _ = stopping.wait_for(|stopping| *stopping) => return,
            }
            let Some(tls) = tls else {
                return serve_connection(&builder, stream, router, limits, stop).await;
            };
            match tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(&builder, stream, router, limits, stop).await,
                Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                Err(_) => debug!("TLS handshake timed out"),
            }
        });
    }
    // Connections finish their in-flight requests (HTTP/1 closes after the current
    // answer, HTTP/2 sends GOAWAY), within the drain timeout.
    stopping.send_replace(true);
    let all_closed = open.acquire_many(u32::try_from(max).unwrap_or(u32::MAX));
    if tokio::time::timeout(limits.drain_timeout, all_closed)
        .await
        .is_err()
    {
        tracing::warn!(
            drain_timeout_ms = limits.drain_timeout.as_millis() as u64,
            "drain timeout reached: closing the connections still open"
        );
    }
}

/// Serve one connection until it ends; closed gracefully when the server stops or when no
/// request has been in flight for the idle timeout.
async fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    stream: S,
    router: Router,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let activity = Arc::new(Activity::default());
    let idle = activity.clone();
    // Each request is in flight from its head until its answer's body is done, or until
    // it is dropped (a reset stream, a client gone): the guard travels with it.
    let counted = tower::service_fn(move |request: Request<hyper::body::Incoming>| {
        let guard = InFlight::begin(activity.clone());
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await;
            response.map(|response| {
                response.map(|body| {
                    Body::new(EndsActivity {
                        body,
                        _guard: guard,
                    })
                })
            })
        }
    });
    let service = TowerToHyperService::new(counted);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let why = tokio::select! {
        ended = connection.as_mut() => {
            if let Err(e) = ended {
                debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|stopping| *stopping) => "server stopping",
        () = idle.idle_for(limits.idle_timeout) => "idle",
    };
    debug!(why, "closing the connection gracefully");
    connection.as_mut().graceful_shutdown();
    if let Err(e) = connection.await {
        debug!(error = %e, "connection ended with an error");
    }
}

/// Requests in flight on one connection, and when the last one ended (milliseconds since
/// the connection opened: an atomic, no lock on the request path).
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    opened: tokio::time::Instant,
    idle_since_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            opened: tokio::time::Instant::now(),
            idle_since_ms: AtomicU64::new(0),
        }
    }
}

/// One request in flight, counted until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    /// Mark now as the last activity.
    fn touch(&self) {
        let now = self.opened.elapsed().as_millis() as u64;
        self.idle_since_ms.store(now, Ordering::Relaxed);
    }

    /// Resolves once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let since = self.idle_since_ms.load(Ordering::Relaxed);
            tokio::time::sleep_until(self.opened + Duration::from_millis(since) + timeout).await;
            let still = self.idle_since_ms.load(Ordering::Relaxed) == since;
            if still && self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            if still {
                // Busy with a long answer: look again a timeout later.
                self.touch();
            }
        }
    }
}

/// A response body that keeps its request in flight until it is finished or dropped.
struct EndsActivity {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for EndsActivity {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
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
