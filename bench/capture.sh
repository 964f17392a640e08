#!/usr/bin/env bash
# Capture throughput against the bare model forward on the same shapes, then the activation reader.
#  1. `saeflow bench forward`: SmolLM2-135M (f32), batch 8 x 128 random tokens, up to blocks.15, as many
#     passes as the capture has batches (this VM slows down under sustained load: compare equal durations).
#  2. A capture stage with the same shapes (packed 128-token contexts, batch 8, blocks.15.hook_resid_post,
#     BOS and first positions kept so every computed token is stored), over the lie-detector preset; tokens/s from its manifest
#     (time after model loading: tokenizing, forward, gathering, shard writing and final assembly).
#  3. `saeflow bench reader` on synthetic d=576 stores, f32 and f16.
# Usage: bench/capture.sh [TOKENS]   (needs: cargo build --release)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin="$here/target/release/saeflow"
tokens=${1:-16384}
cd "$here"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(date -u +%F); $(git rev-parse --short HEAD)"
model=../shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf
work=$(mktemp -d)
cat > "$work/capture.toml" <<TOML
[pipeline]
name = "bench-capture"
[models.smollm]
kind = "llama"
path = "$here/$model"
[stages.data]
kind = "dataset"
sources = [{ preset = "lie_detector", path = "$here/../shared/data/llm_lie_detector" }]
[stages.acts]
kind = "capture"
input = "data"
model = "smollm"
hooks = ["blocks.15.hook_resid_post"]
context = 128
batch_size = 8
pack = true
exclude_bos = false
drop_first = 0
tokens = $tokens
TOML
"$bin" run -q --cache "$work/c" "$work/capture.toml" data
# Alternate the two measurements (this VM's speed drifts); each capture gets a fresh key via its budget.
for i in 1 2 3; do
  "$bin" bench forward "$model" --batch 8 --seq 128 --layer 15 --iters $((tokens / 1024))
  "$bin" run -q --cache "$work/c" "$work/capture.toml" -S acts.tokens=$((tokens + i))
done
python3 - "$work/c" <<'PY'
import glob, json, sys
manifests = [json.load(open(p)) for p in glob.glob(sys.argv[1] + "/objects/*/manifest.json")]
for m in sorted(manifests, key=lambda m: m["started_unix_ms"]):
    if m["kind"] == "capture":
        print(f"capture: {m['metrics']['tokens']} tokens, {m['metrics']['tokens_per_s']:.0f} tokens/s")
PY
"$bin" bench reader --d-model 576 --dtype f32
"$bin" bench reader --d-model 576 --dtype f16
rm -rf "$work"
