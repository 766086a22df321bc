#!/usr/bin/env bash
# A Ray "cluster" of several nodes on this machine: one head and N workers, each a separate
# `ray start --block` process with its own CPUs and a node label, so multi-node placement
# (SPREAD, STRICT_SPREAD, a worker dying) can be seen and tested without more machines.
#
#   cluster/local-cluster.sh start [WORKERS] [CPUS_PER_NODE]   # default: 2 workers, 2 CPUs each
#   cluster/local-cluster.sh status
#   cluster/local-cluster.sh stop
#
# Environment:
#   RAY_PORT=6379               GCS port of the head; clients use ray.address=127.0.0.1:$RAY_PORT
#   DASHBOARD_HOST=127.0.0.1    dashboard and job API bind address; 0.0.0.0 exposes them to the network
#   DASHBOARD_PORT=8265         dashboard and job API port (`ptft submit --address http://127.0.0.1:8265`)
#   OBJECT_STORE_BYTES=300000000  object store per node (several nodes share this machine's memory)
#   PTFT_CLUSTER_DIR=/tmp/ptft-local-cluster-$RAY_PORT   pid files and node logs
#   RAY_AUTH_MODE=token         Ray token auth (token in ~/.ray/auth_token, made if missing); clients
#                               export RAY_AUTH_MODE=token too. `disabled` turns it off.
#   RAY=.venv/bin/ray
#
# `stop` ends only the nodes this script started (their process groups), never every Ray process
# on the machine as `ray stop` would: other clusters and test fixtures may share it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
RAY=${RAY:-$here/../.venv/bin/ray}
PYTHON=${PYTHON:-$(dirname "$RAY")/python}
PORT=${RAY_PORT:-6379}
DASHBOARD_HOST=${DASHBOARD_HOST:-127.0.0.1}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
OBJECT_STORE_BYTES=${OBJECT_STORE_BYTES:-300000000}
STATE=${PTFT_CLUSTER_DIR:-/tmp/ptft-local-cluster-$PORT}
ADDRESS=127.0.0.1:$PORT
# DeepSpeed must pick its CPU accelerator in every Ray worker process these nodes start.
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

running_pids() {
  local f
  for f in "$STATE"/*.pid; do
    [[ -e $f ]] || continue
    if kill -0 "$(cat "$f")" 2>/dev/null; then cat "$f"; fi
  done
}

# start_node NAME ARGS...: one `ray start --block` in its own session (process group = its pid).
start_node() {
  local name=$1; shift
  # Several nodes on one host: each dashboard agent and metrics exporter needs its own port, and
  # each node its own temp dir (shared runtime_env folders get deleted under another node's job).
  setsid "$RAY" start --block --num-cpus="$cpus" \
    --object-store-memory="$OBJECT_STORE_BYTES" --labels="ptft-node=$name" \
    --dashboard-agent-listen-port="$(free_port)" --metrics-export-port="$(free_port)" \
    --temp-dir="$STATE/$name" --disable-usage-stats "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
}

# wait_for_nodes N: until the head reports N alive nodes, or fail with the logs' tails.
wait_for_nodes() {
  local want=$1 deadline=$((SECONDS + ${START_TIMEOUT_S:-180})) alive
  while ((SECONDS < deadline)); do
    alive=$("$RAY" status --address="$ADDRESS" 2>/dev/null | grep -cE '^ +1 node_' || true)
    ((alive >= want)) && return 0
    sleep 2
  done
  echo "local-cluster: $want nodes did not come up in ${START_TIMEOUT_S:-180}s; logs in $STATE:" >&2
  tail -n 20 "$STATE"/*.log >&2 || true
  stop; return 1
}

start() {
  workers=${1:-2}; cpus=${2:-2}
  if [[ -n $(running_pids) ]]; then
    echo "local-cluster: already running (pids $(running_pids | tr '\n' ' ')); '$0 stop' first" >&2; return 1
  fi
  mkdir -p "$STATE"; rm -f "$STATE"/*.pid
  if [[ $RAY_AUTH_MODE == token ]]; then "$RAY" get-auth-token --generate >/dev/null 2>&1; fi
  start_node head --head --port="$PORT" --include-dashboard=true \
    --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT"
  wait_for_nodes 1
  # One at a time: nodes started together on one host can race for the same socket file names.
  for i in $(seq "$workers"); do
    start_node "worker-$i" --address="$ADDRESS"
    wait_for_nodes $((i + 1))
  done
  status
  echo "ray.address=$ADDRESS  dashboard/jobs: http://$DASHBOARD_HOST:$DASHBOARD_PORT  logs: $STATE"
}

status() {
  "$RAY" status --address="$ADDRESS"
}

# kill_sessions SID...: SIGKILL every process still in these sessions (a node's is its pid).
kill_sessions() {
  "$PYTHON" - "$@" <<'EOF'
import os, signal, sys
sessions = {int(arg) for arg in sys.argv[1:]}
for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
        if os.getsid(int(entry)) in sessions:
            os.kill(int(entry), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
EOF
}

stop() {
  local pids pid deadline
  pids=$(running_pids)
  for pid in $pids; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  deadline=$((SECONDS + 60))
  while [[ -n $(running_pids) ]] && ((SECONDS < deadline)); do sleep 1; done
  for pid in $(running_pids); do kill -KILL -- "-$pid" 2>/dev/null || true; done
  # What is left in each node's session moved to a process group of its own: Ray's workers, and
  # an HAProxy ingress, which outlives its Serve actor and would keep holding the Serve port.
  [[ -z $pids ]] || kill_sessions $pids
  rm -f "$STATE"/*.pid
  echo "local-cluster: stopped ${pids:+nodes $(echo $pids)}"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: $0 start [WORKERS] [CPUS_PER_NODE] | status | stop" >&2; exit 2 ;;
esac
