//! Simulator configuration: resources (one loopback port each) and their deployments.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    pub resources: Vec<ResourceSpec>,
}

/// One Azure OpenAI resource (`https://<name>.openai.azure.com`), played on one port.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceSpec {
    pub name: String,
    #[serde(default = "loopback_any_port")]
    pub listen: SocketAddr,
    /// When set, requests must carry it in `api-key` (or as a Bearer token).
    #[serde(default)]
    pub api_key: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    pub deployments: Vec<DeploymentSpec>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentKind {
    /// Provisioned throughput: utilization header, fails fast above 100 %.
    Ptu,
    /// Pay as you go ("Standard"): TPM/RPM quota.
    #[default]
    Payg,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    pub name: String,
    #[serde(default)]
    pub kind: DeploymentKind,
    /// Tokens per window (a minute unless `window_ms` shortens it).
    #[serde(default = "default_tpm")]
    pub tpm: u64,
    /// Requests per window; default 6 per 1,000 TPM, as Azure assigns.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Length of the rate-limit window; tests and the demo shorten it.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// Model name reported in responses.
    #[serde(default = "default_model")]
    pub model: String,
    /// Time to first token.
    #[serde(default = "default_ttft_ms")]
    pub ttft_ms: u64,
    /// Time per generated token.
    #[serde(default = "default_ms_per_token")]
    pub ms_per_token: u64,
    /// ± share of random variation applied to both latencies.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Tokens generated when the request sets no lower `max_tokens`.
    #[serde(default = "default_output_tokens")]
    pub output_tokens: u32,
    #[serde(default = "default_embedding_dims")]
    pub embedding_dims: usize,
}

impl DeploymentSpec {
    pub fn new(name: &str, kind: DeploymentKind, tpm: u64) -> Self {
        Self {
            name: name.into(),
            kind,
            tpm,
            rpm: None,
            window_ms: default_window_ms(),
            model: default_model(),
            ttft_ms: default_ttft_ms(),
            ms_per_token: default_ms_per_token(),
            jitter: default_jitter(),
            output_tokens: default_output_tokens(),
            embedding_dims: default_embedding_dims(),
        }
    }

    pub fn rpm_limit(&self) -> u64 {
        self.rpm.unwrap_or((self.tpm * 6 / 1000).max(1))
    }
}

fn loopback_any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}
fn default_tpm() -> u64 {
    30_000
}
fn default_window_ms() -> u64 {
    60_000
}
fn default_model() -> String {
    "gpt-4o-2024-08-06".into()
}
fn default_ttft_ms() -> u64 {
    150
}
fn default_ms_per_token() -> u64 {
    10
}
fn default_jitter() -> f64 {
    0.1
}
fn default_output_tokens() -> u32 {
    24
}
fn default_embedding_dims() -> usize {
    16
}

impl SimConfig {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml_from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Two PTU resources in two regions and two PAYG ones, each serving `gpt-4o` and
    /// `text-embedding-3-small`: the layout of the README's example configuration.
    pub fn example_fleet() -> Self {
        let resource = |name: &str, region: &str, kind, tpm| ResourceSpec {
            name: name.into(),
            listen: loopback_any_port(),
            api_key: None,
            region: Some(region.into()),
            deployments: vec![
                DeploymentSpec::new("gpt-4o", kind, tpm),
                DeploymentSpec::new("text-embedding-3-small", kind, tpm),
            ],
        };
        Self {
            resources: vec![
                resource("ptu-eastus", "eastus", DeploymentKind::Ptu, 20_000),
                resource(
                    "ptu-swedencentral",
                    "swedencentral",
                    DeploymentKind::Ptu,
                    20_000,
                ),
                resource("payg-eastus2", "eastus2", DeploymentKind::Payg, 450_000),
                resource("payg-westus", "westus", DeploymentKind::Payg, 450_000),
            ],
        }
    }
}

fn toml_from_str(text: &str) -> Result<SimConfig, String> {
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| e.to_string())
}
