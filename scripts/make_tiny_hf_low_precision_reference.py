#!/usr/bin/env python3
"""tests/fixtures/tiny_hf/reference_low_precision.json: what `transformers` computes for the tiny models of
`make_tiny_hf_models.py` when they run in bfloat16 and float16 (eager attention, on the CPU), for
`tests/hf_models.rs`'s check of saeflow's bf16/f16 forward (`dtype = "bf16" | "f16"`).

For each model and dtype: the logits (as float32) at every position of the same 80-token prompt, and the
largest difference between them and the float32 logits (how far low precision moves them at all, the scale
a reasonable tolerance is measured against).

  python3 scripts/make_tiny_hf_low_precision_reference.py   # needs torch, transformers, safetensors
"""
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny_hf"
MODELS = ["llama3", "qwen2", "gemma2", "gpt2"]


def main():
    prompt = json.loads((DIR / "reference.json").read_text())["prompt"]
    ids = torch.tensor([prompt])
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "prompt": prompt}
    for name in MODELS:
        with torch.no_grad():
            full = AutoModelForCausalLM.from_pretrained(DIR / name, dtype=torch.float32, attn_implementation="eager")
            reference = full.eval()(ids).logits[0].float()
            out[name] = {}
            for dtype in ["bfloat16", "float16"]:
                model = AutoModelForCausalLM.from_pretrained(DIR / name, dtype=getattr(torch, dtype),
                                                             attn_implementation="eager").eval()
                logits = model(ids).logits[0].float()
                out[name][dtype] = {
                    "logits": [[round(v, 6) for v in row] for row in logits.tolist()],
                    "max_diff_from_f32": float((logits - reference).abs().max()),
                }
    (DIR / "reference_low_precision.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
