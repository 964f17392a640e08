#!/usr/bin/env python3
"""Runs SAELens' own eval code (`sae_lens.evals`) on the same activations and documents as a saeflow `eval`
stage and prints both sets of metrics side by side.

Installs nothing: run it with a Python that has `sae-lens`, `transformers` and `gguf`.

  python3 scripts/compare_saelens_eval.py CACHE_DIR PIPELINE_NAME --gguf MODEL.gguf [--instance eval]

For the named `eval` instance it takes the SAE (loaded with `SAE.load_from_disk` from saeflow's export) and
the capture it evaluated:

* reconstruction and sparsity metrics: `get_sparsity_and_variance_metrics` over the same stored vectors of
  the same split (fed through a stand-in for the model's `run_with_cache`, as one batch, so SAELens'
  per-batch averages are the pooled ones);
* next-token metrics: `get_downstream_reconstruction_metrics` with the model loaded by Hugging Face
  `transformers` from the GGUF (an independent implementation), hooked at the same layer, over the same
  documents (rebuilt from `tokens.parquet` exactly as the stage does). Supports captures without a BOS
  token (the SmolLM2 case), where SAELens and saeflow splice and ablate the same positions.

Exits non-zero when a metric differs by more than 1e-3 (relative for quantities above 1).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sae_lens import SAE
from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
from sae_lens.training.activation_scaler import ActivationScaler


class Batches:
    """The slice of an ActivationsStore that SAELens' eval functions use: a queue of token batches."""

    def __init__(self, batches):
        self.batches = list(batches)

    def get_batch_tokens(self, _n):
        return self.batches.pop(0)


class StoredActivations:
    """Stands in for the model in `get_sparsity_and_variance_metrics`: `batch_tokens` are row indices into
    the stored vectors, and the "cache" holds those vectors."""

    def __init__(self, hook, acts):
        self.hook, self.acts = hook, acts

    def run_with_cache(self, batch_tokens, names_filter, **_kw):
        assert names_filter == [self.hook]
        return None, {self.hook: self.acts[batch_tokens]}


class HookedHF:
    """A Hugging Face causal LM with TransformerLens' `__call__`/`run_with_hooks` for one residual hook."""

    def __init__(self, model, hook):
        parts = hook.split(".")
        assert parts[0] == "blocks" and parts[2] == "hook_resid_post", f"unsupported hook {hook}"
        self.model, self.hook, self.layer = model, hook, int(parts[1])

    def _run(self, tokens, fn=None):
        handle = None
        if fn is not None:
            def replace(_module, _inputs, output):
                if isinstance(output, tuple):
                    return (fn(output[0], None),) + tuple(output[1:])
                return fn(output, None)

            handle = self.model.model.layers[self.layer].register_forward_hook(replace)
        try:
            logits = self.model(tokens).logits.float()
        finally:
            if handle is not None:
                handle.remove()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        loss = -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return logits, loss

    def __call__(self, tokens, return_type="both", loss_per_token=True, **_kw):
        return self._run(tokens)

    def run_with_hooks(self, tokens, return_type="both", fwd_hooks=(), loss_per_token=True, **_kw):
        (name, fn), = fwd_hooks
        assert name == self.hook
        return self._run(tokens, fn)


