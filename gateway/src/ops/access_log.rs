//! The access log: one JSON line per client request on stdout, when
//! `telemetry.access_log = true` (the layer is installed by `crate::ops::telemetry`; without it
//! these events are disabled at their call site and cost nothing). A streamed answer's line
//! is written when its last byte is sent, with its tokens and time to first token.

use std::time::Duration;

/// The `tracing` target of access log events.
pub const TARGET: &str = "spillway::access";

/// One request's line.
pub struct AccessRecord<'a> {
    pub consumer: Option<&'a str>,
    pub pool: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub tier: Option<u32>,
    pub attempts: u32,
    pub status: u16,
    /// Input and output tokens the answer reported.
    pub tokens: Option<(u64, u64)>,
    pub latency: Duration,
    pub time_to_first_token: Option<Duration>,
    /// The gateway's error code, for a request it answered itself.
    pub error: Option<&'a str>,
    /// Its traffic class, once admission knew it.
    pub class: Option<&'a str>,
    /// Rules in shadow mode that would have refused it (comma-separated).
    pub shadow: Option<&'a str>,
}

pub fn write(r: &AccessRecord<'_>) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    tracing::info!(
        target: TARGET,
        consumer = r.consumer,
        pool = r.pool,
        backend = r.backend,
        tier = r.tier,
        attempts = r.attempts,
        status = r.status,
        input_tokens = r.tokens.map(|t| t.0),
        output_tokens = r.tokens.map(|t| t.1),
        latency_ms = ms(r.latency),
        time_to_first_token_ms = r.time_to_first_token.map(ms),
        error = r.error,
        class = r.class,
        shadow = r.shadow,
        "request"
    );
}
