//! The spans of a request: one per client request, covering the whole answer (a stream until
//! its last byte), and one child per upstream attempt, with OpenTelemetry's GenAI semantic
//! conventions and Spillway's own attributes. The client's W3C trace context is continued,
//! and each attempt's is passed to the backend.
//!
//! Spans are recorded whatever the log level (see `crate::ops::telemetry`); a span's fields are
//! filled as the request goes: admission, each attempt, and the answer's end (usage, time to
//! first token).

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use opentelemetry::propagation::{Extractor, Injector};
use tokio::time::Instant;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::admit::ProxyRequest;
use crate::proxy::tokens::Operation;
use crate::routing_table::Member;

// The spans here have this module's path as their target: `ops::telemetry::SPANS_TARGET`
// names it (the test below holds the two together) to keep them out of the logs.

/// `gen_ai.provider.name` (and the older `gen_ai.system`) of Azure OpenAI.
const PROVIDER: &str = "azure.ai.openai";
const SYSTEM: &str = "az.ai.openai";

/// The span of one client request, continuing the client's trace when it sent one.
pub fn request_span(method: &Method, headers: &HeaderMap) -> Span {
    let span = tracing::info_span!(
        "request",
        otel.name = "request",
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        http.response.status_code = Empty,
        error.type = Empty,
        gen_ai.operation.name = Empty,
        gen_ai.provider.name = PROVIDER,
        gen_ai.system = SYSTEM,
        gen_ai.request.model = Empty,
        gen_ai.response.model = Empty,
        gen_ai.request.max_tokens = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        spillway.pool = Empty,
        spillway.consumer = Empty,
        spillway.class = Empty,
        spillway.shadow = Empty,
        spillway.cost_usd = Empty,
        spillway.stream = Empty,
        spillway.backend = Empty,
        spillway.tier = Empty,
        spillway.region = Empty,
        spillway.attempts = Empty,
        spillway.time_to_first_token_ms = Empty,
    );
    if !span.is_disabled() && headers.contains_key("traceparent") {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        let _ = span.set_parent(parent);
    }
    span
}

/// Name a span once its operation is known. The exported span starts when the request's
/// span is first entered, after which only the OpenTelemetry span itself can be renamed.
fn rename(span: &Span, name: String) {
    if span.is_disabled() || !crate::ops::telemetry::traces_exported() {
        return;
    }
    span.record("otel.name", name.as_str());
    opentelemetry::trace::TraceContextExt::span(&span.context()).update_name(name);
}

/// What the request is, once admitted.
pub fn record_admission(span: &Span, request: &ProxyRequest) {
    let operation = operation_name(request.operation);
    if span.is_disabled() {
        return;
    }
    rename(span, format!("{operation} {}", request.pool.name));
    span.record("gen_ai.operation.name", operation);
    span.record("gen_ai.request.model", request.pool.name.as_str());
    span.record("spillway.pool", request.pool.name.as_str());
    span.record("spillway.stream", request.stream);
    span.record("spillway.class", &*request.class.name);
    if let Some(max) = request.max_tokens {
        span.record(
            "gen_ai.request.max_tokens",
            i64::try_from(max).unwrap_or(i64::MAX),
        );
    }
    if let Some(consumer) = &request.consumer {
        span.record("spillway.consumer", consumer.name.as_str());
    }
}

/// One upstream attempt: its number (from 1) and its span.
pub struct Attempt {
    pub number: u32,
    pub span: Span,
}

/// The span of attempt `number` (from 1) on `member`, a child of the request's.
pub fn attempt_span(parent: &Span, operation: Operation, member: &Member, number: u32) -> Attempt {
    let operation = operation_name(operation);
    let span = tracing::info_span!(
        parent: parent,
        "attempt",
        otel.name = format!("{operation} {}", member.deployment),
        otel.kind = "client",
        otel.status_code = Empty,
        server.address = member.backend.base_url.host_str().unwrap_or_default(),
        http.response.status_code = Empty,
        error.type = Empty,
        gen_ai.operation.name = operation,
        gen_ai.provider.name = PROVIDER,
        gen_ai.system = SYSTEM,
        gen_ai.request.model = member.deployment.as_str(),
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        spillway.backend = member.backend.id.as_str(),
        spillway.tier = i64::from(member.backend.priority),
        spillway.region = member.backend.region.as_deref().unwrap_or_default(),
        spillway.attempt = i64::from(number),
        spillway.retry_reason = Empty,
        spillway.time_to_first_token_ms = Empty,
    );
    Attempt { number, span }
}

