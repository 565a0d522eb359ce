//! `[state]`: the fleet-state store (embedded or Redis) and its windows.

use super::*;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// No URL: embedded in-process state. `redis://`, `rediss://` (TLS), with a password as
    /// `rediss://:password@host:6380`; a cluster as `redis-cluster://host:port?node=host:port`.
    pub redis_url: Option<String>,
    /// Every Redis key starts with this.
    pub key_prefix: String,
    /// Budget window (`tpm`, `rpm` are per this window); tests shorten it.
    pub window_ms: u64,
    /// The budget window is counted in this many buckets.
    pub window_buckets: u32,
    /// Latency samples are kept for this long.
    pub latency_window_ms: u64,
    /// The floor of a Redis call's timeout, which follows the measured round trip (2 × its
    /// p90, at most 1 s): a call slower than that is abandoned (its reservation released
    /// later) and that decision is made on this replica's share of the budgets; after 3
    /// within a second the pool is degraded until Redis has answered in time for 2 s (8
    /// probes in a row).
    pub redis_timeout_ms: u64,
    /// On Redis, a replica admitting many requests takes up to this many admissions per
    /// `lease_ms` of a lease's life in one script call (a budget lease) and hands them out
    /// itself; 0 or 1: every request asks Redis. A lease never holds more than an eighth of a
    /// member's budget left.
    pub lease_requests: u32,
    /// How long a lease, and a PTU's "full" seen by it, is trusted without asking Redis, plus
    /// two measured round trips to Redis.
    pub lease_ms: u64,
    /// The cost ledger's hours are kept this long (`spillway cost --since` reaches back
    /// this far).
    pub cost_retention_hours: u64,
}

impl StateConfig {
    pub fn lease_policy(&self) -> spillway_shared::LeasePolicy {
        spillway_shared::LeasePolicy {
            max_requests: self.lease_requests,
            ttl: std::time::Duration::from_millis(self.lease_ms),
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            key_prefix: "spillway".into(),
            window_ms: 60_000,
            window_buckets: 60,
            latency_window_ms: 300_000,
            // Measured: the acquire script on loopback Redis answers in p99 0.38 ms, p99.9
            // 1.1 ms, max 4.6 ms at 51k calls/s (redis-benchmark, README). 25 ms leaves room
            // for an in-region network hop; a slower call costs one local decision only.
            redis_timeout_ms: 25,
            // Measured (scripts/bench.sh, README): Redis arm 0.27x nginx without leases.
            lease_requests: 32,
            lease_ms: 100,
            // A quarter and a bit: last month, whole, until the next one ends.
            cost_retention_hours: 24 * 92,
        }
    }
}

impl StateConfig {
    pub(super) fn validate(&self, bad: &mut impl FnMut(String, String)) {
        let st = self;
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}', ' ']) {
            bad(
                "state.key_prefix".into(),
                "must be non-empty without braces or spaces".into(),
            );
        }
        if st.window_ms == 0 || st.window_buckets == 0 || st.window_buckets as u64 > st.window_ms {
            bad(
                "state.window_ms".into(),
                "window_ms and window_buckets must be positive, with at least 1 ms per bucket"
                    .into(),
            );
        }
        if st.latency_window_ms < 5 {
            bad(
                "state.latency_window_ms".into(),
                "must be at least 5".into(),
            );
        }
        if st.redis_timeout_ms == 0 {
            bad(
                "state.redis_timeout_ms".into(),
                "must be greater than 0".into(),
            );
        }
        if st.lease_requests >= 2 && (st.lease_ms == 0 || st.lease_ms > st.window_ms) {
            bad(
                "state.lease_ms".into(),
                "must be from 1 ms to the budget window (window_ms) when leases are on".into(),
            );
        }
    }
}
