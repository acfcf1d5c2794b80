#!/usr/bin/env bash
# Start the screening stack: RabbitMQ, Triton, N adapters, the web frontend, the DICOM listener.
#
#   ./start.sh                    Docker engine present: docker compose -f compose.local.yaml up -d
#   ./start.sh --remote           Docker engine present: docker compose -f compose.remote.yaml up -d
#   ./start.sh --local            no containers: local processes (the default without an engine)
#
# Local processes: the system RabbitMQ (started if it is down, management console enabled),
# the study registry's migrations (python -m services.registry upgrade), Triton from the
# nvidia-pytriton wheel serving the python-flavour model repository (the demo repository is
# built first if the folder has none), the adapters, the frontend and the DICOM listener
# (C-STORE from a PACS; README, "Connect a PACS").
# PIDs go to <storage>/run, logs to <storage>/logs; ./stop.sh (same --storage) stops
# exactly what this started. Every port binds to 127.0.0.1.
#
# Options (local processes; CTS__* environment variables override the config as usual):
#   --adapters N              adapter workers (default 2)
#   --model-repository DIR    python-flavour Triton repository (default model_repository_running)
#   --storage DIR             shared storage root (default storage)
#   --queue-prefix NAME       RabbitMQ exchange/queue prefix (default cts)
#   --frontend-port P         default 7860
#   --triton-http-port P / --triton-grpc-port P / --triton-metrics-port P   default 8000/8001/8002
#   --ready-timeout S         seconds to wait for Triton to load the models (default 900)
#   --frontend-metrics-port P default 9400 (Prometheus /metrics of the frontend)
#   --adapter-metrics-port P  default 9410: adapter N serves /metrics on P + N - 1
#   --dicom-port P            default 11112 (the DICOM listener, AE title dicom.ae_title)
#   --dicom-metrics-port P    default 9401 (Prometheus /metrics of the DICOM listener)
#
# Every /metrics endpoint (frontend, adapters, Triton, RabbitMQ's Prometheus plugin on 15692)
# is listed in <storage>/run/prometheus/*.json for Prometheus' file_sd
# (deploy/monitoring/prometheus.local.yml).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

MODE=""
COMPOSE_FILE="compose.local.yaml"
ADAPTERS=2
MODEL_REPOSITORY="${CTS__INFERENCE__MODEL_REPOSITORY:-model_repository_running}"
STORAGE="${CTS__STORAGE__ROOT:-storage}"
QUEUE_PREFIX="${CTS__RABBITMQ__QUEUE_PREFIX:-cts}"
FRONTEND_HOST="${CTS__FRONTEND__HOST:-127.0.0.1}"
FRONTEND_PORT="${CTS__FRONTEND__PORT:-7860}"
TRITON_HTTP_PORT=8000
TRITON_GRPC_PORT=8001
TRITON_METRICS_PORT=8002
FRONTEND_METRICS_PORT="${CTS__METRICS__FRONTEND_PORT:-9400}"
ADAPTER_METRICS_PORT="${CTS__METRICS__ADAPTER_PORT:-9410}"
DICOM_PORT="${CTS__DICOM__PORT:-11112}"
DICOM_METRICS_PORT="${CTS__METRICS__DICOM_LISTENER_PORT:-9401}"
RABBITMQ_PROMETHEUS_PORT=15692
RABBITMQ_HOST="${CTS__RABBITMQ__HOST:-127.0.0.1}"
RABBITMQ_PORT="${CTS__RABBITMQ__PORT:-5672}"
READY_TIMEOUT=900

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --remote) MODE="docker"; COMPOSE_FILE="compose.remote.yaml" ;;
    --local) MODE="local" ;;
    --adapters) ADAPTERS="$2"; shift ;;
    --model-repository) MODEL_REPOSITORY="$2"; shift ;;
    --storage) STORAGE="$2"; shift ;;
    --queue-prefix) QUEUE_PREFIX="$2"; shift ;;
    --frontend-port) FRONTEND_PORT="$2"; shift ;;
    --triton-http-port) TRITON_HTTP_PORT="$2"; shift ;;
    --triton-grpc-port) TRITON_GRPC_PORT="$2"; shift ;;
    --triton-metrics-port) TRITON_METRICS_PORT="$2"; shift ;;
    --frontend-metrics-port) FRONTEND_METRICS_PORT="$2"; shift ;;
    --adapter-metrics-port) ADAPTER_METRICS_PORT="$2"; shift ;;
    --dicom-port) DICOM_PORT="$2"; shift ;;
    --dicom-metrics-port) DICOM_METRICS_PORT="$2"; shift ;;
    --ready-timeout) READY_TIMEOUT="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