def documents(tokens, split, context, ce_tokens):
    """The stage's documents: whole documents of the split in store order, until ce_tokens predictions."""
    doc_id = tokens.column("doc_id").to_numpy()
    pos = tokens.column("pos").to_numpy()
    ids = tokens.column("token_id").to_numpy()
    splits = tokens.column("split").to_pylist()
    docs, counted, row = [], 0, 0
    while row < len(doc_id) and counted < ce_tokens:
        end = row
        while end < len(doc_id) and doc_id[end] == doc_id[row]:
            end += 1
        if splits[row] == split:
            assert pos[row] == 0 and (pos[row:end] == np.arange(end - row)).all(), "whole documents only"
            seq = ids[row:end][:context]
            if len(seq) >= 2:
                counted += len(seq) - 1
                docs.append(torch.tensor(seq.astype(np.int64))[None, :])
        row = end
    return docs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cache")
    p.add_argument("pipeline")
    p.add_argument("--gguf", required=True, help="the model the capture ran, as a GGUF file")
    p.add_argument("--instance", default="eval")
    args = p.parse_args()
    cache = Path(args.cache)
    ref = json.loads((cache / "refs" / args.pipeline / f"{args.instance}.json").read_text())
    obj = cache / "objects" / ref["key"]
    manifest = json.loads((obj / "manifest.json").read_text())
    params = manifest["params"]
    ours = json.loads((obj / "eval.json").read_text())
    capture = cache / "objects" / manifest["inputs"]["input"]
    info = json.loads((capture / "capture.json").read_text())
    if info["tokenizer"].get("bos") is not None:
        sys.exit("this comparison supports captures without BOS (SAELens zero-ablates BOS, saeflow does not)")
    sae = SAE.load_from_disk(str(cache / "objects" / manifest["inputs"]["sae"]), device="cpu")
    hook = ours["hook"]

    tokens = pq.read_table(capture / "tokens.parquet")
    in_split = np.array(tokens.column("split").to_pylist()) == params["split"]
    chunks = []
    for s, shard in enumerate(info["shards"]):
        col = pq.read_table(capture / f"acts-{hook}-{s:05d}.parquet").column("act").combine_chunks()
        chunks.append(np.frombuffer(col.buffers()[1], dtype="<f4").reshape(len(col), -1))
    acts = torch.from_numpy(np.concatenate(chunks)[in_split][: params.get("tokens") or None].copy())
    n = acts.shape[0]
    scaler = ActivationScaler()
    sparsity, features = get_sparsity_and_variance_metrics(
        sae,
        StoredActivations(hook, acts),
        Batches([torch.arange(n)[None, :]]),
        scaler,
        n_batches=1,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        eval_batch_size_prompts=1,
        model_kwargs={},
    )

    from transformers import AutoModelForCausalLM

    gguf = Path(args.gguf)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    docs = documents(tokens, params["split"], info["context"], params["ce_tokens"])
    with torch.no_grad():
        downstream = get_downstream_reconstruction_metrics(
            sae,
            HookedHF(model, hook),
            Batches(docs),
            scaler,
            compute_kl=True,
            compute_ce_loss=True,
            n_batches=len(docs),
            eval_batch_size_prompts=1,
            # A token that never occurs: SAELens then flattens per-token values across documents of
            # different lengths (and masks nothing).
            ignore_tokens=[-1],
        )

    theirs = dict(sparsity) | downstream
    rows = [
        ("reconstruction_quality", "mse"),
        ("reconstruction_quality", "explained_variance"),
        ("reconstruction_quality", "cossim"),
        ("shrinkage", "l2_norm_in"),
        ("shrinkage", "l2_norm_out"),
        ("shrinkage", "l2_ratio"),
        ("shrinkage", "relative_reconstruction_bias"),
        ("sparsity", "l0"),
        ("sparsity", "l1"),
        ("model_performance_preservation", "ce_loss_without_sae"),
        ("model_performance_preservation", "ce_loss_with_sae"),
        ("model_performance_preservation", "ce_loss_with_ablation"),
        ("model_performance_preservation", "ce_loss_score"),
        ("model_behavior_preservation", "kl_div_with_sae"),
        ("model_behavior_preservation", "kl_div_with_ablation"),
        ("model_behavior_preservation", "kl_div_score"),
    ]
    print(f"{n} stored vectors, {len(docs)} documents ({ours['token_stats']['ce_positions']} predictions)")
    print(f"| metric | saeflow | SAELens | difference |\n| --- | --- | --- | --- |")
    worst = 0.0
    for group, name in rows:
        a, b = ours[group][name], theirs[name]
        diff = abs(a - b) / max(1.0, abs(b))
        worst = max(worst, diff)
        print(f"| {name} | {a:.6f} | {b:.6f} | {diff:.1e} |")
    density = pq.read_table(obj / "features.parquet").column("density").to_numpy()
    d = np.abs(density - np.array(features["feature_density"])).max()
    worst = max(worst, d)
    print(f"| feature_density (max over {len(density)} features) | | | {d:.1e} |")
    print("largest difference:", f"{worst:.1e}")
    if worst > 1e-3:
        sys.exit("metrics differ by more than 1e-3")


if __name__ == "__main__":
    main()
