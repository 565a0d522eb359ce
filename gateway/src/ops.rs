//! What operators see: traces, metrics, the access log, and the fleet's state.

pub mod access_log; // one line per request
pub mod metrics; // Prometheus metrics
pub mod otel_metrics; // the same metrics over OTLP
pub mod state_table; // `spillway state`: the fleet state as a table
pub mod telemetry; // tracing and OTLP export
pub mod timed_fleet; // the fleet-state layer that times every call
pub mod top; // `spillway top`: the live view
