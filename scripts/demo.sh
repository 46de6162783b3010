#!/usr/bin/env bash
# Start the ranker (with an embedded CPU tritonserver) on a release, show Rank calls, keep serving.
set -euo pipefail
release=${1:?usage: demo.sh RELEASE_DIR}
port=${RANKER_PORT:-50051}
target="localhost:${port}"

python -m ranker serve --release "$release" --port "$port" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null' EXIT INT TERM

python -m ranker health --target "$target" --wait 180
for query in "cordless drill" "white interior paint" "garden hose 50 ft"; do
  echo
  echo "== Rank: \"$query\""
  python -m ranker query "$query" --target "$target" --top-k 5
done
echo
echo "The ranker is serving ranker.v1.Ranker on $target (health and reflection too). Ctrl-C stops it."
echo "Try: .venv/bin/python -m ranker query 'dewalt drill' --target $target --json"
if [[ -n "${DEMO_EXIT:-}" ]]; then exit 0; fi
wait "$server"
