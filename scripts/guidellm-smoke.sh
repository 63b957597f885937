#!/usr/bin/env bash
# A smoke benchmark with guidellm (PyPI, 0.8.1) against a local 3-node mesh (`kvmesh demo`):
# 40 streamed chat requests with a shared 128-token prefix, 4 at a time, sent to the second node
# (so requests cross the mesh). Fails unless every request succeeded. Run by `.ci/run`.
#
# Usage: scripts/guidellm-smoke.sh [KVMESH_BINARY]   (default: target/release/kvmesh)
# Needs: `pip install guidellm==0.8.1`. Offline: the tokenizer guidellm counts and generates
# prompts with is the repository's (policy/assets/tiny-chat, the demo model's own); set
# TOKENIZER_DIR to use another. Env overrides: REQUESTS, STREAMS, HTTP_PORT, QUIC_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-target/release/kvmesh}"
TOKENIZER_DIR="${TOKENIZER_DIR:-policy/assets/tiny-chat}"
REQUESTS="${REQUESTS:-40}"; STREAMS="${STREAMS:-4}"
HTTP_PORT="${HTTP_PORT:-18080}"; QUIC_PORT="${QUIC_PORT:-17946}"
OUT="$(mktemp -d)"
REPORT="$OUT/guidellm-report.json"

"$BIN" demo --http-port "$HTTP_PORT" --quic-port "$QUIC_PORT" --requests 1 > "$OUT/demo.log" 2>&1 &
demo=$!
trap 'kill "$demo" 2>/dev/null || true; wait "$demo" 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  grep -q "Serving until Ctrl-C" "$OUT/demo.log" && break
  kill -0 "$demo" 2>/dev/null || { cat "$OUT/demo.log" >&2; echo "the demo mesh did not start" >&2; exit 2; }
  sleep 1
done
grep -q "Serving until Ctrl-C" "$OUT/demo.log" || { cat "$OUT/demo.log" >&2; echo "the demo mesh did not start in 60 s" >&2; exit 2; }
TARGET="http://127.0.0.1:$((HTTP_PORT + 1))"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
set +e
timeout 300 guidellm run \
  --backend "kind=openai_http,target=$TARGET,model=kvmesh-sim,request_format=/v1/chat/completions,timeout=30" \
  --tokenizer "kind=hf_auto,model=$TOKENIZER_DIR" \
  --data "kind=synthetic_text,prompt_tokens=256,output_tokens=16,prefix_tokens=128,prefix_count=1" \
  --profile "kind=concurrent,streams=$STREAMS" \
  --constraint "kind=max_requests,count=$REQUESTS" \
  --constraint "kind=max_duration,seconds=120" \
  --output "kind=json,path=$REPORT" \
  --disable-console-interactive > "$OUT/guidellm.log" 2>&1
rc=$?
set -e
if [ ! -s "$REPORT" ]; then
  tail -30 "$OUT/guidellm.log" >&2
  echo "guidellm failed (exit $rc) and wrote no report" >&2
  exit 2
fi
python3 - "$REPORT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = e = i = 0
for b in r.get("benchmarks", []):
    t = b["metrics"]["request_totals"]
    s += int(t["successful"]); e += int(t["errored"]); i += int(t["incomplete"])
print(f"guidellm smoke against a 3-node mesh: successful={s} errored={e} incomplete={i}")
sys.exit(1 if (e > 0 or i > 0 or s == 0) else 0)
PY
