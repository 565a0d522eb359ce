#!/usr/bin/env bash
# BENCHMARKS.md's charts (docs/bench/*.svg), drawn with plotters from what the benchmark
# scripts left in target/bench/: scripts/bench.sh (latency.csv), scripts/memory.sh
# (memory.csv), `cargo bench -p spillway-tests --bench fleet_arm` (fleet.csv). A chart whose
# data is missing is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p spillway-tests --example charts
