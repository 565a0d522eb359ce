//! `spillway serve`: choose the fleet-state store, bind the data plane, run until a signal.

use std::sync::Arc;

use spillway_shared::{EmbeddedState, FleetState};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::app::{Gateway, app};
use crate::config::{Config, ConfigError, ConfigProblem};

/// The fleet-state store the configuration asks for.
pub fn fleet_state(config: &Config) -> Result<Arc<dyn FleetState>, ConfigError> {
    match &config.state.redis_url {
        None => Ok(Arc::new(EmbeddedState::new(config.state.windows()))),
        Some(_) => Err(ConfigError::Invalid(vec![ConfigProblem {
            key: "state.redis_url".into(),
            problem:
                "the Redis store is not in this build yet; remove the key to use the embedded store"
                    .into(),
        }])),
    }
}

pub async fn serve(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let fleet = fleet_state(&config)?;
    let gateway = Gateway::from_config(&config, fleet)?;
    if gateway.consumers.is_open() {
        warn!("no [[consumers]] configured: the data plane accepts requests without a key");
    }
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("server.listen: cannot bind {}: {e}", config.server.listen))?;
    info!(listen = %listener.local_addr()?, pools = gateway.table.pools().count(), "spillway serving");
    axum::serve(listener, app(Arc::new(gateway)))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    info!("spillway stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM (container stop) ends the server after in-flight requests finish.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
