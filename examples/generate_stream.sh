#!/usr/bin/env bash
# POST /generate with "stream": true and curl -N: the text arrives as the model writes it, then one `done` event.
# Fails (non-zero) on any answer but a 200, or on a stream that ends without `done` (a cut answer).
#   GENAPI_KEY=... bash examples/generate_stream.sh ["your prompt"]
set -euo pipefail
url="${GENAPI_URL:-http://127.0.0.1:8000}"
prompt="${1:-Tell me a joke.}"
body=$(python3 -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "stream": True}))' "$prompt")

events=$(mktemp)
trap 'rm -f "$events"' EXIT
curl -N --fail-with-body --silent --show-error -X POST "$url/generate" \
     -H 'Content-Type: application/json' -H "X-API-KEY: $GENAPI_KEY" -d "$body" | tee "$events"
grep -q '^event: done$' "$events" || { echo "the stream ended without its done event: the answer is not complete" >&2; exit 1; }
