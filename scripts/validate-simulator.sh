#!/usr/bin/env bash
# Validates the cluster simulator against real processes at 8 nodes: the routing benchmark
# (`kvmesh bench routing --entry-urls`) on 8 `kvmesh serve` processes (each with its embedded
# engine simulator, meshed over QUIC with mutual TLS) for round-robin and kvmesh, and on one
# `kvmesh serve` router in front of 8 `kvmesh engine-sim` processes for the oracle; then
# `kvmesh simulate` on the same workload, rates and duration. Prints both and their ratio, and
# writes them to BENCHMARKS.md (sections `simulate-validation`, and `routing-processes-NAME` with
# the real runs' full figures; NAME is the workload's file name).
#
#   scripts/validate-simulator.sh [RATES] [DURATION_S] [POLICIES] [WORKLOAD]
#
# Policies: round-robin, least-load, kvmesh, kvmesh-cells (kvmesh in cells of
# KVMESH_CELL_SIZE nodes, default 4, the first two of each cell gateways) and oracle.
#
# Ports are drawn from 10000-29999, below Linux's ephemeral range (32768-60999) where the
# nodes' own outgoing and embedded-engine sockets land.
set -euo pipefail
cd "$(dirname "$0")/.."
rates=${1:-10,25}
duration=${2:-40}
policies=${3:-round-robin,kvmesh,oracle}
workload=${4:-examples/workloads/shared-prefix.toml}
bin=target/release/kvmesh
[ -x "$bin" ] || cargo build --release --locked -p kvmesh-node --bin kvmesh
dir=$(mktemp -d)
. scripts/processes.sh
trap 'stop; rm -rf "$dir"' EXIT
mesh_certs 8

cell_node() { # node index, base: the routing policy, and with cells of $size its cell
  local i=$1 base=$2 first=$(($1 / size * size))
  echo "routing = \"$routing\""
  echo "seeds = [\"127.0.0.1:$((base + first))\"]"
  if [ "$size" -lt 8 ]; then
    printf '[cells]\nname = "c%d"\ngateway = %s\n' $((i / size)) "$([ $((i - first)) -lt 2 ] && echo true || echo false)"
    # Gateways join the backbone through the other cells' first gateways.
    if [ $((i - first)) -lt 2 ]; then
      echo "backbone_seeds = [$(for f in $(seq 0 "$size" 7); do [ "$f" = "$first" ] || printf '"127.0.0.1:%d",' $((base + f)); done | sed 's/,$//')]"
    fi
  fi
}

mesh() { # routing policy (TOML spelling) [cell size: cells of that many nodes, the first two gateways]
  routing=$1 size=${2:-8}
  mesh_peers=$size start_mesh 8 cell_node
  if [ "$size" -lt 8 ]; then sleep 4; fi # the cells table: a backbone round or two
}

oracle() {
  start_engines 8
  start_router oracle "engine_poll_interval_ms = 100
$engines_toml"
}

csvs=()
for rate in ${rates//,/ }; do
  for p in ${policies//,/ }; do
    case $p in
      oracle) oracle ;;
      round-robin) mesh round_robin ;;
      least-load) mesh least_load ;;
      kvmesh) mesh kvmesh ;;
      kvmesh-random) mesh kvmesh_random ;;
      kvmesh-cells) mesh kvmesh "${KVMESH_CELL_SIZE:-4}" ;;
      *) echo "unknown policy $p (round-robin, least-load, kvmesh, kvmesh-random, kvmesh-cells, oracle)" >&2; exit 2 ;;
    esac
    "$bin" bench routing --workload "$workload" --rates "$rate" --duration-s "$duration" --engines 8 \
      --policies "$p" --entry-urls "$entry" --csv "$dir/real-$p-$rate.csv" >/dev/null
    csvs+=("$dir/real-$p-$rate.csv")
    # KVMESH_KEEP_CSV=DIR keeps each point's CSV, to compare runs made by several invocations.
    if [ -n "${KVMESH_KEEP_CSV:-}" ]; then cp "$dir/real-$p-$rate.csv" "$KVMESH_KEEP_CSV/real-$(basename "$workload" .toml)-$p-$rate.csv"; fi
    stop
  done
done
per_engine=$(python3 -c "print(','.join(str(float(r)/8) for r in '$rates'.split(',')))")
"$bin" simulate --nodes 8 --rates-per-engine "$per_engine" --duration-s "$duration" --policies "$policies" \
  --cell-size "${KVMESH_CELL_SIZE:-4}" \
  --workload "$workload" --csv "$dir/sim.csv" >/dev/null
python3 scripts/compare-simulator.py "$dir/sim.csv" "${csvs[@]}" --out BENCHMARKS.md \
  --workload "$workload" --command "scripts/validate-simulator.sh $rates $duration $policies $workload"
