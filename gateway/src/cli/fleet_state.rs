//! `spillway state` and `spillway top`: the shared fleet state in Redis, for operators.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::CliResult;
use crate::config::Config;
use crate::ops::state_table;
use crate::server;

/// `spillway state`: print it once, as a table or JSON.
pub async fn print(config: &Path, json: bool) -> CliResult {
    let config = Config::load(Some(config))?;
    let Some(url) = config.state.redis_url.clone() else {
        return Err(format!("state.redis_url is not set: with the embedded store each replica keeps its own state, and there is no shared state to read; read one replica's with `curl http://{}/admin/state`", config.server.admin_listen).into());
    };
    let redis = server::redis_state(&config, &url)?;
    redis.ready(Duration::from_secs(5)).await?;
    let redis = Arc::new(redis);
    let gateway = crate::Gateway::from_config(&config, redis.clone())?;
    let report = state_table::collect(&gateway.table, &*redis, config.state.window_ms).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", state_table::render_report(&report));
    }
    Ok(())
}

/// `spillway top`: watch it, refreshed every second.
pub async fn watch(config: &Path, redis: Option<String>) -> CliResult {
    let mut config = Config::load(Some(config))?;
    if let Some(url) = redis {
        config.state.redis_url = Some(url);
    }
    let Some(url) = config.state.redis_url.clone() else {
        return Err("state.redis_url is not set (or pass --redis): with the embedded store there is no shared state to watch".into());
    };
    let redis = Arc::new(server::redis_state(&config, &url)?);
    let gateway = crate::Gateway::from_config(&config, redis.clone())?;
    let window_ms = config.state.window_ms;
    // The screen says "connecting" at once; the first read waits for Redis.
    let connected = std::sync::atomic::AtomicBool::new(false);
    let store = redacted_url(&url);
    crate::ops::top::run(
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
                let mut report = state_table::collect(&gateway.table, &*redis, window_ms)
                    .await
                    .map_err(|e| e.to_string())?;
                // With prices, what this hour cost so far (a footnote: never fails the view).
                if !gateway.prices.is_empty()
                    && let Ok(cost) = crate::cost::report::read(
                        &*redis,
                        &gateway.prices,
                        Duration::from_secs(3600),
                    )
                    .await
                {
                    report.cost_this_hour = Some(state_table::CostSummary::of(&cost));
                }
                Ok(report)
            }
        },
        Duration::from_secs(1),
        &store,
    )
    .await?;
    Ok(())
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
