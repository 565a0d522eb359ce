//! Configuration: TOML sections, `SPILLWAY__SECTION__KEY` environment overrides, `validate()`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The whole configuration file. Unknown keys are errors, so typos do not pass silently.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub headers: HeadersConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub consumers: Vec<ConsumerConfig>,
    /// How clients other than key holders authenticate.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Per-pool settings, by pool name: `[pools.gpt-4o]`.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Tokenizer of the model behind the pool, for estimates.
    pub encoding: crate::tokens::Encoding,
    /// A member reporting this utilization or more (PTU's
    /// `azure-openai-deployment-utilization`) is skipped before it starts answering 429.
    pub spill_utilization: f64,
    /// When set, requests to this pool only ever go to members in these regions.
    pub regions: Option<Vec<String>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            encoding: crate::tokens::Encoding::O200kBase,
            spill_utilization: 0.95,
            regions: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Data plane: the OpenAI / Azure OpenAI API, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Operators only (metrics, admin API); loopback by default. Bound anywhere else, it
    /// requires `admin_token_env`.
    pub admin_listen: SocketAddr,
    /// Environment variable holding the bearer token the admin listener requires.
    pub admin_token_env: Option<String>,
    /// Host names the admin listener answers to besides IP addresses and `localhost` (e.g.
    /// `spillway-admin.internal`); a request naming any other host is refused (DNS rebinding).
    pub admin_hosts: Vec<String>,
    /// Largest request body accepted, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Bytes of request bodies one replica holds at once, all requests together: past it a
    /// request is refused with 503 before its body is read. Sized so bodies and what admission
    /// builds from them stay inside the container's memory limit (512 MiB in the shipped
    /// Deployment); at least `max_body_bytes`.
    pub max_inflight_body_bytes: usize,
    /// A body over the limit is still read (and discarded) up to this many bytes, so the
    /// client, still sending, can read its 413; past it the connection is closed.
    pub max_drain_bytes: usize,
    /// A client must send its request head (line and headers) within this time.
    pub header_timeout_ms: u64,
    /// A client must send its whole request body within this time (408 otherwise).
    pub body_timeout_ms: u64,
    /// Most header fields in one request (431 above it).
    pub max_headers: usize,
    /// Largest request head in bytes (431 above it); at least 8192.
    pub max_header_bytes: usize,
    /// Requests (streams and Realtime sessions included) one replica serves at once; past
    /// it, 503 at once.
    pub max_concurrent_requests: usize,
    /// Connections one listener serves at once; past it, new ones wait in the kernel's
    /// backlog until one closes.
    pub max_connections: usize,
    /// A connection (HTTP/1.1 or HTTP/2) with no request in flight for this long is closed
    /// (above Application Gateway's 4-minute backend idle time, so the gateway is not the
    /// one to close a connection the load balancer is about to reuse).
    pub idle_timeout_ms: u64,
    /// Largest Realtime (WebSocket) message, either way, in bytes: a larger one closes the
    /// session (1009).
    pub max_ws_message_bytes: usize,
    /// This replica's region: its members win ties.
    pub region: Option<String>,
    /// After SIGTERM: /readyz answers 503 at once, and everything is still served this long,
    /// so load balancers stop sending first.
    pub shutdown_delay_ms: u64,
    /// Then new connections are refused and in-flight requests (streams too) get this long
    /// to finish.
    pub drain_timeout_ms: u64,
    /// Terminate TLS on the data plane (off by default: Application Gateway or Front Door
    /// usually does).
    pub tls: Option<TlsConfig>,
    /// Serve a data plane beyond loopback with no `[[consumers]]` and no `[auth.jwt]`: anyone
    /// who reaches it spends the backends' capacity. Off: such a configuration is refused.
    pub allow_anonymous: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server certificate first, then its chain.
    pub cert_file: std::path::PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: std::path::PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            admin_token_env: None,
            admin_hosts: Vec::new(),
            max_body_bytes: 16 * 1024 * 1024,
            max_inflight_body_bytes: 64 * 1024 * 1024,
            max_drain_bytes: 64 * 1024 * 1024,
            header_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_concurrent_requests: 1_024,
            max_connections: 10_000,
            idle_timeout_ms: 300_000,
            // A second of 24 kHz 16-bit audio is 64 KiB as base64: room for long chunks.
            max_ws_message_bytes: 4 * 1024 * 1024,
            region: None,
            shutdown_delay_ms: 5_000,
            drain_timeout_ms: 20_000,
            tls: None,
            allow_anonymous: false,
        }
    }
}

