#!/usr/bin/env bash
# Flow control on real processes: `kvmesh bench flow --entry-urls` against
#   - mesh-flow:    8 `kvmesh serve` processes (each with its embedded engine simulator, meshed
#                   over QUIC with mutual TLS), flow control on;
#   - mesh-no-flow: the same 8 processes with `[flow] enabled = false`;
#   - central-flow: one `kvmesh serve` router, flow control on, in front of 8 `kvmesh engine-sim`
#                   processes (the same policy applied centrally, no gossip delay).
# The first setup's run measures the capacity; every setup then gets the same offered loads.
# Writes the sections `flow-processes-SETUP` of BENCHMARKS.md (with KVMESH_FLOW_SEED=N, N > 0,
# another seed's arrivals, and no section), and appends each load point to
# docs/bench-flow-processes.csv (summed up over seeds and plotted by scripts/plot-flow.py).
#
#   scripts/bench-flow.sh [LOADS] [DURATION_S] [SCENARIOS] [TIME_SCALE]
#
# Engines hold about 30 requests each (800 KV blocks) and run TIME_SCALE times slower than the
# default H100 model (4 by default), so that one machine's cores can play the whole mesh.
set -euo pipefail
cd "$(dirname "$0")/.."
loads=${1:-0.8,1.2,1.5,2}
duration=${2:-40}
scenarios=${3:-load,fairness,priority}
scale=${4:-4}
slo_ms=${KVMESH_FLOW_SLO_MS:-2000}
hold_ms=$((slo_ms * 3 / 4))
bin=target/release/kvmesh
[ -x "$bin" ] || cargo build --release --locked -p kvmesh-node --bin kvmesh
dir=$(mktemp -d)
pids=()
stop() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop; rm -rf "$dir"' EXIT
"$bin" cert ca --dir "$dir" >/dev/null
for i in $(seq 0 7); do "$bin" cert node --name "n$i" --dir "$dir" >/dev/null; done

wait_http() { for _ in $(seq 1 120); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.25; done; echo "no answer from $1" >&2; exit 1; }

# The keys and flow control every node runs with (the benchmark's two tenants).
common() { # flow enabled: true|false (tables only: it goes after a config's top-level keys)
  cat <<TOML
[flow]
enabled = $1
max_wait_ms = $hold_ms
slo_ms = { critical = $hold_ms, standard = $hold_ms, sheddable = $hold_ms }
[[auth.keys]]
tenant = "quiet"
key_sha256 = "$("$bin" keys hash sk-bench-quiet)"
max_priority = "critical"
[[auth.keys]]
tenant = "noisy"
key_sha256 = "$("$bin" keys hash sk-bench-noisy)"
max_priority = "critical"
[[auth.keys]]
tenant = "ops"
key_sha256 = "$("$bin" keys hash sk-bench-admin)"
admin = true
TOML
}

mesh() { # flow enabled
  local base=$((10000 + RANDOM % 20000)) urls=()
  for i in $(seq 0 7); do
    cat >"$dir/n$i.toml" <<TOML
node_name = "n$i"
http_addr = "127.0.0.1:$((base + 10 + i))"
quic_addr = "127.0.0.1:$((base + i))"
tls_dir = "$dir"
cluster_id = "bench"
seeds = ["127.0.0.1:$base"]
engine_poll_interval_ms = 50
$(common "$1")
[embedded]
num_gpu_blocks = 800
time_scale = $scale
TOML
    RUST_LOG=warn "$bin" serve --config "$dir/n$i.toml" >"$dir/n$i.log" 2>&1 &
    pids+=($!)
    urls+=("http://127.0.0.1:$((base + 10 + i))")
  done
  for u in "${urls[@]}"; do
    wait_http "$u"
    for _ in $(seq 1 120); do
      n=$(curl -sf -H "Authorization: Bearer sk-bench-admin" "$u/v1/mesh/peers" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0)
      [ "$n" = 8 ] && break
      sleep 0.5
    done
  done
  sleep 2
  entry=$(IFS=,; echo "${urls[*]}")
}

central() {
  local base=$((10000 + RANDOM % 20000)) engines=""
  for i in $(seq 0 7); do
    "$bin" engine-sim --http-addr "127.0.0.1:$((base + 20 + i))" --kv-events-addr "tcp://127.0.0.1:$((base + 40 + i))" \
      --num-gpu-blocks 800 --time-scale "$scale" >"$dir/e$i.log" 2>&1 &
    pids+=($!)
    engines+="[[engines]]
url = \"http://127.0.0.1:$((base + 20 + i))\"
name = \"e$i\"
kv_events = \"tcp://127.0.0.1:$((base + 40 + i))\"
"
  done
  cat >"$dir/central.toml" <<TOML
node_name = "central"
http_addr = "127.0.0.1:$((base + 10))"
engine_poll_interval_ms = 50
$engines
$(common true)
TOML
  for i in $(seq 0 7); do wait_http "http://127.0.0.1:$((base + 20 + i))"; done
  RUST_LOG=warn "$bin" serve --config "$dir/central.toml" >"$dir/central.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$((base + 10))"
  sleep 1
  entry="http://127.0.0.1:$((base + 10))"
}

# KVMESH_FLOW_SETUPS runs some of them; KVMESH_FLOW_CAPACITY skips measuring the capacity.
capacity=${KVMESH_FLOW_CAPACITY:-}
seed=${KVMESH_FLOW_SEED:-0}
for setup in ${KVMESH_FLOW_SETUPS:-mesh-flow mesh-no-flow central-flow}; do
  case $setup in
    mesh-flow) mesh true ;;
    mesh-no-flow) mesh false ;;
    central-flow) central ;;
  esac
  args=(--engines 8 --loads "$loads" --setups "$setup" --scenarios "$scenarios" --duration-s "$duration"
    --slo-ms "$slo_ms" --kv-blocks 800 --time-scale "$scale" --entry-urls "$entry"
    --seed "$seed" --csv docs/bench-flow-processes.csv)
  [ "$seed" = 0 ] && args+=(--out BENCHMARKS.md --section "flow-processes-$setup")
  [ -n "$capacity" ] && args+=(--capacity "$capacity")
  RUST_LOG=warn "$bin" bench flow "${args[@]}" | tee "$dir/$setup.out" | grep -E "^(capacity|load|fairness|priority)"
  [ -n "$capacity" ] || capacity=$(sed -n 's/^capacity: \([0-9.]*\) req\/s$/\1/p' "$dir/$setup.out")
  stop
done
