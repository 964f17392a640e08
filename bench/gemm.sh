#!/usr/bin/env bash
# The forward's linear layers alone: candle's matmul and our kernels, the weight packed per call and once
# (`saeflow bench gemm`), against PyTorch's (bench/gemm_torch.py) on SmolLM2-135M's shapes over 1,024 tokens,
# alternating in one session, three rounds, plus PyTorch's bf16 once. Usage: bench/gemm.sh PYTHON_WITH_TORCH   (needs a release build)
# THREADS=1 ITERS=30 bench/gemm.sh PYTHON: one thread each (a shared host's co-scheduling noise is smaller),
# best of 30; on x86 with AVX2 each round also prints the kernels' arithmetic ceiling (bench/peak.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-python3}
cd "$here"
lscpu | grep -E 'Model name|^CPU\(s\)|^CPU family|^Model:' | sed 's/  */ /g'
# The vector instruction sets the kernels choose from (none of the AVX-512 ones on, say, an AMD Zen 3).
{ grep -o -w -E 'avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo || true; } | sort -u | tr '\n' ' '; echo
iters=${ITERS:-10}
if [ -n "${THREADS:-}" ]; then export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS; fi
for round in 1 2 3; do
  echo "== round $round"
  if grep -q -w avx2 /proc/cpuinfo && command -v cc > /dev/null; then bench/peak.sh; fi
  ./target/release/saeflow bench gemm --iters "$iters"
  "$py" bench/gemm_torch.py --iters "$iters"
done
"$py" bench/gemm_torch.py --bf16 --iters "$iters"
