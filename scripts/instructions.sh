#!/usr/bin/env bash
# User-space instructions one `spillway serve` spends per request, counted by
# `valgrind --tool=callgrind` (repeatable whatever else the machine does, unlike wall time).
# The gateway runs on the embedded store in front of nginx answering the bench's fixed chat
# completion; one keep-alive client sends WARMUP requests, then WARMUP + REQUESTS in a second
# run; the difference of the two totals over REQUESTS is the cost of one request (start-up,
# tokenizer loading and shutdown cancel out). Loopback only; never part of the test suite.
#
#   scripts/instructions.sh                      # the release binary of this checkout
#   BIN=/path/to/other/spillway scripts/instructions.sh   # another build, for a comparison
#   KEEP=/tmp/profile scripts/instructions.sh    # keep the callgrind files (callgrind_annotate)
#   STORE=redis scripts/instructions.sh          # on a local redis-server (default leases)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/mock-azure.sh

WARMUP=${WARMUP:-300}
REQUESTS=${REQUESTS:-2000}

need() { command -v "$1" >/dev/null 2>&1; }
STORE=${STORE:-embedded}
if ! need valgrind || ! need nginx || { [ "$STORE" = redis ] && ! need redis-server; }; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq valgrind nginx-light redis-server >/dev/null
fi
if [ -z "${BIN:-}" ]; then
  cargo build --quiet --release --bin spillway
  BIN="${CARGO_TARGET_DIR:-target}/release/spillway"
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 1200); do curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "gateway on $1 never ready" >&2; exit 1; }

backend=$(free_port)
pids+=("$(start_mock_azure "$work" "$backend")")
state=""
if [ "$STORE" = redis ]; then
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
  pids+=("$!")
  for _ in $(seq 100); do [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
  state="redis_url = \"redis://127.0.0.1:$redis_port\""
fi

# One run: start the gateway under callgrind, send `n` requests, stop it, print its total.
run() {
  local n=$1 port admin
  port=$(free_port); admin=$(free_port)
  cat >"$work/spillway.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
shutdown_delay_ms = 0
drain_timeout_ms = 1000
[[backends]]
id = "ptu"
url = "http://127.0.0.1:$backend"
kind = "ptu"
tpm = 1000000000
deployments = { "gpt-4o" = "gpt-4o" }
EOF
  # Each run on a key prefix of its own: the two runs' budgets and leases do not meet.
  [ -n "$state" ] && printf '[state]\n%s\nkey_prefix = "instr-%s"\n' "$state" "$n" >>"$work/spillway.toml"
  RUST_LOG=error valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.$n" \
    "$BIN" serve --config "$work/spillway.toml" >/dev/null 2>"$work/valgrind.$n" &
  local gateway=$!
  wait_ready "$port"
  python3 - "$port" "$n" <<'EOF'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
body = b'{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":8}'
conn = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n):
    conn.request("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                 body, {"content-type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 200, answer.status
EOF
  kill -TERM "$gateway"; wait "$gateway" || true
  awk '/^(summary|totals):/ { print $2; exit }' "$work/callgrind.$n"
}

base=$(run "$WARMUP")
more=$(run $((WARMUP + REQUESTS)))
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/callgrind.* "$KEEP"/; fi
echo "binary: $BIN (store: $STORE)"
echo "instructions: $base for $WARMUP requests, $more for $((WARMUP + REQUESTS))"
echo "per request: $(( (more - base) / REQUESTS ))"
