#!/usr/bin/env bash
# End-to-end cost of the gateway, in one run: wrk against a zero-latency backend (nginx
# answering a fixed chat completion) directly, through nginx as a plain reverse proxy, and
# through one `spillway serve` replica on the embedded store and on Redis. The arms are
# interleaved (ROUNDS times), each measured for latency (1 connection) and throughput (32).
# Prints each arm's added p50/p99 over the direct arm and its throughput as a ratio to the
# nginx arm. Loopback only; never part of the test suite.
#
#   scripts/bench.sh            # ROUNDS=3 SECONDS_PER_RUN=5 by default
#   BASE=/path/to/old/spillway scripts/bench.sh   # also that build's two arms (base-embedded,
#                                                  # base-redis), interleaved: a before/after
#                                                  # comparison measured in the same run
#   INSTRUCTIONS=0 scripts/bench.sh                # without the instruction counts
#   PEER=0 scripts/bench.sh                        # without the LiteLLM arm
# The peer arm: LiteLLM's proxy (`pip install 'litellm[proxy]'`, its router on the same
# Redis) in front of the same nginx answer, when the `litellm` command is there (skipped
# with a message when not). Writes $OUT/latency.csv (default target/bench) for charts.
# Then (unless INSTRUCTIONS=0) the instructions per request of this build, and of BASE when
# given, by scripts/instructions.sh: the figure that holds on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/mock-azure.sh

