#!/usr/bin/env bash
# What the test suite needs besides Python packages: a running RabbitMQ and Chromium.
set -euo pipefail

if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "[services] starting RabbitMQ"
  rabbitmq-server -detached
  for _ in $(seq 1 60); do
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break
    sleep 1
  done
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "[services] installing Chromium for the browser tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
