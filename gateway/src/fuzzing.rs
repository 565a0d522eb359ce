//! Entry points for `cargo fuzz` (`fuzz/`) and for replaying its corpus as a regular test
//! (`gateway/tests/fuzz_corpus.rs`). Each takes arbitrary bytes, drives one parser the way
//! the gateway does, and panics only when an invariant breaks.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;

use crate::proxy::fuzz_access::{
    BackoffPolicy, OperationPath, UsageMeter, classify_response, retry_after, upstream_hints,
};
use crate::proxy::request_fields::RequestFields;
use crate::proxy::tokens::{Encoding, Operation, estimate};

/// SSE framing and the usage reader: the stream cut into chunks at sizes taken from the
/// input. Unstripped, the relay passes every byte on unchanged; stripped, it never emits
/// more than it received plus nothing invented.
pub fn sse_and_usage(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(seed % 61) + 1;
    for (sse, strip) in [(true, false), (true, true), (false, false)] {
        let mut meter = UsageMeter::new(sse, strip);
        let mut out = Vec::new();
        for piece in body.chunks(chunk) {
            out.extend_from_slice(&meter.relay(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&meter.flush());
        meter.finish();
        meter.response_id();
        if !strip {
            assert_eq!(out, body, "an unstripped relay changes nothing");
        } else {
            assert!(out.len() <= body.len(), "stripping only removes");
        }
    }
}

/// Azure's rate-limit headers (`retry-after` in seconds or as an HTTP date,
/// `retry-after-ms`, `x-ratelimit-*`, utilization): any values, read as the router reads them.
pub fn azure_headers(data: &[u8]) {
    const NAMES: [&str; 8] = [
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-reset-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-remaining-requests",
        "azure-openai-deployment-utilization",
        "x-ms-is-spilled-over",
    ];
    let mut headers = HeaderMap::new();
    for (name, value) in NAMES.iter().zip(data.split(|&b| b == b'\n')) {
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    if let Some(wait) = retry_after(&headers, now) {
        assert!(!wait.is_zero(), "a wait is never zero");
    }
    upstream_hints(&headers, tokio::time::Instant::now());
    let policy = BackoffPolicy {
        default: Duration::from_secs(10),
        max: Duration::from_secs(300),
    };
    for status in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        classify_response(status, &headers, now, policy);
    }
}

/// Request admission: the operation path confined to its pool, and the body read and
/// estimated as for a chat, completions, embeddings or Responses request. The input is the
/// path, a NUL byte, then the body.
pub fn admission(data: &[u8]) {
    let (path, body) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b""[..]),
    };
    if let Ok(path) = std::str::from_utf8(path)
        && let Ok(parsed) = OperationPath::parse(path)
    {
        for segment in parsed.segments() {
            assert!(
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && !segment.contains(['/', '\\', '%', ';']),
                "segment {segment:?} of {path:?} escapes its pool"
            );
        }
    }
    let fields = RequestFields::parse(body).ok();
    for operation in [
        Operation::ChatCompletions,
        Operation::Completions,
        Operation::Embeddings,
        Operation::Responses,
        Operation::Other,
    ] {
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            for limit in [u64::MAX, 100] {
                if let Ok(e) = estimate(
                    encoding,
                    operation,
                    fields.as_ref(),
                    body.len(),
                    4096,
                    limit,
                ) {
                    assert!(e.output <= crate::proxy::tokens::MAX_OUTPUT_ESTIMATE);
                }
            }
        }
    }
}

/// Configuration loading: TOML text parsed and validated; problems are reported, never a
/// panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = crate::config::Config::from_toml(text) {
        let _ = config.validate();
    }
}