/// Which client request headers are forwarded upstream (besides the built-in allow-list),
/// and the names of the consumer budget headers on responses.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    /// More header names to forward. Credentials and cookies are refused.
    pub forward: Vec<String>,
    /// Forward `forwarded` / `x-forwarded-*` (the client's address as a front proxy saw it).
    pub forward_x_forwarded: bool,
    /// For a consumer with a budget: the header carrying its remaining tokens (replacing
    /// the deployment's own), and its remaining requests (API Management names them too).
    pub consumer_remaining_tokens: String,
    pub consumer_remaining_requests: String,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        Self {
            forward: Vec::new(),
            forward_x_forwarded: false,
            consumer_remaining_tokens: "x-ratelimit-remaining-tokens".into(),
            consumer_remaining_requests: "x-ratelimit-remaining-requests".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// No URL: embedded in-process state. `redis://`, `rediss://` (TLS), with a password as
    /// `rediss://:password@host:6380`; a cluster as `redis-cluster://host:port?node=host:port`.
    pub redis_url: Option<String>,
    /// Every Redis key starts with this.
    pub key_prefix: String,
    /// Budget window (`tpm`, `rpm` are per this window); tests shorten it.
    pub window_ms: u64,
    /// The budget window is counted in this many buckets.
    pub window_buckets: u32,
    /// Latency samples are kept for this long.
    pub latency_window_ms: u64,
    /// A Redis call slower than this is abandoned (its reservation released later) and that
    /// decision is made on this replica's share of the budgets; after 3 within a second the
    /// pool is degraded until Redis has answered in time for 2 s (8 probes in a row).
    pub redis_timeout_ms: u64,
    /// On Redis, a replica admitting many requests takes up to this many admissions in one
    /// script call (a budget lease) and hands them out itself; 0 or 1: every request asks
    /// Redis. A lease never holds more than an eighth of a member's budget left.
    pub lease_requests: u32,
    /// How long a lease, and a PTU's "full" seen by it, is trusted without asking Redis.
    pub lease_ms: u64,
}

impl StateConfig {
    pub fn lease_policy(&self) -> spillway_shared::LeasePolicy {
        spillway_shared::LeasePolicy {
            max_requests: self.lease_requests,
            ttl: std::time::Duration::from_millis(self.lease_ms),
        }
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            key_prefix: "spillway".into(),
            window_ms: 60_000,
            window_buckets: 60,
            latency_window_ms: 300_000,
            // Measured: the acquire script on loopback Redis answers in p99 0.38 ms, p99.9
            // 1.1 ms, max 4.6 ms at 51k calls/s (redis-benchmark, README). 25 ms leaves room
            // for an in-region network hop; a slower call costs one local decision only.
            redis_timeout_ms: 25,
            // Measured (scripts/bench.sh, README): Redis arm 0.27x nginx without leases.
            lease_requests: 32,
            lease_ms: 100,
        }
    }
}

impl Config {
    /// The time shapes every fleet-state store is built with.
    pub fn windows(&self) -> spillway_shared::Windows {
        let ms = std::time::Duration::from_millis;
        spillway_shared::Windows {
            budget: ms(self.state.window_ms),
            budget_buckets: self.state.window_buckets,
            latency: ms(self.state.latency_window_ms),
            latency_slots: 5,
            hint_ttl: ms(self.routing.hint_ttl_ms),
            breaker_failures: self.routing.breaker_failures,
            breaker_probe: ms(self.routing.breaker_probe_ms),
            breaker_max: ms(self.routing.max_backoff_ms),
            breaker_failure_rate: self.routing.breaker_failure_rate,
            breaker_min_requests: self.routing.breaker_min_requests,
            breaker_window: ms(self.routing.breaker_window_ms),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Upstream attempts per request; default: every pool member once.
    pub max_attempts: Option<u32>,
    /// Backoff after a failure whose response names no retry time.
    pub default_backoff_ms: u64,
    /// Upper bound on any backoff, whatever an upstream asks for.
    pub max_backoff_ms: u64,
    /// TCP + TLS connect timeout per attempt.
    pub connect_timeout_ms: u64,
    /// Time allowed per attempt until the first byte of the response body.
    pub attempt_timeout_ms: u64,
    /// Time allowed for all attempts of one request together (until the first byte).
    pub request_timeout_ms: u64,
    /// A streaming attempt with no first byte within this time has stalled: it counts as a
    /// failure and the request moves on (nothing was sent to the client yet).
    pub stream_first_byte_timeout_ms: u64,
    /// Output tokens charged up front for a request that sets no `max_tokens`.
    pub default_max_tokens: u64,
    /// An upstream's capacity hints (utilization, remaining tokens) are trusted this long;
    /// a member skipped on a hint is tried again after it.
    pub hint_ttl_ms: u64,
    /// Share of picks inside a tier made at random, so a recovered member is measured again.
    pub explore_share: f64,
    /// A replica refreshes its copy of the fleet's latency and budgets this often (scoring).
    pub view_refresh_ms: u64,
    /// Circuit breaker, shared by the fleet: consecutive failures (5xx, connection errors,
    /// timeouts, stalls; not 429) that open it. Each opening lasts the failure's backoff
    /// doubled per consecutive opening, up to `max_backoff_ms`.
    pub breaker_failures: u32,
    /// After a cool-down one request probes the member; others wait this long for it.
    pub breaker_probe_ms: u64,
    /// The breaker also opens when this share of a member's outcomes failed within
    /// `breaker_window_ms`, once there are at least `breaker_min_requests` of them.
    pub breaker_failure_rate: f64,
    pub breaker_min_requests: u32,
    pub breaker_window_ms: u64,
    /// Retries may add at most this share of the requests (0.2 = 20 %) ...
    pub retry_ratio: f64,
    /// ... plus this many per second, so a quiet replica can still fail over.
    pub min_retries_per_second: f64,
    /// The fleet remembers which member holds each stored Responses API object this long,
    /// and sends follow-ups naming it there (Azure keeps stored responses 30 days).
    pub response_affinity_ttl_s: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            max_attempts: None,
            default_backoff_ms: 10_000,
            max_backoff_ms: 300_000,
            connect_timeout_ms: 5_000,
            attempt_timeout_ms: 120_000,
            request_timeout_ms: 300_000,
            stream_first_byte_timeout_ms: 20_000,
            default_max_tokens: 256,
            hint_ttl_ms: 1_000,
            explore_share: 0.05,
            view_refresh_ms: 500,
            breaker_failures: 1,
            breaker_probe_ms: 5_000,
            breaker_failure_rate: 0.5,
            breaker_min_requests: 20,
            breaker_window_ms: 30_000,
            retry_ratio: 0.2,
            min_retries_per_second: 10.0,
            response_affinity_ttl_s: 86_400,
        }
    }
}

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

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub id: String,
    pub url: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default = "one")]
    pub priority: u32,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub auth: BackendAuthConfig,
    /// Pool name → this backend's deployment name.
    #[serde(default)]
    pub deployments: BTreeMap<String, String>,
    /// Token and request budgets per minute (used by the fleet-state budgets).
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub rpm: Option<u64>,
    /// `ptu` (provisioned) or `payg` (standard, the default). Cached prompt tokens cost a
    /// provisioned deployment nothing, so they are not charged to a `ptu` member's budget.
    #[serde(default)]
    pub kind: BackendKind,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Ptu,
    #[default]
    Payg,
}

