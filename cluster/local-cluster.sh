#!/usr/bin/env bash
# Start or stop a Ray "cluster" of several nodes on this machine: one head, N workers.
#   cluster/local-cluster.sh start [WORKERS] [CPUS_PER_NODE]
#   cluster/local-cluster.sh stop
set -euo pipefail
RAY=${RAY:-$(dirname "$0")/../.venv/bin/ray}
PORT=${RAY_PORT:-6379}
case "${1:-}" in
  start)
    workers=${2:-2}; cpus=${3:-2}
    DS_ACCELERATOR=cpu "$RAY" start --head --port="$PORT" --num-cpus="$cpus" --disable-usage-stats
    for _ in $(seq "$workers"); do
      DS_ACCELERATOR=cpu "$RAY" start --address="127.0.0.1:$PORT" --num-cpus="$cpus" --disable-usage-stats
    done
    "$RAY" status --address="127.0.0.1:$PORT" ;;
  stop)
    "$RAY" stop ;;
  *)
    echo "usage: $0 start [WORKERS] [CPUS_PER_NODE] | stop" >&2; exit 2 ;;
esac
