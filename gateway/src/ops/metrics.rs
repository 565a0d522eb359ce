//! Prometheus metrics for operators, served on the admin listener (`GET /metrics`).

use std::sync::OnceLock;

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use spillway_shared::{BackendId, BackoffReason, FleetState, PoolName};

/// Buckets of the latency histograms (seconds): a fast embedding to a long stream.
const SECONDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets of real over estimated prompt tokens (1 = exact).
const RATIO: [f64; 11] = [0.25, 0.5, 0.75, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0];
/// Buckets of fleet-state calls (seconds): a Redis round trip to the fallback's budget.
const STATE_SECONDS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// An OTLP recorder to feed besides Prometheus, set by `crate::ops::telemetry` before the
/// recorder is installed.
static ALSO_OTLP: std::sync::Mutex<Option<crate::ops::otel_metrics::OtelRecorder>> =
    std::sync::Mutex::new(None);

/// Also push every metric over OTLP (call before anything is counted).
pub fn also_export(recorder: crate::ops::otel_metrics::OtelRecorder) {
    *ALSO_OTLP.lock().expect("recorder lock") = Some(recorder);
}

/// The process-wide recorder, installed on first use (one per process: tests run several
/// gateways in one).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Histograms, not summaries: they aggregate across replicas.
        let prometheus = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("spillway_fleet_state_call_seconds".into()),
                    &STATE_SECONDS,
                )
            })
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("spillway_token_estimate_ratio".into()),
                    &RATIO,
                )
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let handle = prometheus.handle();
        keep_up(handle.clone());
        let otlp = ALSO_OTLP.lock().expect("recorder lock").take();
        match otlp {
            Some(otlp) => {
                let fanout = metrics_util::layers::FanoutBuilder::default()
                    .add_recorder(prometheus)
                    .add_recorder(otlp)
                    .build();
                let _ = metrics::set_global_recorder(fanout);
            }
            None => {
                let _ = metrics::set_global_recorder(prometheus);
            }
        }
        handle
    })
}

/// How often histograms' recorded samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A histogram keeps every sample recorded until it is rendered or upkept: with no scrape
/// (no Prometheus, OTLP only, a laptop), memory grew by about 90 bytes a request (a
/// 5-minute soak at 2,000 requests/s, `scripts/memory.sh`). One thread folds them in.
fn keep_up(handle: PrometheusHandle) {
    let started = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "metrics: no upkeep thread; histograms grow until scraped");
    }
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

/// Who served an answer, for its metrics: bounded by the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AnswerLabels {
    pub pool: PoolName,
    pub backend: BackendId,
    pub tier: u32,
    pub consumer: Option<String>,
    /// The request's traffic class.
    pub class: std::sync::Arc<str>,
}

#[derive(Clone)]
struct AnswerMetrics {
    input_tokens: Counter,
    output_tokens: Counter,
    duration: Histogram,
    first_token: Histogram,
    estimate_ratio: Histogram,
}

/// An answer ended: its tokens (by pool, member, tier and consumer), its duration and time
/// to first token, and how far its prompt estimate was from the real count.
pub fn answer_finished(
    labels: &AnswerLabels,
    duration: Duration,
    first_token: Option<Duration>,
    usage: Option<(u64, u64)>,
    estimated_prompt: u64,
) {
    static METRICS: OnceLock<quick_cache::sync::Cache<AnswerLabels, AnswerMetrics>> =
        OnceLock::new();
    let cache = METRICS.get_or_init(|| quick_cache::sync::Cache::new(4096));
    let register = || {
        handle();
        let consumer = labels.consumer.clone().unwrap_or_else(|| "none".into());
        let tokens = |direction: &'static str| {
            let labels = [
                ("pool", labels.pool.as_str().to_owned()),
                ("backend", labels.backend.as_str().to_owned()),
                ("tier", labels.tier.to_string()),
                ("consumer", consumer.clone()),
                ("class", labels.class.to_string()),
                ("direction", direction.to_owned()),
            ];
            metrics::counter!("spillway_tokens_total", &labels)
        };
        let by_member = [
            ("pool", labels.pool.as_str().to_owned()),
            ("backend", labels.backend.as_str().to_owned()),
        ];
        Ok::<_, std::convert::Infallible>(AnswerMetrics {
            input_tokens: tokens("input"),
            output_tokens: tokens("output"),
            duration: metrics::histogram!("spillway_request_duration_seconds", &by_member),
            first_token: metrics::histogram!("spillway_time_to_first_token_seconds", &by_member),
            estimate_ratio: metrics::histogram!(
                "spillway_token_estimate_ratio",
                "pool" => labels.pool.as_str().to_owned()
            ),
        })
    };
    let m = match cache.get_or_insert_with(labels, register) {
        Ok(m) => m,
        Err(never) => match never {},
    };
    m.duration.record(duration.as_secs_f64());
    if let Some(first) = first_token {
        m.first_token.record(first.as_secs_f64());
    }
    if let Some((input, output)) = usage {
        m.input_tokens.increment(input);
        m.output_tokens.increment(output);
        if estimated_prompt > 0 && input > 0 {
            m.estimate_ratio
                .record(input as f64 / estimated_prompt as f64);
        }
    }
}

/// A request answered by the gateway itself (an error, no upstream answer to relay).
pub fn refusal_duration(pool: &PoolName, duration: Duration) {
    metrics::histogram!(
        "spillway_request_duration_seconds",
        "pool" => pool.as_str().to_owned(),
        "backend" => "none"
    )
    .record(duration.as_secs_f64());
}