fn one() -> u32 {
    1
}

/// How the gateway authenticates to a backend. The client's own key is never forwarded.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BackendAuthConfig {
    /// `api-key` header, value read from the environment variable `env`.
    ApiKey { env: String },
    /// Entra ID token from the managed identity (user-assigned with `client_id`),
    /// scope `https://cognitiveservices.azure.com/.default`.
    ManagedIdentity {
        #[serde(default)]
        client_id: Option<String>,
    },
    /// Entra ID token for the pod's AKS workload identity: a federated service account token
    /// exchanged with Entra ID. Each setting defaults to the variable the AKS webhook injects
    /// (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`, `AZURE_FEDERATED_TOKEN_FILE`;
    /// `AZURE_AUTHORITY_HOST` names the authority).
    WorkloadIdentity {
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default)]
        tenant_id: Option<String>,
        #[serde(default)]
        token_file: Option<std::path::PathBuf>,
    },
    /// Entra ID token of the developer's `az login` (laptops; needs the Azure CLI).
    AzureCli {
        #[serde(default)]
        tenant_id: Option<String>,
    },
    /// No credential (simulators, private gateways).
    #[default]
    None,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Entra ID (JWT) bearer tokens; the application's id maps to a consumer's `client_id`.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The token's `iss`: `https://login.microsoftonline.com/<tenant>/v2.0` for v2 tokens,
    /// `https://sts.windows.net/<tenant>/` for v1.
    pub issuer: String,
    /// Accepted `aud` values: the gateway's application ID URI and/or client id.
    pub audiences: Vec<String>,
    /// The signing keys: a JWKS file, or (exactly one of the two) a URL such as
    /// `https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys`.
    #[serde(default)]
    pub jwks_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// A fetched key set is refreshed when older than this.
    #[serde(default = "default_jwks_refresh_s")]
    pub jwks_refresh_s: u64,
    /// Claims naming the calling application, first present wins.
    #[serde(default = "default_client_claims")]
    pub client_claims: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    #[serde(default = "default_jwt_leeway_s")]
    pub leeway_s: u64,
}

fn default_jwks_refresh_s() -> u64 {
    3600
}

fn default_client_claims() -> Vec<String> {
    vec!["azp".into(), "appid".into()]
}

