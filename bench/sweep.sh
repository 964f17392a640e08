#!/usr/bin/env bash
# A 4-member TopK sweep (k = 16, 32, 48, 64) sharing one pass over the activations, against one member,
# the same four with `--no-group` (a pass each, one process) and four separate runs; then one member with
# the f32 and with the bf16-ranked encoder product; 100 steps of 4096 tokens per member. Wall time of
# `saeflow run` for the `sae` stage of pipelines/quality.toml, whose capture must be cached already:
#
#   cargo build --release && target/release/saeflow run --cache CACHE pipelines/quality.toml
#   bench/sweep.sh CACHE            # the "A 4-member sweep" table of BENCHMARKS.md
#
# Before every timed run the cache's trained SAEs are removed, so each run trains from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${1:?usage: bench/sweep.sh CACHE}
bin=target/release/saeflow
pipeline=pipelines/quality.toml
tokens=409600 # 100 steps of 4096 per member
[ -d "$cache/refs/quality" ] || { echo "no pipeline \`quality\` in $cache: run $pipeline first" >&2; exit 2; }

forget() { # every trained SAE in the cache (refs of single runs overwrite each other, so go by manifest)
  grep -l '"kind": *"train"' "$cache"/objects/*/manifest.json 2>/dev/null | while read -r manifest; do
    rm -rf "$(dirname "$manifest")"
  done
  rm -f "$cache"/refs/quality/sae*.json
}

timed() {
  local label=$1
  shift
  forget
  local start end
  start=$(date +%s.%N)
  "$bin" run -q --cache "$cache" -S sae.tokens=$tokens "$@" "$pipeline" sae >/dev/null
  end=$(date +%s.%N)
  printf '| %s | %.1f s |\n' "$label" "$(echo "$end - $start" | bc)"
}

echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $(date -u +%F); $(git rev-parse --short HEAD)"
echo "| run | wall time |"
echo "| --- | --- |"
timed "one member (k 32, expansion 8)"
timed "four members \`-S sae.k=16,32,48,64\`, grouped (one data pass)" -S sae.k=16,32,48,64
timed "the same four with \`--no-group\` (one pass each, one process)" --no-group -S sae.k=16,32,48,64
forget
start=$(date +%s.%N)
for k in 16 32 48 64; do
  "$bin" run -q --cache "$cache" -S sae.tokens=$tokens -S "sae.k=$k" "$pipeline" sae >/dev/null
done
end=$(date +%s.%N)
printf '| four separate runs | %.1f s |\n' "$(echo "$end - $start" | bc)"
for precision in f32 bf16; do
  timed "one member, \`encoder_precision = \"$precision\"\`" -S "sae.encoder_precision=$precision"
  ref=$(ls "$cache"/refs/quality/sae*.json) # the one instance just trained
  key=$(grep -o '"key": *"[0-9a-f]*"' "$ref" | grep -o '[0-9a-f]\{16,\}')
  python3 - "$cache/objects/$key" <<'PY'
import json, sys
from pathlib import Path
obj = Path(sys.argv[1])
metrics = json.loads((obj / "manifest.json").read_text())["metrics"]
final = json.loads((obj / "train.json").read_text())["final"]
print(f"|   training alone (manifest): {metrics['tokens_per_s']:,.0f} tokens/s, val FVU {final['val_fvu']:.4f} | |")
PY
done
