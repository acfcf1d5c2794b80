#!/usr/bin/env bash
# The local RabbitMQ's management console (127.0.0.1:15672) and Prometheus plugin
# (127.0.0.1:PORT, default 15692), each bound to loopback before it starts (their default is
# every interface) and enabled once. start.sh uses them (console, queue metrics); so do the
# tests (the broker's own connection list, to cut a link). Run as root: rabbitmq-plugins
# rewrites /etc/rabbitmq/enabled_plugins, which the broker's own user must still read.
#   bash scripts/rabbitmq_plugins.sh [PROMETHEUS_PORT]
set -uo pipefail
prometheus_port="${1:-15692}"
umask 022
command -v rabbitmq-plugins >/dev/null 2>&1 || exit 0
enabled() { rabbitmq-plugins list -e -m 2>/dev/null | grep -qx "$1"; }
if ! enabled rabbitmq_management; then
  echo "enabling the RabbitMQ management console (127.0.0.1:15672)"
  rabbitmqctl eval 'application:set_env(rabbitmq_management, tcp_config, [{ip, "127.0.0.1"}, {port, 15672}], [{persistent, true}]).' >/dev/null 2>&1 || true
  rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 \
    || echo "warning: could not enable rabbitmq_management (not root?); no management console"
fi
if ! enabled rabbitmq_prometheus; then
  echo "enabling RabbitMQ's Prometheus plugin (127.0.0.1:$prometheus_port/metrics)"
  rabbitmqctl eval "application:set_env(rabbitmq_prometheus, tcp_config, [{ip, \"127.0.0.1\"}, {port, $prometheus_port}], [{persistent, true}])." >/dev/null 2>&1 || true
  rabbitmq-plugins enable rabbitmq_prometheus >/dev/null 2>&1 \
    || echo "warning: could not enable rabbitmq_prometheus (not root?); no queue metrics"
fi
exit 0
