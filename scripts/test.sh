#!/usr/bin/env bash
# The one test command (README and .ci/run call it). Installs what the checks need when it
# is missing, then runs formatting, lints, every test, and the stock OpenAI SDK check.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Toolchain components: rustup installs them when this toolchain lacks them.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "installing rust component $component"
    rustup component add "$component"
  fi
done

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

log "cargo test"
cargo test --workspace

log "OpenAI Python SDK through spillway serve"
scripts/sdk-check.sh
