#!/usr/bin/env bash
# SAE training throughput, TopK d_in 576, d_sae 4608, k 32, batch 4096, 2 threads: saeflow (`saeflow bench
# train` at the default `encoder_precision = "auto"`: bf16-ranked where bf16 outruns f32 here, int16-ranked
# on AVX2 without AVX-512; and with the f32 encoder product) and the peers in ../shared/bench/sae_train_reference.py (SAELens,
# sparsify, plain PyTorch), alternating, in one session. Usage: bench/train.sh PYTHON_WITH_SAELENS_AND_SPARSIFY
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-python3}
cd "$here"
lscpu | grep -E 'Model name|^CPU\(s\)|^CPU family|^Model:' | sed 's/  */ /g'
# The vector instruction sets the kernels choose from (none of the AVX-512 ones on, say, an AMD Zen 3).
{ grep -o -w -E 'avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo || true; } | sort -u | tr '\n' ' '; echo
# saeflow's rounds run 30 steps, the peers' 10: each tool is timed over a window of about the same length
# (~7 s on an AMD Zen 3), so a slow spell of a shared host weighs the same in both (saeflow's 10 steps took
# ~2.5 s, and one spell moved a round by a third).
steps=30
# Within a round the default encoder runs last of saeflow's and sparsify right after it: the ratio the goal is
# about (default ÷ sparsify) compares two runs ~7 s apart, not ~15 s with another run between them (the
# host's slow spells last seconds to minutes).
for round in 1 2 3; do
  echo "== round $round"
  ./target/release/saeflow bench train --d-in 576 --expansion 8 --k 32 --batch 4096 --steps $steps --encoder f32
  if grep -q -w amx_bf16 /proc/cpuinfo; then
    # bf16 ranking on the AVX512-BF16 kernel, as on a CPU without AMX (why `auto` takes it on AMD only).
    SAEFLOW_AMX=0 ./target/release/saeflow bench train --d-in 576 --expansion 8 --k 32 --batch 4096 --steps $steps --encoder bf16
  fi
  ./target/release/saeflow bench train --d-in 576 --expansion 8 --k 32 --batch 4096 --steps $steps --encoder auto
  for impl in sparsify saelens torch; do
    OMP_NUM_THREADS=2 "$py" ../shared/bench/sae_train_reference.py --impl "$impl" --d-in 576 --expansion 8 --k 32 --batch 4096 --steps 10
  done
done
