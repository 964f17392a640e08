#!/usr/bin/env python3
"""Writes, with SAELens' own save code, the TopK SAE that bench/saelens_import.sh brings into saeflow with an
`sae` stage: SmolLM2-135M's width (576), 4096 latents, k = 32, inputs layer-normed (`normalize_activations =
"layer_norm"`), b_dec applied to the input. Its decoder rows are random unit vectors and its encoder their
transpose, with b_dec at zero: not a trained SAE, but every path of SAELens' maths is exercised.

  python3 bench/saelens_import.py OUT_DIR      # needs sae-lens (pip)
"""
import sys

import torch
from sae_lens import TopKSAE
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAEConfig

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
cfg = TopKSAEConfig(d_in=576, d_sae=4096, k=32, apply_b_dec_to_input=True, normalize_activations="layer_norm",
                    metadata=SAEMetadata(hook_name="blocks.15.hook_resid_post", model_name="SmolLM2-135M-Instruct"))
sae = TopKSAE(cfg)
with torch.no_grad():
    w = torch.randn(4096, 576, generator=g)
    w /= w.norm(dim=-1, keepdim=True)
    sae.W_dec.copy_(w)
    sae.W_enc.copy_(w.T)
    sae.b_enc.zero_()
    sae.b_dec.zero_()
sae.save_model(out)
print(f"wrote {out}")
