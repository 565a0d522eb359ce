//! `spillway serve`: choose the fleet-state store, bind the data plane, run until a signal.

use std::sync::Arc;

use std::time::Duration;

use spillway_shared::{EmbeddedState, FallbackState, FleetState, RedisState};
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::app::{admin_live, app_live};
use crate::config::{Config, ConfigError, ConfigProblem};
use crate::edge::http_server::{self, ConnectionLimits};
use crate::live::Live;
use crate::proxy::Gateway;

/// The fleet-state store the configuration asks for: embedded, or Redis with the embedded
/// store as its fallback. Must run inside the runtime (Redis connects in the background).
pub fn fleet_state(config: &Config) -> Result<Arc<dyn FleetState>, ConfigError> {
    let Some(url) = &config.state.redis_url else {
        return Ok(Arc::new(EmbeddedState::new(config.windows())));
    };
    Ok(redis_fleet(config, url)?)
}

/// Redis with this replica's embedded state as the fallback.
pub fn redis_fleet(config: &Config, url: &str) -> Result<Arc<FallbackState>, ConfigError> {
    let state = &config.state;
    let redis = redis_state(config, url)?.with_leases(state.lease_policy());
    info!(redis = %redacted(url), "fleet state in Redis, with embedded fallback");
    Ok(FallbackState::new(
        redis,
        EmbeddedState::new(config.windows()),
        Duration::from_millis(state.redis_timeout_ms),
    ))
}

/// A Redis store for `url` (no fallback): `spillway state` reads with it.
pub fn redis_state(config: &Config, url: &str) -> Result<RedisState, ConfigError> {
    RedisState::new(url, &config.state.key_prefix, config.windows(), Duration::from_secs(2)).map_err(|_| {
        ConfigError::Invalid(vec![ConfigProblem {
            key: "state.redis_url".into(),
            problem: format!(
                "{} is not a usable Redis URL (redis://, rediss://, redis-cluster://host:port?node=host:port)",
                redacted(url)
            ),
        }])
    })
}

/// The URL without its password, for logs and errors.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://[redacted]@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// How long `serve` waits for Redis (connection and scripts) before it starts degraded.
pub const REDIS_START_WAIT: Duration = Duration::from_secs(10);

/// The fleet state this replica decides with; the listeners open (and /readyz answers) only
/// once it is usable.
async fn start_fleet(config: &Config) -> Result<Arc<dyn FleetState>, Box<dyn std::error::Error>> {
    Ok(match &config.state.redis_url {
        None => fleet_state(config)?,
        Some(url) => {
            let fleet = redis_fleet(config, url)?;
            if !fleet.wait_ready(REDIS_START_WAIT).await {
                warn!(
                    wait_ms = REDIS_START_WAIT.as_millis() as u64,
                    "Redis not ready at start-up: serving degraded (this replica's share of the budgets) until it answers"
                );
            }
            fleet
        }
    })
}

/// Say so loudly when anyone reaching the data plane may spend the backends' capacity.
fn warn_if_anonymous(config: &Config) {
    if !config.is_anonymous() {
        return;
    }
    if config.server.listen.ip().is_loopback() {
        warn!(
            listen = %config.server.listen,
            "no [[consumers]] configured: the data plane on loopback accepts requests without a key"
        );
    } else {
        // Only reachable with server.allow_anonymous = true (validate refuses it otherwise).
        error!(
            listen = %config.server.listen,
            "ANONYMOUS DATA PLANE: server.allow_anonymous = true and no [[consumers]]: anyone reaching this listener spends the backends' capacity"
        );
    }
}