ROUNDS=${ROUNDS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
OUT=${OUT:-target/bench}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx || ! need redis-server; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk nginx-light redis-server >/dev/null
fi
cargo build --quiet --release --bin spillway
bin="${CARGO_TARGET_DIR:-target}/release/spillway"

work=$(mktemp -d)
pids=()
# Gateways start in command substitutions (subshells): their pids go through a file.
cleanup() {
  for p in "${pids[@]}" $(cat "$work/gateway.pids" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

backend=$(free_port); proxy=$(free_port); redis_port=$(free_port)
pids+=("$(start_mock_azure "$work" "$backend" "$proxy")")
redis-server --port "$redis_port" --save "" --appendonly no >/dev/null &
pids+=($!)
wait_port "$backend"; wait_port "$proxy"; wait_port "$redis_port"

start_gateway() { # name, extra [state] lines[, binary]
  local port admin gateway_bin=${3:-$bin}
  port=$(free_port); admin=$(free_port)
  cat >"$work/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
[state]
$2
[[backends]]
id = "backend"
url = "http://127.0.0.1:$backend"
deployments = { "gpt-4o" = "gpt-4o" }
EOF
  RUST_LOG=error "$gateway_bin" serve --config "$work/$1.toml" >/dev/null 2>&1 &
  echo $! >>"$work/gateway.pids"
  wait_port "$port"
  echo "$port"
}
embedded=$(start_gateway embedded "")
on_redis=$(start_gateway redis "redis_url = \"redis://127.0.0.1:$redis_port\"")

cat >"$work/post.lua" <<'EOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"messages":[{"role":"user","content":"Hello there"}],"max_tokens":1}'
done = function(summary, latency, requests)
  io.write(string.format("RESULT %.1f %.1f %.1f\n", latency:percentile(50), latency:percentile(99),
    summary.requests / (summary.duration / 1e6)))
end
EOF
azure_path="/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
declare -A rps path script
run() { # arm, port, connections -> "p50 p99 rps"
  wrk -t1 -c"$3" -d"${SECONDS_PER_RUN}s" -s "${script[$1]:-$work/post.lua}" \
    "http://127.0.0.1:$2${path[$1]:-$azure_path}" | awk '/^RESULT/ {print $2, $3, $4}'
}
arms=(direct nginx embedded redis)
declare -A port=([direct]=$backend [nginx]=$proxy [embedded]=$embedded [redis]=$on_redis)
if [ "${PEER:-1}" != 0 ]; then
  if need litellm; then
    # LiteLLM's proxy: the OpenAI route, a master key (it refuses to start without one), its
    # router on the same Redis; the Azure deployment is the same nginx answer.
    litellm_port=$(free_port)
    key="sk-spillway-bench-$(date +%s)"
    printf '%s\n' "model_list:" "  - model_name: gpt-4o" "    litellm_params:" \
      "      model: azure/gpt-4o" "      api_base: http://127.0.0.1:$backend" \
      "      api_key: not-a-real-key" "      api_version: \"2024-10-21\"" \
      "router_settings:" "  routing_strategy: usage-based-routing-v2" \
      "  redis_host: 127.0.0.1" "  redis_port: $redis_port" \
      "general_settings:" "  master_key: $key" >"$work/litellm.yaml"
    litellm --config "$work/litellm.yaml" --host 127.0.0.1 --port "$litellm_port" >"$work/litellm.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 120); do (echo >"/dev/tcp/127.0.0.1/$litellm_port") 2>/dev/null && break; sleep 0.5; done
    body='{"model":"gpt-4o","messages":[{"role":"user","content":"Hello there"}],"max_tokens":1}'
    { grep -v '^wrk.body' "$work/post.lua"
      echo "wrk.body = '$body'"
      echo "wrk.headers[\"Authorization\"] = \"Bearer $key\""; } >"$work/litellm.lua"
    if curl -fs -o /dev/null -H "authorization: Bearer $key" -H 'content-type: application/json' \
      -d "$body" "http://127.0.0.1:$litellm_port/v1/chat/completions"; then
      arms+=(litellm)
      port[litellm]=$litellm_port; path[litellm]=/v1/chat/completions; script[litellm]=$work/litellm.lua
    else
      echo "# LiteLLM did not answer (its log ends: $(tail -1 "$work/litellm.log")); peer arm skipped" >&2
    fi
  else
    echo "# litellm not installed (pip install 'litellm[proxy]'); peer arm skipped" >&2
  fi
fi
if [ -n "${BASE:-}" ]; then
  # The base build's gateways share the Redis server under their own key prefix.
  port[base-embedded]=$(start_gateway base-embedded "" "$BASE")
  port[base-redis]=$(start_gateway base-redis "redis_url = \"redis://127.0.0.1:$redis_port\"
key_prefix = \"spillway-base\"" "$BASE")
  arms+=(base-embedded base-redis)
fi
# Per round: each arm's added latency over the direct arm and its throughput over the nginx
# arm, all measured within the same minute; the summary is the median of those per-round
# figures, so a machine that drifts between rounds (shared cores) shifts no ratio.
declare -A added50 added99 ratio
for round in $(seq "$ROUNDS"); do
  declare -A r50=() r99=() rrps=()
  for arm in "${arms[@]}"; do
    read -r a b _ < <(run "$arm" "${port[$arm]}" 1)
    read -r _ _ c < <(run "$arm" "${port[$arm]}" 32)
    r50[$arm]=$a; r99[$arm]=$b; rrps[$arm]=$c
    rps[$arm]="${rps[$arm]:-} $c"
    echo "# round $round $arm: p50 $a µs, p99 $b µs, $c requests/s" >&2
  done
  for arm in "${arms[@]}"; do
    added50[$arm]="${added50[$arm]:-} $(awk -v a="${r50[$arm]}" -v d="${r50[direct]}" 'BEGIN {print a - d}')"
    added99[$arm]="${added99[$arm]:-} $(awk -v a="${r99[$arm]}" -v d="${r99[direct]}" 'BEGIN {print a - d}')"
    ratio[$arm]="${ratio[$arm]:-} $(awk -v a="${rrps[$arm]}" -v n="${rrps[nginx]}" 'BEGIN {print a / n}')"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
echo "# scripts/bench.sh: ${ROUNDS} interleaved rounds of ${SECONDS_PER_RUN}s per arm; medians of"
echo "# per-round figures: latency with 1 connection (added over direct), throughput with 32"
echo "# (ratio to the nginx arm of the same round)"
printf '%-14s %14s %14s %12s %10s\n' arm "added p50 µs" "added p99 µs" "requests/s" "vs nginx"
mkdir -p "$OUT"
echo "arm,added_p50_us,added_p99_us,requests_per_s,vs_nginx" >"$OUT/latency.csv"
for arm in "${arms[@]}"; do
  m50=$(echo "${added50[$arm]}" | median); m99=$(echo "${added99[$arm]}" | median)
  r=$(echo "${rps[$arm]}" | median); q=$(echo "${ratio[$arm]}" | median)
  awk -v arm="$arm" -v a="$m50" -v b="$m99" -v r="$r" -v q="$q" \
    'BEGIN { printf "%-14s %14.0f %14.0f %12.0f %9.2fx\n", arm, a, b, r, q }'
  [ "$arm" = direct ] || echo "$arm,$m50,$m99,$r,$q" >>"$OUT/latency.csv"
done
if [ "${INSTRUCTIONS:-1}" != 0 ]; then
  BIN="$bin" scripts/instructions.sh
  if [ -n "${BASE:-}" ]; then BIN="$BASE" TOP=0 scripts/instructions.sh; fi
fi