fn default_jwt_leeway_s() -> u64 {
    30
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    pub name: String,
    /// SHA-256 of this consumer's key, in hex (`spillway hash-key` prints it): the key itself
    /// is never in the configuration.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Or: environment variable holding this consumer's key (hashed at start-up, then
    /// forgotten).
    #[serde(default)]
    pub key_env: Option<String>,
    /// The Entra ID application (client) id whose tokens are this consumer (`[auth.jwt]`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// When set, this consumer's requests only ever go to members in these regions
    /// (data residency), even when that means a 429.
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    /// When set, the only pools this consumer may use (others: 403).
    #[serde(default)]
    pub pools: Option<Vec<String>>,
    /// Largest prompt (estimated tokens) this consumer may send (larger: 400).
    #[serde(default)]
    pub max_prompt_tokens: Option<u64>,
    /// Most output a request of this consumer may ask for: its `max_tokens` (or
    /// `max_completion_tokens`, `max_output_tokens`) must be set, and at most this (else 400).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Tokens and requests this consumer may spend per budget window (a minute by default),
    /// fleet-wide (over: 429 with `retry-after`).
    #[serde(default)]
    pub tpm: Option<u64>,
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens this consumer may spend per `token_quota_period`, fleet-wide (spent: 403
    /// until the period ends).
    #[serde(default)]
    pub token_quota: Option<u64>,
    /// `hourly`, `daily`, `weekly` (from Monday) or `monthly` (the default), in UTC.
    #[serde(default)]
    pub token_quota_period: Option<crate::quota_period::QuotaPeriod>,
}

/// The configuration as JSON with every URL's password replaced (a Redis URL carries one);
/// keys are never in it (only their hashes and the names of the variables holding them).
pub fn redacted(config: &Config) -> serde_json::Value {
    fn redact(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(text) => {
                if let Ok(mut url) = url::Url::parse(text)
                    && url.password().is_some()
                    && url.set_password(Some("REDACTED")).is_ok()
                {
                    *text = url.to_string();
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
            serde_json::Value::Object(map) => map.values_mut().for_each(redact),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(config).unwrap_or_default();
    redact(&mut value);
    value
}

/// One thing wrong with a configuration, with the key it is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration:\n{}", list(.0))]
    Invalid(Vec<ConfigProblem>),
}

fn list(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Read `path` (TOML) if given, then overlay `SPILLWAY__SECTION__KEY` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let env = config::Environment::with_prefix("SPILLWAY")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        Ok(builder.add_source(env).build()?.try_deserialize()?)
    }

    /// Parse TOML text (tests, the demo) with the same rules as a file.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?
            .try_deserialize()?)
    }

    /// Everything that can be checked without touching the network, environment variables
    /// and files (TLS, JWKS) included.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_as(Resolve::Online)
    }

    /// The configuration alone: nothing it names (environment variables, files) is read.
    /// What CI or a laptop can check of a production file.
    pub fn validate_offline(&self) -> Result<(), ConfigError> {
        self.validate_as(Resolve::Offline)
    }

    fn validate_as(&self, resolve: Resolve) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: String, problem: String| problems.push(ConfigProblem { key, problem });
        self.server.validate(resolve, &mut bad);
        self.headers.validate(&mut bad);
        self.state.validate(&mut bad);
        self.routing.validate(&mut bad);
        self.validate_backends(resolve, &mut bad);
        self.validate_pools(&mut bad);
        self.validate_consumers(resolve, &mut bad);
        self.validate_jwt(&mut bad);
        self.validate_anonymous(&mut bad);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

impl StateConfig {
    fn validate(&self, bad: &mut impl FnMut(String, String)) {
        let st = self;
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}', ' ']) {
            bad(
                "state.key_prefix".into(),
                "must be non-empty without braces or spaces".into(),
            );
        }
        if st.window_ms == 0 || st.window_buckets == 0 || st.window_buckets as u64 > st.window_ms {
            bad(
                "state.window_ms".into(),
                "window_ms and window_buckets must be positive, with at least 1 ms per bucket"
                    .into(),
            );
        }
        if st.latency_window_ms < 5 {
            bad(
                "state.latency_window_ms".into(),
                "must be at least 5".into(),
            );
        }
        if st.redis_timeout_ms == 0 {
            bad(
                "state.redis_timeout_ms".into(),
                "must be greater than 0".into(),
            );
        }
        if st.lease_requests >= 2 && (st.lease_ms == 0 || st.lease_ms > st.window_ms) {
            bad(
                "state.lease_ms".into(),
                "must be from 1 ms to the budget window (window_ms) when leases are on".into(),
            );
        }
    }
}