/// On a stop signal: unready at once, still serving for the shutdown delay, then the
/// listeners stop accepting (the receiver turns true) and in-flight requests drain.
fn stop_sequence(
    gateway: Arc<Gateway>,
    stopping: impl Future<Output = Stop> + Send + 'static,
    delay: Duration,
) -> tokio::sync::watch::Receiver<bool> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let signal = stopping.await;
        gateway
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // The delay lets a load balancer stop sending; Ctrl-C in a terminal has none to wait
        // for (in-flight requests still finish).
        use std::io::IsTerminal;
        let delay = if signal == Stop::Interrupt && std::io::stdin().is_terminal() {
            Duration::ZERO
        } else {
            delay
        };
        info!(
            shutdown_delay_ms = delay.as_millis() as u64,
            "stopping: /readyz now answers 503; draining"
        );
        tokio::time::sleep(delay).await;
        let _ = stop.send(true);
    });
    stopped
}

/// Serve until stopped; `source` is the configuration file SIGHUP and `POST /admin/reload`
/// read again.
pub async fn serve(
    config: Config,
    source: Option<std::path::PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    config.validate()?;
    let fleet = start_fleet(&config).await?;
    let gateway = Gateway::from_config(&config, fleet.clone())?;
    warn_if_anonymous(&config);
    let tls = config
        .server
        .tls
        .as_ref()
        .map(crate::edge::tls::acceptor)
        .transpose()
        .map_err(|e| format!("server.tls: {e}"))?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("server.listen: cannot bind {}: {e}", config.server.listen))?;
    let admin_listener = TcpListener::bind(config.server.admin_listen)
        .await
        .map_err(|e| {
            format!(
                "server.admin_listen: cannot bind {}: {e}",
                config.server.admin_listen
            )
        })?;
    let gateway = Arc::new(gateway);
    let live = Live::new(gateway.clone(), source, fleet);
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(live.clone()));
    // Signals are caught from here on (before the listeners announce themselves).
    let stopping = shutdown_signal();
    info!(
        listen = %listener.local_addr()?,
        tls = tls.is_some(),
        admin = %admin_listener.local_addr()?,
        pools = gateway.table.pools().count(),
        state = %gateway.fleet.describe(),
        "spillway serving"
    );
    let limits = ConnectionLimits::from_config(&config.server);
    let fleet = gateway.fleet.clone();
    let delay = Duration::from_millis(config.server.shutdown_delay_ms);
    let stopped = stop_sequence(gateway.clone(), stopping, delay);
    let stop_accepting = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|&s| s).await;
        }
    };
    let router = app_live(live.clone());
    let data_plane = {
        let stop_accepting = stop_accepting.clone();
        async move {
            match tls {
                Some(tls) => {
                    http_server::serve_tls(listener, router, limits, tls, stop_accepting()).await
                }
                None => http_server::serve(listener, router, limits, stop_accepting()).await,
            }
        }
    };
    tokio::join!(
        data_plane,
        http_server::serve(
            admin_listener,
            admin_live(live.clone()),
            limits,
            stop_accepting()
        ),
    );
    // Answers that ended settle in tasks of their own: let them land before leaving.
    if !crate::proxy::all_settled(Duration::from_secs(5)).await {
        warn!("some settlements were still running at exit");
    }
    // The cost ledger's open page, before the store closes.
    live.get().spend.flush().await;
    fleet.close().await;
    info!("spillway stopped");
    Ok(())
}

/// SIGHUP: read the configuration again (see [`Live`]).
#[cfg(unix)]
async fn reload_on_sighup(live: Arc<Live>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    while hangups.recv().await.is_some() {
        let _ = live.reload();
    }
}

/// What asked the server to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Ctrl-C (SIGINT).
    Interrupt,
    /// SIGTERM (a container stop).
    Terminate,
}

/// Ctrl-C or SIGTERM (container stop) ends the server after in-flight requests finish.
/// The handlers are in place when this returns (a signal right after start is caught), the
/// future resolves on the first signal.
pub fn shutdown_signal() -> impl Future<Output = Stop> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = wait(interrupt) => Stop::Interrupt,
                () = wait(terminate) => Stop::Terminate,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        Stop::Interrupt
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted_from_redis_urls() {
        assert_eq!(
            super::redacted("rediss://:s3cret@cache.redis.azure.net:6380"),
            "rediss://[redacted]@cache.redis.azure.net:6380"
        );
        assert_eq!(
            super::redacted("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
    }
}
