#!/usr/bin/env bash
# Stop what ./start.sh started (same --storage): the compose project, or the local processes
# named by the pid files in <storage>/run. The system RabbitMQ is stopped only if start.sh
# started it.
#
#   ./stop.sh [--storage DIR] [--timeout S]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
STORAGE="${CTS__STORAGE__ROOT:-storage}"
TIMEOUT=90  # adapters finish (or give back) the study in progress first

while [ $# -gt 0 ]; do
  case "$1" in
    --storage) STORAGE="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stop.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
case "$STORAGE" in /*) ;; *) STORAGE="$ROOT/$STORAGE" ;; esac
RUN_DIR="$STORAGE/run"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
say() { echo "[stop] $*"; }

if [ ! -f "$RUN_DIR/stack.env" ] && ! ls "$RUN_DIR"/*.pid >/dev/null 2>&1; then
  say "nothing to stop in $RUN_DIR"
  exit 0
fi
MODE=local
COMPOSE_FILE=compose.local.yaml
if [ -f "$RUN_DIR/stack.env" ]; then
  MODE="$(sed -n 's/^MODE=//p' "$RUN_DIR/stack.env")"
  COMPOSE_FILE="$(sed -n 's/^COMPOSE_FILE=//p' "$RUN_DIR/stack.env")"
fi

if [ "$MODE" = "docker" ]; then
  say "docker compose -f $COMPOSE_FILE down"
  docker compose -f "$COMPOSE_FILE" down
  rm -f "$RUN_DIR/stack.env"
  exit 0
fi

# SIGTERM to the service, wait, then SIGKILL its process group (it was started with setsid,
# so the group holds exactly the service and its children, e.g. tritonserver).
stop_service() {
  local pid_file="$1" name pid
  name="$(basename "$pid_file" .pid)"
  pid="$(cat "$pid_file" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    local waited=0
    while kill -0 "$pid" 2>/dev/null && [ $waited -lt $((TIMEOUT * 10)) ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "$name ignored SIGTERM for $TIMEOUT s: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  # Anything left in the service's process group (a child that outlived its parent).
  if [ -n "$pid" ] && pgrep -g "$pid" >/dev/null 2>&1; then
    sleep 1
    pgrep -g "$pid" >/dev/null 2>&1 && kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pid_file"
}

# The frontend and the DICOM listener first (no new tasks), then the adapters (in parallel:
# each drains its study), then Triton, which the adapters need until they are done.
if [ -f "$RUN_DIR/frontend.pid" ]; then stop_service "$RUN_DIR/frontend.pid"; fi
# The DICOM listener keeps what it received and what it has to send on disk: the next start
# goes on with it.
if [ -f "$RUN_DIR/dicom-listener.pid" ]; then stop_service "$RUN_DIR/dicom-listener.pid"; fi
adapter_pids=()
for pid_file in "$RUN_DIR"/adapter-*.pid; do
  [ -f "$pid_file" ] || continue
  stop_service "$pid_file" &
  adapter_pids+=($!)
done
for pid in "${adapter_pids[@]}"; do wait "$pid" || true; done
rm -f "$RUN_DIR"/adapter-*.alive
if [ -f "$RUN_DIR/triton.pid" ]; then stop_service "$RUN_DIR/triton.pid"; fi
for pid_file in "$RUN_DIR"/*.pid; do
  if [ -f "$pid_file" ]; then stop_service "$pid_file"; fi
done

# The services' RabbitMQ account goes with them (start.sh makes it again, same password).
if [ -f "$RUN_DIR/rabbitmq-account" ]; then
  account="$(cat "$RUN_DIR/rabbitmq-account")"
  "$PYTHON" -m services.broker.stack_user --user "$account" --remove >/dev/null 2>&1 \
    || say "warning: the RabbitMQ account $account stays (remove it with rabbitmqctl delete_user)"
  rm -f "$RUN_DIR/rabbitmq-account"
fi
if [ -f "$RUN_DIR/rabbitmq.started" ]; then
  say "stopping RabbitMQ (start.sh started it)"
  rabbitmqctl stop >/dev/null 2>&1 || say "warning: rabbitmqctl stop failed"
  rm -f "$RUN_DIR/rabbitmq.started"
fi
rm -f "$RUN_DIR/stack.env"
rm -rf "$RUN_DIR/prometheus"  # start.sh's scrape targets
say "stopped"
