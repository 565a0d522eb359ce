//! `Gateway`: the replica's shared parts every request reads (the routing table, the fleet
//! state, the HTTP client, consumers, limits), built once per configuration.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderName;
use spillway_shared::FleetState;

use super::BodyLimits;
use super::fleet_view::FleetView;
use super::retry_budget::RetryBudget;
use crate::auth::consumers::Consumers;
use crate::auth::credentials::{BackendCredential, SharedCredentials};
use crate::auth::secret::Secret;
use crate::config::{Config, ConfigError, ConfigProblem, RoutingConfig};
use crate::edge::headers::HeaderPolicy;
use crate::edge::load_shed::RequestSlots;
use crate::routing_table::RoutingTable;

/// Everything a request needs, shared by all requests of one replica.
pub struct Gateway {
    pub table: RoutingTable,
    pub fleet: Arc<dyn FleetState>,
    pub http: super::upstream_client::UpstreamClient,
    pub consumers: Consumers,
    pub routing: RoutingConfig,
    pub body_limits: BodyLimits,
    /// Which client headers go upstream.
    pub headers: HeaderPolicy,
    /// Concurrent data-plane requests (streams included) this replica still takes.
    pub slots: RequestSlots,
    /// Bearer token the admin listener requires (`server.admin_token_env`).
    pub admin_token: Option<Secret>,
    /// This replica's region (wins ties).
    pub region: Option<String>,
    /// Recent fleet latency and budgets, for scoring members.
    pub view: Arc<FleetView>,
    pub retry_budget: RetryBudget,
    /// Response headers naming a consumer's remaining budget.
    pub consumer_headers: ConsumerHeaderNames,
    /// The configuration this replica runs (for `GET /admin/config`, redacted).
    pub config: Config,
    /// Stopping: /readyz says so, so load balancers send no more.
    pub draining: std::sync::atomic::AtomicBool,
    /// Traffic classes.
    pub classes: super::traffic_class::Classes,
    /// `[[prices]]`, and the book answers' tokens go to (the fleet's cost ledger).
    pub prices: Arc<crate::cost::PriceTable>,
    pub spend: Arc<crate::cost::SpendBook>,
}

pub struct ConsumerHeaderNames {
    pub remaining_tokens: HeaderName,
    pub remaining_requests: HeaderName,
}

impl Gateway {
    /// Validate `config` and resolve its secrets; the fleet state is chosen by the caller.
    pub fn from_config(config: &Config, fleet: Arc<dyn FleetState>) -> Result<Self, ConfigError> {
        // Every problem in one report: the configuration's own, then what resolving its
        // credentials, keys and tokens finds (each once, naming its key).
        let mut problems = match config.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid(problems)) => problems,
            Err(other) => return Err(other),
        };
        let mut problem = |key: String, text: String| {
            if !problems.iter().any(|p| p.key == key) {
                problems.push(ConfigProblem { key, problem: text });
            }
        };
        let mut shared = SharedCredentials::default();
        let mut credentials = Vec::with_capacity(config.backends.len());
        for (i, b) in config.backends.iter().enumerate() {
            match BackendCredential::from_config(b, &mut shared) {
                Ok(credential) => credentials.push(credential),
                Err(p) => problem(format!("backends[{i}].auth"), p),
            }
        }
        let consumers = Consumers::from_config(&config.consumers, config.auth.jwt.as_ref())
            .map_err(|p| problem("consumers".into(), p))
            .ok();
        // An upstream's redirect is answered to the client, never followed: the request
        // (and its credential) goes only where the routing table says.
        let http = super::upstream_client::UpstreamClient::new(Duration::from_millis(
            config.routing.connect_timeout_ms,
        ))
        .map_err(|e| {
            problem(
                "routing".into(),
                format!("cannot build the HTTP client: {e}"),
            )
        })
        .ok();
        let admin_token = match &config.server.admin_token_env {
            Some(var) => std::env::var(var)
                .map(Secret::new)
                .map_err(|_| {
                    problem(
                        "server.admin_token_env".into(),
                        format!("environment variable {var} is not set"),
                    )
                })
                .ok(),
            None => None,
        };
        let (Some(consumers), Some(http), true) = (consumers, http, problems.is_empty()) else {
            return Err(ConfigError::Invalid(problems));
        };
        crate::ops::metrics::handle(); // install the recorder before anything is counted
        let fleet: Arc<dyn FleetState> = Arc::new(crate::ops::timed_fleet::TimedFleet::new(fleet));
        let retention = Duration::from_secs(config.state.cost_retention_hours * 3600);
        Ok(Self {
            table: RoutingTable::build(config, credentials),
            spend: crate::cost::SpendBook::new(fleet.clone(), retention),
            fleet,
            http,
            consumers,
            routing: config.routing.clone(),
            body_limits: BodyLimits::from_config(&config.server),
            headers: HeaderPolicy::new(&config.headers.forward, config.headers.forward_x_forwarded),
            slots: RequestSlots::new(config.server.max_concurrent_requests),
            admin_token,
            region: config.server.region.clone(),
            view: FleetView::new(Duration::from_millis(config.routing.view_refresh_ms)),
            retry_budget: RetryBudget::new(
                config.routing.retry_ratio,
                config.routing.min_retries_per_second,
            ),
            consumer_headers: ConsumerHeaderNames {
                remaining_tokens: header_name(&config.headers.consumer_remaining_tokens),
                remaining_requests: header_name(&config.headers.consumer_remaining_requests),
            },
            config: config.clone(),
            draining: Default::default(),
            classes: super::traffic_class::Classes::from_config(&config.classes),
            prices: Arc::new(crate::cost::PriceTable::from_config(config)),
        })
    }
}

/// A header name the configuration validated.
fn header_name(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes()).expect("header names are validated in config")
}
