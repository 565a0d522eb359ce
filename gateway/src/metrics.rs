//! Prometheus metrics for operators, served on the admin listener (`GET /metrics`).

use std::sync::OnceLock;

use metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use spillway_shared::{BackendId, FleetState, PoolName};

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

/// One client request answered (`backend`: the last member tried, if any).
pub fn request_served(pool: &PoolName, backend: Option<&BackendId>, status: u16, attempts: u32) {
    let counters = served_counters(pool, backend, status);
    counters.requests.increment(1);
    counters.attempts.increment(u64::from(attempts));
}

/// The counters a served request increments, registered once per label set: building a
/// metric key allocates and hashes its labels, about 4k instructions a request (callgrind).
#[derive(Clone)]
struct ServedCounters {
    requests: Counter,
    attempts: Counter,
}

type ServedKey = (PoolName, Option<BackendId>, u16);

fn served_counters(pool: &PoolName, backend: Option<&BackendId>, status: u16) -> ServedCounters {
    // Label sets are bounded by the configuration (pools x members x statuses); the cache's
    // bound only guards against a status flood, and an evicted set is registered again.
    static COUNTERS: OnceLock<quick_cache::sync::Cache<ServedKey, ServedCounters>> =
        OnceLock::new();
    let cache = COUNTERS.get_or_init(|| quick_cache::sync::Cache::new(4096));
    let key = (pool.clone(), backend.cloned(), status);
    let register = || {
        handle(); // a handle taken before the recorder exists would count nothing
        let backend = backend.map_or("none", BackendId::as_str);
        let labels = [
            ("pool", pool.as_str().to_owned()),
            ("backend", backend.to_owned()),
            ("status", status.to_string()),
        ];
        Ok::<_, std::convert::Infallible>(ServedCounters {
            requests: metrics::counter!("spillway_requests_total", &labels),
            attempts: metrics::counter!(
                "spillway_upstream_attempts_total",
                "pool" => pool.as_str().to_owned()
            ),
        })
    };
    match cache.get_or_insert_with(&key, register) {
        Ok(counters) => counters,
        Err(never) => match never {},
    }
}

/// Prompt tokens a pool's answers reported, and how many of them came from the prompt
/// cache (the share is the cache hit rate).
pub fn prompt_tokens(pool: &PoolName, prompt: u64, cached: u64) {
    static COUNTERS: OnceLock<quick_cache::sync::Cache<PoolName, (Counter, Counter)>> =
        OnceLock::new();
    let cache = COUNTERS.get_or_init(|| quick_cache::sync::Cache::new(1024));
    let register = || {
        handle();
        Ok::<_, std::convert::Infallible>((
            metrics::counter!("spillway_prompt_tokens_total", "pool" => pool.as_str().to_owned()),
            metrics::counter!(
                "spillway_cached_prompt_tokens_total",
                "pool" => pool.as_str().to_owned()
            ),
        ))
    };
    let (all, from_cache) = match cache.get_or_insert_with(pool, register) {
        Ok(counters) => counters,
        Err(never) => match never {},
    };
    all.increment(prompt);
    from_cache.increment(cached);
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
