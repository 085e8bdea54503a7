#!/usr/bin/env bash
# A private Ray head for `ray job submit` on this machine, and worker nodes that join it.
#
#   cluster/local_head.sh start  [--temp-dir DIR] [--port P] [--dashboard-port D] [--num-cpus N] [--auth token|disabled]
#   cluster/local_head.sh join   --head-dir HEAD_DIR [--temp-dir DIR] [--port P] [--num-cpus N] [--resources JSON]
#   cluster/local_head.sh env    [--temp-dir DIR]   # prints the exports a client needs (eval "$(... env)")
#   cluster/local_head.sh status [--temp-dir DIR]
#   cluster/local_head.sh stop   [--temp-dir DIR] [--now]   # --now: kill -9 (a node lost, not shut down)
#
# It never runs `ray stop` (that kills every Ray on the machine): the head gets its own
# --temp-dir and ports, and stop ends only processes whose command line names that temp dir.
#
# Auth (Ray 2.60): with RAY_AUTH_MODE=token the GCS and the dashboard's HTTP API demand a
# token, read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Left unset,
# `ray start` turns token auth on by itself when ~/.ray/auth_token exists (a local
# ray.init() creates one), so this script always sets the mode explicitly and, in token
# mode, keeps its own token in DIR/auth_token (mode 600) instead of touching ~/.ray.
set -euo pipefail

cmd="${1:-}"; shift || true
TEMP_DIR="${RLSIM_HEAD_DIR:-/tmp/rlsim-head}"
PORT="${RLSIM_HEAD_PORT:-6390}"
DASH_PORT="${RLSIM_DASHBOARD_PORT:-8275}"
NUM_CPUS="${RLSIM_HEAD_CPUS:-}"
AUTH="${RLSIM_HEAD_AUTH:-token}"
HEAD_DIR=""
RESOURCES=""
NOW=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --temp-dir) TEMP_DIR="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --dashboard-port) DASH_PORT="$2"; shift 2 ;;
    --num-cpus) NUM_CPUS="$2"; shift 2 ;;
    --auth) AUTH="$2"; shift 2 ;;
    --head-dir) HEAD_DIR="$2"; shift 2 ;;
    --resources) RESOURCES="$2"; shift 2 ;;
    --now) NOW=1; shift ;;
    *) echo "local_head.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
check_port() {
  if ! [[ "$1" =~ ^[0-9]+$ ]] || (( $1 < 1 || $1 > 65535 )); then
    echo "local_head.sh: invalid port '$1'" >&2; exit 2
  fi
}
check_port_block() {
  # A node uses PORT..PORT+7 for its services and PORT+100..PORT+400 for workers.
  check_port "$PORT"
  if (( PORT + 400 > 65535 )); then
    echo "local_head.sh: --port $PORT leaves no room for the worker ports (needs PORT+400 <= 65535)" >&2; exit 2
  fi
}
check_ports() {
  # A dashboard port inside the head's derived ranges makes `ray start` fail later (or at random,
  # when a worker takes it first).
  check_port_block
  check_port "$DASH_PORT"
  if (( (DASH_PORT >= PORT && DASH_PORT <= PORT + 7) || (DASH_PORT >= PORT + 100 && DASH_PORT <= PORT + 400) )); then
    echo "local_head.sh: --dashboard-port $DASH_PORT overlaps the ports derived from --port $PORT" \
         "($PORT-$((PORT + 7)) services, $((PORT + 100))-$((PORT + 400)) workers)" >&2
    exit 2
  fi
}

TEMP_DIR="$(mkdir -p "$TEMP_DIR" && cd "$TEMP_DIR" && pwd)"
STATE="$TEMP_DIR/head.env"

# Processes of this head: their command lines carry the temp dir (session/socket/log paths).
own_pids() {
  local pid
  for d in /proc/[0-9]*; do
    pid="${d#/proc/}"
    [[ "$pid" == "$$" ]] && continue
    if tr '\0' ' ' 2>/dev/null < "$d/cmdline" | grep -qF -- "$TEMP_DIR/"; then echo "$pid"; fi
  done
}

print_env() {
  # shellcheck disable=SC1090
  source "$STATE"
  echo "export RAY_ADDRESS=$RAY_ADDRESS"
  echo "export RAY_GCS_ADDRESS=$RAY_GCS_ADDRESS"
  echo "export RAY_AUTH_MODE=$RAY_AUTH_MODE"
  if [[ "$RAY_AUTH_MODE" == token ]]; then echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"; fi
}

