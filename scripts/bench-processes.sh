#!/usr/bin/env bash
# The routing benchmark against real processes: 4 `kvmesh serve` nodes on loopback, each with
# its embedded engine simulator, joined in a mesh with mutual TLS; the load generator is
# `kvmesh bench routing --entry-urls`. For each rate, on fresh processes: engines serving whole
# requests (`both`), then 2 prefill + 2 decode (`pd`); each point goes into BENCHMARKS.md.
#
#   scripts/bench-processes.sh [WORKLOAD] [RATES] [DURATION_S]
set -euo pipefail
cd "$(dirname "$0")/.."
workload=${1:-examples/workloads/long-prompt.toml}
rates=${2:-4,6}
duration=${3:-40}
bin=target/release/kvmesh
[ -x "$bin" ] || cargo build --release --locked -p kvmesh-node --bin kvmesh
dir=$(mktemp -d)
. scripts/processes.sh
trap 'stop; rm -rf "$dir"' EXIT
mesh_certs 4

role_node() { # node index, base: in `pd` mode the first two prefill, the others decode
  local role=both
  if [ "$mode" = pd ]; then if [ "$1" -lt 2 ]; then role=prefill; else role=decode; fi; fi
  echo "embedded_role = \"$role\""
}

run() {
  mode=$1
  local rate=$2
  start_mesh 4 role_node
  local label=$([ "$mode" = pd ] && echo "pd (processes)" || echo "both (processes)")
  # Fresh processes for every point, so no run finds another's prompts cached.
  "$bin" bench routing --workload "$workload" --rates "$rate" --duration-s "$duration" --engines 4 \
    --policies "$label" --entry-urls "$entry" \
    --out BENCHMARKS.md --section "processes-$mode-$rate" --csv "docs/bench-processes-$mode-$rate.csv"
  stop
}

for rate in ${rates//,/ }; do
  run both "$rate"
  run pd "$rate"
done
