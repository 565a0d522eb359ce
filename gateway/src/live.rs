//! The running configuration, swappable. SIGHUP or `POST /admin/reload` reads the
//! configuration file again, builds a new [`Gateway`] (backends, budgets, consumers, pools,
//! routing, headers) and swaps it in; requests in flight finish on the one they started with,
//! so none is dropped. An invalid file, or one changing what only a restart can change
//! (listeners, TLS, the state store, telemetry), is refused with the keys named, and the
//! running configuration stays.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use spillway_shared::FleetState;
use tracing::{info, warn};

use crate::config::Config;
use crate::proxy::Gateway;

pub struct Live {
    current: ArcSwap<Gateway>,
    /// Where the configuration comes from; `None`: not reloadable.
    source: Option<PathBuf>,
    /// The state store the gateways share, as built (before the gateway's timing layer).
    fleet: Arc<dyn FleetState>,
}

impl Live {
    pub fn new(
        gateway: Arc<Gateway>,
        source: Option<PathBuf>,
        fleet: Arc<dyn FleetState>,
    ) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::new(gateway),
            source,
            fleet,
        })
    }

    /// A gateway that is never reloaded (tests, the demo).
    pub fn fixed(gateway: Arc<Gateway>) -> Arc<Self> {
        let fleet = gateway.fleet.clone();
        Self::new(gateway, None, fleet)
    }

    pub fn get(&self) -> Arc<Gateway> {
        self.current.load_full()
    }

    /// Read the configuration again and swap it in, or say why not.
    pub fn reload(&self) -> Result<(), String> {
        let outcome = self.try_reload();
        match &outcome {
            Ok(()) => info!("configuration reloaded"),
            Err(e) => {
                warn!(error = %e, "configuration reload refused; the running configuration stays")
            }
        }
        outcome
    }

    fn try_reload(&self) -> Result<(), String> {
        let Some(path) = &self.source else {
            return Err("this replica was started without a configuration file".into());
        };
        let config = Config::load(Some(path)).map_err(|e| e.to_string())?;
        let running = self.get();
        restart_only_changes(&running.config, &config)?;
        let mut next =
            Gateway::from_config(&config, self.fleet.clone()).map_err(|e| e.to_string())?;
        // What belongs to the replica, not to the configuration, carries over.
        next.slots = running.slots.clone();
        next.body_limits = next
            .body_limits
            .clone()
            .sharing_budget_with(&running.body_limits);
        next.view = running.view.clone();
        next.draining = std::sync::atomic::AtomicBool::new(
            running.draining.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.current.store(Arc::new(next));
        Ok(())
    }
}

/// Refuse a configuration that changes what only a restart can change.
fn restart_only_changes(running: &Config, next: &Config) -> Result<(), String> {
    let json = |c: &Config| serde_json::to_value(c).unwrap_or_default();
    let (running, next) = (json(running), json(next));
    let changed: Vec<&str> = [
        "/server/listen",
        "/server/admin_listen",
        "/server/tls",
        "/server/max_concurrent_requests",
        "/server/max_inflight_body_bytes",
        "/server/max_connections",
        "/server/idle_timeout_ms",
        // The connection loop and the stop sequence are built with these at start.
        "/server/header_timeout_ms",
        "/server/max_headers",
        "/server/max_header_bytes",
        "/server/shutdown_delay_ms",
        "/server/drain_timeout_ms",
        "/state",
        "/telemetry",
    ]
    .into_iter()
    .filter(|key| running.pointer(key) != next.pointer(key))
    .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = changed
        .iter()
        .map(|k| k.trim_start_matches('/').replace('/', "."))
        .collect();
    Err(format!("{}: changes need a restart", keys.join(", ")))
}

/// The gateway a request is served by: the current one when it arrived.
pub struct Current(pub Arc<Gateway>);

impl FromRequestParts<Arc<Live>> for Current {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, live: &Arc<Live>) -> Result<Self, Self::Rejection> {
        Ok(Current(live.get()))
    }
}
