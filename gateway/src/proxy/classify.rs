//! Upstream outcome → deliver it, or back off that backend and retry elsewhere.
//! Pure: status and headers in, verdict out; the clock is an argument.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, StatusCode};
use spillway_shared::{Backoff, BackoffReason, UpstreamHints};

use super::forward::FailureKind;

/// What to do with an upstream answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand the response to the client: success, or a 4xx that is the client's own fault.
    Deliver,
    /// Mark the backend and try the next candidate.
    Retry(Backoff),
}

/// Backoff durations used when the upstream names none, and the cap on any it names.
#[derive(Clone, Copy, Debug)]
pub struct BackoffPolicy {
    pub default: Duration,
    pub max: Duration,
}

pub fn classify_response(
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
    policy: BackoffPolicy,
) -> Verdict {
    let reason = match status.as_u16() {
        429 => BackoffReason::Throttled,
        500..=599 => BackoffReason::ServerError,
        // The gateway owns the backend credential: a rejection is the backend's problem.
        401 | 403 => BackoffReason::AuthRejected,
        _ => return Verdict::Deliver,
    };
    let duration = retry_after(headers, now)
        .unwrap_or(policy.default)
        .min(policy.max);
    Verdict::Retry(Backoff { duration, reason })
}

/// A failure with no response (refused, timed out, no credential): the default backoff.
pub fn classify_transport_failure(kind: FailureKind, policy: BackoffPolicy) -> Backoff {
    let reason = match kind {
        FailureKind::Connection => BackoffReason::Unreachable,
        FailureKind::Timeout => BackoffReason::Timeout,
        FailureKind::Credential => BackoffReason::AuthRejected,
    };
    Backoff {
        duration: policy.default,
        reason,
    }
}

/// How long the upstream asked us to wait, in Microsoft's order of precedence, with
/// `retry-after-ms` (more precise, sent by PTU) ahead of it. Zero or negative values are
/// ignored as the real service sometimes sends them.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let retry_after_ms = || {
        get("retry-after-ms")
            .and_then(|v| v.parse::<f64>().ok())
            .and_then(|ms| positive_seconds(ms / 1000.0))
    };
    let retry_after = || {
        get("retry-after").and_then(|v| match v.parse::<f64>() {
            Ok(seconds) => positive_seconds(seconds),
            Err(_) => httpdate::parse_http_date(v)
                .ok()
                .and_then(|at| at.duration_since(now).ok())
                .filter(|d| !d.is_zero()),
        })
    };
    let reset = || {
        [
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
            "x-rate-limit-reset-tokens",
        ]
        .into_iter()
        .filter_map(get)
        .find_map(parse_reset)
    };
    retry_after_ms().or_else(retry_after).or_else(reset)
}

fn positive_seconds(seconds: f64) -> Option<Duration> {
    // `try_`: a value past what a Duration holds ("1e300") is no hint, not a panic; one that
    // rounds to nothing ("3e-31") is no hint either.
    (seconds > 0.0)
        .then(|| Duration::try_from_secs_f64(seconds).ok())
        .flatten()
        .filter(|wait| !wait.is_zero())
}

/// `x-ratelimit-reset-*` values: plain seconds (`6`, `0.5`) or OpenAI durations
/// (`6s`, `250ms`, `1m30s`, `2h`).
fn parse_reset(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.parse::<f64>() {
        return positive_seconds(seconds);
    }
    let mut total = 0.0;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    positive_seconds(total)
}

/// Capacity hints on an upstream response: remaining tokens and PTU utilization ("87.5%").
/// Whether Azure served the request from the standard deployment a PTU spills over to
/// (`x-ms-is-spilled-over: true`, or an `x-ms-spillover-from-…` header).
pub fn azure_spilled_over(headers: &HeaderMap) -> bool {
    let marked = headers
        .get("x-ms-is-spilled-over")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    marked
        || headers
            .keys()
            .any(|k| k.as_str().starts_with("x-ms-spillover-from"))
}

/// The capacity hints of a response head that arrived at `observed`.
pub fn upstream_hints(headers: &HeaderMap, observed: tokio::time::Instant) -> UpstreamHints {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    UpstreamHints {
        remaining_tokens: get("x-ratelimit-remaining-tokens").and_then(|v| v.parse().ok()),
        utilization: get("azure-openai-deployment-utilization")
            .and_then(|v| v.trim_end_matches('%').trim().parse::<f64>().ok())
            .map(|percent| percent / 100.0),
        observed: Some(observed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BackoffPolicy = BackoffPolicy {
        default: Duration::from_secs(10),
        max: Duration::from_secs(300),
    };

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn backoff_for(status: u16, pairs: &[(&'static str, &str)]) -> Verdict {
        classify_response(
            StatusCode::from_u16(status).unwrap(),
            &headers(pairs),
            SystemTime::UNIX_EPOCH,
            POLICY,
        )
    }

    fn retry(ms: u64, reason: BackoffReason) -> Verdict {
        Verdict::Retry(Backoff {
            duration: Duration::from_millis(ms),
            reason,
        })
    }

    #[test]
    fn retry_after_ms_wins_over_retry_after() {
        let v = backoff_for(429, &[("retry-after-ms", "1500"), ("retry-after", "7")]);
        assert_eq!(v, retry(1_500, BackoffReason::Throttled));
    }

    #[test]
    fn retry_after_seconds_and_http_date() {
        assert_eq!(
            backoff_for(429, &[("retry-after", "7")]),
            retry(7_000, BackoffReason::Throttled)
        );
        let date = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(12));
        assert_eq!(
            backoff_for(429, &[("retry-after", &date)]),
            retry(12_000, BackoffReason::Throttled)
        );
    }

    #[test]
    fn reset_headers_then_default() {
        assert_eq!(
            backoff_for(429, &[("x-ratelimit-reset-requests", "1m30s")]),
            retry(90_000, BackoffReason::Throttled)
        );
        assert_eq!(
            backoff_for(429, &[("x-ratelimit-reset-tokens", "250ms")]),
            retry(250, BackoffReason::Throttled)
        );
        assert_eq!(
            backoff_for(429, &[("x-rate-limit-reset-tokens", "3")]),
            retry(3_000, BackoffReason::Throttled)
        );
        // Zero and negative values are ignored, falling back to the default.
        assert_eq!(
            backoff_for(429, &[("retry-after", "0"), ("retry-after-ms", "-1")]),
            retry(10_000, BackoffReason::Throttled)
        );
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(
            backoff_for(429, &[("retry-after", "86400")]),
            retry(300_000, BackoffReason::Throttled)
        );
    }

    #[test]
    fn statuses_map_to_reasons() {
        assert_eq!(
            backoff_for(503, &[]),
            retry(10_000, BackoffReason::ServerError)
        );
        assert_eq!(
            backoff_for(401, &[]),
            retry(10_000, BackoffReason::AuthRejected)
        );
        assert_eq!(
            backoff_for(403, &[]),
            retry(10_000, BackoffReason::AuthRejected)
        );
        for deliver in [200, 201, 400, 404, 408, 413, 422] {
            assert_eq!(backoff_for(deliver, &[]), Verdict::Deliver, "{deliver}");
        }
    }
}
