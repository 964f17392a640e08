#!/usr/bin/env python3
"""PyTorch eager baseline for `saeflow bench forward`: the same GGUF dequantized to float32 by
transformers' GGUF loader, the same batch shape, the same thread count.

  python bench/model_forward_torch.py MODEL_DIR GGUF_FILE [--batch 8] [--seq 128] [--layer 15] [--iters 5] [--threads 2]
                                      [--device cuda] [--dtype float32|bfloat16|float16] [--profile]
--profile also prints the share of the timed passes' CPU time in matrix products (aten::mm / addmm / bmm) and
what they reach in GFLOP/s, from torch.profiler.
Needs: torch, transformers, gguf (a venv: pip install torch transformers gguf).
"""
import argparse
import resource
import time

import torch
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("model_dir")
p.add_argument("gguf_file")
p.add_argument("--batch", type=int, default=8)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--layer", type=int, default=None)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
p.add_argument("--profile", action="store_true")
a = p.parse_args()

torch.set_num_threads(a.threads)
dtype = getattr(torch, a.dtype)
model = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=a.gguf_file, torch_dtype=dtype).eval().to(a.device)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), generator=g).to(a.device)
sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
if a.layer is not None:
    model.model.layers = model.model.layers[: a.layer + 1]  # stop after blocks.{layer}, like saeflow's early stop
    run = lambda: model.model(input_ids=ids, use_cache=False).last_hidden_state
else:
    run = lambda: model(input_ids=ids, use_cache=False).logits
with torch.inference_mode():
    run()
    sync()
    t = time.perf_counter()
    for _ in range(a.iters):
        run()
    sync()
    secs = time.perf_counter() - t
    if a.profile:
        with torch.profiler.profile(with_flops=True) as prof:
            for _ in range(a.iters):
                run()
            sync()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        products = [e for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
        mm_us = sum(e.self_cpu_time_total for e in products)
        mm_flops = sum(e.flops for e in products)
        print(
            f"profile: matrix products {100 * mm_us / total:.1f}% of the CPU time, "
            f"{mm_flops / mm_us / 1e3:.1f} GFLOP/s in them ({mm_flops / a.iters / 1e9:.1f} GFLOP per pass)"
        )
depth = f"up to blocks.{a.layer}" if a.layer is not None else "full depth + logits"
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(
    f"pytorch {torch.__version__} eager ({a.device}, {a.dtype}): batch {a.batch} x {a.seq}, {depth}: "
    f"{a.batch * a.seq * a.iters / secs:.0f} tokens/s ({secs / a.iters:.3f} s per pass), peak RSS {rss:.0f} MiB, "
    f"{torch.get_num_threads()} threads"
)
