#!/usr/bin/env bash
# POST /generate with curl: one prompt in, the model's text out. Fails (non-zero) on any answer but a 200.
#   GENAPI_KEY=... bash examples/generate.sh ["your prompt"]
set -euo pipefail
url="${GENAPI_URL:-http://127.0.0.1:8000}"
prompt="${1:-Tell me a joke.}"
body=$(python3 -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "max_tokens": 50}))' "$prompt")

curl --fail-with-body --silent --show-error -X POST "$url/generate" \
     -H 'Content-Type: application/json' -H "X-API-KEY: $GENAPI_KEY" -d "$body"
echo
