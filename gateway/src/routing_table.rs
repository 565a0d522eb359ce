//! The resolved routing table: pool → tiers (by priority) → members (backend + deployment).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use spillway_shared::{BackendId, Candidate, PoolName};

use crate::auth::credentials::BackendCredential;
use crate::config::{BackendKind, Config};

/// One Azure OpenAI resource the gateway may send traffic to.
#[derive(Debug)]
pub struct Backend {
    pub id: BackendId,
    /// Base URL, e.g. `https://contoso.openai.azure.com`; upstream paths are built on it
    /// segment by segment (`proxy::upstream_path`).
    pub base_url: url::Url,
    /// The base URL split once into what every upstream request's URI is built from.
    pub upstream: UpstreamBase,
    pub region: Option<String>,
    pub priority: u32,
    pub weight: u32,
    pub credential: BackendCredential,
    /// Budget per deployment per window (`state.window_ms`, a minute by default).
    pub tpm: Option<u64>,
    pub rpm: Option<u64>,
    /// PTU, standard PAYG or priority processing.
    pub kind: BackendKind,
    /// PTU: the share of `tpm` kept for the highest-ranked traffic class.
    pub reserve: f64,
}

impl Backend {
    /// Provisioned (PTU): cached prompt tokens are not charged to its budget.
    pub fn provisioned(&self) -> bool {
        self.kind == BackendKind::Ptu
    }
}

/// A backend's base URL as an upstream request needs it: scheme and authority (shared,
/// never parsed again) and the path prefix the API paths go under (no trailing `/`).
#[derive(Clone, Debug)]
pub struct UpstreamBase {
    pub scheme: axum::http::uri::Scheme,
    pub authority: axum::http::uri::Authority,
    pub path: String,
}

impl UpstreamBase {
    /// Split a validated http(s) backend URL.
    pub fn of(url: &url::Url) -> Self {
        let scheme = if url.scheme() == "https" {
            axum::http::uri::Scheme::HTTPS
        } else {
            axum::http::uri::Scheme::HTTP
        };
        let authority = url::Position::BeforeHost..url::Position::AfterPort;
        let path = url.path();
        Self {
            scheme,
            authority: url[authority]
                .parse()
                .expect("a validated backend URL has a host"),
            // As the `url` crate's segment API does: one trailing empty segment dropped.
            path: path.strip_suffix('/').unwrap_or(path).to_owned(),
        }
    }
}

/// A backend serving a pool under its own deployment name.
#[derive(Clone, Debug)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub deployment: String,
}

#[derive(Debug)]
pub struct Pool {
    pub name: PoolName,
    pub encoding: crate::config::Encoding,
    /// Members reporting this utilization or more are skipped (proactive spill-over).
    pub spill_utilization: f64,
    /// Requests to this pool only go to members in these regions.
    pub regions: Option<Vec<String>>,
    /// Sorted by priority, then backend id.
    pub members: Vec<Member>,
}

impl Pool {
    pub fn member(&self, id: &BackendId) -> Option<&Member> {
        self.members.iter().find(|m| &m.backend.id == id)
    }

    /// A member as offered to the fleet state: its budget and this pool's spill threshold.
    pub fn candidate(&self, member: &Member) -> Candidate {
        Candidate {
            backend: member.backend.id.clone(),
            tokens_per_window: member.backend.tpm,
            requests_per_window: member.backend.rpm,
            spill_utilization: Some(self.spill_utilization),
            tier: member.backend.priority,
            ceiling: None,
        }
    }

    pub fn candidates(&self) -> Vec<Candidate> {
        self.members.iter().map(|m| self.candidate(m)).collect()
    }

    /// Members a request may use: in `regions` when given (data residency). A member with
    /// no configured region is never assumed to be inside a restriction.
    pub fn members_in<'a>(
        &'a self,
        regions: Option<&'a [String]>,
    ) -> impl Iterator<Item = &'a Member> {
        self.members.iter().filter(move |m| match regions {
            None => true,
            Some(allowed) => m
                .backend
                .region
                .as_ref()
                .is_some_and(|r| allowed.contains(r)),
        })
    }
}

#[derive(Debug, Default)]
pub struct RoutingTable {
    pools: BTreeMap<String, Arc<Pool>>,
}

impl RoutingTable {
    /// Build from a validated configuration and the backends' resolved credentials
    /// (in the order of `config.backends`).
    pub fn build(config: &Config, credentials: Vec<BackendCredential>) -> Self {
        let mut pools: BTreeMap<String, Vec<Member>> = BTreeMap::new();
        for (b, credential) in config.backends.iter().zip(credentials) {
            let base_url = url::Url::parse(&b.url).expect("backend URLs are validated");
            let backend = Arc::new(Backend {
                id: BackendId::new(&b.id),
                upstream: UpstreamBase::of(&base_url),
                base_url,
                region: b.region.clone(),
                priority: b.priority,
                weight: b.weight,
                credential,
                tpm: b.tpm,
                rpm: b.rpm,
                kind: b.kind,
                reserve: b.reserve,
            });
            for (pool, deployment) in &b.deployments {
                pools.entry(pool.clone()).or_default().push(Member {
                    backend: backend.clone(),
                    deployment: deployment.clone(),
                });
            }
        }
        let pools = pools
            .into_iter()
            .map(|(name, mut members)| {
                members.sort_by(|a, b| {
                    (a.backend.priority, &a.backend.id).cmp(&(b.backend.priority, &b.backend.id))
                });
                let settings = config.pools.get(&name).cloned().unwrap_or_default();
                let pool = Pool {
                    name: PoolName::new(&name),
                    encoding: settings.encoding,
                    spill_utilization: settings.spill_utilization,
                    regions: settings.regions,
                    members,
                };
                (name, Arc::new(pool))
            })
            .collect();
        Self { pools }
    }

    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    pub fn pools(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values()
    }

    /// Human-readable table for `spillway check-config`, its columns as wide as the
    /// longest id, deployment and region.
    pub fn render(&self) -> String {
        let members = || self.pools().flat_map(|p| p.members.iter());
        let width = |f: &dyn Fn(&Member) -> usize| members().map(f).max().unwrap_or(0);
        let id_width = width(&|m| m.backend.id.as_str().len());
        let deployment_width = width(&|m| m.deployment.len());
        let region_width = width(&|m| m.backend.region.as_deref().unwrap_or("-").len());
        let mut out = String::new();
        for pool in self.pools() {
            let _ = writeln!(out, "pool {}", pool.name);
            let mut tier = None;
            for m in &pool.members {
                let b = &m.backend;
                if tier != Some(b.priority) {
                    tier = Some(b.priority);
                    let _ = writeln!(out, "  tier {}", b.priority);
                }
                let _ = writeln!(
                    out,
                    "    {:<id_width$}  deployment={:<deployment_width$}  kind={:<8} weight={:<3} region={:<region_width$}  tpm={:<8} rpm={:<6} {}auth={} url={}",
                    b.id.as_str(),
                    m.deployment,
                    b.kind.as_str(),
                    b.weight,
                    b.region.as_deref().unwrap_or("-"),
                    b.tpm.map_or("-".into(), |v| v.to_string()),
                    b.rpm.map_or("-".into(), |v| v.to_string()),
                    if b.reserve > 0.0 {
                        format!("reserve={} ", b.reserve)
                    } else {
                        String::new()
                    },
                    b.credential.kind(),
                    b.base_url
                );
            }
        }
        out
    }
}
