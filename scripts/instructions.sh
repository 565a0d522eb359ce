#!/usr/bin/env bash
# User-space instructions one `spillway serve` spends per request, counted by
# `valgrind --tool=callgrind` (repeatable whatever else the machine does, unlike wall time).
# The gateway runs in front of nginx answering the bench's fixed chat completion (or a
# streamed one); one keep-alive client sends WARMUP requests with counting off, then
# REQUESTS with it on (`callgrind_control -i`), so start-up, tokenizer loading and shutdown
# are not counted. Loopback only; never part of the test suite.
#
# Arms (ARMS, all by default):
#   embedded          chat completion, embedded store
#   redis             chat completion, on a local redis-server (default leases)
#   stream            streamed chat completion of 1 content event, embedded store
#   stream-41         the same with 41 content events: the relay's cost per SSE event is
#                     (stream-41 - stream) / 40
# Prints instructions per request per arm, the cost per SSE event, and where the first
# arm's instructions go (the TOP functions by inclusive cost, per request).
#
#   scripts/instructions.sh                               # the release binary of this checkout
#   BIN=/path/to/other/spillway scripts/instructions.sh   # another build, for a comparison
#   ARMS="embedded redis" TOP=0 scripts/instructions.sh   # some arms, no profile
#   KEEP=/tmp/profile scripts/instructions.sh             # keep the callgrind files
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/mock-azure.sh

WARMUP=${WARMUP:-300}
REQUESTS=${REQUESTS:-2000}
ARMS=${ARMS:-embedded redis stream stream-41}
TOP=${TOP:-15}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need valgrind || ! need nginx || ! need redis-server; then
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
redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
pids+=("$!")
for _ in $(seq 100); do [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done

# One arm: start the gateway under callgrind with counting off, warm it up, count REQUESTS,
# stop it; prints the instructions counted per request.
measure() {
  local arm=$1 port admin deployment=gpt-4o stream=false state=""
  port=$(free_port); admin=$(free_port)
  case "$arm" in
    embedded) ;;
    redis) state=$(printf '[state]\nredis_url = "redis://127.0.0.1:%s"\nkey_prefix = "instr-%s"\n' "$redis_port" "$port") ;;
    stream) deployment=stream-1; stream=true ;;
    stream-41) deployment=stream-41; stream=true ;;
    *) echo "unknown arm $arm" >&2; exit 2 ;;
  esac
  cat >"$work/$arm.toml" <<EOF
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
deployments = { "gpt-4o" = "$deployment" }
$state
EOF
  RUST_LOG=error valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$work/callgrind.$arm" \
    "$BIN" serve --config "$work/$arm.toml" >/dev/null 2>"$work/valgrind.$arm" &
  local gateway=$!
  wait_ready "$port"
  python3 - "$port" "$WARMUP" "$REQUESTS" "$stream" "$gateway" <<'EOF'
import http.client, subprocess, sys
port, warmup, requests, stream, pid = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
body = ('{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":8,"stream":%s}' % stream).encode()
conn = http.client.HTTPConnection("127.0.0.1", port)
def send(n):
    for _ in range(n):
        conn.request("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                     body, {"content-type": "application/json"})
        answer = conn.getresponse()
        text = answer.read()
        assert answer.status == 200, (answer.status, text)
        assert stream != "true" or text.rstrip().endswith(b"data: [DONE]"), text
def counting(on):
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", pid], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
send(warmup)
counting(True)
send(requests)
counting(False)
EOF
  kill -TERM "$gateway"; wait "$gateway" || true
  local total
  total=$(awk '/^totals:/ { print $2; exit }' "$work/callgrind.$arm")
  echo $(( total / REQUESTS ))
}

echo "# scripts/instructions.sh: $BIN; $REQUESTS requests counted after $WARMUP uncounted"
declare -A per
for arm in $ARMS; do
  per[$arm]=$(measure "$arm")
  printf '%-10s %9s instructions per request\n' "$arm" "${per[$arm]}"
done
if [ -n "${per[stream]:-}" ] && [ -n "${per[stream-41]:-}" ]; then
  printf '%-10s %9s instructions per SSE event relayed\n' "per event" $(( (per[stream-41] - per[stream]) / 40 ))
fi
first=${ARMS%% *}
# A function list from callgrind_annotate, per request: its count over REQUESTS, its share.
per_request() {
  awk -v n="$REQUESTS" -v top="$TOP" '
    /^-+$/ { rule++; next }
    rule >= 3 && $1 ~ /^[0-9,]+$/ && $0 !~ /PROGRAM TOTALS/ && shown < top {
      count = $1; gsub(",", "", count)
      share = match($0, /\( *[0-9.]+%\)/) ? substr($0, RSTART + 1, RLENGTH - 2) : ""; gsub(" ", "", share)
      name = $0; sub(/^ *[0-9,]+ +(\( *[0-9.]+%\) +)?/, "", name); sub(/ \[[^]]*\]$/, "", name)
      sub(/^\?\?\?:/, "", name)
      if (length(name) > 100) name = substr(name, 1, 97) "..."
      printf "%9d %9s  %s\n", count / n, share, name; shown++
    }'
}
if [ "$TOP" -gt 0 ]; then
  echo "# where the $first arm's instructions go, per request: the top $TOP functions by inclusive cost"
  callgrind_annotate --inclusive=yes "$work/callgrind.$first" 2>/dev/null | per_request
  echo "# and by their own (exclusive) cost"
  callgrind_annotate "$work/callgrind.$first" 2>/dev/null | per_request
fi
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$work"/callgrind.* "$KEEP"/; fi
