#!/usr/bin/env bash
# Start a Redis on 127.0.0.1:6379 when none answers (tests use their own database numbers).
# Installs Debian's redis-server first if the binary is missing.
set -euo pipefail
port=${REDIS_PORT:-6379}
if redis-cli -p "$port" ping >/dev/null 2>&1; then exit 0; fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis-server not found: installing Debian's redis-server" >&2
  (apt-get update -qq && apt-get install -y -qq redis-server) >&2
fi
mkdir -p /tmp/cbd-redis
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir /tmp/cbd-redis --logfile /tmp/cbd-redis/redis.log
for _ in $(seq 1 50); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "redis-server did not answer on port $port; see /tmp/cbd-redis/redis.log" >&2
exit 1
