//! `[telemetry]`: OTLP export.

use super::*;

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`.
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is used when this is unset.
    pub otlp_endpoint: Option<String>,
    /// `json` for one JSON object per log line; anything else is human-readable text.
    pub log_format: Option<String>,
    /// One JSON line per request on stdout (target `spillway::access`), whatever
    /// `RUST_LOG` says.
    pub access_log: bool,
}
