#!/usr/bin/env bash
# Time from `cbd serve` on an empty home to the first finished init (README, Quick start).
#
#   bash bench/first_start.sh          # empty CBD_HOME: assets from their packages, then `tiny`, then the init
#   bash bench/first_start.sh assets   # assets from ~/.cache/cbd, empty chains and artifacts folders
#
# Starts `cbd serve` (embedded Redis, one worker) on port ${PORT:-8011}, prints when /healthz first
# answers and when the quick start's POST /initialize first answers 200 (tried every 5 s), then stops
# the service and removes its folder. Run it on idle cores: it measures wall time.
set -u
cd "$(dirname "$0")/.."
port=${PORT:-8011}
d=$(mktemp -d)
if [ "${1:-}" = assets ]; then
  env=(CBD_CHAINS="$d/chains" CBD_ARTIFACTS="$d/artifacts")
else
  env=(CBD_HOME="$d/home")
fi
t0=$(date +%s.%N)
env "${env[@]}" setsid .venv/bin/python -m cbd.cli serve --port "$port" >"$d/serve.log" 2>&1 &
pid=$!
trap 'kill -- -$pid 2>/dev/null; sleep 2; rm -rf "$d"' EXIT
until code=$(curl -s -m 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz") && [ "$code" != 000 ]; do
  kill -0 $pid 2>/dev/null || { echo "cbd serve exited:"; tail -n 5 "$d/serve.log"; exit 1; }
  sleep 0.5
done
echo "/healthz answered ($code) after $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
body='{"architecture": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512}}'
until [ "$(curl -s -o "$d/answer.json" -w '%{http_code}' -X POST -H 'content-type: application/json' \
           -d "$body" "http://127.0.0.1:$port/initialize")" = 200 ]; do
  kill -0 $pid 2>/dev/null || { echo "cbd serve exited:"; tail -n 5 "$d/serve.log"; exit 1; }
  sleep 5
done
echo "first finished init (POST /initialize 200) after $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
