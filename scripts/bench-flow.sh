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
. scripts/processes.sh
trap 'stop; rm -rf "$dir"' EXIT
mesh_certs 8

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

flow_node() { # node index, base (uses $flow: enabled or not)
  echo "engine_poll_interval_ms = 50"
  common "$flow"
  printf '[embedded]\nnum_gpu_blocks = 800\ntime_scale = %s\n' "$scale"
}

mesh() { # flow enabled
  flow=$1
  start_mesh 8 flow_node -H "Authorization: Bearer sk-bench-admin"
}

central() {
  start_engines 8 --num-gpu-blocks 800 --time-scale "$scale"
  start_router central "engine_poll_interval_ms = 50
$engines_toml
$(common true)"
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
