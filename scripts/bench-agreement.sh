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
pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$dir"' EXIT
"$bin" cert ca --dir "$dir" >/dev/null
for i in $(seq 0 7); do "$bin" cert node --name "n$i" --dir "$dir" >/dev/null; done

wait_http() { for _ in $(seq 1 160); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.25; done; echo "no answer from $1" >&2; exit 1; }

mesh() { # routing policy (TOML spelling)
  local base=$((10000 + RANDOM % 20000)) urls=()
  for i in $(seq 0 7); do
    cat >"$dir/n$i.toml" <<TOML
node_name = "n$i"
http_addr = "127.0.0.1:$((base + 10 + i))"
quic_addr = "127.0.0.1:$((base + i))"
tls_dir = "$dir"
cluster_id = "bench"
seeds = ["127.0.0.1:$base"]
routing = "$1"
[embedded]
num_gpu_blocks = $blocks
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
      [ "$n" = 8 ] && break
      sleep 0.5
    done
  done
  sleep 2 # load reports and first summaries in gossip
  entry=$(IFS=,; echo "${urls[*]}")
}

engines() { # 8 engine processes from port $1 + 20 (KV events from $1 + 40)
  for i in $(seq 0 7); do
    "$bin" engine-sim --http-addr "127.0.0.1:$(($1 + 20 + i))" --kv-events-addr "tcp://127.0.0.1:$(($1 + 40 + i))" \
      --num-gpu-blocks "$blocks" >"$dir/e$i.log" 2>&1 &
    pids+=($!)
  done
  for i in $(seq 0 7); do wait_http "http://127.0.0.1:$(($1 + 20 + i))"; done
}

oracle() {
  local base=$((10000 + RANDOM % 20000)) list=""
  engines "$base"
  for i in $(seq 0 7); do
    list+="[[engines]]
url = \"http://127.0.0.1:$((base + 20 + i))\"
name = \"e$i\"
kv_events = \"tcp://127.0.0.1:$((base + 40 + i))\"
"
  done
  cat >"$dir/oracle.toml" <<TOML
node_name = "oracle"
http_addr = "127.0.0.1:$((base + 10))"
engine_poll_interval_ms = 100
$list
TOML
  RUST_LOG=warn "$bin" serve --config "$dir/oracle.toml" >"$dir/oracle.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$((base + 10))"
  sleep 1
  entry="http://127.0.0.1:$((base + 10))"
}

smg_router() {
  local base=$((10000 + RANDOM % 20000)) workers=()
  engines "$base"
  for i in $(seq 0 7); do workers+=("http://127.0.0.1:$((base + 20 + i))"); done
  "$smg" launch --host 127.0.0.1 --port "$((base + 10))" --prometheus-port "$((base + 9))" --policy cache_aware \
    --worker-urls "${workers[@]}" \
    --log-level warn >"$dir/smg.log" 2>&1 &
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
        kvmesh) mesh kvmesh ;;
        kvmesh-random) mesh kvmesh_random ;;
        least-load) mesh least_load ;;
        oracle) oracle ;;
        smg) smg_router ;;
        *) echo "unknown setup $p" >&2; exit 2 ;;
      esac
      csv="$out/$(basename "$workload" .toml)-$blocks-$p-$rate-$seed.csv"
      "$bin" bench routing --workload "$workload" --rates "$rate" --duration-s "$duration" --engines 8 \
        --policies "$p" --entry-urls "$entry" --seed "$seed" --csv "$csv" | grep -E "req/s" || true
      csvs+=("$csv")
      stop
    done
  done
done
python3 scripts/agreement-table.py "${csvs[@]}" --out BENCHMARKS.md --section agreement-processes \
  --title "Routers that agree when caches are full: 8 real processes ($(basename "$workload" .toml), $blocks blocks per engine)" \
  --command "KVMESH_GPU_BLOCKS=$blocks scripts/bench-agreement.sh $rates $duration $seeds $setups $workload"
