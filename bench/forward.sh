#!/usr/bin/env bash
# Model forward throughput, SmolLM2-135M (GGUF dequantized), batch 8 × 128, 2 threads: saeflow
# (`saeflow bench forward`, f32, and the bf16 mode on CPUs with bf16 arithmetic) and PyTorch eager f32
# (bench/model_forward_torch.py), alternating in one session: five rounds up to blocks.15, three at full depth.
# Usage: bench/forward.sh PYTHON_WITH_TORCH_TRANSFORMERS_GGUF
# With BEFORE=path/to/an/older/saeflow, that binary runs in every round too (a before/after in one session).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-python3}
cd "$here"
lscpu | grep -E 'Model name|^CPU\(s\)|^CPU family|^Model:' | sed 's/  */ /g'
# The vector instruction sets the kernels choose from (none of the AVX-512 ones on, say, an AMD Zen 3).
{ grep -o -w -E 'avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo || true; } | sort -u | tr '\n' ' '; echo

m=../shared/models/smollm2-135m-instruct-q4_1
g=SmolLM2-135M-Instruct.Q4_1.gguf
# One untimed pass of each first: the first process of a session ran ~8% slower than the rest (seen in two
# sessions, whichever tool came first), which is the machine warming up, not either tool.
echo "== warm-up (not counted)"
./target/release/saeflow bench forward "$m/$g" --layer 15 > /dev/null
"$py" bench/model_forward_torch.py "$m" "$g" --layer 15 > /dev/null 2>&1
# The f32 forward runs right before PyTorch's in each round, so the ratio compares two adjacent runs. The bf16
# mode runs only where the CPU has bf16 arithmetic (AVX512-BF16 or AMX): elsewhere it is f32 arithmetic on
# bf16 weights, slower by design (ARCHITECTURE.md), and would only hold the pair apart.
bf16=$(grep -o -w -m1 -E 'avx512_bf16|amx_bf16' /proc/cpuinfo || true)
for round in 1 2 3 4 5; do
  echo "== round $round, up to blocks.15"
  if [ -n "$bf16" ]; then echo -n "bf16: "; ./target/release/saeflow bench forward "$m/$g" --layer 15 --dtype bf16; fi
  if [ -n "${BEFORE:-}" ]; then echo -n "before: "; "$BEFORE" bench forward "$m/$g" --layer 15; fi
  ./target/release/saeflow bench forward "$m/$g" --layer 15
  "$py" bench/model_forward_torch.py "$m" "$g" --layer 15 2>&1 | tail -1
done
for round in 1 2 3; do
  echo "== round $round, full depth"
  if [ -n "$bf16" ]; then echo -n "bf16: "; ./target/release/saeflow bench forward "$m/$g" --dtype bf16; fi
  if [ -n "${BEFORE:-}" ]; then echo -n "before: "; "$BEFORE" bench forward "$m/$g"; fi
  ./target/release/saeflow bench forward "$m/$g"
  "$py" bench/model_forward_torch.py "$m" "$g" 2>&1 | tail -1
done
