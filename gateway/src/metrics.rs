//! Prometheus metrics for operators, served on the admin listener (`GET /metrics`).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use spillway_shared::FleetState;

/// The process-wide recorder, installed on first use (one per process: tests run several
/// gateways in one).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// One client request answered.
pub fn request_served(pool: &str, backend: &str, status: u16, attempts: u32) {
    let labels = [
        ("pool", pool.to_owned()),
        ("backend", backend.to_owned()),
        ("status", status.to_string()),
    ];
    metrics::counter!("spillway_requests_total", &labels).increment(1);
    metrics::counter!("spillway_upstream_attempts_total", "pool" => pool.to_owned())
        .increment(u64::from(attempts));
}

/// One upstream attempt failed and the member was backed off (or counted by its breaker).
pub fn upstream_failure(pool: &str, backend: &str, reason: &str) {
    let labels = [
        ("pool", pool.to_owned()),
        ("backend", backend.to_owned()),
        ("reason", reason.to_owned()),
    ];
    metrics::counter!("spillway_upstream_failures_total", &labels).increment(1);
}

/// A request refused at once because the replica was at `server.max_concurrent_requests`.
pub fn request_shed() {
    metrics::counter!("spillway_requests_shed_total").increment(1);
}

/// The exposition text, with the state store's health read now.
pub fn render(fleet: &dyn FleetState) -> String {
    let health = fleet.health();
    metrics::gauge!("spillway_fleet_state_degraded").set(if health.degraded { 1.0 } else { 0.0 });
    metrics::gauge!("spillway_fleet_state_fallback_decisions")
        .set(health.fallback_decisions as f64);
    handle().render()
}