absolute() { case "$1" in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
STORAGE="$(absolute "$STORAGE")"
MODEL_REPOSITORY="$(absolute "$MODEL_REPOSITORY")"
RUN_DIR="$STORAGE/run"
LOG_DIR="$STORAGE/logs"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

say() { echo "[start] $*"; }
fail() { echo "[start] error: $*" >&2; exit 1; }

if [ -z "$MODE" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    MODE="docker"
  else
    MODE="local"
  fi
fi

mkdir -p "$RUN_DIR" "$LOG_DIR"
if [ -f "$RUN_DIR/stack.env" ]; then
  fail "a stack is already running with storage $STORAGE (stop it with ./stop.sh --storage $STORAGE)"
fi

# ---------------------------------------------------------------------------- docker
if [ "$MODE" = "docker" ]; then
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
    || fail "--remote needs a running Docker engine (docker info failed)"
  say "docker compose -f $COMPOSE_FILE up -d (adapters: $ADAPTERS)"
  CTS_ADAPTERS="$ADAPTERS" CTS_STORAGE_DIR="$STORAGE" CTS_MODEL_REPOSITORY_DIR="$MODEL_REPOSITORY" \
    CTS_QUEUE_PREFIX="$QUEUE_PREFIX" CTS_FRONTEND_PORT="$FRONTEND_PORT" \
    docker compose -f "$COMPOSE_FILE" up -d
  printf 'MODE=docker\nCOMPOSE_FILE=%s\n' "$COMPOSE_FILE" > "$RUN_DIR/stack.env"
  say "frontend: http://127.0.0.1:$FRONTEND_PORT   RabbitMQ console: http://127.0.0.1:15672"
  exit 0
fi

# ---------------------------------------------------------------------------- local processes
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
http_ok() { "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$1" >/dev/null 2>&1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Started processes are cleaned up if a later step fails.
cleanup_on_failure() {
  local code=$?
  if [ $code -ne 0 ]; then
    echo "[start] failed: stopping what was started (logs in $LOG_DIR)" >&2
    bash "$ROOT/stop.sh" --storage "$STORAGE" >&2 || true
  fi
}
trap cleanup_on_failure EXIT
printf 'MODE=local\nQUEUE_PREFIX=%s\n' "$QUEUE_PREFIX" > "$RUN_DIR/stack.env"

# 1. RabbitMQ (the system server): started only if it is down, and then remembered.
if ! port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT"; then
  case "$RABBITMQ_HOST" in
    127.0.0.1|localhost) ;;
    *) fail "RabbitMQ at $RABBITMQ_HOST:$RABBITMQ_PORT is not reachable" ;;
  esac
  command -v rabbitmq-server >/dev/null 2>&1 || fail "RabbitMQ is down and rabbitmq-server is not installed"
  say "starting RabbitMQ"
  # The management console and the Prometheus plugin listen on 127.0.0.1 only.
  RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-rabbitmq_management tcp_config [{ip,"127.0.0.1"},{port,15672}] -rabbitmq_prometheus tcp_config [{ip,"127.0.0.1"},{port,15692}]' \
    rabbitmq-server -detached
  touch "$RUN_DIR/rabbitmq.started"
  for _ in $(seq 1 60); do port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT" && break; sleep 1; done
  port_open "$RABBITMQ_HOST" "$RABBITMQ_PORT" || fail "RabbitMQ did not come up"
fi
if command -v rabbitmq-plugins >/dev/null 2>&1 && [ "$RABBITMQ_HOST" = "127.0.0.1" ]; then
  if ! rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_management; then
    say "enabling the RabbitMQ management console (127.0.0.1:15672)"
    rabbitmqctl eval 'application:set_env(rabbitmq_management, tcp_config, [{ip, "127.0.0.1"}, {port, 15672}], [{persistent, true}]).' >/dev/null 2>&1 || true
    rabbitmq-plugins enable rabbitmq_management >/dev/null 2>&1 \
      || say "warning: could not enable rabbitmq_management (not root?); the stack runs without the console"
  fi
  if ! rabbitmq-plugins list -e -m 2>/dev/null | grep -qx rabbitmq_prometheus; then
    say "enabling RabbitMQ's Prometheus plugin (127.0.0.1:$RABBITMQ_PROMETHEUS_PORT/metrics)"
    # Bound to loopback before it starts (its default is every interface).
    rabbitmqctl eval "application:set_env(rabbitmq_prometheus, tcp_config, [{ip, \"127.0.0.1\"}, {port, $RABBITMQ_PROMETHEUS_PORT}], [{persistent, true}])." >/dev/null 2>&1 || true
    rabbitmq-plugins enable rabbitmq_prometheus >/dev/null 2>&1 \
      || say "warning: could not enable rabbitmq_prometheus (not root?); no queue metrics"
  fi
fi

# 2. The model repository (python flavour: the wheel's Triton has only the python backend).
METADATA="$MODEL_REPOSITORY/chest_screening/metadata.json"
if [ ! -f "$METADATA" ]; then
  say "no model repository in $MODEL_REPOSITORY: building the DEMO repository (seeded weights)"
  "$PYTHON" -m convertation.build_repository --output "$MODEL_REPOSITORY" --flavour python --demo \
    > "$LOG_DIR/build_repository.log" 2>&1 || fail "building the demo repository failed: see $LOG_DIR/build_repository.log"
fi
FLAVOUR="$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['flavour'])" "$METADATA")"
[ "$FLAVOUR" = "python" ] || fail "$MODEL_REPOSITORY holds the $FLAVOUR flavour; the local Triton serves only the python flavour (build one with --flavour python, or use Docker)"