impl RoutingConfig {
    fn validate(&self, bad: &mut impl FnMut(String, String)) {
        if !(0.0..=1.0).contains(&self.explore_share) {
            bad(
                "routing.explore_share".into(),
                "must be a share from 0 to 1".into(),
            );
        }
        if !(self.retry_ratio >= 0.0 && self.min_retries_per_second >= 0.0) {
            bad(
                "routing.retry_ratio".into(),
                "retry_ratio and min_retries_per_second must be >= 0".into(),
            );
        }
        if !(self.breaker_failure_rate > 0.0 && self.breaker_failure_rate <= 1.0) {
            bad(
                "routing.breaker_failure_rate".into(),
                "must be a share above 0 and at most 1".into(),
            );
        }
        if self.breaker_failures == 0 {
            bad(
                "routing.breaker_failures".into(),
                "must be at least 1".into(),
            );
        }
        if self.view_refresh_ms == 0 {
            bad(
                "routing.view_refresh_ms".into(),
                "must be greater than 0".into(),
            );
        }
        if self.response_affinity_ttl_s == 0 {
            bad(
                "routing.response_affinity_ttl_s".into(),
                "must be greater than 0 (follow-ups need to find their member)".into(),
            );
        }
        if self.hint_ttl_ms == 0 {
            bad(
                "routing.hint_ttl_ms".into(),
                "must be greater than 0".into(),
            );
        }
        let r = self;
        if r.max_attempts == Some(0) {
            bad("routing.max_attempts".into(), "must be at least 1".into());
        }
        for (key, value) in [
            ("routing.connect_timeout_ms", r.connect_timeout_ms),
            ("routing.attempt_timeout_ms", r.attempt_timeout_ms),
            ("routing.request_timeout_ms", r.request_timeout_ms),
            (
                "routing.stream_first_byte_timeout_ms",
                r.stream_first_byte_timeout_ms,
            ),
            ("routing.max_backoff_ms", r.max_backoff_ms),
        ] {
            if value == 0 {
                bad(key.into(), "must be greater than 0".into());
            }
        }
    }
}

impl Config {
    fn validate_backends(&self, resolve: Resolve, bad: &mut impl FnMut(String, String)) {
        if self.backends.is_empty() {
            bad(
                "backends".into(),
                "no backends configured: add at least one [[backends]] table".into(),
            );
        }

        let mut ids = BTreeSet::new();
        for (i, b) in self.backends.iter().enumerate() {
            let at = |field: &str| format!("backends[{i}].{field}");
            if b.id.is_empty()
                || !b
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                bad(
                    at("id"),
                    format!(
                        "{:?} must be non-empty and use only letters, digits, '-', '_', '.'",
                        b.id
                    ),
                );
            } else if !ids.insert(b.id.as_str()) {
                bad(at("id"), format!("{:?} is used by another backend", b.id));
            }
            match reqwest::Url::parse(&b.url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                Ok(_) => bad(
                    at("url"),
                    format!("{:?} must be an http(s) URL with a host", b.url),
                ),
                Err(e) => bad(at("url"), format!("{:?} is not a URL: {e}", b.url)),
            }
            if b.priority == 0 {
                bad(
                    at("priority"),
                    "must be at least 1 (1 is tried first)".into(),
                );
            }
            if b.tpm == Some(0) {
                bad(
                    at("tpm"),
                    "must be at least 1 (leave it out for no budget)".into(),
                );
            }
            if b.rpm == Some(0) {
                bad(
                    at("rpm"),
                    "must be at least 1 (leave it out for no budget)".into(),
                );
            }
            if b.weight == 0 {
                bad(at("weight"), "must be at least 1".into());
            }
            if b.deployments.is_empty() {
                bad(
                    at("deployments"),
                    "maps no pool to a deployment; this backend would never be used".into(),
                );
            }
            for (pool, deployment) in &b.deployments {
                // Both appear as one URL path segment (the pool in client paths, the
                // deployment upstream), so both follow the path-segment rule.
                let plain = |name: &str| crate::proxy::check_segment(name, 0).is_ok();
                if !plain(pool) || !plain(deployment) {
                    bad(
                        at(&format!("deployments.{pool}")),
                        "pool and deployment names must be non-empty and use only letters, digits, '-', '.', '_', '~', not starting or ending with '.'".into(),
                    );
                }
            }
            // Budgets and backoffs are kept per pool: two pools on one deployment would each
            // spend its whole capacity.
            let mut by_deployment: BTreeMap<&str, &str> = BTreeMap::new();
            for (pool, deployment) in &b.deployments {
                if let Some(other) = by_deployment.insert(deployment, pool) {
                    bad(
                        at("deployments"),
                        format!(
                            "pools {other:?} and {pool:?} both name deployment {deployment:?}: budgets and backoffs are kept per pool, so each would spend its whole capacity; map one pool to it (clients can share that pool name)"
                        ),
                    );
                }
            }
            if let BackendAuthConfig::ApiKey { env } = &b.auth {
                check_env(resolve, bad, at("auth.env"), env);
            }
        }
    }

    fn validate_pools(&self, bad: &mut impl FnMut(String, String)) {
        let pools: BTreeSet<&str> = self
            .backends
            .iter()
            .flat_map(|b| b.deployments.keys())
            .map(String::as_str)
            .collect();
        for (name, pool) in &self.pools {
            if !(pool.spill_utilization > 0.0 && pool.spill_utilization <= 1.0) {
                bad(
                    format!("pools.{name}.spill_utilization"),
                    "must be a share above 0 and at most 1 (0.95 = 95 %)".into(),
                );
            }
            if !pools.contains(name.as_str()) {
                bad(
                    format!("pools.{name}"),
                    "no backend serves this pool (check the name against backends' deployments)"
                        .into(),
                );
            }
        }
    }

    fn validate_consumers(&self, resolve: Resolve, bad: &mut impl FnMut(String, String)) {
        let mut names = BTreeSet::new();
        let mut client_ids = BTreeSet::new();
        for (i, c) in self.consumers.iter().enumerate() {
            if c.name.is_empty() || !names.insert(c.name.as_str()) {
                bad(
                    format!("consumers[{i}].name"),
                    format!("{:?} must be non-empty and unique", c.name),
                );
            }
            if let Some(id) = &c.client_id
                && !client_ids.insert(id.as_str())
            {
                bad(
                    format!("consumers[{i}].client_id"),
                    format!("{id:?} is already another consumer's"),
                );
            }
            if c.client_id.is_some() && self.auth.jwt.is_none() {
                bad(
                    format!("consumers[{i}].client_id"),
                    "needs [auth.jwt] (the tokens it names are Entra ID tokens)".into(),
                );
            }
            match (&c.key_sha256, &c.key_env) {
                (None, None) if c.client_id.is_some() => {}
                (Some(hash), None) => {
                    if hex::decode(hash).map(|h| h.len()) != Ok(32) {
                        bad(
                            format!("consumers[{i}].key_sha256"),
                            "must be 64 hexadecimal digits (the output of `spillway hash-key`)"
                                .into(),
                        );
                    }
                }
                (None, Some(var)) => {
                    check_env(resolve, bad, format!("consumers[{i}].key_env"), var)
                }
                _ => bad(
                    format!("consumers[{i}]"),
                    "needs exactly one of key_sha256 and key_env (or only a client_id)".into(),
                ),
            }
            if c.token_quota_period.is_some() && c.token_quota.is_none() {
                bad(
                    format!("consumers[{i}].token_quota_period"),
                    "is set without token_quota".into(),
                );
            }
            for (key, value) in [
                ("tpm", c.tpm),
                ("rpm", c.rpm),
                ("max_tokens", c.max_tokens),
                ("token_quota", c.token_quota),
            ] {
                if value == Some(0) {
                    bad(
                        format!("consumers[{i}].{key}"),
                        "must be greater than 0".into(),
                    );
                }
            }
        }
    }
}

