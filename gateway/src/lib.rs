//! Spillway gateway: many stateless replicas in front of many Azure OpenAI deployments,
//! sharing one view of the fleet, answering as one never-throttled endpoint.

pub mod access_log;
pub mod app;
pub mod config;
pub mod consumers;
pub mod credentials;
#[cfg(feature = "simulator")]
pub mod demo;
pub mod entra_clients;
pub mod error;
pub mod fleet_view;
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub mod http_server;
pub mod live;
pub mod load_shed;
pub mod metrics;
pub mod models;
pub mod otel_metrics;
pub mod proxy;
pub mod quota_period;
pub mod request_fields;
pub mod retry_budget;
pub mod secret;
pub mod server;
pub mod state_table;
pub mod table;
pub mod telemetry;
pub mod timed_fleet;
pub mod tls;
pub mod tokens;
pub mod top;

pub use app::{Gateway, admin, app};
/// The simulated Azure OpenAI resources (crate `spillway-simulator`), for `spillway sim`,
/// `spillway demo` and tests; a build without the `simulator` feature has neither.
#[cfg(feature = "simulator")]
pub use spillway_simulator as sim;