case "$cmd" in
  start)
    check_ports
    if [[ -f "$STATE" ]] && [[ -n "$(own_pids)" ]]; then
      echo "local_head.sh: a head is already running from $TEMP_DIR" >&2; print_env; exit 0
    fi
    unset RAY_ADDRESS
    export RAY_AUTH_MODE="$AUTH"
    export RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    if [[ "$AUTH" == token ]]; then
      export RAY_AUTH_TOKEN_PATH="$TEMP_DIR/auth_token"
      unset RAY_AUTH_TOKEN
      if [[ ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
        (umask 077; python -c "import secrets; print(secrets.token_hex(32), end='')" > "$RAY_AUTH_TOKEN_PATH")
      fi
    elif [[ "$AUTH" != disabled ]]; then
      echo "local_head.sh: --auth must be token or disabled" >&2; exit 2
    fi
    # Every port is derived from --port so two heads (or another user's Ray) never collide.
    args=(--head --node-ip-address 127.0.0.1 --port "$PORT" --temp-dir "$TEMP_DIR/ray"
          --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASH_PORT"
          --ray-client-server-port $((PORT + 1)) --node-manager-port $((PORT + 2))
          --object-manager-port $((PORT + 3)) --dashboard-agent-grpc-port $((PORT + 4))
          --dashboard-agent-listen-port $((PORT + 5)) --runtime-env-agent-port $((PORT + 6))
          --metrics-export-port $((PORT + 7)) --min-worker-port $((PORT + 100))
          --max-worker-port $((PORT + 400)) --disable-usage-stats)
    if [[ -n "$NUM_CPUS" ]]; then args+=(--num-cpus "$NUM_CPUS"); fi
    ray start "${args[@]}" > "$TEMP_DIR/start.log" 2>&1 || { cat "$TEMP_DIR/start.log" >&2; exit 1; }
    {
      echo "RAY_ADDRESS=http://127.0.0.1:$DASH_PORT"
      echo "RAY_GCS_ADDRESS=127.0.0.1:$PORT"
      echo "RAY_AUTH_MODE=$AUTH"
      echo "RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-}"
    } > "$STATE"
    own_pids > "$TEMP_DIR/pids"
    # The dashboard's job API comes up a little after `ray start` returns.
    for _ in $(seq 1 60); do
      if python - "$DASH_PORT" <<'EOF' 2>/dev/null; then break; fi
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=2)
except urllib.error.HTTPError:
    pass  # 401 in token mode still means the server is up
EOF
      sleep 1
    done
    print_env
    ;;
  join)
    # A worker node on this machine: its own temp dir and ports (all derived from --port), joining
    # the head recorded in HEAD_DIR with that head's auth mode and token.
    check_port_block
    [[ -n "$HEAD_DIR" && -f "$HEAD_DIR/head.env" ]] || { echo "local_head.sh: join needs --head-dir of a running head" >&2; exit 2; }
    if [[ -f "$STATE" ]] && [[ -n "$(own_pids)" ]]; then
      echo "local_head.sh: a node is already running from $TEMP_DIR" >&2; exit 0
    fi
    # shellcheck disable=SC1090
    source "$HEAD_DIR/head.env"
    unset RAY_ADDRESS
    export RAY_AUTH_MODE RAY_USAGE_STATS_ENABLED=0 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    if [[ "$RAY_AUTH_MODE" == token ]]; then export RAY_AUTH_TOKEN_PATH; unset RAY_AUTH_TOKEN; fi
    args=(--address "$RAY_GCS_ADDRESS" --node-ip-address 127.0.0.1 --temp-dir "$TEMP_DIR/ray"
          --node-manager-port $((PORT + 2)) --object-manager-port $((PORT + 3))
          --dashboard-agent-grpc-port $((PORT + 4)) --dashboard-agent-listen-port $((PORT + 5))
          --runtime-env-agent-port $((PORT + 6)) --metrics-export-port $((PORT + 7))
          --min-worker-port $((PORT + 100)) --max-worker-port $((PORT + 400)) --disable-usage-stats)
    if [[ -n "$NUM_CPUS" ]]; then args+=(--num-cpus "$NUM_CPUS"); fi
    if [[ -n "$RESOURCES" ]]; then args+=(--resources "$RESOURCES"); fi
    ray start "${args[@]}" > "$TEMP_DIR/start.log" 2>&1 || { cat "$TEMP_DIR/start.log" >&2; exit 1; }
    cp "$HEAD_DIR/head.env" "$STATE"
    own_pids > "$TEMP_DIR/pids"
    echo "joined $RAY_GCS_ADDRESS from $TEMP_DIR"
    ;;
  env)
    [[ -f "$STATE" ]] || { echo "local_head.sh: no head recorded in $TEMP_DIR" >&2; exit 1; }
    print_env
    ;;
  status)
    pids="$(own_pids | tr '\n' ' ')"
    if [[ -f "$STATE" && -n "$pids" ]]; then
      echo "running from $TEMP_DIR (pids: $pids)"; print_env
    else
      echo "not running ($TEMP_DIR)"; exit 3
    fi
    ;;
  stop)
    pids="$(own_pids)"
    if [[ -z "$pids" ]]; then echo "no head running from $TEMP_DIR"; rm -f "$STATE"; exit 0; fi
    # shellcheck disable=SC2086
    if (( NOW )); then kill -KILL $pids 2>/dev/null || true; fi
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
      left="$(own_pids)"; [[ -z "$left" ]] && break; sleep 0.5
    done
    left="$(own_pids)"
    # shellcheck disable=SC2086
    if [[ -n "$left" ]]; then kill -KILL $left 2>/dev/null || true; fi
    rm -f "$STATE"
    echo "stopped the Ray node from $TEMP_DIR"
    ;;
  *)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