impl Config {
    /// The data plane serves anyone (no consumer keys, no Entra ID clients).
    pub fn is_anonymous(&self) -> bool {
        self.consumers.is_empty() && self.auth.jwt.is_none()
    }

    /// Fail closed: an anonymous data plane only on loopback, unless asked for by name.
    fn validate_anonymous(&self, bad: &mut impl FnMut(String, String)) {
        if self.is_anonymous()
            && !self.server.listen.ip().is_loopback()
            && !self.server.allow_anonymous
        {
            bad(
                "consumers".into(),
                format!(
                    "none configured and no [auth.jwt], yet server.listen {} is not a loopback address: anyone reaching it would spend the backends' capacity. Add [[consumers]] (keys: `spillway hash-key`), or set server.allow_anonymous = true if a front door authenticates every request",
                    self.server.listen
                ),
            );
        }
    }

    fn validate_jwt(&self, bad: &mut impl FnMut(String, String)) {
        let Some(jwt) = &self.auth.jwt else {
            return;
        };
        if jwt.issuer.is_empty() {
            bad("auth.jwt.issuer".into(), "must not be empty".into());
        }
        if jwt.audiences.is_empty() || jwt.audiences.iter().any(String::is_empty) {
            bad(
                "auth.jwt.audiences".into(),
                "must list at least one audience, none empty".into(),
            );
        }
        if jwt.client_claims.is_empty() {
            bad("auth.jwt.client_claims".into(), "must name a claim".into());
        }
        match (&jwt.jwks_file, &jwt.jwks_url) {
            (Some(_), None) => {}
            (None, Some(url)) => {
                if !jwks_url_is_trusted(url) {
                    bad(
                        "auth.jwt.jwks_url".into(),
                        "must be an https:// URL (http:// only to a loopback address): the keys it serves decide who is let in".into(),
                    );
                }
            }
            _ => bad(
                "auth.jwt".into(),
                "needs exactly one of jwks_file and jwks_url".into(),
            ),
        }
        if jwt.jwks_refresh_s == 0 {
            bad(
                "auth.jwt.jwks_refresh_s".into(),
                "must be greater than 0".into(),
            );
        }
    }
}

