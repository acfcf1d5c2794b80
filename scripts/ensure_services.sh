#!/usr/bin/env bash
# What the test suite needs besides Python packages: a running RabbitMQ and PostgreSQL,
# Chromium, the Prometheus binary and the DICOM peers (Orthanc with its DICOMweb plugin, DCMTK, dicom3tools).
set -euo pipefail

rabbitmq_listens() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! rabbitmq_listens; then
  # The broker's own user must read its plugin list, or no start succeeds
  # (cannot_read_enabled_plugins_file): a root umask of 077 once left it 0600.
  [ -f /etc/rabbitmq/enabled_plugins ] && chmod a+r /etc/rabbitmq/enabled_plugins
  # A node whose application was stopped (rabbitmqctl stop_app, e.g. a fault test cut off
  # before it restored the broker) keeps its name, so a second rabbitmq-server cannot start:
  # that node is given its application back instead.
  if timeout 30 rabbitmqctl -q ping >/dev/null 2>&1; then
    echo "[services] RabbitMQ's node runs without its application: starting it"
    timeout 60 rabbitmqctl -q start_app >/dev/null || true
  else
    echo "[services] starting RabbitMQ"
    rabbitmq-server -detached
  fi
  for _ in $(seq 1 60); do
    rabbitmq_listens && break
    sleep 1
  done
  # Every broker test would fail one by one for the better part of an hour otherwise.
  rabbitmq_listens || {
    echo "[services] RabbitMQ did not come up on 127.0.0.1:5672 (see /var/log/rabbitmq/)" >&2
    exit 1
  }
fi

# The broker tests read the broker's own connection list (to cut one link) from its console.
bash "$(dirname "${BASH_SOURCE[0]}")/rabbitmq_plugins.sh" | sed 's/^/[services] /'

if ! (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; then
  # The registry's tests run on the machine's PostgreSQL too (trust authentication on
  # 127.0.0.1); Debian's cluster is started as its packaging does.
  echo "[services] starting PostgreSQL"
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
  fi
  version="$(ls /etc/postgresql | sort -V | tail -1)"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do
    (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null && break
    sleep 1
  done
  (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null || {
    echo "[services] PostgreSQL did not come up on 127.0.0.1:5432 (see /var/log/postgresql/)" >&2
    exit 1
  }
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

# The DICOMweb plugin is a library, not a command: its file says whether it is installed
# (tests/orthanc_support.py loads it from there).
ORTHANC_DICOMWEB_PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if ! command -v Orthanc >/dev/null 2>&1 || [ ! -f "$ORTHANC_DICOMWEB_PLUGIN" ] \
  || ! command -v storescu >/dev/null 2>&1 || ! command -v dciodvfy >/dev/null 2>&1; then
  # The hospital-integration and report-sink tests start their own Orthancs on free
  # 127.0.0.1 ports (a DIMSE PACS, a DICOMweb archive); the Debian service the package would
  # start on 4242/8042 is stopped again (and not started at all where policy-rc.d forbids
  # it, as in containers).
  echo "[services] installing Orthanc, its DICOMweb plugin, DCMTK and dicom3tools for the DICOM tests"
  export DEBIAN_FRONTEND=noninteractive
  DICOM_PACKAGES="orthanc orthanc-dicomweb dcmtk dicom3tools"
  # shellcheck disable=SC2086 # the list is meant to split into packages
  apt-get install -y -qq --no-install-recommends $DICOM_PACKAGES >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null \
      && apt-get install -y -qq --no-install-recommends $DICOM_PACKAGES >/dev/null; }
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
