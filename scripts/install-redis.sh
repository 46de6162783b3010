#!/usr/bin/env bash
# redis-server for the tests of the Redis profile store (tests/redis_server.py starts it on a free port).
# Nothing to do when it is on PATH; otherwise Debian/Ubuntu's package, as root or with sudo.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-redis.sh: redis-server is not on PATH and apt-get is not available;" >&2
  echo "  install Redis >= 6.2 (e.g. 'brew install redis', 'dnf install redis') and re-run" >&2
  exit 1
fi
sudo=""
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-redis.sh: not root and no sudo: run 'apt-get install -y redis-server' as root" >&2
    exit 1
  fi
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y --no-install-recommends redis-server; then
  $sudo apt-get update
  $sudo apt-get install -y --no-install-recommends redis-server
fi
redis-server --version
