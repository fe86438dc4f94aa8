#!/usr/bin/env bash
# Serve the exported tiny model with Ray Serve in the background, then call every endpoint.
# Used by `make demo` / `make serve-bg`; stop the server with `make stop`.
set -euo pipefail
VENV=${VENV:-.venv}
URL=${URL:-http://127.0.0.1:8000}
mkdir -p runs
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy:middlewares  # a lost replica: 503 + Retry-After

if curl -sf "$URL/health" >/dev/null 2>&1; then
  echo "a server already answers at $URL"
else
  "$VENV/bin/python" -m serving.app_args configs/serve.yaml  # bad args: one line, exit 1
  echo "starting: serve run configs/serve.yaml (log: runs/serve.log)"
  nohup "$VENV/bin/serve" run configs/serve.yaml >runs/serve.log 2>&1 &
  echo $! >runs/serve.pid
  for _ in $(seq 1 180); do
    curl -sf "$URL/health" >/dev/null 2>&1 && break
    if ! kill -0 "$(cat runs/serve.pid)" 2>/dev/null; then
      echo "the server exited; last lines of runs/serve.log:" >&2; tail -20 runs/serve.log >&2; exit 1
    fi
    sleep 1
  done
  curl -sf "$URL/health" >/dev/null || { echo "no answer from $URL after 180 s" >&2; exit 1; }
fi

show() { echo; echo "\$ $1"; eval "$1"; echo; }
show "curl -s $URL/health"
show "curl -s $URL/v1/models"
show "curl -s $URL/v1/completions -H 'content-type: application/json' -d '{\"model\": \"tiny\", \"prompt\": \"The cats that were sitting on the mat\", \"max_tokens\": 16, \"temperature\": 0}'"
show "curl -s $URL/v1/next-token -H 'content-type: application/json' -d '{\"text\": \"The cat that was sitting near the dogs\", \"top_k\": 5}'"
show "curl -s $URL/v1/attention -H 'content-type: application/json' -d '{\"text\": \"The cat jumps.\", \"layers\": [0], \"heads\": [0], \"decimals\": 2}'"
show "curl -s $URL/v1/probe -H 'content-type: application/json' -d '{\"text\": \"The cat that was sitting on the mat which was next to the dogs jumps.\"}'"
show "curl -sN $URL/v1/completions -H 'content-type: application/json' -d '{\"model\": \"tiny\", \"prompt\": \"The dog\", \"max_tokens\": 4, \"temperature\": 0, \"stream\": true}'"
echo "\$ python -m serving.show --text 'The cat that was sitting on the mat which was next to the dog jumps.'"
"$VENV/bin/python" -m serving.show --url "$URL" --text "The cat that was sitting on the mat which was next to the dog jumps."
echo
echo "Serving at $URL  (attention viewer: $URL/ ; stop: make stop)"
