#!/usr/bin/env bash
# Two simulated engines with KV events, and one node in front of them, all on loopback.
# Ctrl-C stops everything.
set -euo pipefail
cargo build --release --quiet
bin=target/release/kvmesh
trap 'kill 0' EXIT
$bin engine-sim --http-addr 127.0.0.1:8000 --kv-events-addr tcp://127.0.0.1:5557 &
$bin engine-sim --http-addr 127.0.0.1:8001 --kv-events-addr tcp://127.0.0.1:5558 &
sleep 1
$bin serve --http-addr 127.0.0.1:8080 \
  --engine http://127.0.0.1:8000,kv-events=tcp://127.0.0.1:5557,name=gpu0 \
  --engine http://127.0.0.1:8001,kv-events=tcp://127.0.0.1:5558,name=gpu1
