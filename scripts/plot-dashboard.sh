#!/usr/bin/env bash
# Plots the Grafana dashboard's panels (deploy/grafana/kvmesh-dashboard.json) over a short run:
# a local 3-node mesh of `kvmesh serve` with embedded engine simulators (mutual TLS, API keys,
# tenant limits, guardrails, audit trail, flow control), scraped every second by a Prometheus of
# its own; scripts/plot-dashboard.py drives load through phases (light, mixed, overload, one node
# paused, recovery), then runs each panel's PromQL through Prometheus's query_range API and draws
# the panels into docs/dashboard.png. Exits non-zero when more than 2 panels return no data.
#
# Usage: scripts/plot-dashboard.sh [KVMESH_BINARY]   (default: target/release/kvmesh)
# Env: DURATION_S (load, default 150), OUT (default docs/dashboard.png), DASHBOARD, BASE_PORT,
# PROM_PORT. Takes about DURATION_S + 20 s.
# Needs: prometheus (Debian's package; installed with apt-get when missing; its service is not
# used), python3 with matplotlib (pip-installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release/kvmesh}"
DURATION_S="${DURATION_S:-150}"
OUT="${OUT:-docs/dashboard.png}"
DASHBOARD="${DASHBOARD:-deploy/grafana/kvmesh-dashboard.json}"
BASE_PORT="${BASE_PORT:-$((20000 + RANDOM % 10000))}"
PROM_PORT="${PROM_PORT:-$((BASE_PORT + 90))}"
[ -x "$BIN" ] || { echo "no kvmesh binary at $BIN (cargo build --release)" >&2; exit 2; }

if ! command -v prometheus >/dev/null; then
  echo "installing prometheus (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >/dev/null
fi
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib

dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BIN" cert ca --dir "$dir" >/dev/null
key_hash() { python3 -c 'import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())' "$1"; }
ops=$(key_hash sk-plot-ops); acme=$(key_hash sk-plot-acme); burst=$(key_hash sk-plot-burst)
urls=()
for i in 0 1 2; do
  "$BIN" cert node --name "n$i" --dir "$dir" >/dev/null
  cat >"$dir/n$i.toml" <<TOML
node_name = "n$i"
http_addr = "127.0.0.1:$((BASE_PORT + 10 + i))"
quic_addr = "127.0.0.1:$((BASE_PORT + i))"
tls_dir = "$dir"
cluster_id = "dashboard"
seeds = ["127.0.0.1:$BASE_PORT"]

[embedded]
max_num_seqs = 8            # small engines, so load makes requests wait
num_gpu_blocks = 1200       # and fills their KV caches visibly

[flow]
max_waiting_per_engine = 2
max_wait_ms = 3000

[auth]
protect_metrics = false
[[auth.keys]]
tenant = "ops"
key_sha256 = "$ops"
admin = true
[[auth.keys]]
tenant = "acme"
key_sha256 = "$acme"
[[auth.keys]]
tenant = "burst"
key_sha256 = "$burst"

[limits.default]
requests_per_minute = 100000
max_tokens = 1024
[limits.tenants.burst]
requests_per_minute = 30

[[guardrails]]
kind = "deny"
name = "no-secrets"
on = ["prompt", "response"]
words = ["internal-only"]

[[guardrails]]
kind = "pii"
name = "pii"
on = ["prompt", "response"]
types = ["email", "phone"]
action = "redact"

[audit]
path = "$dir/audit-n$i.jsonl"
TOML
  RUST_LOG=warn "$BIN" serve --config "$dir/n$i.toml" >"$dir/n$i.log" 2>&1 &
  pids+=($!)
  urls+=("http://127.0.0.1:$((BASE_PORT + 10 + i))")
done
node_pids=("${pids[@]}")

for u in "${urls[@]}"; do
  n=0
  for _ in $(seq 1 120); do
    for p in "${node_pids[@]}"; do
      kill -0 "$p" 2>/dev/null || { echo "a node failed to start:" >&2; tail -n 20 "$dir"/n*.log >&2; exit 2; }
    done
    n=$(curl -sf -H 'authorization: Bearer sk-plot-ops' "$u/v1/mesh/peers" |
      python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0)
    [ "$n" = 3 ] && break
    sleep 0.5
  done
  [ "$n" = 3 ] || { echo "$u does not see 3 peers" >&2; tail -n 20 "$dir"/n*.log >&2; exit 2; }
done

targets=$(printf '"%s",' "${urls[@]#http://}"); targets=${targets%,}
cat >"$dir/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: kvmesh
    static_configs:
      - targets: [$targets]
YAML
prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$dir/prometheus.log" 2>&1 &
pids+=($!)
PROM="http://127.0.0.1:$PROM_PORT"
for _ in $(seq 1 60); do curl -sf "$PROM/-/ready" >/dev/null && break; sleep 0.5; done
curl -sf "$PROM/-/ready" >/dev/null || { tail -n 20 "$dir/prometheus.log" >&2; exit 2; }

python3 scripts/plot-dashboard.py \
  --urls "$(IFS=,; echo "${urls[*]}")" --pause-pid "${node_pids[2]}" \
  --prometheus "$PROM" --duration-s "$DURATION_S" \
  --dashboard "$DASHBOARD" --out "$OUT"
