//! `spillway demo`: simulated PTU and PAYG deployments, a fleet of gateway replicas sharing
//! one state store, and a load ramp past PTU capacity, reported second by second.

mod classes;
mod load;
mod report;

use std::sync::Arc;
use std::time::Duration;

use spillway_shared::{EmbeddedState, FleetState};
use tokio::net::TcpListener;

use crate::app::app;
use crate::config::Config;
use crate::proxy::Gateway;
use crate::server;
use crate::sim::{self, DeploymentKind, DeploymentSpec, ResourceSpec, SimConfig, SimHandle};
use load::{LoadPlan, Outcomes};
use report::{BackendRow, Report};

pub struct DemoOptions {
    pub duration: Duration,
    pub replicas: usize,
    /// Share state through this Redis instead of one in-process store.
    pub redis: Option<String>,
    /// Show traffic classes (interactive waves, batch filling the valleys) and the cost.
    pub classes: bool,
}

/// Budgets are per 10-second window in the demo (a minute in Azure) so that a short run
/// shows PTU filling, PAYG taking the overflow, and PTU refilling.
const WINDOW_MS: u64 = 10_000;
const PTU_TOKENS_PER_WINDOW: u64 = 6_000;
const PAYG_TOKENS_PER_WINDOW: u64 = 400_000;
const MAX_WORKERS: usize = 24;

/// (resource, region, kind, tokens per window)
const FLEET: [(&str, &str, DeploymentKind, u64); 4] = [
    (
        "ptu-eastus",
        "eastus",
        DeploymentKind::Ptu,
        PTU_TOKENS_PER_WINDOW,
    ),
    (
        "ptu-swedencentral",
        "swedencentral",
        DeploymentKind::Ptu,
        PTU_TOKENS_PER_WINDOW,
    ),
    (
        "payg-eastus2",
        "eastus2",
        DeploymentKind::Payg,
        PAYG_TOKENS_PER_WINDOW,
    ),
    (
        "payg-westus",
        "westus",
        DeploymentKind::Payg,
        PAYG_TOKENS_PER_WINDOW,
    ),
];

pub async fn run(options: DemoOptions) -> Result<(), Box<dyn std::error::Error>> {
    if options.replicas == 0 {
        return Err("--replicas must be at least 1".into());
    }
    let sim = sim::start(demo_sim()).await?;
    let text = if options.classes {
        classes::gateway_config(&sim, options.redis.as_deref())
    } else {
        gateway_config(&sim, options.redis.as_deref())
    };
    let config = Config::from_toml(&text)?;
    let embedded: Arc<dyn FleetState> = Arc::new(EmbeddedState::new(config.windows()));
    let mut replicas = Vec::new();
    for _ in 0..options.replicas {
        // Each replica has its own Redis client, as separate processes would.
        let fleet = match &options.redis {
            Some(url) => server::redis_fleet(&config, url)? as Arc<dyn FleetState>,
            None => embedded.clone(),
        };
        replicas.push(start_replica(&config, fleet).await?);
    }

    let shared = match &options.redis {
        Some(url) => format!("Redis at {}", server::redacted(url)),
        None => "one embedded state store".into(),
    };
    println!(
        "spillway demo: {} gateway replicas sharing {shared}, 2 PTU + 2 PAYG simulated deployments",
        options.replicas
    );
    if options.classes {
        let gateways = replicas.iter().map(|r| r.gateway.clone()).collect();
        return classes::run(&config, &replicas, gateways, options.duration).await;
    }
    println!(
        "PTU budget {PTU_TOKENS_PER_WINDOW} tokens per {}s window each; load ramps from 1 to {MAX_WORKERS} clients over {}s\n",
        WINDOW_MS / 1000,
        options.duration.as_secs()
    );

    let outcomes = Arc::new(Outcomes::default());
    let plan = LoadPlan {
        duration: options.duration,
        max_workers: MAX_WORKERS,
        gateways: replicas.iter().map(|r| r.url.clone()).collect(),
    };
    let load = tokio::spawn(load::run(plan, outcomes.clone()));

    let mut report = Report::new(
        FLEET
            .iter()
            .map(|(name, _, kind, _)| (name.to_string(), *kind))
            .collect(),
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let seconds = options.duration.as_secs().max(1);
    for second in 1..=seconds {
        tick.tick().await;
        report.second(second, outcomes.snapshot(), backend_rows(&sim));
    }
    load.await?;
    report.summary(outcomes.snapshot(), backend_rows(&sim));
    if options.redis.is_some() {
        println!(
            "\nShared state stays in Redis for a while: redis-cli --scan --pattern 'spillway:*'"
        );
        println!("  e.g. redis-cli HGETALL 'spillway:{{gpt-4o}}:usage:ptu-eastus'");
    }
    Ok(())
}

fn demo_sim() -> SimConfig {
    let resources = FLEET
        .iter()
        .map(|(name, region, kind, tokens)| ResourceSpec {
            name: name.to_string(),
            listen: "127.0.0.1:0".parse().expect("literal address"),
            api_key: None,
            region: Some(region.to_string()),
            deployments: vec![DeploymentSpec {
                window_ms: WINDOW_MS,
                ttft_ms: 40,
                ms_per_token: 4,
                jitter: 0.2,
                output_tokens: 60,
                ..DeploymentSpec::new("gpt-4o", *kind, *tokens)
            }],
        })
        .collect();
    SimConfig { resources }
}

/// PTU backends carry a budget equal to their capacity, so the fleet spills to PAYG before a
/// PTU has to answer 429; the budget window matches the simulator's.
fn gateway_config(sim: &SimHandle, redis: Option<&str>) -> String {
    let mut config =
        format!("[state]\nwindow_ms = {WINDOW_MS}\nwindow_buckets = 20\nredis_timeout_ms = 50\n");
    if let Some(url) = redis {
        config += &format!("redis_url = \"{url}\"\n");
    }
    for (name, region, kind, tokens) in FLEET {
        let (priority, budget) = match kind {
            DeploymentKind::Ptu => (1, format!("tpm = {tokens}\n")),
            DeploymentKind::Payg => (2, String::new()),
        };
        config += &format!(
            "[[backends]]\nid = \"{name}\"\nurl = \"{}\"\nregion = \"{region}\"\npriority = {priority}\n{budget}deployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n",
            sim.url(name)
        );
    }
    config
}

struct Replica {
    url: String,
    gateway: Arc<Gateway>,
    _task: tokio::task::JoinHandle<()>,
}

async fn start_replica(
    config: &Config,
    fleet: Arc<dyn FleetState>,
) -> Result<Replica, Box<dyn std::error::Error>> {
    let gateway = Arc::new(Gateway::from_config(config, fleet)?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let limits = crate::edge::http_server::ConnectionLimits::from_config(&config.server);
    let task = tokio::spawn(crate::edge::http_server::serve(
        listener,
        app(gateway.clone()),
        limits,
        std::future::pending(),
    ));
    Ok(Replica {
        url,
        gateway,
        _task: task,
    })
}

fn backend_rows(sim: &SimHandle) -> Vec<BackendRow> {
    FLEET
        .iter()
        .map(|(name, _, _, _)| {
            let s = sim.stats(name, "gpt-4o");
            BackendRow {
                requests: s.requests,
                tokens: s.total_tokens,
                throttled: s.throttled + s.forced,
            }
        })
        .collect()
}