/// The member that answered, on the request's span.
pub fn record_member(span: &Span, member: &Member) {
    span.record("spillway.backend", member.backend.id.as_str());
    span.record("spillway.tier", i64::from(member.backend.priority));
    if let Some(region) = &member.backend.region {
        span.record("spillway.region", region.as_str());
    }
}

/// The upstream's answer (its head) on an attempt's span.
pub fn record_status(span: &Span, status: u16) {
    span.record("http.response.status_code", i64::from(status));
    if status >= 400 {
        span.record("error.type", status.to_string());
        span.record("otel.status_code", "ERROR");
    }
}

/// Why an attempt did not deliver: `throttled`, `server_error`, `timeout`, ... An attempt
/// without an HTTP answer (refused, timed out, no credential) has that as its error type.
pub fn record_failure(span: &Span, reason: &str, answered: bool) {
    span.record("spillway.retry_reason", reason);
    if !answered {
        span.record("error.type", reason);
    }
    span.record("otel.status_code", "ERROR");
}

/// The client's answer on the request's span.
pub fn record_response(span: &Span, status: u16, attempts: u32, error_code: Option<&str>) {
    span.record("http.response.status_code", i64::from(status));
    span.record("spillway.attempts", i64::from(attempts));
    if status >= 500 || status == 429 {
        span.record("otel.status_code", "ERROR");
    }
    if let Some(code) = error_code.filter(|_| status >= 400) {
        span.record("error.type", code);
    }
}

/// The spans an answer keeps open until its last byte, and what its end records on them.
pub struct AnswerSpans {
    pub request: Span,
    pub attempt: Span,
    /// When the client's request arrived (time to first token is counted from it).
    pub started: Instant,
    /// The attempt that answered (1 for the first), and the status it answered.
    pub attempts: u32,
    pub status: u16,
}

impl AnswerSpans {
    pub fn record_end(
        &self,
        usage: Option<(u64, u64)>,
        first_byte: Option<Instant>,
        response_model: Option<&str>,
    ) {
        for span in [&self.request, &self.attempt] {
            if let Some((input, output)) = usage {
                // OTLP integers are signed.
                span.record(
                    "gen_ai.usage.input_tokens",
                    i64::try_from(input).unwrap_or(i64::MAX),
                );
                span.record(
                    "gen_ai.usage.output_tokens",
                    i64::try_from(output).unwrap_or(i64::MAX),
                );
            }
            if let Some(model) = response_model {
                span.record("gen_ai.response.model", model);
            }
        }
        if let Some(first) = first_byte {
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            self.request.record(
                "spillway.time_to_first_token_ms",
                ms(first.saturating_duration_since(self.started)),
            );
        }
    }
}

/// The trace context of `span`, as the headers the backend gets (none when the span is not
/// exported, so the client's own context passes unchanged).
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if span.is_disabled() || !crate::ops::telemetry::traces_exported() {
        return;
    }
    let context = span.context();
    if !opentelemetry::trace::TraceContextExt::span(&context)
        .span_context()
        .is_valid()
    {
        return;
    }
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut HeaderInjector(headers));
    });
}

fn operation_name(operation: Operation) -> &'static str {
    match operation {
        Operation::ChatCompletions | Operation::Responses => "chat",
        Operation::Completions => "text_completion",
        Operation::Embeddings => "embeddings",
        Operation::Other => "other",
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_spans_target_is_this_modules_path() {
        assert_eq!(
            crate::ops::telemetry::SPANS_TARGET,
            module_path!().trim_end_matches("::tests")
        );
    }
}
