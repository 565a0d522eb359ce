#!/usr/bin/env bash
# Validate the deployment files: Kubernetes manifests (kubernetes-validate from PyPI, and
# their consistency, scripts/check_deploy.py) and docker-compose.yml (`docker-compose config`
# where Debian's docker-compose installs). Called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${CARGO_TARGET_DIR:-target}/deploy-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
  timeout 600 "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    'kubernetes-validate>=1.31' pyyaml
fi
# A release binary newer than every source is used as it is; otherwise a debug one is built.
target="${CARGO_TARGET_DIR:-target}"
bin="$target/release/spillway"
if [ ! -x "$bin" ] || [ -n "$(find gateway/src shared/src Cargo.lock -newer "$bin" -print -quit)" ]; then
  cargo build --quiet --bin spillway
  bin="$target/debug/spillway"
fi
"$venv/bin/python" scripts/check_deploy.py "$bin"

if ! command -v docker-compose >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  timeout 600 bash -c "$sudo apt-get install -y -qq docker-compose >/dev/null 2>&1" || true
fi
if command -v docker-compose >/dev/null 2>&1; then
  # The key is the operator's to choose; any value shows the file is complete.
  SPILLWAY_LOCAL_KEY=check-deploy docker-compose -f docker-compose.yml config -q
  # deploy/spillway.toml (the compose and image configuration) passes check-config too.
  SPILLWAY_LOCAL_KEY=check-deploy SPILLWAY__STATE__REDIS_URL=redis://127.0.0.1:1 \
    "$bin" check-config --config deploy/spillway.toml >/dev/null
  echo "check-deploy: docker-compose.yml valid"
else
  echo "notice: docker-compose could not be installed here; docker-compose.yml not validated"
fi
