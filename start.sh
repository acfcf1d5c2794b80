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
# Security (README, "Security"): everything written is its user's alone (umask 077: folders
# 0700, files 0600); the services use a RabbitMQ account of their own with a random password
# (<storage>/run/secrets/rabbitmq-password), never guest; a new storage gets a web user
# `admin` whose password is printed once and saved in <storage>/run/secrets/admin-password
# (never replaced; with compose, made in the frontend container, or the command printed).
# Each service appends its log to <storage>/logs/<service>.log (rotated by size,
# logging.rotation_mb) and anything else it prints to <service>.out; nothing is truncated.
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
#   --broker-guest            let the services use RabbitMQ's guest account (only where no
#                             account can be made: neither rabbitmqctl nor the management API)
#
# Every /metrics endpoint (frontend, adapters, Triton, RabbitMQ's Prometheus plugin on 15692)
# is listed in <storage>/run/prometheus/*.json for Prometheus' file_sd
# (deploy/monitoring/prometheus.local.yml).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

MODE=""
COMPOSE_FILE="compose.local.yaml"
FRONTEND_CONTAINER="chest-ct-screening-frontend-1"  # both compose files' project: chest-ct-screening
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
BROKER_GUEST=0

usage() { sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; }

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
    --broker-guest) BROKER_GUEST=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

absolute() { case "$1" in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
STORAGE="$(absolute "$STORAGE")"
MODEL_REPOSITORY="$(absolute "$MODEL_REPOSITORY")"
RUN_DIR="$STORAGE/run"
SECRETS_DIR="$RUN_DIR/secrets"
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

# Studies, results, logs and secrets are patient data or keys to them: whatever this script
# and the services it starts create is their user's alone (the services set it themselves
# too: services/monitoring/runner.py).
umask 077
mkdir -p "$RUN_DIR" "$SECRETS_DIR" "$LOG_DIR"
if [ -f "$RUN_DIR/stack.env" ]; then
  fail "a stack is already running with storage $STORAGE (stop it with ./stop.sh --storage $STORAGE)"
fi

# ---------------------------------------------------------------------------- docker
if [ "$MODE" = "docker" ]; then
  command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
    || fail "--remote needs a running Docker engine (docker info failed)"
  if [ -z "${CTS_RABBITMQ_PASSWORD:-}" ]; then
    # The broker's account for a compose stack: made once, kept with the storage (the broker
    # container takes it as its first user when its data volume is new).
    [ -f "$SECRETS_DIR/rabbitmq-password" ] \
      || "$PYTHON" -c "import secrets; print(secrets.token_urlsafe(32))" > "$SECRETS_DIR/rabbitmq-password"
    CTS_RABBITMQ_PASSWORD="$(cat "$SECRETS_DIR/rabbitmq-password")"
    export CTS_RABBITMQ_PASSWORD CTS_RABBITMQ_USER="${CTS_RABBITMQ_USER:-cts}"
    say "RabbitMQ account ${CTS_RABBITMQ_USER}: password in $SECRETS_DIR/rabbitmq-password"
  fi
  case "${CTS_BIND_ADDRESS:-127.0.0.1}" in
    127.*|localhost|::1)
      # The listener's port is published on this host's loopback only: any calling AE title
      # may send, as on a local listener, unless the caller listed them.
      if [ -z "${CTS_DICOM_ALLOWED_CALLING_AE_TITLES:-}" ]; then
        export CTS_DICOM_ALLOW_ANY_CALLING_AE="${CTS_DICOM_ALLOW_ANY_CALLING_AE:-true}"
      fi ;;
  esac
  say "docker compose -f $COMPOSE_FILE up -d (adapters: $ADAPTERS)"
  CTS_ADAPTERS="$ADAPTERS" CTS_STORAGE_DIR="$STORAGE" CTS_MODEL_REPOSITORY_DIR="$MODEL_REPOSITORY" \
    CTS_QUEUE_PREFIX="$QUEUE_PREFIX" CTS_FRONTEND_PORT="$FRONTEND_PORT" \
    docker compose -f "$COMPOSE_FILE" up -d
  printf 'MODE=docker\nCOMPOSE_FILE=%s\n' "$COMPOSE_FILE" > "$RUN_DIR/stack.env"
  say "frontend: http://127.0.0.1:$FRONTEND_PORT   RabbitMQ console: http://127.0.0.1:15672"
  # The first web user, as on local processes: made in the running frontend container (the
  # registry's settings are its), the password kept here, 0600, and never replaced.
  # A new password goes to a file of its own first: it becomes the kept one only when it is
  # the admin's (made now) or may become it (the container could not be asked); an admin that
  # exists already keeps no file that is not its password. Only standard output is read: a
  # warning on standard error must not read as "made".
  ADMIN_PASSWORD_FILE="$SECRETS_DIR/admin-password"
  PASSWORD_SOURCE="$ADMIN_PASSWORD_FILE"
  if [ ! -e "$ADMIN_PASSWORD_FILE" ]; then
    PASSWORD_SOURCE="$ADMIN_PASSWORD_FILE.new"
    rm -f "$PASSWORD_SOURCE"
    (set -C; "$PYTHON" -c "import secrets; print(secrets.token_urlsafe(18))" > "$PASSWORD_SOURCE")
  fi
  ADMIN_COMMAND="docker exec -i $FRONTEND_CONTAINER python -m services.registry users first-admin --password-stdin < '$ADMIN_PASSWORD_FILE'"
  ADMIN_ERRORS="$LOG_DIR/first-admin.log"
  if FIRST_ADMIN="$(docker exec -i "$FRONTEND_CONTAINER" python -m services.registry users first-admin \
      --password-stdin < "$PASSWORD_SOURCE" 2> "$ADMIN_ERRORS")"; then
    if [ -n "$FIRST_ADMIN" ]; then
      [ "$PASSWORD_SOURCE" = "$ADMIN_PASSWORD_FILE" ] || mv -n "$PASSWORD_SOURCE" "$ADMIN_PASSWORD_FILE"
      say "web sign-in: user admin, password $(cat "$ADMIN_PASSWORD_FILE") (kept in $ADMIN_PASSWORD_FILE)"
    fi
    [ "$PASSWORD_SOURCE" = "$ADMIN_PASSWORD_FILE" ] || rm -f "$PASSWORD_SOURCE"
  else
    [ "$PASSWORD_SOURCE" = "$ADMIN_PASSWORD_FILE" ] || mv -n "$PASSWORD_SOURCE" "$ADMIN_PASSWORD_FILE"
    say "warning: the first web user could not be made yet ($(tail -n 1 "$ADMIN_ERRORS"))"
    say "make it, once the frontend runs, with: $ADMIN_COMMAND"
  fi
  exit 0
