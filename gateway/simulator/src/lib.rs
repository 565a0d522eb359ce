//! `spillway sim`: simulated Azure OpenAI resources on loopback, for tests, the demo and
//! local development. Each resource listens on its own port and serves its deployments.

mod api;
mod chat;
pub mod config;
mod deployment;
mod journal;
mod limiter;
mod realtime;
mod responses;
mod text;
pub mod tokens;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{DeploymentKind, DeploymentSpec, ResourceSpec, SimConfig};
pub use deployment::{DeploymentStats, Faults, ForcedResponse};
pub use journal::ReceivedRequest;

use api::ResourceState;
use deployment::Deployment;

/// Running simulator: addresses, live stats and fault controls. Stops when dropped.
pub struct SimHandle {
    resources: Vec<RunningResource>,
    changed: watch::Receiver<u64>,
}

struct RunningResource {
    spec: ResourceSpec,
    addr: SocketAddr,
    state: Arc<ResourceState>,
    task: JoinHandle<()>,
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        for r in &self.resources {
            r.task.abort();
        }
    }
}

/// Bind every resource and start serving.
pub async fn start(config: SimConfig) -> std::io::Result<SimHandle> {
    tokio::task::spawn_blocking(tokens::warm_up).await?;
    let changed = watch::Sender::new(0u64);
    let mut resources = Vec::new();
    for spec in config.resources {
        let deployments: BTreeMap<String, Arc<Deployment>> = spec
            .deployments
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    Arc::new(Deployment::new(d.clone(), changed.clone())),
                )
            })
            .collect();
        let state = Arc::new(ResourceState::new(
            &spec.name,
            spec.api_key.clone(),
            deployments,
        ));
        let listener = TcpListener::bind(spec.listen).await?;
        let addr = listener.local_addr()?;
        let app = api::router(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        resources.push(RunningResource {
            spec,
            addr,
            state,
            task,
        });
    }
    Ok(SimHandle {
        resources,
        changed: changed.subscribe(),
    })
}

impl SimHandle {
    fn resource(&self, name: &str) -> &RunningResource {
        self.resources
            .iter()
            .find(|r| r.spec.name == name)
            .unwrap_or_else(|| panic!("no simulated resource named {name}"))
    }

    fn deployment(&self, resource: &str, deployment: &str) -> &Arc<Deployment> {
        self.resource(resource)
            .state
            .deployments
            .get(deployment)
            .unwrap_or_else(|| panic!("no simulated deployment {resource}/{deployment}"))
    }

    /// Base URL of a resource, like `https://<name>.openai.azure.com`.
    pub fn url(&self, resource: &str) -> String {
        format!("http://{}", self.resource(resource).addr)
    }

    pub fn resource_names(&self) -> Vec<String> {
        self.resources.iter().map(|r| r.spec.name.clone()).collect()
    }

    pub fn stats(&self, resource: &str, deployment: &str) -> DeploymentStats {
        self.deployment(resource, deployment).stats()
    }

    /// Every request the resource received (any path), oldest first.
    pub fn received(&self, resource: &str) -> Vec<ReceivedRequest> {
        self.resource(resource).state.journal.requests()
    }

    /// Requests received by all resources together.
    pub fn received_total(&self) -> usize {
        self.resources
            .iter()
            .map(|r| r.state.journal.requests().len())
            .sum()
    }

    pub fn set_faults(&self, resource: &str, deployment: &str, faults: Faults) {
        self.deployment(resource, deployment).set_faults(faults);
    }

    /// Wait until `done` holds for the stats, re-checking on every change; false on timeout.
    pub async fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let mut changed = self.changed.clone();
        tokio::time::timeout(timeout, async {
            loop {
                changed.mark_unchanged();
                if done(self) {
                    return;
                }
                if changed.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await
        .is_ok()
    }

    /// What is running, and `[[backends]]` tables that point a gateway at it.
    pub fn describe(&self) -> String {
        let mut out = String::from("# spillway sim: simulated Azure OpenAI resources\n");
        for r in &self.resources {
            let _ = writeln!(out, "#   {:<22} {}", r.spec.name, self.url(&r.spec.name));
            for d in &r.spec.deployments {
                let _ = writeln!(
                    out,
                    "#     {:<28} {:?} tpm={} rpm={}",
                    d.name,
                    d.kind,
                    d.tpm,
                    d.rpm_limit()
                );
            }
        }
        out.push_str("# Backends for spillway.toml (PTU priority 1, PAYG priority 2):\n");
        for r in &self.resources {
            let ptu = r
                .spec
                .deployments
                .iter()
                .any(|d| d.kind == DeploymentKind::Ptu);
            let deployments: Vec<String> = r
                .spec
                .deployments
                .iter()
                .map(|d| format!("\"{0}\" = \"{0}\"", d.name))
                .collect();
            // The gateway budgets each member at the backend's `tpm`: the simulator's own
            // (the smallest of the resource's deployments), so it spills on budget before
            // the simulator throttles.
            let tpm = r.spec.deployments.iter().map(|d| d.tpm).min().unwrap_or(0);
            let _ = writeln!(
                out,
                "\n[[backends]]\nid = \"{}\"\nurl = \"{}\"\nregion = \"{}\"\npriority = {}\nkind = \"{}\"\ntpm = {tpm}\ndeployments = {{ {} }}",
                r.spec.name,
                self.url(&r.spec.name),
                r.spec.region.as_deref().unwrap_or("local"),
                if ptu { 1 } else { 2 },
                if ptu { "ptu" } else { "payg" },
                deployments.join(", ")
            );
        }
        out.push_str("\n# sim ready\n");
        out
    }
}
