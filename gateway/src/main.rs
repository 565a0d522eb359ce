//! `spillway`: parse the command line and run the command (`spillway_gateway::cli`).

use std::process::ExitCode;

use clap::Parser;
use spillway_gateway::cli::{self, Cli};

// Small short-lived allocations per request are the gateway's main allocator load; glibc's
// malloc showed up as a fifth of the CPU under load (scripts/bench.sh, README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    match cli::run(Cli::parse().command()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
