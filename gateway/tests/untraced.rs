//! With no collector configured, the request's spans are not built at all: the telemetry a
//! replica installs declares no interest in them (each span would otherwise cost its fields,
//! records and close on every request, for nobody). Its own binary: it installs the global
//! subscriber, and no OTLP variable may be set.

use spillway_gateway::config::TelemetryConfig;
use spillway_gateway::ops::telemetry::{self, SPANS_TARGET};

#[test]
fn without_a_collector_the_request_spans_are_disabled() {
    for var in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ] {
        assert!(
            std::env::var_os(var).is_none(),
            "{var} is set: this test needs it unset"
        );
    }
    let config = TelemetryConfig {
        access_log: true,
        ..TelemetryConfig::default()
    };
    let _telemetry = telemetry::init(&config).expect("telemetry installs");
    let request = tracing::info_span!(target: SPANS_TARGET, "request", spillway.pool = "p");
    assert!(request.is_disabled(), "nobody reads the request's span");
    // The logs still see the gateway's own events and spans at their level.
    assert!(tracing::enabled!(target: "spillway_gateway::proxy", tracing::Level::INFO));
}
