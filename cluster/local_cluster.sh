#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine, on 127.0.0.1, for trying `ray job submit` and multi-node placement:
#   bash cluster/local_cluster.sh start [NUM_NODES]   # a head (+ NUM_NODES-1 worker nodes); jobs API at :8265
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
#       --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py --config tiny
#   RAY_AUTH_MODE=token ptray pretrain --config tiny --address 127.0.0.1:6379 cluster.placement_strategy=STRICT_SPREAD
#   bash cluster/local_cluster.sh stop
# Each node gets NUM_CPUS logical CPUs (default: this machine's cores + 2, so Ray Data has CPUs beside 2 workers).
# Ray 2.60 turns on token authentication for clusters it starts; clients need RAY_AUTH_MODE=token (the token is in
# ~/.ray/auth_token).
set -euo pipefail
NUM_CPUS="${NUM_CPUS:-$(( $(nproc) + 2 ))}"
PORT="${RAY_PORT:-6379}"
# Ray lets a raylet start at most min(cores, CPUs) workers at a time and warns on the console once 4x that many are
# alive; here the nodes share the cores and advertise more CPUs, so a sweep would print that warning for what it asked.
export RAY_worker_maximum_startup_concurrency="${RAY_worker_maximum_startup_concurrency:-$NUM_CPUS}"
case "${1:-}" in
  start)
    ray start --head --node-ip-address 127.0.0.1 --port "$PORT" --dashboard-host 127.0.0.1 --dashboard-port 8265 \
      --num-cpus "$NUM_CPUS" --disable-usage-stats
    for i in $(seq 2 "${2:-1}"); do  # own temp dir: else each node's log monitor forwards every node's logs
      RAY_AUTH_MODE=token ray start --address "127.0.0.1:$PORT" --node-ip-address 127.0.0.1 --num-cpus "$NUM_CPUS" \
        --temp-dir "/tmp/ray-node$i" --disable-usage-stats
    done ;;
  stop) ray stop ;;
  *) echo "usage: $0 start [NUM_NODES] | stop" >&2; exit 2 ;;
esac
