#!/usr/bin/env bash
# A stock OpenAI Python SDK (AzureOpenAI and OpenAI clients) against `spillway serve` in
# front of `spillway sim`, as separate processes over loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/sdk-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check 'openai>=1.50,<3'
fi

cargo build --quiet --bin spillway
exec "$venv/bin/python" scripts/sdk_check.py "${CARGO_TARGET_DIR:-target}/debug/spillway"