export CTS__STORAGE__ROOT="$STORAGE"
export CTS__RABBITMQ__QUEUE_PREFIX="$QUEUE_PREFIX"
export CTS__RABBITMQ__HOST="$RABBITMQ_HOST"
export CTS__RABBITMQ__PORT="$RABBITMQ_PORT"
export CTS__INFERENCE__BACKEND=triton
export CTS__INFERENCE__MODEL_REPOSITORY="$MODEL_REPOSITORY"
export CTS__INFERENCE__TRITON_URL="127.0.0.1:$TRITON_GRPC_PORT"
export CTS__FRONTEND__HOST="$FRONTEND_HOST"
export CTS__FRONTEND__PORT="$FRONTEND_PORT"
export CTS__DICOM__PORT="$DICOM_PORT"

# The study registry (SQLite under the storage root, or registry.url): at this code's schema
# before any service opens it (they refuse any other).
say "study registry: applying its migrations"
"$PYTHON" -m services.registry upgrade > "$LOG_DIR/registry-upgrade.log" 2>&1 \
  || fail "the registry could not be upgraded: see $LOG_DIR/registry-upgrade.log"

# Each service runs in its own session (setsid): stop.sh can end its whole process group.
launch() {
  local name="$1"; shift
  setsid "$@" > "$LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/$name.pid"
}

# 3. Triton.
say "starting Triton (http $TRITON_HTTP_PORT, grpc $TRITON_GRPC_PORT, metrics $TRITON_METRICS_PORT)"
launch triton "$PYTHON" -m services.triton.local_server --model-repository "$MODEL_REPOSITORY" \
  --http-port "$TRITON_HTTP_PORT" --grpc-port "$TRITON_GRPC_PORT" --metrics-port "$TRITON_METRICS_PORT" \
  --ready-timeout "$READY_TIMEOUT"
deadline=$((SECONDS + READY_TIMEOUT))
until http_ok "http://127.0.0.1:$TRITON_HTTP_PORT/v2/health/ready"; do
  alive "$RUN_DIR/triton.pid" || fail "Triton exited: see $LOG_DIR/triton.log"
  [ $SECONDS -lt $deadline ] || fail "Triton not ready after $READY_TIMEOUT s: see $LOG_DIR/triton.log"
  sleep 1
done

