#!/usr/bin/env bash
# Routers that agree when caches are full (issue 22), on 8 real processes: the routing benchmark
# (`kvmesh bench routing --entry-urls`) with engines whose KV caches hold less than the
# workload's prefixes (`KVMESH_GPU_BLOCKS` blocks of 16 tokens each, default 6,000: the
# shared-prefix workload's 128 prefixes of 6,000 tokens fill 1.0x the 8 caches before any
# question or answer), for each setup:
#
#   kvmesh         8 `kvmesh serve` processes, each with its embedded engine simulator, meshed
#                  over QUIC with mutual TLS (prefix placement on, the default)
#   kvmesh-random  the same with `routing = "kvmesh_random"` (near-equal engines drawn at random:
#                  the routing before prefix placement)
#   least-load     the same with `routing = "least_load"`
#   oracle         one `kvmesh serve` router in front of 8 `kvmesh engine-sim` processes (it
#                  reads every engine's KV events and load: a central exact index)
#   smg            Shepherd Model Gateway (PyPI `sglang-router`, `smg launch --policy
#                  cache_aware`) in front of the same 8 engine processes
#
# Fresh processes for every point; three seeds by default. The figures go to BENCHMARKS.md
# (section `agreement-processes`, by `scripts/agreement-table.py`) and their CSVs to
# docs/bench-agreement/.
#
#   scripts/bench-agreement.sh [RATES] [DURATION_S] [SEEDS] [SETUPS] [WORKLOAD]
#
# SMG: `smg` on PATH, or KVMESH_SMG=/path/to/smg (`pip install sglang-router`).
set -euo pipefail
cd "$(dirname "$0")/.."
rates=${1:-24}
duration=${2:-40}
seeds=${3:-1,2,3}
setups=${4:-kvmesh,kvmesh-random,oracle,smg}
workload=${5:-examples/workloads/shared-prefix.toml}
blocks=${KVMESH_GPU_BLOCKS:-6000}
bin=target/release/kvmesh
smg=${KVMESH_SMG:-smg}
[ -x "$bin" ] || cargo build --release --locked -p kvmesh-node --bin kvmesh
if [[ ",$setups," == *",smg,"* ]] && ! command -v "$smg" >/dev/null; then
  echo "setup smg needs Shepherd Model Gateway: pip install sglang-router (or KVMESH_SMG=/path/to/smg)" >&2
  exit 2
fi
dir=$(mktemp -d)
out=docs/bench-agreement
mkdir -p "$out"
. scripts/processes.sh
trap 'stop; rm -rf "$dir"' EXIT
mesh_certs 8

contended_node() { # node index, base: the setup's routing and a contended embedded engine
  echo "routing = \"$routing\""
  printf '[embedded]\nnum_gpu_blocks = %d\n' "$blocks"
}

smg_router() {
  "$smg" launch --host 127.0.0.1 --port "$((base + 10))" --prometheus-port "$((base + 9))" --policy cache_aware \
    --worker-urls "${engine_urls[@]}" --log-level warn >"$dir/smg.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 160); do curl -sf "http://127.0.0.1:$((base + 10))/health" >/dev/null && break; sleep 0.25; done
  curl -sf "http://127.0.0.1:$((base + 10))/health" >/dev/null || { echo "smg did not start:" >&2; tail -n 20 "$dir/smg.log" >&2; exit 1; }
  # Its workers are registered (and health-checked) in the background: wait for all 8.
  for _ in $(seq 1 80); do
    n=$(curl -sf "http://127.0.0.1:$((base + 10))/workers" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d.get("workers", d) if isinstance(d, dict) else d))' 2>/dev/null || echo 0)
    [ "$n" = 8 ] && break
    sleep 0.25
  done
  entry="http://127.0.0.1:$((base + 10))"
}

csvs=()
for rate in ${rates//,/ }; do
  for seed in ${seeds//,/ }; do
    for p in ${setups//,/ }; do
      case $p in
        kvmesh | kvmesh-random | least-load) routing=${p//-/_} && start_mesh 8 contended_node ;;
        oracle) start_engines 8 --num-gpu-blocks "$blocks" && start_router oracle "engine_poll_interval_ms = 100
$engines_toml" ;;
        smg) start_engines 8 --num-gpu-blocks "$blocks" && smg_router ;;
        *) echo "unknown setup $p" >&2; exit 2 ;;
      esac
      csv="$out/$(basename "$workload" .toml)-$blocks-$p-$rate-$seed.csv"
      # A failed point must not leave an earlier run's figures to be reported as this one's.
      rm -f "$csv"
      "$bin" bench routing --workload "$workload" --rates "$rate" --duration-s "$duration" --engines 8 \
        --policies "$p" --entry-urls "$entry" --seed "$seed" --csv "$csv" | { grep -E "req/s" || true; }
      [ -s "$csv" ] || { echo "no figures for $p at $rate req/s, seed $seed" >&2; exit 1; }
      csvs+=("$csv")
      stop
    done
  done
done
python3 scripts/agreement-table.py "${csvs[@]}" --out BENCHMARKS.md --section agreement-processes \
  --title "Routers that agree when caches are full: 8 real processes ($(basename "$workload" .toml), $blocks blocks per engine)" \
  --command "KVMESH_GPU_BLOCKS=$blocks scripts/bench-agreement.sh $rates $duration $seeds $setups $workload"
