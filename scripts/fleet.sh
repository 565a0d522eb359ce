#!/usr/bin/env bash
# The docker-compose fleet as local processes, for machines without a container engine:
# Redis, simulated PTU and PAYG deployments in two regions, three gateway replicas sharing
# state through Redis, and nginx as a round-robin front standing in for Application Gateway.
#
#   scripts/fleet.sh up       build, start everything, wait until the front answers
#   scripts/fleet.sh up --redis-delay-ms N
#                             the same fleet "across regions": replica 1 next to Redis, replicas
#                             2 and 3 reach it through a proxy adding N ms each way (40: about
#                             Sweden Central to East US). Nothing else is configured differently.
#   scripts/fleet.sh status   what runs (a replica stopping says "draining"), and the shared
#                             fleet state (spillway state)
#   scripts/fleet.sh down     stop the front, then the replicas (waiting for their drain),
#                             then the simulator and Redis; returns once all have exited
#
# It serves two pools: gpt-4o (chat, completions, Responses, Realtime) and
# text-embedding-3-small (embeddings), each on PTU first and PAYG after, in two regions.
#
# Ports (loopback only) start at FLEET_PORT (default 18100): front +0, replicas +1..+3,
# their admin listeners +11..+13, Redis +20 (+21: Redis through the delay proxy), simulated
# resources +31..+34.
# Set OTEL_EXPORTER_OTLP_ENDPOINT to export the replicas' traces to a collector.
set -euo pipefail
cd "$(dirname "$0")/.."

base="${FLEET_PORT:-18100}"
dir="${CARGO_TARGET_DIR:-target}/fleet"
bin="${CARGO_TARGET_DIR:-target}/release/spillway"
front=$((base)); redis=$((base + 20)); far_redis=$((base + 21))
delay_ms=0

log() { printf '==> %s\n' "$*"; }

install_missing() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v nginx >/dev/null 2>&1 || missing+=(nginx)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() { # name, command...
  local name="$1"; shift
  "$@" >"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

wait_for() { # url, what
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "fleet.sh: $2 did not come up; see $dir/*.log" >&2
  return 1
}

write_configs() {
  local regions=(eastus westus eastus westus) kinds=(ptu ptu payg payg) tpms=(20000 20000 450000 450000)
  : >"$dir/sim.toml"
  : >"$dir/backends.toml"
  for i in 0 1 2 3; do
    local name="${kinds[$i]}-${regions[$i]}" port=$((base + 31 + i)) priority=1
    [ "${kinds[$i]}" = payg ] && priority=2
    cat >>"$dir/sim.toml" <<EOT
[[resources]]
name = "$name"
listen = "127.0.0.1:$port"
region = "${regions[$i]}"
[[resources.deployments]]
name = "gpt-4o"
kind = "${kinds[$i]}"
tpm = ${tpms[$i]}
[[resources.deployments]]
name = "text-embedding-3-small"
kind = "${kinds[$i]}"
tpm = ${tpms[$i]}

EOT
    cat >>"$dir/backends.toml" <<EOT
[[backends]]
id = "$name"
url = "http://127.0.0.1:$port"
region = "${regions[$i]}"
priority = $priority
kind = "${kinds[$i]}"
$([ "${kinds[$i]}" = ptu ] && echo "tpm = ${tpms[$i]}")
deployments = { "gpt-4o" = "gpt-4o", "text-embedding-3-small" = "text-embedding-3-small" }

EOT
  done
  for r in 1 2 3; do
    local redis_port=$redis
    [ "$delay_ms" -gt 0 ] && [ "$r" -gt 1 ] && redis_port=$far_redis
    cat >"$dir/replica-$r.toml" <<EOT
[server]
listen = "127.0.0.1:$((base + r))"
admin_listen = "127.0.0.1:$((base + 10 + r))"
# \`down\` stops the front first: no load balancer needs the delay to stop sending.
shutdown_delay_ms = 500

[state]
redis_url = "redis://127.0.0.1:$redis_port"

[telemetry]
access_log = true

EOT
    cat "$dir/backends.toml" >>"$dir/replica-$r.toml"
  done
  cat >"$dir/nginx.conf" <<EOT
worker_processes 1;
pid $PWD/$dir/nginx.pid;
error_log $PWD/$dir/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $PWD/$dir/nginx-tmp;
  proxy_temp_path $PWD/$dir/nginx-tmp;
  upstream spillway {
    server 127.0.0.1:$((base + 1)) max_fails=1 fail_timeout=5s;
    server 127.0.0.1:$((base + 2)) max_fails=1 fail_timeout=5s;
    server 127.0.0.1:$((base + 3)) max_fails=1 fail_timeout=5s;
    keepalive 32;
  }
  server {
    listen 127.0.0.1:$front;
    client_max_body_size 16m;
    location / {
      proxy_pass http://spillway;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
      proxy_next_upstream error timeout http_503;
    }
  }
}
EOT
}

