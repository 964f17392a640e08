#!/usr/bin/env bash
# The GPU measurements in one go (aimed at under 10 minutes on one H100/H200-class GPU): build with CUDA,
# the GPU tests (kernels against candle's ops, the device engine against the sparse CPU engine, SmolLM2's
# forward on CUDA against the CPU), saeflow vs sparsify training tokens/s (d_in 2048 and 4096, expansion 16
# and 32, k 32 and 64, batch 4096 and 16384, alternating), and the forward (capture) tokens/s of SmolLM2 vs
# PyTorch on the same GPU, in f32 and bf16.
#
# Usage: bench/gpu.sh [PYTHON_WITH_TORCH_SPARSIFY_TRANSFORMERS_GGUF]
# Needs on the GPU machine: nvcc (a CUDA toolkit; or `source DIR/env.sh` after scripts/cuda_toolchain.py),
# ../shared (the SmolLM2 model), and for the peers torch + eai-sparsify + transformers + gguf.
# First it runs what a CPU can check (the device engine on the CPU device); without a GPU it stops there
# with a message and exit status 2.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-python3}
cd "$here"
bin="${CARGO_TARGET_DIR:-target}/release/saeflow"
date -u +"%Y-%m-%d %H:%M UTC"
lscpu | grep -E 'Model name|^CPU\(s\)' | sed 's/  */ /g'

echo "== CPU-checkable parts: the device-resident engine on the CPU device"
cargo test -q --release -p saeflow-core --test device_engine
cargo build -q --release
"$bin" bench train --device cpu-dense --d-in 64 --expansion 8 --k 8 --batch 512 --steps 3

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi is missing or lists none). The CPU-checkable parts" >&2
  echo "passed; the GPU tests and measurements need a GPU machine." >&2
  exit 2
fi
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv
CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.[:space:]')
export CUDA_COMPUTE_CAP
if ! command -v nvcc >/dev/null; then
  echo "bench/gpu.sh: candle's CUDA kernels are built with nvcc, which is not on PATH: install a CUDA toolkit," >&2
  echo "or run 'python3 scripts/cuda_toolchain.py DIR && source DIR/env.sh' (needs PyPI) first." >&2
  exit 2
fi

echo "== build with CUDA (compute capability $CUDA_COMPUTE_CAP)"
export SAEFLOW_REQUIRE_CUDA=1
cargo build -q --release --features cuda
cargo test -q --release --features cuda -p saeflow-core --test cuda --no-run

echo "== GPU tests"
cargo test -q --release --features cuda -p saeflow-core --test cuda

echo "== training: saeflow (device-resident) vs sparsify, alternating; a shape that does not fit says so"
for d_in in 2048 4096; do
  for expansion in 16 32; do
    for k in 32 64; do
      for batch in 4096 16384; do
        "$bin" bench train --device cuda --d-in "$d_in" --expansion "$expansion" --k "$k" \
          --batch "$batch" --steps 20 2>&1 | tail -1 || true
        "$py" bench/sparsify_gpu.py --d-in "$d_in" --expansion "$expansion" --k "$k" --batch "$batch" \
          --steps 20 2>&1 | tail -1 || true
      done
    done
  done
done

echo "== capture: SmolLM2-135M forward up to blocks.15, batch 32 x 256, f32 and bf16"
m=../shared/models/smollm2-135m-instruct-q4_1
g=SmolLM2-135M-Instruct.Q4_1.gguf
for round in 1 2; do
  for dtype in f32:float32 bf16:bfloat16; do
    "$bin" bench forward "$m/$g" --device cuda --dtype "${dtype%%:*}" --layer 15 --batch 32 \
      --seq 256 --iters 10
    "$py" bench/model_forward_torch.py "$m" "$g" --device cuda --dtype "${dtype##*:}" --layer 15 --batch 32 \
      --seq 256 --iters 10 2>&1 | tail -1
  done
done
