//! `[[backends]]` and `[pools.*]`: the Azure OpenAI resources, their deployments and how the gateway authenticates to each; the pools they form.

use super::*;

/// The tokenizer of the model behind a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// gpt-4o, gpt-4.1, o-series.
    #[default]
    O200kBase,
    /// gpt-4, gpt-3.5-turbo, text-embedding-3-*, ada-002.
    Cl100kBase,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Tokenizer of the model behind the pool, for estimates.
    pub encoding: Encoding,
    /// A member reporting this utilization or more (PTU's
    /// `azure-openai-deployment-utilization`) is skipped before it starts answering 429.
    pub spill_utilization: f64,
    /// When set, requests to this pool only ever go to members in these regions.
    pub regions: Option<Vec<String>>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            encoding: Encoding::O200kBase,
            spill_utilization: 0.95,
            regions: None,
        }
    }
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
    /// `ptu` (provisioned), `payg` (standard, the default) or `priority` (Azure priority
    /// processing: standard deployments called with `service_tier = "priority"`, billed
    /// above standard, reached only by classes with `priority_tier`). Cached prompt tokens
    /// cost a provisioned deployment nothing, so they are not charged to a `ptu` member's
    /// budget.
    #[serde(default)]
    pub kind: BackendKind,
    /// `ptu` only: the share of its `tpm` kept for the highest-ranked traffic class; lower
    /// classes are admitted only while the window's use stays below `tpm × (1 − reserve)`.
    #[serde(default)]
    pub reserve: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Ptu,
    #[default]
    Payg,
    Priority,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ptu => "ptu",
            Self::Payg => "payg",
            Self::Priority => "priority",
        }
    }
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

impl Config {
    pub(super) fn validate_backends(&self, resolve: Resolve, bad: &mut impl FnMut(String, String)) {
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
            b.validate(&at, bad);
            if let BackendAuthConfig::ApiKey { env } = &b.auth {
                check_env(resolve, bad, at("auth.env"), env);
            }
        }
    }

    pub(super) fn validate_pools(&self, bad: &mut impl FnMut(String, String)) {
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
}

impl BackendConfig {
    /// One backend's own fields (`at` names a field's key).
    fn validate(&self, at: &impl Fn(&str) -> String, bad: &mut impl FnMut(String, String)) {
        let b = self;
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
        if !(0.0..1.0).contains(&b.reserve) {
            bad(
                at("reserve"),
                "must be a share from 0 up to (not including) 1 (0.2 = 20 %)".into(),
            );
        } else if b.reserve > 0.0 && b.kind != BackendKind::Ptu {
            bad(
                at("reserve"),
                format!(
                    "applies to kind = \"ptu\" members only (this one is {:?})",
                    b.kind.as_str()
                ),
            );
        } else if b.reserve > 0.0 && b.tpm.is_none() {
            bad(
                at("reserve"),
                "needs tpm: the line lower classes stop at is a share of it".into(),
            );
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
            let plain = |name: &str| crate::path_segment::check_segment(name, 0).is_ok();
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
    }
}
