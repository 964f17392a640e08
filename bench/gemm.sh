#!/usr/bin/env bash
# The f32 forward's linear layers alone: candle's matmul (`saeflow bench gemm`) against PyTorch's
# (bench/gemm_torch.py) on SmolLM2-135M's shapes over 1,024 tokens, alternating in one session, three rounds,
# plus PyTorch's bf16 once. Usage: bench/gemm.sh PYTHON_WITH_TORCH   (needs a release build)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-python3}
cd "$here"
lscpu | grep -E 'Model name|^CPU\(s\)' | sed 's/  */ /g'
for round in 1 2 3; do
  echo "== round $round"
  ./target/release/saeflow bench gemm
  "$py" bench/gemm_torch.py
done
"$py" bench/gemm_torch.py --bf16
