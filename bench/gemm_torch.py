#!/usr/bin/env python3
"""PyTorch's f32 (and bf16) matmul on SmolLM2-135M's linear shapes, as `saeflow bench gemm` times candle's:
`x @ w.T` for x [tokens, in], w [out, in], best of N after a warm-up, at the thread count torch uses.

  python3 bench/gemm_torch.py [--tokens 1024] [--iters 10] [--bf16]
"""
import argparse
import time

import torch

SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152)]

p = argparse.ArgumentParser()
p.add_argument("--tokens", type=int, default=1024)
p.add_argument("--iters", type=int, default=10)
p.add_argument("--bf16", action="store_true")
a = p.parse_args()
dtype = torch.bfloat16 if a.bf16 else torch.float32
with torch.no_grad():
    for name, inner, out in SHAPES:
        x = torch.randn(a.tokens, inner, dtype=dtype)
        w = 0.05 * torch.randn(out, inner, dtype=dtype)
        x @ w.T
        best = float("inf")
        for _ in range(a.iters):
            t = time.perf_counter()
            (x @ w.T)[0, 0].item()
            best = min(best, time.perf_counter() - t)
        flops = 2 * a.tokens * inner * out
        print(f"torch {str(dtype)[6:]} gemm {name:>8} [{a.tokens}x{inner}]·[{inner}x{out}]: "
              f"{flops / best / 1e9:.1f} GFLOP/s ({best * 1e3:.2f} ms), {torch.get_num_threads()} threads")
