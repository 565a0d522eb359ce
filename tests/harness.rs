//! Test harness: simulated Azure OpenAI resources and gateway replicas on loopback port 0.

pub mod delay_proxy;
pub mod far_fleet;
pub mod pki;
pub mod redis_server;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use spillway_gateway::config::Config;
use spillway_gateway::edge::http_server::{self, ConnectionLimits};
use spillway_gateway::sim::{
    self, DeploymentKind, DeploymentSpec, ResourceSpec, SimConfig, SimHandle,
};
use spillway_gateway::{Gateway, app};
use spillway_shared::FleetState;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use spillway_gateway::sim::{Faults, ForcedResponse};

/// Generous bound for awaited events; tests wait for the event, this only stops a hang.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A simulated deployment that answers at once (no latency, no jitter).
pub fn instant_deployment(name: &str, kind: DeploymentKind, tpm: u64) -> DeploymentSpec {
    DeploymentSpec {
        ttft_ms: 0,
        ms_per_token: 0,
        jitter: 0.0,
        ..DeploymentSpec::new(name, kind, tpm)
    }
}

/// A deployment whose streams are long and steady: 4,000 tokens at 5 ms each (20 s), so a
/// test can act while one is in flight.
pub fn long_stream_deployment() -> DeploymentSpec {
    DeploymentSpec {
        ttft_ms: 0,
        ms_per_token: 5,
        jitter: 0.0,
        output_tokens: 4_000,
        ..DeploymentSpec::new("gpt-4o", DeploymentKind::Ptu, 10_000_000)
    }
}

/// A resource on a free loopback port serving the given deployments.
pub fn resource(name: &str, deployments: Vec<DeploymentSpec>) -> ResourceSpec {
    ResourceSpec {
        name: name.into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: None,
        region: None,
        deployments,
    }
}

pub async fn start_sim(resources: Vec<ResourceSpec>) -> SimHandle {
    sim::start(SimConfig { resources })
        .await
        .expect("simulator starts")
}

/// The usual two-tier pool `gpt-4o`: resource `ptu` (priority 1) and `payg` (priority 2),
/// each with one instant deployment named `gpt-4o`.
pub async fn ptu_and_payg() -> SimHandle {
    start_sim(vec![
        resource(
            "ptu",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        ),
        resource(
            "payg",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Payg,
                1_000_000,
            )],
        ),
    ])
    .await
}

/// Pool `gpt-4o` on resources `a` (PTU) and `b` (PAYG), each with one instant deployment;
/// in a configuration, `backend(&sim, "a", 1) + &backend(&sim, "b", 2)`.
pub async fn tiers_a_and_b() -> SimHandle {
    start_sim(vec![
        resource(
            "a",
            vec![instant_deployment("gpt-4o", DeploymentKind::Ptu, 1_000_000)],
        ),
        resource(
            "b",
            vec![instant_deployment(
                "gpt-4o",
                DeploymentKind::Payg,
                1_000_000,
            )],
        ),
    ])
    .await
}

/// Pool `gpt-4o` on three tiers' worth of instant deployments: `a` (PTU), `p` and `b`
/// (standard deployments: a priority-processing member and PAYG in the traffic-class and
/// cost tests); the simulator's own quotas never bind.
pub async fn three_tiers() -> SimHandle {
    let deployment = |kind| instant_deployment("gpt-4o", kind, 10_000_000);
    start_sim(vec![
        resource("a", vec![deployment(DeploymentKind::Ptu)]),
        resource("p", vec![deployment(DeploymentKind::Payg)]),
        resource("b", vec![deployment(DeploymentKind::Payg)]),
    ])
    .await
}

/// `[[backends]]` table for a simulated resource serving pool `gpt-4o` as deployment `gpt-4o`.
pub fn backend(sim: &SimHandle, id: &str, priority: u32) -> String {
    backend_at(id, &sim.url(id), priority)
}

pub fn backend_at(id: &str, url: &str, priority: u32) -> String {
    format!(
        "[[backends]]\nid = \"{id}\"\nurl = \"{url}\"\npriority = {priority}\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n"
    )
}

