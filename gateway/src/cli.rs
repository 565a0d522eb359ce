//! The `spillway` command line: what each subcommand does, one file each under `cli/`.

mod check_config;
mod cost;
mod fleet_state;
mod hash_key;
mod healthcheck;
#[cfg(feature = "simulator")]
mod sim;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::ops::telemetry;
use crate::server;

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Parser)]
#[command(
    name = "spillway",
    version,
    about = "One never-throttled endpoint in front of many Azure OpenAI deployments"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway (the default command).
    Serve {
        /// TOML configuration file; every key can be overridden by SPILLWAY__SECTION__KEY.
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and print the resolved routing table.
    CheckConfig {
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: PathBuf,
        /// Check the file alone: environment variables, files and credentials it names are
        /// not read (what CI or a laptop can check of a production configuration).
        #[arg(long)]
        offline: bool,
    },
    /// Print the shared fleet state (backoffs, budgets, latency) from Redis, for operators.
    State {
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: PathBuf,
        /// JSON (the same as `GET /admin/state`) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// What every token cost: per consumer, pool, class and tier, from the fleet's cost
    /// ledger and `[[prices]]`; PTU reservations shared by their users' tokens, and what
    /// the PTU saved against PAYG prices.
    Cost {
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: PathBuf,
        /// How far back (whole hours, the current one included).
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        since: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Probe a running gateway's `/readyz` (for a container's HEALTHCHECK: no curl needed);
    /// exits 0 when it is ready.
    Healthcheck {
        /// The readiness URL.
        #[arg(
            long,
            env = "SPILLWAY_HEALTHCHECK_URL",
            default_value = "http://127.0.0.1:8080/readyz"
        )]
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// The live fleet view: per pool and member, state, budget, utilization, latency and
    /// throughput from the shared state, refreshed every second (`q` quits).
    Top {
        #[arg(long, env = "SPILLWAY_CONFIG")]
        config: PathBuf,
        /// Read this Redis instead of the configuration's `state.redis_url`.
        #[arg(long)]
        redis: Option<String>,
    },
    /// Read a consumer key on stdin and print its SHA-256, for `key_sha256` in the
    /// configuration (the key is never echoed).
    HashKey,
    /// Run simulated Azure OpenAI deployments on loopback.
    #[cfg(feature = "simulator")]
    Sim {
        /// Simulator TOML; without it, two PTU and two PAYG resources are started.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen on fixed ports: the resources take this port and the ones after it, in
        /// order (so a pasted `[[backends]]` keeps working after a restart). Without it, a
        /// resource listens where its `listen` says (any free port by default).
        #[arg(long)]
        port_base: Option<u16>,
    },
    /// The one-command showcase: simulated deployments, a gateway fleet and a load ramp.
    #[cfg(feature = "simulator")]
    Demo {
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Share the fleet state through this Redis (e.g. redis://127.0.0.1:6379).
        #[arg(long)]
        redis: Option<String>,
        /// Traffic classes: interactive waves and a batch job filling the PTU's valleys,
        /// then what every token cost.
        #[arg(long)]
        classes: bool,
    },
}

impl Cli {
    /// The command to run: `serve` when none is named.
    pub fn command(self) -> Command {
        self.command.unwrap_or(Command::Serve {
            config: std::env::var_os("SPILLWAY_CONFIG").map(PathBuf::from),
        })
    }
}

pub async fn run(command: Command) -> CliResult {
    match command {
        Command::Serve { config } => serve(config).await,
        Command::CheckConfig { config, offline } => check_config::run(&config, offline),
        Command::State { config, json } => fleet_state::print(&config, json).await,
        Command::Top { config, redis } => fleet_state::watch(&config, redis).await,
        Command::Cost {
            config,
            since,
            json,
        } => cost::print(&config, since, json).await,
        Command::Healthcheck { url, timeout } => healthcheck::run(&url, timeout).await,
        Command::HashKey => hash_key::run(),
        #[cfg(feature = "simulator")]
        Command::Sim { config, port_base } => sim::run(config, port_base).await,
        #[cfg(feature = "simulator")]
        Command::Demo {
            duration,
            replicas,
            redis,
            classes,
        } => {
            crate::demo::run(crate::demo::DemoOptions {
                duration,
                replicas,
                redis,
                classes,
            })
            .await
        }
    }
}

/// `spillway serve`: load the configuration, start telemetry, serve until stopped.
async fn serve(path: Option<PathBuf>) -> CliResult {
    let config = Config::load(path.as_deref())?;
    if path.is_none() && config.backends.is_empty() {
        return Err("no configuration: pass --config <file> or set SPILLWAY_CONFIG (`spillway sim` prints [[backends]] to start from; `spillway demo` runs everything at once)".into());
    }
    let telemetry = telemetry::init(&config.telemetry)?;
    let result = server::serve(config, path).await;
    telemetry.shutdown().await;
    result
}
