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
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop; rm -rf "$dir"' EXIT

"$bin" cert ca --dir "$dir" >/dev/null
for i in 0 1 2 3; do "$bin" cert node --name "n$i" --dir "$dir" >/dev/null; done

run() {
  local mode=$1 rate=$2
  pids=()
  local urls=()
  # Ports away from the defaults, from earlier runs' lingering sockets and below the ephemeral range.
  local base=$((10000 + RANDOM % 20000))
  for i in 0 1 2 3; do
    local role=both
    if [ "$mode" = pd ]; then if [ "$i" -lt 2 ]; then role=prefill; else role=decode; fi; fi
    cat >"$dir/n$i.toml" <<TOML
node_name = "n$i"
http_addr = "127.0.0.1:$((base + 10 + i))"
quic_addr = "127.0.0.1:$((base + i))"
tls_dir = "$dir"
cluster_id = "bench"
seeds = ["127.0.0.1:$base"]
embedded_role = "$role"
TOML
    RUST_LOG=warn "$bin" serve --config "$dir/n$i.toml" >"$dir/n$i-$mode.log" 2>&1 &
    pids+=($!)
    urls+=("http://127.0.0.1:$((base + 10 + i))")
  done
  for u in "${urls[@]}"; do
    for p in "${pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { echo "a node failed to start:" >&2; tail -n 20 "$dir"/n*-"$mode".log >&2; exit 1; }
    done
    for _ in $(seq 1 120); do
      n=$(curl -sf "$u/v1/mesh/peers" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0)
      [ "$n" = 4 ] && break
      sleep 0.5
    done
  done
  sleep 1 # load reports and roles in gossip
  local label=$([ "$mode" = pd ] && echo "pd (processes)" || echo "both (processes)")
  # Fresh processes for every point, so no run finds another's prompts cached.
  "$bin" bench routing --workload "$workload" --rates "$rate" --duration-s "$duration" --engines 4 \
    --policies "$label" --entry-urls "$(IFS=,; echo "${urls[*]}")" \
    --out BENCHMARKS.md --section "processes-$mode-$rate" --csv "docs/bench-processes-$mode-$rate.csv"
  stop
}

for rate in ${rates//,/ }; do
  run both "$rate"
  run pd "$rate"
done