/// A gateway replica serving on a free loopback port.
pub struct Replica {
    pub url: String,
    pub gateway: Arc<Gateway>,
    task: JoinHandle<()>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_gateway(config_toml: &str, fleet: Arc<dyn FleetState>) -> Replica {
    let config = Config::from_toml(config_toml).expect("test configuration parses");
    let gateway =
        Arc::new(Gateway::from_config(&config, fleet).expect("test configuration is valid"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = app(gateway.clone());
    let limits = ConnectionLimits::from_config(&config.server);
    let task = tokio::spawn(http_server::serve(
        listener,
        router,
        limits,
        std::future::pending(),
    ));
    Replica { url, gateway, task }
}

/// One replica on the state store its configuration names (embedded by default).
pub async fn start_single(config_toml: &str) -> Replica {
    let config = Config::from_toml(config_toml).expect("test configuration parses");
    let fleet = spillway_gateway::server::fleet_state(&config).expect("state store starts");
    start_gateway(config_toml, fleet).await
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

pub fn chat_body(stream: bool) -> Value {
    json!({ "messages": [{ "role": "user", "content": "Hello there" }], "max_tokens": 8, "stream": stream })
}

/// `POST /openai/deployments/{pool}/chat/completions` as the Azure SDKs send it.
pub async fn chat(replica: &Replica, pool: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!(
            "{}/openai/deployments/{pool}/chat/completions?api-version=2024-10-21",
            replica.url
        ))
        .json(body)
        .send()
        .await
        .expect("gateway answers")
}

/// Pool `gpt-4o`'s chat completions URL on a gateway at `base`.
pub fn chat_url(base: &str) -> String {
    format!("{base}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
}

/// [`chat`] to pool `gpt-4o` with a client key in `api-key`.
pub async fn chat_as(gw: &Replica, key: &str) -> reqwest::Result<reqwest::Response> {
    client()
        .post(chat_url(&gw.url))
        .header("api-key", key)
        .json(&chat_body(false))
        .send()
        .await
}

pub fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Force the next `times` requests (None: all) of a deployment to get `status`.
pub fn force(
    sim: &SimHandle,
    resource: &str,
    status: u16,
    retry_after_ms: Option<u64>,
    retry_after_s: Option<u64>,
    times: Option<u32>,
) {
    sim.set_faults(
        resource,
        "gpt-4o",
        Faults {
            respond_with: Some(ForcedResponse {
                status,
                retry_after_ms,
                retry_after_s,
                code: None,
                times,
            }),
            ..Faults::default()
        },
    );
}

/// Make every request to a resource's `gpt-4o` deployment fail with 500.
pub fn fail_every_request(sim: &SimHandle, resource: &str) {
    sim.set_faults(
        resource,
        "gpt-4o",
        Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
    );
}

/// A loopback address with nothing listening (bound, then released).
pub async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// A store that tells when requests settle, so tests await the event instead of polling.
pub struct ObservedState {
    pub inner: Arc<dyn FleetState>,
    settled: tokio::sync::watch::Sender<u64>,
    admitted: std::sync::atomic::AtomicU64,
    charged: tokio::sync::watch::Sender<u64>,
    quota_spends: tokio::sync::watch::Sender<u64>,
}

impl ObservedState {
    pub fn new(inner: Arc<dyn FleetState>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            settled: tokio::sync::watch::Sender::new(0),
            admitted: std::sync::atomic::AtomicU64::new(0),
            charged: tokio::sync::watch::Sender::new(0),
            quota_spends: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Wait until `n` quota counters in all have been spent on (reads do not count).
    pub async fn quota_spent(&self, n: u64) {
        let mut rx = self.quota_spends.subscribe();
        tokio::time::timeout(EVENT_TIMEOUT, rx.wait_for(|&count| count >= n))
            .await
            .expect("quota spends happen")
            .expect("sender alive");
    }

    /// Wait until `n` charges (usage without a reservation) in all have happened.
    pub async fn charged(&self, n: u64) {
        let mut rx = self.charged.subscribe();
        tokio::time::timeout(EVENT_TIMEOUT, rx.wait_for(|&count| count >= n))
            .await
            .expect("charges happen")
            .expect("sender alive");
    }

    /// Wait until every reservation made so far has been settled (or released): none is
    /// left open. Returns how many were made.
    pub async fn all_settled(&self) -> u64 {
        let admitted = self.admitted.load(std::sync::atomic::Ordering::SeqCst);
        self.settled(admitted).await;
        admitted
    }

    /// Wait until `n` settlements in all have happened.
    pub async fn settled(&self, n: u64) {
        let mut rx = self.settled.subscribe();
        tokio::time::timeout(EVENT_TIMEOUT, rx.wait_for(|&count| count >= n))
            .await
            .expect("settlements happen")
            .expect("sender alive");
    }
}

impl spillway_shared::FleetLayer for ObservedState {
    fn inner(&self) -> &dyn FleetState {
        &*self.inner
    }

    fn ended(&self, call: spillway_shared::Call, _took: Duration) {
        use spillway_shared::Call;
        match call {
            Call::Acquire { admitted: true } => {
                self.admitted
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Call::Settle => self.settled.send_modify(|n| *n += 1),
            Call::Charge => self.charged.send_modify(|n| *n += 1),
            Call::SpendQuota { tokens } if tokens > 0 => self.quota_spends.send_modify(|n| *n += 1),
            _ => {}
        }
    }
}

/// Tokens and requests the fleet state has charged to `backend` in pool `gpt-4o`.
pub async fn charged(fleet: &dyn FleetState, backend: &str) -> (u64, u64) {
    let candidate = spillway_shared::Candidate::unlimited(spillway_shared::BackendId::new(backend));
    let snap = fleet
        .snapshot(&spillway_shared::PoolName::new("gpt-4o"), &[candidate])
        .await
        .unwrap();
    (snap.members[0].tokens_used, snap.members[0].requests_used)
}

/// A replica on Redis (with its embedded fallback), as `spillway serve` builds it.
pub async fn start_on_redis(config_toml: &str) -> (Replica, Arc<spillway_shared::FallbackState>) {
    let fleet = redis_fleet(config_toml).await;
    (start_gateway(config_toml, fleet.clone()).await, fleet)
}

/// The fleet state `spillway serve` builds for a configuration naming Redis, ready.
pub async fn redis_fleet(config_toml: &str) -> Arc<spillway_shared::FallbackState> {
    let config = Config::from_toml(config_toml).expect("test configuration parses");
    let url = config
        .state
        .redis_url
        .clone()
        .expect("the configuration names Redis");
    let fleet = spillway_gateway::server::redis_fleet(&config, &url).expect("Redis store builds");
    fleet
        .wait_ready(spillway_gateway::server::REDIS_START_WAIT)
        .await;
    fleet
}

/// A `[state]` section for Redis at `url`, with a key prefix of its own.
pub fn redis_section(url: &str, extra: &str) -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "[state]\nredis_url = \"{url}\"\nkey_prefix = \"t{}-{n}\"\n{extra}",
        std::process::id()
    )
}

/// Send `count` chat requests, `concurrency` at a time, spread over `replicas`; returns the
/// statuses in completion order.
pub async fn offer_load(replicas: &[&Replica], count: usize, concurrency: usize) -> Vec<u16> {
    let bases: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    offer_load_to(&bases, count, concurrency).await
}

/// [`offer_load`] to gateways by base URL.
pub async fn offer_load_to(bases: &[String], count: usize, concurrency: usize) -> Vec<u16> {
    use futures_util::StreamExt;
    let http = client();
    let urls: Vec<String> = bases.iter().map(|base| chat_url(base)).collect();
    futures_util::stream::iter(0..count)
        .map(|i| {
            let (http, url) = (http.clone(), urls[i % urls.len()].clone());
            async move {
                let r = http
                    .post(url)
                    .json(&chat_body(false))
                    .send()
                    .await
                    .expect("gateway answers");
                let status = r.status().as_u16();
                r.bytes().await.expect("body");
                status
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Pool `gpt-4o`'s member `backend` as the fleet state sees it now.
pub async fn member_snapshot(
    fleet: &dyn FleetState,
    backend: &str,
) -> spillway_shared::MemberSnapshot {
    let c = [spillway_shared::Candidate::unlimited(
        spillway_shared::BackendId::new(backend),
    )];
    fleet
        .snapshot(&spillway_shared::PoolName::new("gpt-4o"), &c)
        .await
        .expect("the state store answers")
        .members
        .remove(0)
}
