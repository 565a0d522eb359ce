//! `spillway`: parse the command line and run the command (`spillway_gateway::cli`).

use std::process::ExitCode;

use clap::Parser;
use spillway_gateway::cli::{self, Cli};

// Small short-lived allocations per request are the gateway's main allocator load; glibc's
// malloc showed up as a fifth of the CPU under load (scripts/bench.sh, README).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's defaults hold memory a proxy does not need: arenas committed eagerly, and
/// freed pages kept 10 ms (longer for arenas) before they go back. Set here unless the
/// environment sets them: purge at once, commit arena memory as it is used. The first arena
/// is reserved before `main`, so the container image also sets `MIMALLOC_ARENA_EAGER_COMMIT=0`
/// (Dockerfile). `scripts/memory.sh` (idle / after one request / 1,000 streams open / soak):
/// defaults 22 / 75 / 139 / 69 MiB; set here 23 / 52 / 120 / 56 MiB; with both variables
/// in the environment 15 / 38 / 94 / 44 MiB; throughput unchanged within noise.
#[cfg(not(feature = "system-allocator"))]
fn allocator_options() {
    // mimalloc v3's `mi_option_e` (c_src/mimalloc/v3/include/mimalloc.h).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    for (option, variable) in [
        (ARENA_EAGER_COMMIT, "MIMALLOC_ARENA_EAGER_COMMIT"),
        (PURGE_DELAY, "MIMALLOC_PURGE_DELAY"),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: sets a process-wide allocator option; mimalloc allows it at any time.
            unsafe { libmimalloc_sys::mi_option_set(option, 0) };
        }
    }
}

fn main() -> ExitCode {
    #[cfg(not(feature = "system-allocator"))]
    allocator_options();
    run()
}

#[tokio::main]
async fn run() -> ExitCode {
    match cli::run(Cli::parse().command()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
