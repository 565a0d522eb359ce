//! Spillway fleet state: what every gateway replica must agree on.
//!
//! Routing code talks only to the [`FleetState`] trait. Each implementation keeps, per
//! *deployment* (a pool member: one backend serving one pool), a backoff deadline and
//! its reason. Deadlines are handed over as durations ("back off for 3 s"), never as
//! wall-clock instants, so the store, not the replica, owns the clock: replicas' clocks
//! differ, and the Redis store (next) takes time from Redis itself.
//!
//! Implementations:
//! - [`EmbeddedState`]: in-process, the default with no Redis configured.
//!
//! Key schema (shared by every store that has keys; `prefix` is `state.key_prefix`):
//!
//! | key                                    | value                          |
//! |----------------------------------------|--------------------------------|
//! | `{prefix}:{<pool>}:backoff:<backend>`  | hash `until_ms`, `reason`      |
//!
//! The pool is a Redis Cluster hash tag so one script touches one slot.

#[doc(hidden)]
pub mod contract;
mod fallback;
mod keys;
mod memory;
mod redis;
mod store;
mod window;

pub use fallback::FallbackState;
pub use keys::{KeySchema, MemberKeys};
pub use redis::RedisState;

pub use memory::{EmbeddedState, ms_per_output_token};
pub use store::{
    Admission, BackendId, Backoff, BackoffReason, Candidate, FleetState, Histogram,
    LATENCY_BOUNDS_MS, LatencyHistograms, LatencySample, MemberSnapshot, PoolName, PoolSnapshot,
    Receipt, Reservation, StateError, UpstreamHints, Windows,
};
