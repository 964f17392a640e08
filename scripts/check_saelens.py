#!/usr/bin/env python3
"""Compatibility check with SAELens itself: loads SAEs that saeflow exported with `SAE.load_from_disk` and
checks that SAELens' encode/decode match saeflow's on stored activation rows.

Installs nothing: run it with a Python that has `sae-lens` (e.g. `pip install sae-lens` in a venv).

  python3 scripts/check_saelens.py CACHE_DIR PIPELINE_NAME [--rows 256] [--saeflow target/release/saeflow]

For every `train` object the pipeline's refs name, it runs `saeflow sae-encode` on the first ROWS rows of
the upstream capture (the SAE's hook), loads the SAE with SAELens, and compares latent activations and
reconstructions (|ours − SAELens| ≤ 1e-5 + 1e-5·|SAELens|).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from sae_lens import SAE


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cache")
    p.add_argument("pipeline")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--saeflow", default="target/release/saeflow")
    args = p.parse_args()
    cache = Path(args.cache)
    checked = 0
    for ref in sorted((cache / "refs" / args.pipeline).glob("*.json")):
        ref_json = json.loads(ref.read_text())
        obj = cache / "objects" / ref_json["key"]
        manifest = json.loads((obj / "manifest.json").read_text())
        if manifest["kind"] != "train":
            continue
        capture = cache / "objects" / next(iter(manifest["inputs"].values()))
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "ours.safetensors"
            subprocess.run(
                [args.saeflow, "sae-encode", str(obj), "--capture", str(capture), "--rows", str(args.rows), "--out", str(out)],
                check=True,
            )
            ours = load_file(str(out))
        sae = SAE.load_from_disk(str(obj), device="cpu")
        with torch.no_grad():
            acts = sae.encode(ours["x"])
            recon = sae.decode(acts)
        for name, theirs in [("acts", acts), ("recon", recon)]:
            diff = (ours[name] - theirs).abs()
            bound = 1e-5 + 1e-5 * theirs.abs()
            worst = float(diff.max())
            assert bool((diff <= bound).all()), f"{ref.stem}: {name} differs by up to {worst}"
            print(f"{ref.stem} ({type(sae).__name__}, d_in {sae.cfg.d_in}, d_sae {sae.cfg.d_sae}): {name} of {args.rows} rows match SAELens, max |diff| {worst:.2e}")
        l0 = float((acts > 0).sum(-1).float().mean())
        print(f"{ref.stem}: SAELens L0 {l0:.2f}")
        checked += 1
    assert checked, f"no train objects under {cache} for pipeline {args.pipeline}"
    print(f"SAELens {__import__('sae_lens').__version__}: {checked} exported SAEs load and agree")


if __name__ == "__main__":
    sys.exit(main())