impl ServerConfig {
    fn validate(&self, resolve: Resolve, bad: &mut impl FnMut(String, String)) {
        if let Some(tls) = &self.tls
            && resolve == Resolve::Online
            && let Err(e) = crate::tls::acceptor(tls)
        {
            bad("server.tls".into(), e);
        }
        for (key, value) in [
            ("server.max_body_bytes", self.max_body_bytes as u64),
            ("server.header_timeout_ms", self.header_timeout_ms),
            ("server.body_timeout_ms", self.body_timeout_ms),
            ("server.max_headers", self.max_headers as u64),
            (
                "server.max_concurrent_requests",
                self.max_concurrent_requests as u64,
            ),
            (
                "server.max_ws_message_bytes",
                self.max_ws_message_bytes as u64,
            ),
            ("server.max_connections", self.max_connections as u64),
            ("server.idle_timeout_ms", self.idle_timeout_ms),
        ] {
            if value == 0 {
                bad(key.into(), "must be greater than 0".into());
            }
        }
        if self.max_inflight_body_bytes < self.max_body_bytes {
            bad(
                "server.max_inflight_body_bytes".into(),
                format!(
                    "must be at least max_body_bytes ({}), or the largest body could never be admitted",
                    self.max_body_bytes
                ),
            );
        }
        if self.max_body_bytes > u32::MAX as usize {
            bad(
                "server.max_body_bytes".into(),
                "must be at most 4294967295".into(),
            );
        }
        if self.max_header_bytes < 8_192 {
            bad(
                "server.max_header_bytes".into(),
                "must be at least 8192".into(),
            );
        }
        match &self.admin_token_env {
            Some(var) => check_env(resolve, bad, "server.admin_token_env".into(), var),
            None if !self.admin_listen.ip().is_loopback() => bad(
                "server.admin_token_env".into(),
                format!(
                    "admin_listen {} is not a loopback address: set admin_token_env to the environment variable holding the admin bearer token",
                    self.admin_listen
                ),
            ),
            None => {}
        }
    }
}

impl HeadersConfig {
    fn validate(&self, bad: &mut impl FnMut(String, String)) {
        for (key, name) in [
            (
                "headers.consumer_remaining_tokens",
                &self.consumer_remaining_tokens,
            ),
            (
                "headers.consumer_remaining_requests",
                &self.consumer_remaining_requests,
            ),
        ] {
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                bad(key.into(), format!("{name:?} is not a header name"));
            }
        }
        for (i, name) in self.forward.iter().enumerate() {
            let key = format!("headers.forward[{i}]");
            let lower = name.to_ascii_lowercase();
            if axum::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                bad(key, format!("{name:?} is not a header name"));
            } else if crate::headers::NEVER_FORWARDED.contains(&lower.as_str()) {
                bad(
                    key,
                    format!("{name:?} carries credentials or cookies and is never forwarded"),
                );
            }
        }
    }
}

/// A key set is fetched over TLS, or from this machine (tests, a local sidecar).
fn jwks_url_is_trusted(url: &str) -> bool {
    let Ok(url) = url::Url::parse(url) else {
        return false;
    };
    match url.scheme() {
        "https" => url.host().is_some(),
        "http" => match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
            None => false,
        },
        _ => false,
    }
}

/// Whether validation reads what the configuration names (environment variables, files).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolve {
    Online,
    Offline,
}

