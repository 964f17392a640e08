#!/usr/bin/env bash
# The AVX2 product kernels' arithmetic ceiling on this host (bench/peak.c), to read the GEMM and forward
# benchmarks against: on a shared host it moves from run to run. Needs a C compiler (cc). Usage: bench/peak.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cc -O2 -o "$out/peak" "$here/peak.c"
"$out/peak"
