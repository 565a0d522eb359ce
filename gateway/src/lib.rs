//! Spillway gateway: many stateless replicas in front of many Azure OpenAI deployments,
//! sharing one view of the fleet, answering as one never-throttled endpoint.
//!
//! A request's path through the areas (README, "Architecture", draws it):
//! `edge` (listener, TLS, limits, load shedding) → `app` (routes; `auth` names the caller)
//! → `proxy` (admit → route: select, forward, classify → relay → settle, against the fleet
//! state of `spillway_shared`) → back out through `edge`; `ops` watches all of it.

pub mod app; // the router and the `Gateway` every request reads
pub mod auth; // who calls (consumers, keys, Entra clients) and how the gateway calls Azure
pub mod cli; // the subcommands of `spillway`
pub mod config;
pub mod cost; // what every token cost: the ledger's book, prices, `spillway cost` // the configuration, one file per section, each with its validation
#[cfg(feature = "simulator")]
pub mod demo; // `spillway demo`: simulated deployments, a fleet and a load ramp
pub mod edge; // listeners, TLS, connection and request limits, header policy
pub mod error; // every refusal in Azure OpenAI's error shape
#[doc(hidden)]
pub mod fuzzing; // the parsers the fuzz targets drive
pub mod live; // the configuration in force, swapped on reload
pub mod ops; // telemetry, metrics, access log, `state` and `top`
pub mod path_segment; // what may be a segment of an upstream path
pub mod proxy; // the request's phases
pub mod routing_table; // pools and their members, built from the configuration
pub mod server; // `serve`: start, reload, drain and stop

pub use app::{admin, app};
pub use proxy::Gateway;
/// The simulated Azure OpenAI resources (crate `spillway-simulator`), for `spillway sim`,
/// `spillway demo` and tests; a build without the `simulator` feature has neither.
#[cfg(feature = "simulator")]
pub use spillway_simulator as sim;
