//! Reading the scripts' replies: numbers, texts, lists, and a member's snapshot entry.

use std::time::Duration;

use fred::prelude::*;

use crate::store::{
    Backoff, BackoffReason, Candidate, LATENCY_BOUNDS_MS, LatencyHistograms, MemberSnapshot,
    StateError, UpstreamHints,
};

pub(super) fn int(value: &Value) -> Result<i64, StateError> {
    match value {
        Value::Integer(n) => Ok(*n),
        Value::String(s) => s
            .parse()
            .map_err(|_| StateError::Protocol(format!("not a number: {s}"))),
        Value::Bytes(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StateError::Protocol("not a number".into())),
        other => Err(StateError::Protocol(format!(
            "expected a number, got {other:?}"
        ))),
    }
}

pub(super) fn text(value: &Value) -> String {
    value.as_string().unwrap_or_default()
}

pub(super) fn array(value: Value) -> Result<Vec<Value>, StateError> {
    match value {
        Value::Array(items) => Ok(items),
        other => Err(StateError::Protocol(format!(
            "expected an array, got {other:?}"
        ))),
    }
}

pub(super) fn bucket_of_label(label: &str) -> Option<usize> {
    let bound = label.strip_prefix("le_")?;
    if bound == "inf" {
        return Some(LATENCY_BOUNDS_MS.len());
    }
    let bound: u64 = bound.parse().ok()?;
    LATENCY_BOUNDS_MS.iter().position(|&b| b == bound)
}

pub(super) fn parse_member(
    candidate: &Candidate,
    entry: Value,
) -> Result<MemberSnapshot, StateError> {
    let fields = array(entry)?;
    let [
        remaining,
        reason,
        tokens,
        requests,
        remaining_tokens,
        utilization,
        latency,
        estimated,
        actual,
        prompt,
        cached,
    ] = <[Value; 11]>::try_from(fields)
        .map_err(|f| StateError::Protocol(format!("snapshot entry has {} fields", f.len())))?;
    let remaining = int(&remaining)?;
    let backoff = (remaining > 0).then(|| Backoff {
        duration: Duration::from_millis(remaining as u64),
        reason: BackoffReason::parse(&text(&reason)).unwrap_or(BackoffReason::ServerError),
    });
    let mut histograms = LatencyHistograms::default();
    let latency = array(latency)?;
    for pair in latency.chunks(2) {
        let [field, count] = pair else { continue };
        let field = text(field);
        let mut parts = field.splitn(3, ':');
        let (Some(metric), Some(_slot), Some(bucket)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Some(index) = bucket_of_label(bucket) else {
            continue;
        };
        let histogram = match metric {
            "ttfb_ms" => &mut histograms.ttfb_ms,
            "total_ms" => &mut histograms.total_ms,
            "ms_per_output_token" => &mut histograms.ms_per_output_token,
            "output_tokens" => &mut histograms.output_tokens,
            _ => continue,
        };
        histogram.counts[index] += int(count)?.max(0) as u64;
    }
    Ok(MemberSnapshot {
        backend: candidate.backend.clone(),
        backoff,
        tokens_used: int(&tokens)?.max(0) as u64,
        requests_used: int(&requests)?.max(0) as u64,
        hints: UpstreamHints {
            // Kept at 0 or more since acquire.lua floors it; one written below by an older
            // release still reads as "none left", not as "no hint".
            remaining_tokens: text(&remaining_tokens)
                .parse::<i64>()
                .ok()
                .map(|r| r.max(0) as u64),
            utilization: text(&utilization).parse().ok(),
            observed: None,
        },
        latency: histograms,
        estimated_tokens: int(&estimated)?.max(0) as u64,
        actual_tokens: int(&actual)?.max(0) as u64,
        prompt_tokens: int(&prompt)?.max(0) as u64,
        cached_tokens: int(&cached)?.max(0) as u64,
    })
}