# 4. Adapters. Each one's onnxruntime threads: the host's cores shared among the adapters
# (at least one), so that N adapters running models themselves do not oversubscribe a small
# host; idle threads sleep (inference.onnx_thread_spinning). CTS__INFERENCE__ONNX_INTRA_OP_THREADS
# set by the caller wins.
CORES="$(nproc 2>/dev/null || echo 1)"
ADAPTER_THREADS=$(( CORES / ADAPTERS )); [ "$ADAPTER_THREADS" -ge 1 ] || ADAPTER_THREADS=1
ADAPTER_THREADS="${CTS__INFERENCE__ONNX_INTRA_OP_THREADS:-$ADAPTER_THREADS}"
for index in $(seq 1 "$ADAPTERS"); do
  CTS__METRICS__ADAPTER_PORT=$((ADAPTER_METRICS_PORT + index - 1)) \
    CTS__INFERENCE__ONNX_INTRA_OP_THREADS="$ADAPTER_THREADS" \
    launch "adapter-$index" "$PYTHON" -m services.adapter --adapter-id "adapter-$index" \
    --health-file "$RUN_DIR/adapter-$index.alive"
done
say "started $ADAPTERS adapter(s), $ADAPTER_THREADS onnxruntime thread(s) each ($CORES cores)"

# 5. Frontend.
CTS__METRICS__FRONTEND_PORT="$FRONTEND_METRICS_PORT" launch frontend "$PYTHON" -m services.frontend
deadline=$((SECONDS + 120))
until http_ok "http://127.0.0.1:$FRONTEND_PORT/healthz"; do
  alive "$RUN_DIR/frontend.pid" || fail "the frontend exited: see $LOG_DIR/frontend.log"
  [ $SECONDS -lt $deadline ] || fail "the frontend did not answer within 120 s: see $LOG_DIR/frontend.log"
  sleep 1
done

# 6. The DICOM listener (studies from a PACS; their structured reports back to dicom.destinations).
CTS__METRICS__DICOM_LISTENER_PORT="$DICOM_METRICS_PORT" launch dicom-listener "$PYTHON" -m services.dicom_listener
deadline=$((SECONDS + 60))
until "$PYTHON" -m services.dicom_listener.healthcheck "$DICOM_PORT" >/dev/null 2>&1; do
  alive "$RUN_DIR/dicom-listener.pid" || fail "the DICOM listener exited: see $LOG_DIR/dicom-listener.log"
  [ $SECONDS -lt $deadline ] || fail "the DICOM listener did not answer a C-ECHO within 60 s: see $LOG_DIR/dicom-listener.log"
  sleep 1
done
for index in $(seq 1 "$ADAPTERS"); do
  alive "$RUN_DIR/adapter-$index.pid" || fail "adapter-$index exited: see $LOG_DIR/adapter-$index.log"
done

# 7. What Prometheus scrapes: one file_sd file per kind of service (a local Prometheus with
# deploy/monitoring/prometheus.local.yml reads them).
targets() { # file, then host:port ...
  local file="$1" first=1; shift
  { printf '[{"targets": ['
    for target in "$@"; do [ $first = 1 ] || printf ', '; printf '"%s"' "$target"; first=0; done
    printf ']}]\n'; } > "$RUN_DIR/prometheus/$file.json"
}
mkdir -p "$RUN_DIR/prometheus"
adapter_targets=()
for index in $(seq 1 "$ADAPTERS"); do adapter_targets+=("127.0.0.1:$((ADAPTER_METRICS_PORT + index - 1))"); done
targets frontend "127.0.0.1:$FRONTEND_METRICS_PORT"
targets dicom_listener "127.0.0.1:$DICOM_METRICS_PORT"
targets adapters "${adapter_targets[@]}"
targets triton "127.0.0.1:$TRITON_METRICS_PORT"
targets rabbitmq "$RABBITMQ_HOST:$RABBITMQ_PROMETHEUS_PORT"

trap - EXIT
say "frontend: http://127.0.0.1:$FRONTEND_PORT   REST API: http://127.0.0.1:$FRONTEND_PORT/api/v1/docs"
say "DICOM listener: AE $("$PYTHON" -c "from services.core.config import load_settings; print(load_settings().dicom.ae_title)") on 127.0.0.1:$DICOM_PORT"
say "RabbitMQ console: http://127.0.0.1:15672   queues: $QUEUE_PREFIX.tasks, $QUEUE_PREFIX.tasks.dead-letter"
say "metrics: frontend :$FRONTEND_METRICS_PORT, adapters :$ADAPTER_METRICS_PORT.., Triton :$TRITON_METRICS_PORT, RabbitMQ :$RABBITMQ_PROMETHEUS_PORT (targets: $RUN_DIR/prometheus/)"
say "logs: $LOG_DIR   stop with: ./stop.sh$( [ "$STORAGE" = "$ROOT/storage" ] || echo " --storage $STORAGE")"
