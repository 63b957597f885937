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
pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$dir"' EXIT
"$bin" cert ca --dir "$dir" >/dev/null
for i in $(seq 0 7); do "$bin" cert node --name "n$i" --dir "$dir" >/dev/null; done

wait_http() { for _ in $(seq 1 120); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.25; done; echo "no answer from $1" >&2; exit 1; }

mesh() { # routing policy (TOML spelling) [cell size: cells of that many nodes, the first two gateways]
  local base=$((10000 + RANDOM % 20000)) urls=() size=${2:-8} cells=""
  for i in $(seq 0 7); do
    local first=$((i / size * size))
    if [ "$size" -lt 8 ]; then
      cells="[cells]
name = \"c$((i / size))\"
gateway = $([ $((i - first)) -lt 2 ] && echo true || echo false)"
      # Gateways join the backbone through the other cells' first gateways.
      if [ $((i - first)) -lt 2 ]; then
        cells+="
backbone_seeds = [$(for f in $(seq 0 "$size" 7); do [ "$f" = "$first" ] || printf '"127.0.0.1:%d",' $((base + f)); done | sed 's/,$//')]"
      fi
    fi
    cat >"$dir/n$i.toml" <<TOML
node_name = "n$i"
http_addr = "127.0.0.1:$((base + 10 + i))"
quic_addr = "127.0.0.1:$((base + i))"
tls_dir = "$dir"
cluster_id = "bench"
seeds = ["127.0.0.1:$((base + first))"]
routing = "$1"
$cells
TOML
    RUST_LOG=warn "$bin" serve --config "$dir/n$i.toml" >"$dir/n$i.log" 2>&1 &
    pids+=($!)
    urls+=("http://127.0.0.1:$((base + 10 + i))")
  done
  for u in "${urls[@]}"; do
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "a node failed to start:" >&2; tail -n 20 "$dir"/n*.log >&2; exit 1; }
    done
    wait_http "$u"
    for _ in $(seq 1 120); do
      n=$(curl -sf "$u/v1/mesh/peers" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0)
      [ "$n" = "$size" ] && break
      sleep 0.5
    done
  done
  sleep 2 # load reports and first summaries in gossip
  if [ "$size" -lt 8 ]; then sleep 4; fi # the cells table: a backbone round or two
  entry=$(IFS=,; echo "${urls[*]}")
}

oracle() {
  local base=$((10000 + RANDOM % 20000)) engines=""
  for i in $(seq 0 7); do
    "$bin" engine-sim --http-addr "127.0.0.1:$((base + 20 + i))" --kv-events-addr "tcp://127.0.0.1:$((base + 40 + i))" \
      >"$dir/e$i.log" 2>&1 &
    pids+=($!)
    engines+="[[engines]]
url = \"http://127.0.0.1:$((base + 20 + i))\"
name = \"e$i\"
kv_events = \"tcp://127.0.0.1:$((base + 40 + i))\"
"
  done
  cat >"$dir/oracle.toml" <<TOML
node_name = "oracle"
http_addr = "127.0.0.1:$((base + 10))"
engine_poll_interval_ms = 100
$engines
TOML
  for i in $(seq 0 7); do wait_http "http://127.0.0.1:$((base + 20 + i))"; done
  RUST_LOG=warn "$bin" serve --config "$dir/oracle.toml" >"$dir/oracle.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$((base + 10))"
  sleep 1
  entry="http://127.0.0.1:$((base + 10))"
}

csvs=()
for rate in ${rates//,/ }; do
  for p in ${policies//,/ }; do
    case $p in
      oracle) oracle ;;
      round-robin) mesh round_robin ;;
      least-load) mesh least_load ;;
      kvmesh) mesh kvmesh ;;
      kvmesh-cells) mesh kvmesh "${KVMESH_CELL_SIZE:-4}" ;;
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
