#!/usr/bin/env bash
# The forward's linear layers alone: candle's matmul and our kernels, the weight packed per call and once
# (`saeflow bench gemm`), against PyTorch's (bench/gemm_torch.py) on SmolLM2-135M's shapes over 1,024 tokens,
# alternating in one session, three rounds, plus PyTorch's bf16 once. Usage: bench/gemm.sh PYTHON_WITH_TORCH   (needs a release build)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-python3}
cd "$here"
lscpu | grep -E 'Model name|^CPU\(s\)|^CPU family|^Model:' | sed 's/  */ /g'
# The vector instruction sets the kernels choose from (none of the AVX-512 ones on, say, an AMD Zen 3).
{ grep -o -w -E 'avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo || true; } | sort -u | tr '\n' ' '; echo
for round in 1 2 3; do
  echo "== round $round"
  ./target/release/saeflow bench gemm
  "$py" bench/gemm_torch.py
done
"$py" bench/gemm_torch.py --bf16
