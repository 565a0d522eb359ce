//! `spillway`: parse the command line, load configuration, start telemetry, run a command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use spillway_gateway::config::Config;
use std::sync::Arc;

#[cfg(feature = "simulator")]
use spillway_gateway::{demo, sim};
use spillway_gateway::{server, state_table, telemetry};
use spillway_shared::EmbeddedState;

// Small short-lived allocations per request are the gateway's main allocator load; glibc's
// malloc showed up as a fifth of the CPU under load (scripts/bench.sh, README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spillway",
    version,
    about = "One never-throttled endpoint in front of many Azure OpenAI deployments"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
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
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve {
        config: std::env::var_os("SPILLWAY_CONFIG").map(PathBuf::from),
    });
    match run(command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Serve { config: path } => {
            let config = Config::load(path.as_deref())?;
            if path.is_none() && config.backends.is_empty() {
                return Err("no configuration: pass --config <file> or set SPILLWAY_CONFIG (`spillway sim` prints [[backends]] to start from; `spillway demo` runs everything at once)".into());
            }
            let telemetry = telemetry::init(&config.telemetry)?;
            let result = server::serve(config, path).await;
            telemetry.shutdown().await;
            result
        }
        Command::CheckConfig {
            config,
            offline: true,
        } => {
            Config::load(Some(&config))?.validate_offline()?;
            println!(
                "configuration OK (offline: environment variables, files and credentials were not read; run without --offline where the replicas run to check those too)"
            );
            Ok(())
        }
        Command::CheckConfig {
            config,
            offline: false,
        } => {
            let config = Config::load(Some(&config))?;
            // Validation only: no connection to the state store.
            let fleet = Arc::new(EmbeddedState::new(config.windows()));
            let gateway = spillway_gateway::Gateway::from_config(&config, fleet)?;
            print!("{}", gateway.table.render());
            println!("configuration OK");
            Ok(())
        }
        Command::State { config, json } => {
            let config = Config::load(Some(&config))?;
            let Some(url) = config.state.redis_url.clone() else {
                return Err(format!("state.redis_url is not set: with the embedded store each replica keeps its own state, and there is no shared state to read; read one replica's with `curl http://{}/admin/state`", config.server.admin_listen).into());
            };
            let redis = server::redis_state(&config, &url)?;
            redis.ready(Duration::from_secs(5)).await?;
            let redis = Arc::new(redis);
            let gateway = spillway_gateway::Gateway::from_config(&config, redis.clone())?;
            let report =
                state_table::collect(&gateway.table, &*redis, config.state.window_ms).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", state_table::render_report(&report));
            }
            Ok(())
        }
        Command::Top { config, redis } => {
            let mut config = Config::load(Some(&config))?;
            if let Some(url) = redis {
                config.state.redis_url = Some(url);
            }
            let Some(url) = config.state.redis_url.clone() else {
                return Err("state.redis_url is not set (or pass --redis): with the embedded store there is no shared state to watch".into());
            };
            let redis = Arc::new(server::redis_state(&config, &url)?);
            let gateway = spillway_gateway::Gateway::from_config(&config, redis.clone())?;
            let window_ms = config.state.window_ms;
            // The screen says "connecting" at once; the first read waits for Redis.
            let connected = std::sync::atomic::AtomicBool::new(false);
            let store = redacted_url(&url);
            spillway_gateway::top::run(
                || {
                    let (gateway, redis, connected) = (&gateway, redis.clone(), &connected);
                    async move {
                        if !connected.load(std::sync::atomic::Ordering::Relaxed) {
                            redis
                                .ready(Duration::from_secs(5))
                                .await
                                .map_err(|e| e.to_string())?;
                            connected.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        state_table::collect(&gateway.table, &*redis, window_ms)
                            .await
                            .map_err(|e| e.to_string())
                    }
                },
                Duration::from_secs(1),
                &store,
            )
            .await?;
            Ok(())
        }
        Command::Healthcheck { url, timeout } => {
            let answer = reqwest::Client::builder()
                .timeout(timeout)
                .build()?
                .get(&url)
                .send()
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            let status = answer.status();
            let text = answer.text().await.unwrap_or_default();
            if status.is_success() {
                println!("{}", text.trim());
                Ok(())
            } else {
                Err(format!("{url}: {status} {}", text.trim()).into())
            }
        }
        Command::HashKey => {
            let mut input = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)?;
            // One line as typed or piped: its line ending is not part of the key.
            let key = input
                .strip_suffix('\n')
                .map(|k| k.strip_suffix('\r').unwrap_or(k))
                .unwrap_or(&input);
            if key.trim().is_empty() {
                return Err(
                    "no key on stdin (e.g. `printf %s \"$KEY\" | spillway hash-key`)".into(),
                );
            }
            println!("{}", spillway_gateway::consumers::key_sha256_hex(key));
            Ok(())
        }
        #[cfg(feature = "simulator")]
        Command::Sim { config, port_base } => {
            let _telemetry = telemetry::init(&Default::default())?;
            let mut config = match config {
                Some(path) => sim::SimConfig::load(&path)?,
                None => sim::SimConfig::example_fleet(),
            };
            if let Some(base) = port_base {
                for (i, resource) in config.resources.iter_mut().enumerate() {
                    let port = u16::try_from(i)
                        .ok()
                        .and_then(|i| base.checked_add(i))
                        .ok_or("--port-base: the resources' ports would pass 65535")?;
                    resource.listen.set_port(port);
                }
            }
            let handle = sim::start(config).await?;
            print!("{}", handle.describe());
            server::shutdown_signal().await;
            Ok(())
        }
        #[cfg(feature = "simulator")]
        Command::Demo {
            duration,
            replicas,
            redis,
        } => {
            demo::run(demo::DemoOptions {
                duration,
                replicas,
                redis,
            })
            .await
        }
    }
}

/// A state URL for the screen: its password replaced.
fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("REDACTED"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "Redis".into(),
    }
}
