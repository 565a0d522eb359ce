//! Logs and traces, independent of each other.
//!
//! - Logs go to stderr, filtered by `RUST_LOG` (default `info`), text or JSON.
//! - Traces are exported over OTLP when an endpoint is configured (`telemetry.otlp_endpoint`,
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), whatever the log
//!   level: Spillway's request and attempt spans are always recorded, and which traces are
//!   kept is the sampler's call (`OTEL_TRACES_SAMPLER`/`_ARG`, parent-based by default).
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` picks `http/protobuf` (default) or `grpc`;
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` apply.
//! - Export runs on the SDK's batch thread with a bounded queue: a slow or dead collector
//!   costs dropped spans, never a blocked request.
//! - Metrics also go over OTLP when the environment names a collector (`crate::ops::otel_metrics`).
//! - The access log (`telemetry.access_log`): one JSON line per request on stdout.
//! - W3C trace context (`traceparent`, `tracestate`) is the propagation format.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::Level;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::TelemetryConfig;

/// The tracing target of the request and attempt spans (`proxy::trace`'s module path):
/// traces carry them, the logs do not.
pub const SPANS_TARGET: &str = "spillway_gateway::proxy::trace";

/// Whether spans are exported: naming spans and passing trace context on cost something
/// per request, for nothing when no collector reads them.
static TRACES_EXPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn traces_exported() -> bool {
    TRACES_EXPORTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Keeps the trace pipeline alive; call [`Telemetry::shutdown`] to flush before exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    meters: Option<opentelemetry_sdk::metrics::SdkMeterProvider>,
}

/// Install the global subscriber and propagator.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, String> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let logs = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Access lines are the access log's alone, never in the logs; the request and attempt
    // spans are for traces (logs carry their own fields): not formatting them for the log
    // layer keeps an untraced request cheap.
    // A static filter (not a closure): each call site's interest is decided once, so
    // disabled log lines stay free.
    let not_access = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target(crate::ops::access_log::TARGET, LevelFilter::OFF)
        .with_target(SPANS_TARGET, LevelFilter::OFF);
    let fmt = if config.log_format.as_deref() == Some("json") {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(logs)
            .with_filter(not_access)
            .boxed()
    } else {
        // Colours for a person at a terminal; plain text for files and log collectors.
        use std::io::IsTerminal;
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(logs)
            .with_filter(not_access)
            .boxed()
    };
    let access = config.access_log.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stdout)
            .with_filter(Targets::new().with_target(crate::ops::access_log::TARGET, Level::INFO))
            .boxed()
    });

    let provider = tracer_provider(config)?;
    // Spillway's own spans and events, whatever RUST_LOG says about logs.
    let traced = Targets::new()
        .with_target("spillway_gateway", Level::INFO)
        .with_target("spillway_shared", Level::INFO)
        .with_target("spillway", Level::INFO)
        .with_target(
            crate::ops::access_log::TARGET,
            tracing_subscriber::filter::LevelFilter::OFF,
        );
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("spillway"))
            .with_filter(traced)
            .boxed()
    });

    // Only the layers in use: an absent (`None`) layer would declare an interest in every
    // span and event, and the request's spans would be built, recorded and closed on every
    // request for nobody.
    let layers: Vec<_> = [Some(fmt), access, otel].into_iter().flatten().collect();
    tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    TRACES_EXPORTED.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
    let meters = meter_provider()?;
    if let Some(meters) = &meters {
        crate::ops::metrics::also_export(crate::ops::otel_metrics::OtelRecorder::new(meters));
    }
    Ok(Telemetry { provider, meters })
}

/// OTLP metrics, when the environment names a collector (see `crate::ops::otel_metrics`).
fn meter_provider() -> Result<Option<opentelemetry_sdk::metrics::SdkMeterProvider>, String> {
    if !crate::ops::otel_metrics::wanted() {
        return Ok(None);
    }
    let cannot = |e: &dyn std::fmt::Display| format!("cannot build the OTLP metrics exporter: {e}");
    let builder = opentelemetry_sdk::metrics::SdkMeterProvider::builder().with_resource(resource());
    let builder = match protocol()? {
        Protocol::Grpc => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc-metrics")
                .enable_all()
                .build()
                .map_err(|e| cannot(&e))?;
            let _entered = runtime.enter();
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| cannot(&e))?;
            drop(_entered);
            builder.with_periodic_exporter(OnOwnRuntime {
                inner: exporter,
                runtime: Some(runtime),
            })
        }
        _ => builder.with_periodic_exporter(
            opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .build()
                .map_err(|e| cannot(&e))?,
        ),
    };
    Ok(Some(builder.build()))
}

