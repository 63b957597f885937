#!/usr/bin/env bash
# Tests the container image where a Docker engine runs (CI machines here have none):
#   1. builds it (its build stage runs the same cargo command as .ci/run);
#   2. runs one node with the embedded simulator and checks that the health check turns
#      healthy, that the node runs as uid 10001, and that a chat completion is served;
#   3. runs the compose `sim` profile (edge-1, sim-1, sim-2) and sends requests through the
#      edge node, which must reach both workers over the mesh.
# Usage: scripts/test-image.sh [IMAGE_TAG]     (default kvmesh:local)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-kvmesh:local}
name=kvmesh-image-test

docker build -t "$tag" .
echo "image size: $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}')"

cleanup() {
  docker rm -f "$name" >/dev/null 2>&1 || true
  (cd examples/compose && docker compose --profile sim down -v >/dev/null 2>&1) || true
}
trap cleanup EXIT

docker run -d --name "$name" -p 18080:8080 "$tag" serve >/dev/null
[ "$(docker exec "$name" id -u)" = 10001 ] || { echo "FAIL: not running as uid 10001"; exit 1; }
for _ in $(seq 60); do
  [ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" = healthy ] && break
  sleep 2
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" = healthy ] || { docker logs "$name"; echo "FAIL: not healthy"; exit 1; }
curl -fsS localhost:18080/v1/chat/completions -H 'content-type: application/json' \
  -d '{"model":"kvmesh-sim","messages":[{"role":"user","content":"Hello!"}],"max_tokens":8}' >/dev/null
echo "ok: single node healthy, non-root, serving"

(cd examples/compose && docker compose --profile sim up -d --build)
for _ in $(seq 60); do
  curl -fsS -o /dev/null localhost:8080/health && break   # edge-1 is healthy once a worker's engine is
  sleep 2
done
served=""
for i in $(seq 40); do
  h=$(curl -fsSi localhost:8080/v1/chat/completions -H 'content-type: application/json' \
    -d "{\"model\":\"kvmesh-sim\",\"messages\":[{\"role\":\"user\",\"content\":\"request $i\"}],\"max_tokens\":4}" \
    | tr -d '\r' | awk -F': ' 'tolower($1)=="x-kvmesh-served-by"{print $2}') || true
  served="$served ${h%%/*}"
  sleep 0.25
done
for n in sim-1 sim-2; do
  case "$served" in *"$n"*) ;; *) echo "FAIL: edge-1 never routed to $n (served by:$served)"; exit 1 ;; esac
done
echo "ok: compose sim profile, edge-1 routes to sim-1 and sim-2"
echo "image tests: all passed"