fn check_env(resolve: Resolve, bad: &mut impl FnMut(String, String), key: String, var: &str) {
    if resolve == Resolve::Offline {
        return;
    }
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => {}
        Ok(_) => bad(key, format!("environment variable {var} is empty")),
        Err(_) => bad(key, format!("environment variable {var} is not set")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[backends]]
        id = "ptu-eastus"
        url = "http://127.0.0.1:1"
        deployments = { "gpt-4o" = "gpt-4o-ptu" }
    "#;

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match Config::from_toml(text).unwrap().validate() {
            Err(ConfigError::Invalid(p)) => p,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg = Config::from_toml(MINIMAL).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.server.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(cfg.routing.default_backoff_ms, 10_000);
        assert_eq!(cfg.backends[0].priority, 1);
        assert!(matches!(cfg.backends[0].auth, BackendAuthConfig::None));
    }

    #[test]
    fn problems_name_the_key() {
        let p = problems(
            r#"
            [[backends]]
            id = "a"
            url = "ftp://x"
            priority = 0
            deployments = { "gpt-4o" = "d" }
            [[backends]]
            id = "a"
            url = "http://127.0.0.1:1"
            auth = { type = "api-key", env = "SPILLWAY_TEST_SURELY_UNSET_VAR" }
            deployments = { "gpt-4o" = "d" }
        "#,
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "backends[0].url",
                "backends[0].priority",
                "backends[1].id",
                "backends[1].auth.env"
            ]
        );
        assert!(
            p[3].problem
                .contains("SPILLWAY_TEST_SURELY_UNSET_VAR is not set")
        );
    }

    #[test]
    fn a_token_quota_needs_a_count_and_a_known_period() {
        let consumer = |extra: &str| {
            format!(
                "{MINIMAL}\n[[consumers]]\nname = \"app\"\nkey_sha256 = \"{}\"\n{extra}",
                "ab".repeat(32)
            )
        };
        let keys =
            |text: &str| -> Vec<String> { problems(text).into_iter().map(|p| p.key).collect() };
        assert_eq!(
            keys(&consumer("token_quota_period = \"daily\"")),
            ["consumers[0].token_quota_period"]
        );
        assert_eq!(
            keys(&consumer("token_quota = 0")),
            ["consumers[0].token_quota"]
        );
        let err = Config::from_toml(&consumer(
            "token_quota = 5\ntoken_quota_period = \"yearly\"",
        ))
        .unwrap_err();
        assert!(err.to_string().contains("yearly"), "{err}");
        Config::from_toml(&consumer("token_quota = 5"))
            .unwrap()
            .validate()
            .expect("the period defaults to monthly");
    }

    #[test]
    fn jwt_clients_need_a_key_source_an_audience_and_unique_client_ids() {
        let text = |jwt: &str| {
            format!(
                "{MINIMAL}\n[auth.jwt]\nissuer = \"https://login.microsoftonline.com/t/v2.0\"\n{jwt}\n\
                 [[consumers]]\nname = \"a\"\nclient_id = \"app\"\n\
                 [[consumers]]\nname = \"b\"\nclient_id = \"app\"\n"
            )
        };
        let keys: Vec<String> = problems(&text("audiences = []\njwks_url = \"ftp://x\""))
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            [
                "consumers[1].client_id",
                "auth.jwt.audiences",
                "auth.jwt.jwks_url"
            ]
        );
        let both = problems(&text(
            "audiences = [\"api://x\"]\njwks_url = \"https://x\"\njwks_file = \"/k\"",
        ));
        assert!(both.iter().any(|p| p.key == "auth.jwt"), "{both:?}");
        let no_jwt = format!("{MINIMAL}\n[[consumers]]\nname = \"a\"\nclient_id = \"app\"\n");
        assert_eq!(problems(&no_jwt)[0].key, "consumers[0].client_id");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::from_toml("[server]\nlisen = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn no_backends_is_a_problem() {
        assert_eq!(problems("")[0].key, "backends");
    }

    #[test]
    fn two_pools_on_one_deployment_are_refused_with_the_reason() {
        let p = problems(
            "[[backends]]\nid = \"a\"\nurl = \"http://127.0.0.1:1\"\ndeployments = { \"gpt-4o\" = \"d\", \"gpt-4o-mini\" = \"d\" }\n",
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "backends[0].deployments");
        assert!(
            p[0].problem
                .contains("budgets and backoffs are kept per pool"),
            "{p:?}"
        );
    }

    #[test]
    fn an_anonymous_data_plane_beyond_loopback_is_refused_unless_asked_for() {
        let public = format!("[server]\nlisten = \"0.0.0.0:8080\"\n{MINIMAL}");
        let p = problems(&public);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].key, "consumers");
        assert!(p[0].problem.contains("allow_anonymous"), "{p:?}");
        let v6 = format!("[server]\nlisten = \"[::]:8080\"\n{MINIMAL}");
        assert_eq!(problems(&v6)[0].key, "consumers");
        let allowed =
            format!("[server]\nlisten = \"0.0.0.0:8080\"\nallow_anonymous = true\n{MINIMAL}");
        Config::from_toml(&allowed).unwrap().validate().unwrap();
        let with_consumer = format!(
            "{public}\n[[consumers]]\nname = \"app\"\nkey_sha256 = \"{}\"\n",
            "ab".repeat(32)
        );
        Config::from_toml(&with_consumer)
            .unwrap()
            .validate()
            .unwrap();
        for loopback in ["127.0.0.1:8080", "[::1]:8080"] {
            let local = format!("[server]\nlisten = \"{loopback}\"\n{MINIMAL}");
            Config::from_toml(&local).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn a_jwks_url_is_https_or_loopback() {
        for ok in [
            "https://login.microsoftonline.com/t/discovery/v2.0/keys",
            "http://127.0.0.1:9/keys",
            "http://[::1]:9/keys",
            "http://localhost:9/keys",
        ] {
            assert!(jwks_url_is_trusted(ok), "{ok}");
        }
        for bad in [
            "http://login.microsoftonline.com/keys",
            "http://10.0.0.1/keys",
            "ftp://x/keys",
            "file:///etc/keys",
            "not a url",
        ] {
            assert!(!jwks_url_is_trusted(bad), "{bad}");
        }
    }

    #[test]
    fn an_admin_listener_beyond_loopback_needs_a_token() {
        let p = problems(&format!(
            "[server]\nadmin_listen = \"0.0.0.0:9090\"\n{MINIMAL}"
        ));
        assert!(p.iter().any(|p| p.key == "server.admin_token_env"), "{p:?}");
    }
}
