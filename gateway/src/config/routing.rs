//! `[routing]`: timeouts, backoff, the circuit breaker, retries, scoring.

use super::*;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Upstream attempts per request; default: every pool member once.
    pub max_attempts: Option<u32>,
    /// Backoff after a failure whose response names no retry time.
    pub default_backoff_ms: u64,
    /// Upper bound on any backoff, whatever an upstream asks for.
    pub max_backoff_ms: u64,
    /// TCP + TLS connect timeout per attempt.
    pub connect_timeout_ms: u64,
    /// Time allowed per attempt until the first byte of the response body.
    pub attempt_timeout_ms: u64,
    /// Time allowed for all attempts of one request together (until the first byte).
    pub request_timeout_ms: u64,
    /// A streaming attempt with no first byte within this time has stalled: it counts as a
    /// failure and the request moves on (nothing was sent to the client yet).
    pub stream_first_byte_timeout_ms: u64,
    /// Output tokens charged up front for a request that sets no `max_tokens`.
    pub default_max_tokens: u64,
    /// An upstream's capacity hints (utilization, remaining tokens) are trusted this long;
    /// a member skipped on a hint is tried again after it.
    pub hint_ttl_ms: u64,
    /// Share of picks inside a tier made at random, so a recovered member is measured again.
    pub explore_share: f64,
    /// A replica refreshes its copy of the fleet's latency and budgets this often (scoring).
    pub view_refresh_ms: u64,
    /// Circuit breaker, shared by the fleet: consecutive failures (5xx, connection errors,
    /// timeouts, stalls; not 429) that open it. Each opening lasts the failure's backoff
    /// doubled per consecutive opening, up to `max_backoff_ms`.
    pub breaker_failures: u32,
    /// After a cool-down one request probes the member; others wait this long for it.
    pub breaker_probe_ms: u64,
    /// The breaker also opens when this share of a member's outcomes failed within
    /// `breaker_window_ms`, once there are at least `breaker_min_requests` of them.
    pub breaker_failure_rate: f64,
    pub breaker_min_requests: u32,
    pub breaker_window_ms: u64,
    /// Retries may add at most this share of the requests (0.2 = 20 %) ...
    pub retry_ratio: f64,
    /// ... plus this many per second, so a quiet replica can still fail over.
    pub min_retries_per_second: f64,
    /// The fleet remembers which member holds each stored Responses API object this long,
    /// and sends follow-ups naming it there (Azure keeps stored responses 30 days).
    pub response_affinity_ttl_s: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            max_attempts: None,
            default_backoff_ms: 10_000,
            max_backoff_ms: 300_000,
            connect_timeout_ms: 5_000,
            attempt_timeout_ms: 120_000,
            request_timeout_ms: 300_000,
            stream_first_byte_timeout_ms: 20_000,
            default_max_tokens: 256,
            hint_ttl_ms: 1_000,
            explore_share: 0.05,
            view_refresh_ms: 500,
            breaker_failures: 1,
            breaker_probe_ms: 5_000,
            breaker_failure_rate: 0.5,
            breaker_min_requests: 20,
            breaker_window_ms: 30_000,
            retry_ratio: 0.2,
            min_retries_per_second: 10.0,
            response_affinity_ttl_s: 86_400,
        }
    }
}

impl RoutingConfig {
    pub(super) fn validate(&self, bad: &mut impl FnMut(String, String)) {
        if !(0.0..=1.0).contains(&self.explore_share) {
            bad(
                "routing.explore_share".into(),
                "must be a share from 0 to 1".into(),
            );
        }
        if !(self.retry_ratio >= 0.0 && self.min_retries_per_second >= 0.0) {
            bad(
                "routing.retry_ratio".into(),
                "retry_ratio and min_retries_per_second must be >= 0".into(),
            );
        }
        if !(self.breaker_failure_rate > 0.0 && self.breaker_failure_rate <= 1.0) {
            bad(
                "routing.breaker_failure_rate".into(),
                "must be a share above 0 and at most 1".into(),
            );
        }
        if self.breaker_failures == 0 {
            bad(
                "routing.breaker_failures".into(),
                "must be at least 1".into(),
            );
        }
        if self.view_refresh_ms == 0 {
            bad(
                "routing.view_refresh_ms".into(),
                "must be greater than 0".into(),
            );
        }
        if self.response_affinity_ttl_s == 0 {
            bad(
                "routing.response_affinity_ttl_s".into(),
                "must be greater than 0 (follow-ups need to find their member)".into(),
            );
        }
        if self.hint_ttl_ms == 0 {
            bad(
                "routing.hint_ttl_ms".into(),
                "must be greater than 0".into(),
            );
        }
        let r = self;
        if r.max_attempts == Some(0) {
            bad("routing.max_attempts".into(), "must be at least 1".into());
        }
        for (key, value) in [
            ("routing.connect_timeout_ms", r.connect_timeout_ms),
            ("routing.attempt_timeout_ms", r.attempt_timeout_ms),
            ("routing.request_timeout_ms", r.request_timeout_ms),
            (
                "routing.stream_first_byte_timeout_ms",
                r.stream_first_byte_timeout_ms,
            ),
            ("routing.max_backoff_ms", r.max_backoff_ms),
        ] {
            if value == 0 {
                bad(key.into(), "must be greater than 0".into());
            }
        }
    }
}