up() {
  install_missing
  if [ -e "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then
    echo "fleet.sh: already up (scripts/fleet.sh down first)" >&2
    exit 1
  fi
  for p in $front $((base + 1)) $((base + 2)) $((base + 3)) $((base + 11)) $((base + 12)) $((base + 13)) $redis $((base + 31)) $((base + 32)) $((base + 33)) $((base + 34)); do
    port_free "$p" || { echo "fleet.sh: port $p is taken; set FLEET_PORT" >&2; exit 1; }
  done
  log "building spillway (release)"
  cargo build --release --quiet --bin spillway
  if [ "$delay_ms" -gt 0 ]; then
    port_free "$far_redis" || { echo "fleet.sh: port $far_redis is taken; set FLEET_PORT" >&2; exit 1; }
    cargo build --release --quiet -p spillway-tests --bin spillway-delay-proxy
  fi
  mkdir -p "$dir/nginx-tmp"
  write_configs
  log "starting redis on $redis"
  start redis redis-server --port "$redis" --bind 127.0.0.1 --save "" --appendonly no
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$redis" ping 2>/dev/null)" = PONG ] && break
    sleep 0.1
  done
  if [ "$delay_ms" -gt 0 ]; then
    log "starting the delay proxy on $far_redis: Redis ${delay_ms} ms away (each way) for replicas 2 and 3"
    start delay-proxy "${CARGO_TARGET_DIR:-target}/release/spillway-delay-proxy" \
      "127.0.0.1:$far_redis" "127.0.0.1:$redis" "$delay_ms"
  fi
  log "starting simulated deployments on $((base + 31))-$((base + 34))"
  start sim "$bin" sim --config "$dir/sim.toml"
  for r in 1 2 3; do
    log "starting replica $r on $((base + r)) (admin $((base + 10 + r)))"
    RUST_LOG="${RUST_LOG:-warn}" start "replica-$r" "$bin" serve --config "$dir/replica-$r.toml"
  done
  for r in 1 2 3; do
    wait_for "http://127.0.0.1:$((base + r))/readyz" "replica $r"
  done
  log "starting the front (nginx) on $front"
  nginx -c "$PWD/$dir/nginx.conf" -p "$PWD/$dir" -g 'daemon off;' >"$dir/nginx.log" 2>&1 &
  wait_for "http://127.0.0.1:$front/readyz" "the front"
  local answer
  answer=$(curl -fsS "http://127.0.0.1:$front/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21" \
    -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"hello"}],"max_tokens":5}')
  case "$answer" in
    *'"chat.completion"'*) ;;
    *) echo "fleet.sh: the first request failed: $answer" >&2; exit 1 ;;
  esac
  cat <<EOT

The fleet is up. Send requests to the front (as to https://<resource>.openai.azure.com):
  curl -s 'http://127.0.0.1:$front/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21' \\
       -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"hi"}]}'
Embeddings:     curl -s 'http://127.0.0.1:$front/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21' \\
                     -H 'content-type: application/json' -d '{"input":"hi"}'
Shared state:   redis-cli -p $redis --scan --pattern 'spillway:*'
Fleet table:    scripts/fleet.sh status
Logs:           $dir/*.log (replicas write one JSON access line per request to theirs)
Stop:           scripts/fleet.sh down
EOT
}

alive() { [ -e "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

status() {
  local any=0
  for name in redis delay-proxy sim replica-1 replica-2 replica-3 nginx; do
    if alive "$name"; then
      local state=running
      # A replica answering /readyz 503 has been told to stop and is draining.
      if [[ $name == replica-* ]] && [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((base + ${name#replica-}))/readyz")" = 503 ]; then
        state=draining
      fi
      printf '%-10s %s (pid %s)\n' "$name" "$state" "$(cat "$dir/$name.pid")"; any=1
    elif [ "$name" != delay-proxy ]; then
      printf '%-10s stopped\n' "$name"
    fi
  done
  if [ $any -eq 1 ] && [ -x "$bin" ] && [ -e "$dir/replica-1.toml" ]; then
    echo
    "$bin" state --config "$dir/replica-1.toml" || true
  fi
}

# Stop these (SIGTERM) and wait until every one has exited (at most `within` seconds).
stop_all() { # within, names...
  local within=$1; shift
  for name in "$@"; do
    alive "$name" && kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
  done
  for name in "$@"; do
    for _ in $(seq 1 $((within * 10))); do
      alive "$name" || break
      sleep 0.1
    done
    if alive "$name"; then
      echo "fleet.sh: $name did not stop within ${within}s; killing it" >&2
      kill -9 "$(cat "$dir/$name.pid")" 2>/dev/null || true
    fi
    rm -f "$dir/$name.pid"
  done
}

down() {
  log "stopping the front"
  stop_all 10 nginx
  log "stopping the replicas (they finish what is in flight)"
  stop_all 30 replica-1 replica-2 replica-3
  log "stopping the simulator and Redis"
  stop_all 10 sim delay-proxy redis
  log "fleet stopped"
}

case "${1:-}" in
  up)
    shift
    while [ $# -gt 0 ]; do
      case "$1" in
        --redis-delay-ms)
          [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "fleet.sh: --redis-delay-ms takes milliseconds (each way)" >&2; exit 2; }
          delay_ms=$2; shift 2 ;;
        *) echo "usage: scripts/fleet.sh up [--redis-delay-ms N]" >&2; exit 2 ;;
      esac
    done
    up ;;
  status) status ;;
  down) down ;;
  *) echo "usage: scripts/fleet.sh up [--redis-delay-ms N]|status|down" >&2; exit 2 ;;
esac
