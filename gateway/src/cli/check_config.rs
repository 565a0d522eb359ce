//! `spillway check-config`: validate a configuration and print the routing table it makes.

use std::path::Path;
use std::sync::Arc;

use spillway_shared::EmbeddedState;

use super::CliResult;
use crate::config::Config;

pub fn run(config: &Path, offline: bool) -> CliResult {
    if offline {
        offline_check(config)
    } else {
        full_check(config)
    }
}

/// The file alone: what CI or a laptop can check of a production configuration.
fn offline_check(config: &Path) -> CliResult {
    Config::load(Some(config))?.validate_offline()?;
    println!(
        "configuration OK (offline: environment variables, files and credentials were not read; run without --offline where the replicas run to check those too)"
    );
    Ok(())
}

/// Everything a replica would read (environment, files, credentials), but no state store.
fn full_check(config: &Path) -> CliResult {
    let config = Config::load(Some(config))?;
    // Validation only: no connection to the state store.
    let fleet = Arc::new(EmbeddedState::new(config.windows()));
    let gateway = crate::Gateway::from_config(&config, fleet)?;
    print!("{}", gateway.table.render());
    println!("configuration OK");
    Ok(())
}
