//! Configuration: TOML sections, `SPILLWAY__SECTION__KEY` environment overrides, `validate()`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

mod backends;
mod classes;
mod consumers;
mod headers;
mod prices;
pub mod quota_period;
mod routing;
mod server;
mod state;
mod telemetry;

pub use backends::{BackendAuthConfig, BackendConfig, BackendKind, Encoding, PoolConfig};
pub use classes::{ClassConfig, Overflow, default_classes};
pub use consumers::{AuthConfig, ConsumerConfig, JwtConfig};
pub use headers::{HeadersConfig, NEVER_FORWARDED};
pub use prices::{HOURS_PER_MONTH, PriceConfig};
pub use routing::RoutingConfig;
pub use server::{ServerConfig, TlsConfig};
pub use state::StateConfig;
pub use telemetry::TelemetryConfig;

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
    /// Traffic classes (`interactive` and `batch` when none are listed).
    #[serde(default = "default_classes")]
    pub classes: Vec<ClassConfig>,
    /// What tokens and PTU reservations cost (the cost ledger's money).
    #[serde(default)]
    pub prices: Vec<PriceConfig>,
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
        self.validate_classes(&mut bad);
        self.validate_prices(&mut bad);
        self.validate_jwt(&mut bad);
        self.validate_anonymous(&mut bad);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
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
    fn class_and_reserve_mistakes_name_their_key() {
        let p = problems(
            r#"
            [[backends]]
            id = "ptu"
            url = "http://127.0.0.1:1"
            kind = "ptu"
            reserve = 0.2
            deployments = { "gpt-4o" = "a" }
            [[backends]]
            id = "payg"
            url = "http://127.0.0.1:2"
            reserve = 0.2
            tpm = 1000
            deployments = { "gpt-4o" = "b" }
            [[backends]]
            id = "big"
            url = "http://127.0.0.1:3"
            kind = "ptu"
            tpm = 1000
            reserve = 1.0
            deployments = { "gpt-4o" = "c" }
            [[classes]]
            name = "interactive"
            rank = 2
            [[classes]]
            name = "interactive"
            rank = 1
            [[consumers]]
            name = "jobs"
            class = "nightly"
            key_sha256 = "0c7e232ca6aa55ab05a0287b1c4198c7b4275500bce25c40b5a6aa7d564d3c45"
        "#,
        );
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "backends[0].reserve",
                "backends[1].reserve",
                "backends[2].reserve",
                "classes[1].name",
                "consumers[0].class",
            ],
            "{p:?}"
        );
        let defaults = Config::from_toml(MINIMAL).unwrap();
        let names: Vec<&str> = defaults.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["interactive", "batch"]);
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
            assert!(consumers::jwks_url_is_trusted(ok), "{ok}");
        }
        for bad in [
            "http://login.microsoftonline.com/keys",
            "http://10.0.0.1/keys",
            "ftp://x/keys",
            "file:///etc/keys",
            "not a url",
        ] {
            assert!(!consumers::jwks_url_is_trusted(bad), "{bad}");
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
