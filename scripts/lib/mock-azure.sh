# Sourced by the measurement scripts (bench.sh, instructions.sh): a zero-latency Azure OpenAI
# stand-in, nginx answering every request with one fixed chat completion on loopback, and,
# when asked, nginx as a plain reverse proxy in front of it (the bench's baseline arm).
#
#   start_mock_azure WORK BACKEND_PORT [PROXY_PORT]   # prints the nginx pid
#
# Deployment `stream-N` (any N from 1 to 200) answers a streamed chat completion of N
# content events, its usage chunk and `[DONE]`, as Azure OpenAI streams one: the per-event
# cost of relaying is the difference between two N over their difference.

MOCK_AZURE_ANSWER='{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"Hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}'

# The SSE body of a streamed answer of N content events.
mock_azure_stream() {
  local n=$1 i out=""
  local head='{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":['
  for i in $(seq "$n"); do
    out+="data: ${head}{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n"
  done
  out+="data: ${head}{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
  out+="data: ${head}],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":$n,\"total_tokens\":$((9 + n))}}\n\n"
  out+="data: [DONE]\n\n"
  printf '%s' "$out"
}

start_mock_azure() {
  local work=$1 backend=$2 proxy=${3:-}
  local proxy_block="" streams="" n
  mkdir -p "$work/nginx/sse"
  for n in 1 41; do
    printf '%b' "$(mock_azure_stream "$n")" >"$work/nginx/sse/stream-$n"
  done
  # nginx's workers (another user when started as root) read them.
  chmod a+rx "$work" "$work/nginx" "$work/nginx/sse" && chmod a+r "$work"/nginx/sse/*
  # Static files are not served to POST (405): the error page turns that into the file.
  streams="    location ~ ^/openai/deployments/(stream-[0-9]+)/ { root $work/nginx/sse; default_type text/event-stream;
      try_files /\$1 =404; error_page 405 =200 \$request_uri; }
"
  if [ -n "$proxy" ]; then
    proxy_block="upstream backend { server 127.0.0.1:$backend; keepalive 64; }
  server { listen 127.0.0.1:$proxy;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  fi
  mkdir -p "$work/nginx"
  cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body; proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fcgi; uwsgi_temp_path $work/nginx/uwsgi; scgi_temp_path $work/nginx/scgi;
  server { listen 127.0.0.1:$backend;
$streams    location / { default_type application/json; return 200 '$MOCK_AZURE_ANSWER'; } }
  $proxy_block
}
EOF
  nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -g 'daemon off;' >/dev/null 2>&1 &
  echo $!
}