/// The OTLP protocol the environment asks for (`grpc` or `http/protobuf`).
fn protocol() -> Result<Protocol, String> {
    let named = [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok().filter(|v| !v.is_empty()));
    match named.as_deref() {
        None | Some("http/protobuf") => Ok(Protocol::HttpBinary),
        Some("grpc") => Ok(Protocol::Grpc),
        Some(other) => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: Spillway exports http/protobuf or grpc"
        )),
    }
}

fn tracer_provider(config: &TelemetryConfig) -> Result<Option<SdkTracerProvider>, String> {
    let env_endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
    if config.otlp_endpoint.is_none() && !env_endpoint {
        return Ok(None);
    }
    let cannot = |e: &dyn std::fmt::Display| format!("cannot build the OTLP exporter: {e}");
    let builder = SdkTracerProvider::builder().with_resource(resource());
    let builder = match protocol()? {
        Protocol::Grpc => {
            // tonic needs a Tokio reactor, which the SDK's batch thread lacks: the exporter
            // gets a small runtime of its own.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-grpc")
                .enable_all()
                .build()
                .map_err(|e| cannot(&e))?;
            let _entered = runtime.enter();
            let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(endpoint) = &config.otlp_endpoint {
                exporter = exporter.with_endpoint(endpoint);
            }
            let exporter = exporter.build().map_err(|e| cannot(&e))?;
            drop(_entered);
            builder.with_batch_exporter(OnOwnRuntime {
                inner: exporter,
                runtime: Some(runtime),
            })
        }
        _ => {
            let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
            if let Some(endpoint) = &config.otlp_endpoint {
                exporter = exporter.with_endpoint(endpoint);
            }
            builder.with_batch_exporter(exporter.build().map_err(|e| cannot(&e))?)
        }
    };
    Ok(Some(builder.build()))
}

/// The environment's resource (`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME`), named
/// `spillway` unless it names the service itself.
fn resource() -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
        "service.version",
        env!("CARGO_PKG_VERSION"),
    ));
    if named {
        builder.build()
    } else {
        builder.with_service_name("spillway").build()
    }
}

/// A span exporter driven on its own Tokio runtime.
#[derive(Debug)]
struct OnOwnRuntime<E> {
    inner: E,
    runtime: Option<tokio::runtime::Runtime>,
}

impl<E: SpanExporter> SpanExporter for OnOwnRuntime<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let runtime = self.runtime.as_ref().expect("runtime until dropped");
        std::future::ready(runtime.block_on(self.inner.export(batch)))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let runtime = self.runtime.as_ref().expect("runtime until dropped");
        let _entered = runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: opentelemetry_sdk::metrics::exporter::PushMetricExporter>
    opentelemetry_sdk::metrics::exporter::PushMetricExporter for OnOwnRuntime<E>
{
    fn export(
        &self,
        metrics: &opentelemetry_sdk::metrics::data::ResourceMetrics,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let runtime = self.runtime.as_ref().expect("runtime until dropped");
        std::future::ready(runtime.block_on(self.inner.export(metrics)))
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let runtime = self.runtime.as_ref().expect("runtime until dropped");
        let _entered = runtime.enter();
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.inner.temporality()
    }
}

impl<E> Drop for OnOwnRuntime<E> {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Telemetry {
    /// Flush buffered spans. Exports block, so this runs off the async runtime.
    pub async fn shutdown(self) {
        let Self { provider, meters } = self;
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(meters) = meters {
                let _ = meters.shutdown();
            }
            if let Some(provider) = provider {
                let _ = provider.shutdown();
            }
        })
        .await;
    }
}
