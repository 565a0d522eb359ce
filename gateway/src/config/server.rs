//! `[server]`: listeners, request and connection limits, TLS, the stop sequence.

use super::*;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data plane: the OpenAI / Azure OpenAI API, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Operators only (metrics, admin API); loopback by default. Bound anywhere else, it
    /// requires `admin_token_env`.
    pub admin_listen: SocketAddr,
    /// Environment variable holding the bearer token the admin listener requires.
    pub admin_token_env: Option<String>,
    /// Host names the admin listener answers to besides IP addresses and `localhost` (e.g.
    /// `spillway-admin.internal`); a request naming any other host is refused (DNS rebinding).
    pub admin_hosts: Vec<String>,
    /// Largest request body accepted, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Bytes of request bodies one replica holds at once, all requests together: past it a
    /// request is refused with 503 before its body is read. Sized so bodies and what admission
    /// builds from them stay inside the container's memory limit (512 MiB in the shipped
    /// Deployment); at least `max_body_bytes`.
    pub max_inflight_body_bytes: usize,
    /// A body over the limit is still read (and discarded) up to this many bytes, so the
    /// client, still sending, can read its 413; past it the connection is closed.
    pub max_drain_bytes: usize,
    /// A client must send its request head (line and headers) within this time.
    pub header_timeout_ms: u64,
    /// A client must send its whole request body within this time (408 otherwise).
    pub body_timeout_ms: u64,
    /// Most header fields in one request (431 above it).
    pub max_headers: usize,
    /// Largest request head in bytes (431 above it); at least 8192.
    pub max_header_bytes: usize,
    /// Requests (streams and Realtime sessions included) one replica serves at once; past
    /// it, 503 at once.
    pub max_concurrent_requests: usize,
    /// Connections one listener serves at once; past it, new ones wait in the kernel's
    /// backlog until one closes.
    pub max_connections: usize,
    /// A connection (HTTP/1.1 or HTTP/2) with no request in flight for this long is closed
    /// (above Application Gateway's 4-minute backend idle time, so the gateway is not the
    /// one to close a connection the load balancer is about to reuse).
    pub idle_timeout_ms: u64,
    /// Largest Realtime (WebSocket) message, either way, in bytes: a larger one closes the
    /// session (1009).
    pub max_ws_message_bytes: usize,
    /// This replica's region: its members win ties.
    pub region: Option<String>,
    /// After SIGTERM: /readyz answers 503 at once, and everything is still served this long,
    /// so load balancers stop sending first.
    pub shutdown_delay_ms: u64,
    /// Then new connections are refused and in-flight requests (streams too) get this long
    /// to finish.
    pub drain_timeout_ms: u64,
    /// Terminate TLS on the data plane (off by default: Application Gateway or Front Door
    /// usually does).
    pub tls: Option<TlsConfig>,
    /// Serve a data plane beyond loopback with no `[[consumers]]` and no `[auth.jwt]`: anyone
    /// who reaches it spends the backends' capacity. Off: such a configuration is refused.
    pub allow_anonymous: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server certificate first, then its chain.
    pub cert_file: std::path::PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_token_env: None,
            admin_hosts: Vec::new(),
            max_body_bytes: 16 * 1024 * 1024,
            max_inflight_body_bytes: 64 * 1024 * 1024,
            max_drain_bytes: 64 * 1024 * 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_concurrent_requests: 1_024,
            max_connections: 10_000,
            idle_timeout_ms: 300_000,
            // A second of 24 kHz 16-bit audio is 64 KiB as base64: room for long chunks.
            max_ws_message_bytes: 4 * 1024 * 1024,
            region: None,
            shutdown_delay_ms: 5_000,
            drain_timeout_ms: 20_000,
            tls: None,
            allow_anonymous: false,
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self, resolve: Resolve, bad: &mut impl FnMut(String, String)) {
        if let Some(tls) = &self.tls
            && resolve == Resolve::Online
            && let Err(e) = tls.identity()
        {
            bad("server.tls".into(), e);
        }
        for (key, value) in [
            ("server.max_body_bytes", self.max_body_bytes as u64),
            ("server.header_timeout_ms", self.header_timeout_ms),
            ("server.body_timeout_ms", self.body_timeout_ms),
            ("server.max_headers", self.max_headers as u64),
            (
                "server.max_concurrent_requests",
                self.max_concurrent_requests as u64,
            ),
            (
                "server.max_ws_message_bytes",
                self.max_ws_message_bytes as u64,
            ),
            ("server.max_connections", self.max_connections as u64),
            ("server.idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if value == 0 {
                bad(key.into(), "must be greater than 0".into());
            }
        }
        if self.max_inflight_body_bytes < self.max_body_bytes {
            bad(
                "server.max_inflight_body_bytes".into(),
                format!(
                    "must be at least max_body_bytes ({}), or the largest body could never be admitted",
                    self.max_body_bytes
                ),
            );
        }
        if self.max_body_bytes > u32::MAX as usize {
            bad(
                "server.max_body_bytes".into(),
                "must be at most 4294967295".into(),
            );
        }
        if self.max_header_bytes < 8_192 {
            bad(
                "server.max_header_bytes".into(),
                "must be at least 8192".into(),
            );
        }
        match &self.admin_token_env {
            Some(var) => check_env(resolve, bad, "server.admin_token_env".into(), var),
            None if !self.admin_listen.ip().is_loopback() => bad(
                "server.admin_token_env".into(),
                format!(
                    "admin_listen {} is not a loopback address: set admin_token_env to the environment variable holding the admin bearer token",
                    self.admin_listen
                ),
            ),
            None => {}
        }
    }
}

impl TlsConfig {
    /// The TLS identity `[server.tls]` names; an unreadable or mismatched certificate or key
    /// is an error naming the file. The edge adds ALPN to it (`edge::tls`).
    pub fn identity(&self) -> Result<rustls::ServerConfig, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|e| format!("cannot read {}: {e}", self.cert_file.display()))?;
        if certs.is_empty() {
            return Err(format!("no certificate in {}", self.cert_file.display()));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| format!("cannot read {}: {e}", self.key_file.display()))?;
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("certificate and key do not make a TLS identity: {e}"))
    }
}
