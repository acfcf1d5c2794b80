#!/usr/bin/env bash
# The local RabbitMQ's management console (127.0.0.1:15672) and Prometheus plugin
# (127.0.0.1:PORT, default 15692), each bound to loopback before it starts (their default is
# every interface) and enabled once. start.sh uses them (console, queue metrics); so do the
# tests (the broker's own connection list, to cut a link). Run as root: rabbitmq-plugins
# rewrites /etc/rabbitmq/enabled_plugins, which the broker's own user must still read. The
# binding is set in the running node and, where the broker has no advanced.config yet, in
# one (what is set in a running node does not outlive a restart of the node).
#   bash scripts/rabbitmq_plugins.sh [PROMETHEUS_PORT]
set -uo pipefail
prometheus_port="${1:-15692}"
umask 022
command -v rabbitmq-plugins >/dev/null 2>&1 || exit 0
enabled() { timeout 60 rabbitmq-plugins list -e -m 2>/dev/null | grep -qx "$1"; }
bind_loopback() { # application, port
  timeout 60 rabbitmqctl eval "application:set_env($1, tcp_config, [{ip, \"127.0.0.1\"}, {port, $2}], [{persistent, true}])." >/dev/null 2>&1 || true
}
if ! enabled rabbitmq_management; then
  echo "enabling the RabbitMQ management console (127.0.0.1:15672)"
  bind_loopback rabbitmq_management 15672
  timeout 120 rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 \
    || echo "warning: could not enable rabbitmq_management (not root?); no management console"
fi
if ! enabled rabbitmq_prometheus; then
  echo "enabling RabbitMQ's Prometheus plugin (127.0.0.1:$prometheus_port/metrics)"
  bind_loopback rabbitmq_prometheus "$prometheus_port"
  timeout 120 rabbitmq-plugins enable rabbitmq_prometheus >/dev/null 2>&1 \
    || echo "warning: could not enable rabbitmq_prometheus (not root?); no queue metrics"
fi
advanced=/etc/rabbitmq/advanced.config
if [ -d /etc/rabbitmq ] && [ -w /etc/rabbitmq ] && [ ! -e "$advanced" ]; then
  {
    echo "%% Written by chest-ct-screening's scripts/rabbitmq_plugins.sh: the management console"
    echo "%% and the Prometheus plugin listen on loopback only, after a restart of the node too."
    echo "[{rabbitmq_management, [{tcp_config, [{ip, \"127.0.0.1\"}, {port, 15672}]}]},"
    echo " {rabbitmq_prometheus, [{tcp_config, [{ip, \"127.0.0.1\"}, {port, $prometheus_port}]}]}]."
  } > "$advanced"
  # A file the node cannot read would stop its next start: checked, else removed.
  if ! timeout 60 rabbitmqctl eval "{ok, _} = file:consult(\"$advanced\")." >/dev/null 2>&1; then
    rm -f "$advanced"
    echo "warning: $advanced not kept; the plugins listen on loopback until the node restarts"
  fi
elif [ -e "$advanced" ] && ! grep -q "chest-ct-screening" "$advanced"; then
  echo "note: $advanced is the site's own; bind rabbitmq_management and rabbitmq_prometheus to 127.0.0.1 there"
fi
exit 0
