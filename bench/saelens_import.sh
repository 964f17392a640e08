#!/usr/bin/env bash
# An SAE written by SAELens' own save code, brought in by an `sae` stage and evaluated by saeflow's `eval`
# stage, against SAELens' own eval code on the same vectors and documents (scripts/compare_saelens_eval.py).
# BENCHMARKS.md, "An imported SAELens SAE, evaluated", has the table.
#
#   bench/saelens_import.sh [WORK_DIR]    # needs ../shared, a release build, and a Python with sae-lens,
#                                         # transformers and gguf (PYTHON=…, default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-/tmp/saeflow-saelens-import}"
python="${PYTHON:-python3}"
gguf="$(realpath ../shared/models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf)"
data="$(realpath ../shared/data)"
rm -rf "$work"
mkdir -p "$work"
"$python" bench/saelens_import.py "$work/sae"
cat > "$work/p.toml" <<TOML
[pipeline]
name = "saelens_import"
seed = 0

[models.smollm]
kind = "llama"
path = "$gguf"

[stages.data]
kind = "dataset"
sources = [
  { preset = "truthfulqa", path = "$data/truthfulqa" },
  { preset = "persona_deception", path = "$data/anthropic_evals_persona" },
]

# Whole documents, every position kept: the downstream metrics rerun the model on each document.
[stages.acts]
kind = "capture"
input = "data"
model = "smollm"
hooks = ["blocks.15.hook_resid_post"]
context = 128
drop_first = 0
tokens = 20_000

[stages.imported]
kind = "sae"
path = "$work/sae"
model = "smollm"

[stages.eval]
kind = "eval"
sae = "imported"
input = "acts"
model = "smollm"
ce_tokens = 2000
TOML
SAEFLOW_CACHE="$work/cache" cargo run -q --release -- run "$work/p.toml"
"$python" scripts/compare_saelens_eval.py "$work/cache" saelens_import --gguf "$gguf"
