//! `spillway cost`: the fleet's cost ledger, priced, from Redis.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::CliResult;
use crate::config::Config;
use crate::cost::{PriceTable, report};
use crate::server;

pub async fn print(config: &Path, since: Duration, json: bool) -> CliResult {
    let config = Config::load(Some(config))?;
    config.validate_offline()?;
    let Some(url) = config.state.redis_url.clone() else {
        return Err(format!("state.redis_url is not set: with the embedded store each replica keeps its own ledger; read one replica's with `curl 'http://{}/admin/cost?since=24h'`", config.server.admin_listen).into());
    };
    let redis = server::redis_state(&config, &url)?;
    redis.ready(Duration::from_secs(5)).await?;
    let redis = Arc::new(redis);
    let prices = PriceTable::from_config(&config);
    if prices.is_empty() {
        eprintln!("no [[prices]] configured: tokens are counted, money is not");
    }
    let report = report::read(&*redis, &prices, since).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::render(&report));
    }
    Ok(())
}
