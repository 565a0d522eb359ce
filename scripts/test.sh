#!/usr/bin/env bash
# The one test command (README and .ci/run call it). Installs what the checks need when it
# is missing, then runs formatting, lints, every test, and the stock OpenAI SDK check.
set -euo pipefail
cd "$(dirname "$0")/.."

# A one-off build gains nothing from incremental artifacts, which were a third of the disk used.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

log() { printf '\n==> %s\n' "$*"; }

# Toolchain components: rustup installs them when this toolchain lacks them.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "installing rust component $component"
    rustup component add "$component"
  fi
done

# The Redis tests run real redis-server processes (on free loopback ports, started by the
# test harness itself); Debian's package also brings redis-cli for the cluster tests.
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  log "installing redis-server"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server openssl >/dev/null
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
# The gateway without the simulator (`spillway sim`, `spillway demo`) still builds.
cargo clippy -p spillway-gateway --no-default-features -- -D warnings

log "cargo test"
cargo test --workspace

# Dependencies: licenses, sources and bans always; known vulnerabilities when the RustSec
# advisory database (a GitHub repository) can be fetched. cargo-deny installs from crates.io
# in about two minutes on a fresh 2-core machine.
log "cargo deny"
if ! cargo deny --version >/dev/null 2>&1; then
  log "installing cargo-deny"
  timeout 900 cargo install cargo-deny --locked --quiet || true
fi
if cargo deny --version >/dev/null 2>&1; then
  cargo deny check bans licenses sources
  if timeout 120 cargo deny fetch db >/dev/null 2>&1; then
    cargo deny check advisories
  else
    echo "notice: the RustSec advisory database cannot be fetched from here; advisories not checked"
  fi
else
  echo "notice: cargo-deny could not be installed; dependency checks skipped"
fi

log "deployment files (Kubernetes manifests, docker-compose.yml)"
scripts/check-deploy.sh

log "OpenAI Python SDK through spillway serve"
scripts/sdk-check.sh
