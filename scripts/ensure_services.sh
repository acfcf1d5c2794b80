#!/usr/bin/env bash
# What the test suite needs besides Python packages: a running RabbitMQ, Chromium, the
# Prometheus binary and the DICOM peers (Orthanc, DCMTK, dicom3tools).
set -euo pipefail

if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "[services] starting RabbitMQ"
  rabbitmq-server -detached
  for _ in $(seq 1 60); do
    (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break
    sleep 1
  done
fi

if ! command -v prometheus >/dev/null 2>&1; then
  # tests/test_metrics_prometheus.py runs its own Prometheus on a free port; the Debian
  # service the package would start on 9090 is stopped again (and not started at all where
  # policy-rc.d forbids it, as in containers).
  echo "[services] installing Prometheus for the metrics test"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
  if pgrep -x prometheus >/dev/null 2>&1; then
    service prometheus stop >/dev/null 2>&1 || invoke-rc.d prometheus stop >/dev/null 2>&1 || true
  fi
fi

if ! command -v Orthanc >/dev/null 2>&1 || ! command -v storescu >/dev/null 2>&1 \
  || ! command -v dciodvfy >/dev/null 2>&1; then
  # The hospital-integration tests start their own Orthanc on free 127.0.0.1 ports; the
  # Debian service the package would start on 4242/8042 is stopped again (and not started
  # at all where policy-rc.d forbids it, as in containers).
  echo "[services] installing Orthanc, DCMTK and dicom3tools for the DICOM tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends orthanc dcmtk dicom3tools >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null \
      && apt-get install -y -qq --no-install-recommends orthanc dcmtk dicom3tools >/dev/null; }
  if pgrep -x Orthanc >/dev/null 2>&1; then
    service orthanc stop >/dev/null 2>&1 || invoke-rc.d orthanc stop >/dev/null 2>&1 || true
  fi
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "[services] installing Chromium for the browser tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium chromium-driver >/dev/null
fi
