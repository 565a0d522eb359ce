//! TLS termination for the data plane (rustls), for deployments without a TLS-terminating
//! front such as Application Gateway. Off unless `[server.tls]` names a certificate chain
//! and its key (PEM). HTTP/2 and HTTP/1.1 are offered by ALPN.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The acceptor for `[server.tls]`; an unreadable or mismatched certificate or key is an error
/// naming the file.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, String> {
    let mut server = config.identity()?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}