/// One fleet-state call and how long it took (`op`: acquire, settle, snapshot, ...).
pub fn fleet_state_call(op: &'static str, took: Duration) {
    static HISTOGRAMS: OnceLock<quick_cache::sync::Cache<&'static str, Histogram>> =
        OnceLock::new();
    let cache = HISTOGRAMS.get_or_init(|| quick_cache::sync::Cache::new(64));
    let register = || {
        handle();
        Ok::<_, std::convert::Infallible>(metrics::histogram!(
            "spillway_fleet_state_call_seconds",
            "op" => op
        ))
    };
    match cache.get_or_insert_with(&op, register) {
        Ok(h) => h.record(took.as_secs_f64()),
        Err(never) => match never {},
    }
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

/// What an answer cost (its tier: `ptu`, `priority`, `payg`). A gauge that only grows:
/// the metrics facade counts whole numbers, money is not one.
pub fn cost(labels: &AnswerLabels, tier: &'static str, usd: f64) {
    static GAUGES: OnceLock<quick_cache::sync::Cache<(AnswerLabels, &'static str), Gauge>> =
        OnceLock::new();
    let cache = GAUGES.get_or_init(|| quick_cache::sync::Cache::new(4096));
    let register = || {
        handle();
        let labels = [
            (
                "consumer",
                labels.consumer.clone().unwrap_or_else(|| "none".into()),
            ),
            ("pool", labels.pool.as_str().to_owned()),
            ("class", labels.class.to_string()),
            ("tier", tier.to_owned()),
        ];
        Ok::<_, std::convert::Infallible>(metrics::gauge!("spillway_cost_usd_total", &labels))
    };
    match cache.get_or_insert_with(&(labels.clone(), tier), register) {
        Ok(gauge) => gauge.increment(usd),
        Err(never) => match never {},
    }
}

/// A request of a waiting class left the pool's queue: admitted, or given up on.
pub fn queue_wait(pool: &str, class: &str, waited: Duration, admitted: bool) {
    let labels = [
        ("pool", pool.to_owned()),
        ("class", class.to_owned()),
        (
            "outcome",
            if admitted { "admitted" } else { "gave_up" }.to_owned(),
        ),
    ];
    metrics::histogram!("spillway_queue_wait_seconds", &labels).record(waited.as_secs_f64());
}

/// A rule in shadow mode would have refused a request (which was served).
pub fn shadow_refusal(pool: &str, consumer: &str, class: &str, rule: &'static str) {
    let labels = [
        ("pool", pool.to_owned()),
        ("consumer", consumer.to_owned()),
        ("class", class.to_owned()),
        ("rule", rule.to_owned()),
    ];
    metrics::counter!("spillway_shadow_refusals_total", &labels).increment(1);
}

/// A request refused at once because the replica was at `server.max_concurrent_requests`.
pub fn request_shed() {
    metrics::counter!("spillway_requests_shed_total").increment(1);
}

/// The exposition text, with the state store's health and each member's budget use and
/// backoff read now.
pub async fn render(fleet: &dyn FleetState, table: &crate::routing_table::RoutingTable) -> String {
    let health = fleet.health();
    metrics::gauge!("spillway_fleet_state_degraded").set(if health.degraded { 1.0 } else { 0.0 });
    metrics::gauge!("spillway_fleet_state_fallback_decisions")
        .set(health.fallback_decisions as f64);
    // How far this replica is from Redis, and what follows from it.
    if let Some(round_trip) = health.round_trip {
        metrics::gauge!("spillway_fleet_state_round_trip_seconds").set(round_trip.as_secs_f64());
    }
    if let Some(timeout) = health.call_timeout {
        metrics::gauge!("spillway_fleet_state_call_timeout_seconds").set(timeout.as_secs_f64());
    }
    metrics::gauge!("spillway_fleet_state_acquires_waited").set(health.acquires_waited as f64);
    for pool in table.pools() {
        let candidates: Vec<_> = pool.members.iter().map(|m| pool.candidate(m)).collect();
        let Ok(snapshot) = fleet.snapshot(&pool.name, &candidates).await else {
            continue;
        };
        for (member, candidate) in snapshot.members.iter().zip(&candidates) {
            let labels = [
                ("pool", pool.name.as_str().to_owned()),
                ("backend", member.backend.as_str().to_owned()),
            ];
            if let Some(limit) = candidate.tokens_per_window.filter(|&l| l > 0) {
                metrics::gauge!("spillway_budget_used_ratio", &labels)
                    .set(member.tokens_used as f64 / limit as f64);
            }
            metrics::gauge!("spillway_member_held_back_seconds", &labels)
                .set(member.backoff.map_or(0.0, |b| b.duration.as_secs_f64()));
            // The breaker: open while a failure holds the member back (a 429 is throttling,
            // not a failure), probing while one request tests a recovered member.
            let reason = member.backoff.map(|b| b.reason);
            let open = reason
                .is_some_and(|r| !matches!(r, BackoffReason::Throttled | BackoffReason::Probing));
            metrics::gauge!("spillway_member_breaker_open", &labels).set(f64::from(u8::from(open)));
            metrics::gauge!("spillway_member_probing", &labels)
                .set(f64::from(u8::from(reason == Some(BackoffReason::Probing))));
            if let Some(utilization) = member.hints.utilization {
                metrics::gauge!("spillway_member_utilization", &labels).set(utilization);
            }
        }
    }
    handle().render()
}
