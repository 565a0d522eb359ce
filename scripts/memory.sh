#!/usr/bin/env bash
# Resident memory of one `spillway serve` replica (embedded store, default settings), read
# from /proc/<pid>/status (VmRSS):
#   idle      after start, before any request (no tokenizer built yet)
#   warm      after one request (the pool's tokenizer built)
#   streams   STREAMS (1,000) streamed answers held open at once, from a simulated deployment
#             sending one token a second (`spillway sim`)
#   soak      SOAK_SECONDS (300) of RATE (2,000) requests/s (wrk, CONNECTIONS connections each
#             pausing between requests) against nginx's fixed answer; RSS every 10 s and its
#             slope (least squares, KiB per minute)
# Writes $OUT/memory.csv (phase,seconds,rss_kib) for scripts/charts.sh. Loopback only; never
# part of the test suite.
#
#   scripts/memory.sh                          # STREAMS=1000 SOAK_SECONDS=300 RATE=2000
#   SOAK_SECONDS=60 scripts/memory.sh          # a shorter soak
#   BIN=/path/to/other/spillway scripts/memory.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/mock-azure.sh

STREAMS=${STREAMS:-1000}
SOAK_SECONDS=${SOAK_SECONDS:-300}
RATE=${RATE:-2000}
CONNECTIONS=${CONNECTIONS:-40}
OUT=${OUT:-target/bench}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk nginx-light >/dev/null
fi
if [ -n "${BIN:-}" ]; then
  bin=$BIN
else
  cargo build --quiet --release --bin spillway
  bin="${CARGO_TARGET_DIR:-target}/release/spillway"
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
mkdir -p "$OUT"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 600); do curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "gateway on $1 never ready:" >&2; cat "$work/gateway.log" >&2; exit 1; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

backend=$(free_port); sim_port=$(free_port); port=$(free_port); admin=$(free_port)
pids+=("$(start_mock_azure "$work" "$backend")")
cat >"$work/sim.toml" <<EOF
[[resources]]
name = "slow"
listen = "127.0.0.1:$sim_port"
[[resources.deployments]]
name = "slow"
tpm = 1000000000
rpm = 1000000000
ttft_ms = 50
ms_per_token = 1000
jitter = 0.0
output_tokens = 60
EOF
RUST_LOG=error "$bin" sim --config "$work/sim.toml" >/dev/null 2>&1 &
pids+=($!)
cat >"$work/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
[[backends]]
id = "nginx"
url = "http://127.0.0.1:$backend"
deployments = { "gpt-4o" = "gpt-4o" }
[[backends]]
id = "sim"
url = "http://127.0.0.1:$sim_port"
deployments = { "slow" = "slow" }
EOF
RUST_LOG=error "$bin" serve --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
gateway=$!
pids+=("$gateway")
wait_ready "$port"
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$sim_port") 2>/dev/null && break; sleep 0.1; done

csv="$OUT/memory.csv"
echo "phase,seconds,rss_kib" >"$csv"
idle=$(rss_kib "$gateway")
echo "idle,0,$idle" >>"$csv"
path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
curl -fs -o /dev/null -H 'content-type: application/json' \
  -d '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":1}' "http://127.0.0.1:$port$path"
for t in 0 1 2 3 4 5; do echo "warm,$t,$(rss_kib "$gateway")" >>"$csv"; sleep 1; done
warm=$(rss_kib "$gateway")

read -r _ _ _ open _ failed _ streams_rss < <(python3 scripts/lib/slow_streams.py "$port" slow "$STREAMS" "$gateway")
echo "streams,0,$streams_rss" >>"$csv"

# The soak: each connection pauses so that all of them together send about RATE requests/s.
pause_ms=$(awk -v c="$CONNECTIONS" -v r="$RATE" 'BEGIN {printf "%d", c * 1000 / r}')
cat >"$work/soak.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":1}'
function delay() return $pause_ms end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %.1f\n", summary.requests,
    e.status + e.connect + e.read + e.write + e.timeout, summary.requests / (summary.duration / 1e6)))
end
EOF
wrk -t2 -c"$CONNECTIONS" -d"${SOAK_SECONDS}s" -s "$work/soak.lua" "http://127.0.0.1:$port$path" >"$work/wrk.out" &
wrk_pid=$!
for t in $(seq 10 10 "$SOAK_SECONDS"); do
  sleep 10
  echo "soak,$t,$(rss_kib "$gateway")" >>"$csv"
done
wait "$wrk_pid"
read -r _ sent errors rate < <(grep '^RESULT' "$work/wrk.out")

slope=$(awk -F, '$1 == "soak" {n++; x+=$2; y+=$3; xx+=$2*$2; xy+=$2*$3}
  END {if (n > 1) printf "%.1f", (n*xy - x*y) / (n*xx - x*x) * 60; else print "n/a"}' "$csv")
first=$(awk -F, '$1 == "soak" {print $3; exit}' "$csv")
last=$(awk -F, '$1 == "soak" {v=$3} END {print v}' "$csv")
mib() { awk -v k="$1" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
echo "# scripts/memory.sh, $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%F)"
echo "idle                $(mib "$idle")"
echo "after one request   $(mib "$warm")"
echo "$STREAMS streams open  $(mib "$streams_rss")  ($open open, $failed failed)"
echo "soak                ${SOAK_SECONDS} s, $sent requests at $rate/s, $errors errors; RSS $(mib "$first") at 10 s, $(mib "$last") at the end; slope $slope KiB/min"
echo "# samples: $csv"
