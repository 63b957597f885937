# Helpers for the scripts that run kvmesh processes on loopback (sourced, not run):
# `scripts/bench-agreement.sh`, `bench-flow.sh`, `bench-processes.sh`, `validate-simulator.sh`.
#
# The caller sets `bin` (the kvmesh binary) and `dir` (a scratch directory). Every process
# started here is appended to `pids`; `stop` ends them all. Ports are drawn from 10000-29999,
# below Linux's ephemeral range (32768-60999) where the nodes' own outgoing and
# embedded-engine sockets land.

pids=()
stop() { for pid in ${pids[@]+"${pids[@]}"}; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }

# mesh_certs N: a CA and the certificates of nodes n0 .. n(N-1) in $dir.
mesh_certs() {
  "$bin" cert ca --dir "$dir" >/dev/null
  for i in $(seq 0 $(($1 - 1))); do "$bin" cert node --name "n$i" --dir "$dir" >/dev/null; done
}

# wait_http URL: until URL/health answers (30 s at most).
wait_http() {
  for _ in $(seq 1 120); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.25; done
  echo "no answer from $1" >&2
  exit 1
}

# wait_peers URL N [CURL ARGS...]: until the node at URL lists N peers (60 s at most; a mesh
# that does not form shows in the benchmark's own figures).
wait_peers() {
  local url=$1 want=$2 n
  shift 2
  for _ in $(seq 1 120); do
    n=$(curl -sf "$@" "$url/v1/mesh/peers" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0)
    [ "$n" = "$want" ] && return 0
    sleep 0.5
  done
}

# start_mesh N EXTRA [CURL ARGS...]: N `kvmesh serve` nodes n0 .. n(N-1), each with its
# embedded engine simulator unless EXTRA configures engines, meshed over QUIC with mutual TLS
# (certificates from `mesh_certs`). EXTRA names a function called with a node's index and the
# ports' base that prints the rest of that node's TOML (top-level keys first, then tables);
# without a `seeds` line from it, every node joins through n0. The curl arguments go to the
# peer-list probe (an admin key). Sets `entry` (the nodes' URLs, comma-separated).
start_mesh() {
  local n=$1 extra=$2 base=$((10000 + RANDOM % 20000)) urls=() i u pid body
  shift 2
  for i in $(seq 0 $((n - 1))); do
    body=$("$extra" "$i" "$base")
    {
      echo "node_name = \"n$i\""
      echo "http_addr = \"127.0.0.1:$((base + 10 + i))\""
      echo "quic_addr = \"127.0.0.1:$((base + i))\""
      echo "tls_dir = \"$dir\""
      echo "cluster_id = \"bench\""
      grep -q '^seeds = ' <<<"$body" || echo "seeds = [\"127.0.0.1:$base\"]"
      echo "$body"
    } >"$dir/n$i.toml"
    RUST_LOG=warn "$bin" serve --config "$dir/n$i.toml" >"$dir/n$i.log" 2>&1 &
    pids+=($!)
    urls+=("http://127.0.0.1:$((base + 10 + i))")
  done
  for u in "${urls[@]}"; do
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "a node failed to start:" >&2; tail -n 20 "$dir"/n*.log >&2; exit 1; }
    done
    wait_http "$u"
    wait_peers "$u" "${mesh_peers:-$n}" "$@"
  done
  sleep 2 # load reports and first summaries in gossip
  entry=$(IFS=,; echo "${urls[*]}")
}

# start_engines N [ENGINE-SIM ARGS...]: N `kvmesh engine-sim` processes with KV events, on
# ports from a random base. Sets `engine_urls` (an array), `engines_toml` (their `[[engines]]`
# entries, named e0 ..) and `base` (the router's port is base + 10).
start_engines() {
  local n=$1 i
  shift
  base=$((10000 + RANDOM % 20000))
  engine_urls=()
  engines_toml=""
  for i in $(seq 0 $((n - 1))); do
    "$bin" engine-sim --http-addr "127.0.0.1:$((base + 20 + i))" --kv-events-addr "tcp://127.0.0.1:$((base + 40 + i))" \
      "$@" >"$dir/e$i.log" 2>&1 &
    pids+=($!)
    engine_urls+=("http://127.0.0.1:$((base + 20 + i))")
    engines_toml+="[[engines]]
url = \"http://127.0.0.1:$((base + 20 + i))\"
name = \"e$i\"
kv_events = \"tcp://127.0.0.1:$((base + 40 + i))\"
"
  done
  for u in "${engine_urls[@]}"; do wait_http "$u"; done
}

# start_router NAME TOML: one `kvmesh serve` router named NAME at port base + 10 (after
# `start_engines`) with TOML after its name and address. Sets `entry`.
start_router() {
  printf 'node_name = "%s"\nhttp_addr = "127.0.0.1:%d"\n%s\n' "$1" $((base + 10)) "$2" >"$dir/$1.toml"
  RUST_LOG=warn "$bin" serve --config "$dir/$1.toml" >"$dir/$1.log" 2>&1 &
  pids+=($!)
  wait_http "http://127.0.0.1:$((base + 10))"
  sleep 1
  entry="http://127.0.0.1:$((base + 10))"
}
