#!/usr/bin/env bash
# Start or stop a single-node Ray head on loopback, for trying `ray job submit` on this machine:
#   bash cluster/local_cluster.sh start     # dashboard/jobs API at http://127.0.0.1:8265
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
#       python jobs/pretrain.py --config tiny
#   bash cluster/local_cluster.sh stop
set -euo pipefail
case "${1:-}" in
  start) ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --dashboard-port 8265 \
           --num-cpus "${NUM_CPUS:-$(( $(nproc) + 2 ))}" --disable-usage-stats ;;
  stop) ray stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
