//! Spillway fleet state: what every gateway replica must agree on.
//!
//! Routing code talks only to the [`FleetState`] trait:
//! - `acquire`: the first candidate (in preference order) not in backoff and with budget left
//!   in its window for the request's estimated tokens and one request; the estimate is
//!   reserved on it;
//! - `settle`: replace the reservation by the real token count, record latency and the
//!   upstream's capacity hints, and (for a failed attempt) start a backoff, in one round trip;
//! - `backoff`: a deadline of max(current, now + length), with its reason;
//! - `snapshot`: everything about some pool members, in one call;
//! - `charge`: usage no reservation covered (a Realtime session's responses);
//! - `pin_response` / `response_owner`: which member holds a stored Responses API object.
//!
//! Time belongs to the store, never to a replica (their clocks differ): deadlines cross the
//! trait as durations, and the Redis scripts read Redis `TIME`.
//!
//! Stores: [`EmbeddedState`] (in-process, the default), [`RedisState`] (Lua scripts run by
//! EVALSHA), and [`FallbackState`] (Redis, falling back to an embedded store per replica while
//! Redis is unreachable or slow). [`contract`] is the one test suite every store passes.
//!
//! # Redis key schema
//!
//! `prefix` is `state.key_prefix` (default `spillway`); the pool is a Redis Cluster hash tag,
//! so every key a script touches is in one slot. Values are plain numbers.
//!
//! | key                                  | type | fields                                                             | expires |
//! |--------------------------------------|------|--------------------------------------------------------------------|---------|
//! | `{prefix}:{<pool>}:backoff:<backend>` | hash | `until_ms`, `reason`, `set_ms`; breaker `failures`, `opened`, `opened_ms` (epoch), `rate_start_ms`, `rate_ok`, `rate_failed` | the deadline plus the longest cool-down |
//! | `{prefix}:{<pool>}:usage:<backend>`   | hash | `tokens:<bucket_start_ms>`, `requests:<bucket_start_ms>`; running sums `sum_tokens`, `sum_requests`, `oldest`, `newest`, `bucket_ms` | 2 windows after the last request |
//! | `{prefix}:{<pool>}:latency:<backend>` | hash | `<metric>:<slot_start_ms>:le_<ms>` counts (`ttfb_ms`, `total_ms`, `ms_per_output_token`, `output_tokens`), their window sums `<metric>:w:le_<ms>`, `slot`, `summed` | 2 latency windows |
//! | `{prefix}:{<pool>}:hints:<backend>`   | hash | `remaining_tokens`, `utilization` (share, 0.95 = 95 %), `updated_ms` (observation time), `admitted_tokens`, `estimated_tokens`, `actual_tokens`, `prompt_tokens`, `cached_tokens` | 2 latency windows |
//! | `{prefix}:{<pool>}:pending`           | hash | reservation id → `<candidate>\|<bucket_ms>\|<tokens>\|<requests>` (a lease when requests > 1), or `released` | 2 windows |
//! | `{prefix}:response:<id>`              | hash | `pool`, `backend`: the member holding that stored response; `consumer`: its creator's tag | `routing.response_affinity_ttl_s` |
//! | `{prefix}:quota:{<consumer>:<period>:<start_s>}` | string | tokens served to a consumer in one quota period | the period's end |
//! | `{prefix}:replicas`                   | zset | replica id → last heartbeat (ms)                                   | 2 × 5 s |
//! | `{{prefix}:replicas}:round_trips`      | hash | live replica id → its typical round trip to Redis (µs)             | 2 × 5 s |
//! | `{prefix}:{<pool>}:generation`        | string | `<replica>:<n>`, set by the replica that restored the pool (or first read it); missing after Redis lost the pool's data | never |
//!
//! Times are Redis `TIME` in Unix milliseconds. A reservation never settled (a replica died)
//! stays charged at its estimate until its bucket leaves the window; one whose acquire a
//! replica abandoned is released by id; a lease's unused part is given back by its id.

/// The contract suite, for the stores' own tests (feature `contract`).
#[cfg(any(test, feature = "contract"))]
#[doc(hidden)]
pub mod contract;
pub mod fallback;
mod health;
mod keys;
mod last_view;
mod layer;
pub mod lease;
pub mod ledger;
mod memory;
mod redis;
pub mod round_trip;
mod scripts;
mod settle_batch;
mod store;
mod window;

pub use fallback::FallbackState;
pub use keys::{KeySchema, MemberKeys};
pub use layer::{Call, FleetLayer};
pub use lease::LeasePolicy;
pub use redis::RedisState;

pub use memory::{EmbeddedState, ms_per_output_token};
pub use store::{
    Admission, BackendId, Backoff, BackoffReason, Candidate, FleetState, Histogram, Issuer,
    LATENCY_BOUNDS_MS, LatencyHistograms, LatencySample, MAX_QUOTA_NAME_BYTES,
    MAX_RESPONSE_ID_BYTES, MAX_TICKET_ID_BYTES, MemberSnapshot, PoolName, PoolSnapshot,
    QuotaCounter, Receipt, Reservation, ResponseOwner, StateError, Ticket, UpstreamHints, Windows,
};
pub use store::{ClockControl, ReplicaDistance, StoreHealth};
