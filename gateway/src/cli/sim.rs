//! `spillway sim`: simulated Azure OpenAI resources on loopback.

use std::path::PathBuf;

use super::CliResult;
use crate::ops::telemetry;
use crate::{server, sim};

pub async fn run(config: Option<PathBuf>, port_base: Option<u16>) -> CliResult {
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