fi

# ---------------------------------------------------------------------------- local processes
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
http_ok() { "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$1" >/dev/null 2>&1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# On an existing storage too: the root closed to other users closes everything below it;
# the logs and the run folder (few files) are closed one by one as well.
chmod 700 "$STORAGE"
chmod -R go-rwx "$RUN_DIR" "$LOG_DIR"

# Logs are appended to, never truncated; a file of raw output over logging.rotation_mb is set
# aside (FILE.1, FILE.2, ... up to logging.keep_files) when its service starts. The services'
# own <service>.log are rotated by themselves while they run (services/core/logging_setup.py).
read -r LOG_ROTATE_BYTES LOG_KEEP < <("$PYTHON" -c "from services.core.config import load_settings
logging = load_settings().logging
print(int(logging.rotation_mb * 1024 * 1024), logging.keep_files)")
rotate_if_full() {
  local file="$1" index
  [ -f "$file" ] && [ "$(stat -c %s "$file")" -ge "$LOG_ROTATE_BYTES" ] || return 0
  rm -f "$file.$LOG_KEEP"
  for ((index = LOG_KEEP - 1; index >= 1; index--)); do
    if [ -f "$file.$index" ]; then mv "$file.$index" "$file.$((index + 1))"; fi
  done
  mv "$file" "$file.1"
}
log_to() { rotate_if_full "$1"; printf '%s\n' "$1"; }

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
# The system server's files are not the stack's: written with the system's usual mode
# (rabbitmq-plugins rewrites /etc/rabbitmq/enabled_plugins as root; under umask 077 the
# broker's own user could no longer read it and would not start again).
umask 022
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
if [ "$RABBITMQ_HOST" = "127.0.0.1" ]; then
  bash "$ROOT/scripts/rabbitmq_plugins.sh" "$RABBITMQ_PROMETHEUS_PORT" | while IFS= read -r line; do say "$line"; done
fi
umask 077

# The services' RabbitMQ account: one per stack (named by its queue prefix), a random password
# saved in the run folder, allowed only the stack's own queues and exchanges. An account given
# by the caller (CTS__RABBITMQ__USERNAME) is used as it is.
if [ -n "${CTS__RABBITMQ__USERNAME:-}" ]; then
  say "RabbitMQ account $CTS__RABBITMQ__USERNAME (given)"
elif [ "$BROKER_GUEST" = 1 ]; then
  say "warning: the services use RabbitMQ's guest account (--broker-guest)"
elif [ "$RABBITMQ_HOST" != 127.0.0.1 ] && [ "$RABBITMQ_HOST" != localhost ]; then
  fail "RabbitMQ at $RABBITMQ_HOST is not this host's: give the services' account (CTS__RABBITMQ__USERNAME and CTS__RABBITMQ__PASSWORD_FILE)"
else
  "$PYTHON" -m services.broker.stack_user --user "$QUEUE_PREFIX" --prefix "$QUEUE_PREFIX" \
    --password-file "$SECRETS_DIR/rabbitmq-password" --host "$RABBITMQ_HOST" --port "$RABBITMQ_PORT" \
    >> "$(log_to "$LOG_DIR/rabbitmq-account.log")" 2>&1 \
    || fail "no RabbitMQ account for the services (see $LOG_DIR/rabbitmq-account.log): run start.sh where rabbitmqctl works (root on the broker's host) or the management API takes guest from 127.0.0.1; or give an account made by the broker's administrator (CTS__RABBITMQ__USERNAME and CTS__RABBITMQ__PASSWORD_FILE); or, on a machine of your own, --broker-guest"
  printf '%s\n' "$QUEUE_PREFIX" > "$RUN_DIR/rabbitmq-account"  # stop.sh removes the account
  export CTS__RABBITMQ__USERNAME="$QUEUE_PREFIX"
  export CTS__RABBITMQ__PASSWORD_FILE="$SECRETS_DIR/rabbitmq-password"
  say "RabbitMQ account $QUEUE_PREFIX (password in $SECRETS_DIR/rabbitmq-password)"
fi

# 2. The model repository (python flavour: the wheel's Triton has only the python backend).
METADATA="$MODEL_REPOSITORY/chest_screening/metadata.json"
if [ ! -f "$METADATA" ]; then
  say "no model repository in $MODEL_REPOSITORY: building the DEMO repository (seeded weights)"
  "$PYTHON" -m convertation.build_repository --output "$MODEL_REPOSITORY" --flavour python --demo \
    >> "$(log_to "$LOG_DIR/build_repository.log")" 2>&1 || fail "building the demo repository failed: see $LOG_DIR/build_repository.log"
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
REGISTRY_LOG="$(log_to "$LOG_DIR/registry.log")"
"$PYTHON" -m services.registry upgrade >> "$REGISTRY_LOG" 2>&1 \
  || fail "the registry could not be upgraded: see $REGISTRY_LOG"

# A new registry's first web user: admin, with a random password shown this once (and kept,
# 0600, for whoever lost the terminal). Never again once an admin account exists; the
# registry is asked first (a database that is down stops the start here, nothing written),
# and a kept password file is never replaced (services/registry/admin_commands.py).
FIRST_ADMIN="$("$PYTHON" -m services.registry users first-admin \
  --password-file "$SECRETS_DIR/admin-password" 2>> "$REGISTRY_LOG")" \
  || fail "the registry could not be asked for its admin account (is its database up?); no password was made or changed: see $REGISTRY_LOG"
[ -z "$FIRST_ADMIN" ] || say "$FIRST_ADMIN"

# Each service runs in its own session (setsid): stop.sh can end its whole process group.
# Its own log lines go to <name>.log (logging.file); whatever else it prints to <name>.out.
launch() {
  local name="$1"; shift
  CTS__LOGGING__FILE="$LOG_DIR/$name.log" setsid "$@" >> "$(log_to "$LOG_DIR/$name.out")" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/$name.pid"
}

# 3. Triton.
say "starting Triton (http $TRITON_HTTP_PORT, grpc $TRITON_GRPC_PORT, metrics $TRITON_METRICS_PORT)"
# Triton's own log: appended by the launcher (--log-file), set aside here when full.
launch triton "$PYTHON" -m services.triton.local_server --model-repository "$MODEL_REPOSITORY" \
  --log-file "$(log_to "$LOG_DIR/triton.log")" --http-port "$TRITON_HTTP_PORT" --grpc-port "$TRITON_GRPC_PORT" --metrics-port "$TRITON_METRICS_PORT" \
  --ready-timeout "$READY_TIMEOUT"
deadline=$((SECONDS + READY_TIMEOUT))
until http_ok "http://127.0.0.1:$TRITON_HTTP_PORT/v2/health/ready"; do
  alive "$RUN_DIR/triton.pid" || fail "Triton exited: see $LOG_DIR/triton.log and triton.out"
  [ $SECONDS -lt $deadline ] || fail "Triton not ready after $READY_TIMEOUT s: see $LOG_DIR/triton.log and triton.out"
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
  alive "$RUN_DIR/frontend.pid" || fail "the frontend exited: see $LOG_DIR/frontend.log and frontend.out"
  [ $SECONDS -lt $deadline ] || fail "the frontend did not answer within 120 s: see $LOG_DIR/frontend.log and frontend.out"
  sleep 1
done

# 6. The DICOM listener (studies from a PACS; their structured reports back to dicom.destinations).
CTS__METRICS__DICOM_LISTENER_PORT="$DICOM_METRICS_PORT" launch dicom-listener "$PYTHON" -m services.dicom_listener
deadline=$((SECONDS + 60))
until "$PYTHON" -m services.dicom_listener.healthcheck "$DICOM_PORT" >/dev/null 2>&1; do
  alive "$RUN_DIR/dicom-listener.pid" || fail "the DICOM listener exited: see $LOG_DIR/dicom-listener.log and dicom-listener.out"
  [ $SECONDS -lt $deadline ] || fail "the DICOM listener did not answer a C-ECHO within 60 s: see $LOG_DIR/dicom-listener.log and dicom-listener.out"
  sleep 1
done
for index in $(seq 1 "$ADAPTERS"); do
  alive "$RUN_DIR/adapter-$index.pid" || fail "adapter-$index exited: see $LOG_DIR/adapter-$index.log and adapter-$index.out"
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
