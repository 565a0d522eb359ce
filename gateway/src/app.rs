//! The gateway's shared parts (`Gateway`) and its data-plane router (`app`).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use spillway_shared::FleetState;

use crate::config::{Config, ConfigError, ConfigProblem, RoutingConfig};
use crate::consumers::Consumers;
use crate::credentials::BackendCredential;
use crate::error::GatewayError;
use crate::fleet_view::FleetView;
use crate::proxy::{self, Inbound};
use crate::retry_budget::RetryBudget;
use crate::table::RoutingTable;

/// Everything a request needs, shared by all requests of one replica.
pub struct Gateway {
    pub table: RoutingTable,
    pub fleet: Arc<dyn FleetState>,
    pub http: reqwest::Client,
    pub consumers: Consumers,
    pub routing: RoutingConfig,
    pub max_body_bytes: usize,
    /// This replica's region (wins ties).
    pub region: Option<String>,
    /// Recent fleet latency and budgets, for scoring members.
    pub view: Arc<FleetView>,
    pub retry_budget: RetryBudget,
}

impl Gateway {
    /// Validate `config` and resolve its secrets; the fleet state is chosen by the caller.
    pub fn from_config(config: &Config, fleet: Arc<dyn FleetState>) -> Result<Self, ConfigError> {
        config.validate()?;
        let invalid = |key: String, problem: String| {
            ConfigError::Invalid(vec![ConfigProblem { key, problem }])
        };
        let credentials = config
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                BackendCredential::from_config(b)
                    .map_err(|p| invalid(format!("backends[{i}].auth"), p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let consumers = Consumers::from_config(&config.consumers)
            .map_err(|p| invalid("consumers".into(), p))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.routing.connect_timeout_ms))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| {
                invalid(
                    "routing".into(),
                    format!("cannot build the HTTP client: {e}"),
                )
            })?;
        crate::metrics::handle(); // install the recorder before anything is counted
        Ok(Self {
            table: RoutingTable::build(config, credentials),
            fleet,
            http,
            consumers,
            routing: config.routing.clone(),
            max_body_bytes: config.server.max_body_bytes,
            region: config.server.region.clone(),
            view: FleetView::new(Duration::from_millis(config.routing.view_refresh_ms)),
            retry_budget: RetryBudget::new(
                config.routing.retry_ratio,
                config.routing.min_retries_per_second,
            ),
        })
    }
}

/// The data-plane router: the Azure OpenAI and OpenAI v1 APIs plus health probes.
pub fn app(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/openai/deployments/{pool}/{*operation}", post(deployment))
        .route("/openai/v1/{*operation}", post(v1))
        .route("/v1/{*operation}", post(v1))
        .fallback(|| async { GatewayError::NotFound })
        .with_state(gateway)
}

/// The admin router (operators only, `server.admin_listen`): Prometheus metrics and a probe.
pub fn admin(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(g): State<Arc<Gateway>>| async move { crate::metrics::render(&*g.fleet) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(gateway)
}

async fn readyz(State(gateway): State<Arc<Gateway>>) -> Response {
    match gateway.fleet.ping().await {
        Ok(()) => (
            StatusCode::OK,
            format!("ready (state: {})", gateway.fleet.describe()),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn deployment(
    State(gateway): State<Arc<Gateway>>,
    Path((pool, _)): Path<(String, String)>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // The operation is taken from the raw path so it is forwarded exactly as sent.
    let operation = uri
        .path()
        .strip_prefix("/openai/deployments/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(String::new(), |(_, op)| op.to_owned());
    let inbound = Inbound {
        pool: Some(pool),
        operation,
        query,
        headers,
        body,
    };
    proxy::handle(&gateway, inbound).await
}

async fn v1(
    State(gateway): State<Arc<Gateway>>,
    uri: Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path();
    let operation = path
        .strip_prefix("/openai/v1/")
        .or_else(|| path.strip_prefix("/v1/"))
        .unwrap_or_default()
        .to_owned();
    let inbound = Inbound {
        pool: None,
        operation,
        query,
        headers,
        body,
    };
    proxy::handle(&gateway, inbound).await
}
