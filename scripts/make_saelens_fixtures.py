#!/usr/bin/env python3
"""tests/fixtures/saelens/: SAEs written by SAELens' own save code, and SAELens' outputs on fixed inputs, for
`tests/sae_import.rs` (the `sae` stage kind and `Sae::load`).

- `topk/`: a TopK SAE (k = 8, `apply_b_dec_to_input`), hook `blocks.1.hook_resid_post`.
- `topk_ln_rescaled/`: TopK with `normalize_activations = "layer_norm"` and `rescale_acts_by_decoder_norm`,
  without `apply_b_dec_to_input`.
- `jumprelu/`: JumpReLU with `normalize_activations = "constant_norm_rescale"`.
- `gemma_scope/params.npz`: the raw arrays Gemma Scope publishes (`W_enc`, `W_dec`, `b_enc`, `b_dec`,
  `threshold`), run by SAELens as its Gemma Scope loader configures it (JumpReLU, no b_dec on the input).

- `bad/`: inputs the stage must refuse by name: `no_threshold/params.npz` (an array missing),
  `pickled/params.npz` (an object array, which NumPy can only read by unpickling).

Every parameter is random (biases and thresholds too, so that each matters) and d_in = 32, the width of the
tiny models in tests/fixtures/tiny_hf. `reference.json` holds the inputs and, per SAE, SAELens' `encode`
(latents) and `decode(encode(x))` (reconstruction).

  python3 scripts/make_saelens_fixtures.py   # needs sae-lens (pip); writes the fixtures
"""
import json
from pathlib import Path

import numpy as np
import sae_lens
import torch
from sae_lens import JumpReLUSAE, TopKSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.topk_sae import TopKSAEConfig

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "saelens"
D_IN, D_SAE = 32, 64


def metadata(hook):
    return SAEMetadata(hook_name=hook, model_name="tiny-gemma2", context_size=128, prepend_bos=True)


def randomise(sae, seed, threshold=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * (0.5 + torch.rand(D_SAE, 1, generator=g)))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=g))
        sae.b_dec.copy_(0.5 * torch.randn(D_IN, generator=g))
        if threshold:
            sae.threshold.copy_(0.2 + 0.3 * torch.rand(D_SAE, generator=g))
    return sae.eval()


def outputs(sae, x):
    with torch.no_grad():
        latents = sae.encode(x)
        return {"latents": latents.tolist(), "reconstruction": sae.decode(latents).tolist()}


def main():
    torch.manual_seed(0)
    x = 3.0 * torch.randn(6, D_IN) + torch.linspace(-1.0, 1.0, D_IN)
    reference = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "inputs": x.tolist()}

    saes = {
        "topk": randomise(TopKSAE(TopKSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=8, apply_b_dec_to_input=True,
            metadata=metadata("blocks.1.hook_resid_post"))), 1),
        "topk_ln_rescaled": randomise(TopKSAE(TopKSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=6, apply_b_dec_to_input=False, normalize_activations="layer_norm",
            rescale_acts_by_decoder_norm=True, metadata=metadata("blocks.2.hook_mlp_out"))), 2),
        "jumprelu": randomise(JumpReLUSAE(JumpReLUSAEConfig(
            d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=True, normalize_activations="constant_norm_rescale",
            metadata=metadata("blocks.0.hook_resid_pre"))), 3, threshold=True),
    }
    for name, sae in saes.items():
        sae.save_model(OUT / name)
        reference[name] = outputs(sae, x)

    # Gemma Scope: arrays only; SAELens' gemma_2 loader makes a JumpReLU SAE without b_dec on the input.
    scope = randomise(JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)),
                      4, threshold=True)
    (OUT / "gemma_scope").mkdir(parents=True, exist_ok=True)
    np.savez(OUT / "gemma_scope" / "params.npz",
             **{k: getattr(scope, k).detach().numpy() for k in ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"]})
    reference["gemma_scope"] = outputs(scope, x)
    (OUT / "reference.json").write_text(json.dumps(reference) + "\n")

    arrays = {k: getattr(scope, k).detach().numpy() for k in ["W_enc", "W_dec", "b_enc", "b_dec"]}
    (OUT / "bad" / "no_threshold").mkdir(parents=True, exist_ok=True)
    np.savez(OUT / "bad" / "no_threshold" / "params.npz", **arrays)
    (OUT / "bad" / "pickled").mkdir(parents=True, exist_ok=True)
    np.savez(OUT / "bad" / "pickled" / "params.npz",
             **{**arrays, "threshold": np.array([{"payload": "never unpickled"}] * D_SAE, dtype=object)})


if __name__ == "__main__":
    main()
