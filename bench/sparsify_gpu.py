#!/usr/bin/env python3
"""sparsify on a GPU, the peer of `saeflow bench train --device cuda`: EleutherAI sparsify's SparseCoder (its
fused TopK encoder and Triton sparse decoder) trained in sparsify's own recipe (FVU loss, decoder-parallel
gradient removed, Adam, unit decoder rows), on a pool of 8 standard-normal batches already on the GPU (as
saeflow's bench), after 3 warm-up steps. Prints one line: tokens/s, ms per step, final FVU.

  python bench/sparsify_gpu.py --d-in 2048 --expansion 16 --k 32 --batch 4096 [--steps 20] [--dtype float32]
Needs: torch with CUDA, eai-sparsify (pip install eai-sparsify), triton (comes with torch's CUDA wheel).
"""
import argparse
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--d-in", type=int, required=True)
p.add_argument("--expansion", type=int, required=True)
p.add_argument("--k", type=int, required=True)
p.add_argument("--batch", type=int, required=True)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
a = p.parse_args()
if not torch.cuda.is_available():
    raise SystemExit("sparsify_gpu.py: torch sees no CUDA device")

from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

dev = torch.device("cuda")
d_sae = a.d_in * a.expansion
sae = SparseCoder(a.d_in, SparseCoderConfig(expansion_factor=a.expansion, k=a.k), device=dev)
opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (d_sae / 16384) ** 0.5)
g = torch.Generator(device=dev).manual_seed(0)
pool = [torch.randn(a.batch, a.d_in, generator=g, device=dev) for _ in range(8)]
autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")


def step(x):
    with autocast:
        out = sae(x)
    opt.zero_grad(set_to_none=True)
    out.fvu.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    sae.set_decoder_norm_to_unit_norm()
    return out.fvu


for i in range(3):
    step(pool[i % 8])
torch.cuda.synchronize()
t = time.perf_counter()
for i in range(a.steps):
    fvu = step(pool[(i + 3) % 8])
fvu = fvu.item()  # waits for the last step
secs = time.perf_counter() - t
print(
    f"sparsify (torch {torch.__version__}, {torch.cuda.get_device_name()}, {a.dtype}): d_in {a.d_in}, d_sae {d_sae}, "
    f"k {a.k}, batch {a.batch}: {a.batch * a.steps / secs:.0f} tokens/s, {1000 * secs / a.steps:.2f} ms/step, FVU {fvu:.4f}"
)
