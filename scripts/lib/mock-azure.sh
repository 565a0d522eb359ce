# Sourced by the measurement scripts (bench.sh, instructions.sh): a zero-latency Azure OpenAI
# stand-in, nginx answering every request with one fixed chat completion on loopback, and,
# when asked, nginx as a plain reverse proxy in front of it (the bench's baseline arm).
#
#   start_mock_azure WORK BACKEND_PORT [PROXY_PORT]   # prints the nginx pid

MOCK_AZURE_ANSWER='{"id":"chatcmpl-bench","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"Hi"}}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}'

start_mock_azure() {
  local work=$1 backend=$2 proxy=${3:-}
  local proxy_block=""
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
    location / { default_type application/json; return 200 '$MOCK_AZURE_ANSWER'; } }
  $proxy_block
}
EOF
  nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -g 'daemon off;' >/dev/null 2>&1 &
  echo $!
}
