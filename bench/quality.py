#!/usr/bin/env python3
"""SAE quality of saeflow against SAELens and EleutherAI sparsify: same activations, same token budget, each
peer trained the way its own library recommends, all three measured by the same code on the same held-out rows.

  python3 bench/quality.py CACHE_DIR [PIPELINE_NAME=quality] [--stage sae] [--val-rows 8192]

Needs torch, sae-lens 6.54.12, eai-sparsify 1.3.3, numpy and pyarrow (e.g. the venv of bench/train.sh), and a
cache that ran the pipeline (`cargo run --release -- run pipelines/quality.toml`). It reads the pipeline's
`train` object (stage `sae` by default: `refs/<pipeline>/<stage>.json` names its key, the object is
`CACHE/objects/<key>`) and the capture it was trained on, then

1. saeflow: takes the SAE that stage exported (SAELens layout: cfg.json + sae_weights.safetensors, the input
   scale folded in so it works in original units), and its training tokens/s from the stage's manifest;
2. trains a SAELens 6.54.12 TopK SAE (TopKTrainingSAE + SAETrainer.fit) and
3. an EleutherAI sparsify 1.3.3 TopK SparseCoder (the update recipe of sparsify.Trainer.fit, step by step),
   both on exactly train.json's `tokens` rows of the capture's `train` split (shuffled with numpy seed 0,
   wrapping around if the budget exceeds the rows) in batches of train.json's tokens/steps, with saeflow's
   d_in, d_sae and k, and everything else (optimizer, learning rate and schedule, input normalisation,
   AuxK / dead-latent rules, decoder-norm handling) at what each library documents or defaults to — the
   choices and their sources are commented in `train_saelens` and `train_sparsify` and printed in the JSON;
4. measures all three with SAELens' TopK `SAE.load_from_disk` encode/decode (peers are saved in that layout
   first; sparsify's own forward is checked to agree) on the first --val-rows rows of the capture's `val`
   split, in original units: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² (x̄ the mean of those rows), mean L0, and the
   fraction of latents that never fire on those rows ("dead on val").

Training tokens/s of the peers is the wall time of their training loop only (each batch is gathered from the
rows by index, ~1% of a step; norm estimation is outside), with torch.set_num_threads(2); saeflow's is its own `tokens_per_s` metric.

Output: one JSON object on stdout (per trainer: config, val_fvu, l0, dead_on_val, tokens_per_s,
train_seconds), then the Markdown table `| trainer | val FVU | L0 | dead on val | training tokens/s |`.
Library logs and progress bars go to stderr. Every figure in the quality table of BENCHMARKS.md ("SAE quality
against SAELens and sparsify") comes from this script.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

SAELENS_VERSION = "6.54.12"
SPARSIFY_VERSION = "1.3.3"


class Fail(Exception):
    """A problem with the cache or the environment, reported as one line (no traceback)."""


# ----------------------------------------------------------------------------------------------- the cache


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise Fail(f"{what}: {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise Fail(f"{what}: cannot read {path}: {e}") from None


def find_objects(cache: Path, pipeline: str, stage: str) -> tuple[Path, Path]:
    """The pipeline's SAE object (a `train` stage) and the capture object it was trained on."""
    if not cache.is_dir():
        raise Fail(f"{cache} is not a directory (give the saeflow cache, e.g. `cache`)")
    refs = cache / "refs" / pipeline
    if not refs.is_dir():
        raise Fail(f"{cache} has no runs of pipeline `{pipeline}` (no {refs}); run "
                   f"`cargo run --release -- run pipelines/{pipeline}.toml` first")
    ref = refs / f"{stage}.json"
    if not ref.exists():
        have = ", ".join(sorted(p.stem for p in refs.glob("*.json"))) or "none"
        raise Fail(f"pipeline `{pipeline}` has no finished stage `{stage}` in {cache} (finished: {have})")
    key = read_json(ref, f"ref of `{stage}`").get("key")
    sae = cache / "objects" / str(key)
    if not key or not sae.is_dir():
        raise Fail(f"stage `{stage}` of `{pipeline}` points at object {key!r}, which {cache / 'objects'} lacks "
                   "(garbage-collected? rerun the pipeline)")
    manifest = read_json(sae / "manifest.json", f"object of `{stage}`")
    if manifest.get("kind") != "train":
        raise Fail(f"stage `{stage}` is a `{manifest.get('kind')}` stage, not `train`")
    for f in ("cfg.json", "sae_weights.safetensors", "train.json"):
        if not (sae / f).exists():
            raise Fail(f"SAE object {sae} lacks {f}")
    captures = [cache / "objects" / k for k in manifest.get("inputs", {}).values()]
    captures = [c for c in captures if (c / "capture.json").exists()]
    if not captures:
        raise Fail(f"the capture that `{stage}` was trained on ({manifest.get('inputs')}) is not in {cache / 'objects'}")
    return sae, captures[0]


def read_acts(capture: Path, hook: str):
    import numpy as np
    import pyarrow.parquet as pq

    info = read_json(capture / "capture.json", "capture")
    if hook not in info.get("hooks", []):
        raise Fail(f"capture {capture} has no hook {hook} (hooks: {info.get('hooks')})")
    dtype, d = info.get("dtype"), info.get("d_model")
    parts = []
    for i, shard in enumerate(info["shards"]):
        path = capture / f"acts-{hook}-{i:05d}.parquet"
        if not path.exists():
            raise Fail(f"capture {capture} lacks {path.name}")
        col = pq.read_table(path, columns=["act"]).column("act").combine_chunks()
        buf = col.buffers()[1]
        if dtype == "f32":
            a = np.frombuffer(buf, dtype="<f4", count=len(col) * d)
        elif dtype == "f16":
            a = np.frombuffer(buf, dtype="<f2", count=len(col) * d).astype(np.float32)
        elif dtype == "bf16":
            a = (np.frombuffer(buf, dtype="<u2", count=len(col) * d).astype(np.uint32) << 16).view(np.float32)
        else:
            raise Fail(f"capture {capture}: unknown dtype {dtype!r}")
        if len(col) != shard["rows"]:
            raise Fail(f"{path.name} has {len(col)} rows, capture.json says {shard['rows']}")
        parts.append(a.reshape(len(col), d))
    x = np.concatenate(parts)
    split = pq.read_table(capture / "tokens.parquet", columns=["split"]).column("split").to_numpy(zero_copy_only=False)
    if len(split) != len(x):
        raise Fail(f"capture {capture}: tokens.parquet has {len(split)} rows, the act shards {len(x)}")
    return x, split.astype(str)


class TrainingStream:
    """`tokens` training rows: a numpy-seed-0 permutation of the rows, followed by further permutations if the
    budget exceeds them. Only the order is held (the rows themselves would be tokens × d_in floats, 11 GB for
    pipelines/quality.toml's budget); each batch is gathered when asked for, ~1% of a step's time."""

    def __init__(self, train_x, tokens: int, seed: int = 0):
        import numpy as np

        rng = np.random.default_rng(seed)
        order, left = [], tokens
        while left > 0:
            p = rng.permutation(len(train_x))[:left]
            order.append(p)
            left -= len(p)
        self.rows, self.order = train_x, np.concatenate(order)

    def __len__(self) -> int:
        return len(self.order)


def batches(stream: TrainingStream, batch: int, cycle: bool = False):
    import torch

    while True:
        for i in range(len(stream) // batch):
            yield torch.from_numpy(stream.rows[stream.order[i * batch:(i + 1) * batch]])
        if not cycle:
            return


# ------------------------------------------------------------------------------------------------ measuring


def measure(sae_dir: Path, val) -> dict:
    """FVU, mean L0 and the never-firing fraction of an SAE in SAELens' layout, through SAELens' own
    `SAE.load_from_disk` encode/decode, on `val` in original units (every SAE measured here works in original
    units: saeflow folds its input scale into the export, SAELens' trainer folds its normalisation into the
    weights at the end of `fit`, sparsify trains on raw activations)."""
    import numpy as np
    import torch
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    x_all = torch.from_numpy(val)
    mean = x_all.double().mean(0)
    err = var = 0.0
    l0 = 0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for i in range(0, len(val), 2048):
            x = x_all[i:i + 2048]
            a = sae.encode(x)
            x_hat = sae.decode(a)
            err += float((x_hat.double() - x.double()).pow(2).sum())
            var += float((x.double() - mean).pow(2).sum())
            on = a > 0
            l0 += int(on.sum())
            fired |= on.any(0)
    return {"val_fvu": err / var, "l0": l0 / len(val), "dead_on_val": float((~fired).float().mean()),
            "architecture": sae.cfg.architecture(), "d_sae": int(sae.cfg.d_sae)}


# -------------------------------------------------------------------------------------------------- SAELens


def train_saelens(stream, d_in: int, d_sae: int, k: int, batch: int, out: Path) -> dict:
    import torch
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps = len(stream) // batch
    torch.manual_seed(42)  # fixed init (42: LanguageModelSAERunnerConfig.seed's default value)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=d_sae, k=k, device="cpu", dtype="float32",
        # docs/training_saes.md ("Basic training setup", and its tutorial training_a_sparse_autoencoder.ipynb)
        # trains with normalize_activations="expected_average_only_in" (Anthropic's April 2024 update: scale
        # inputs so E‖x‖ = √d_in, estimated from the data); its "Training Topk SAEs" section adds only the
        # TopK-specific fields. TopK's AuxK is written for it (topk_sae.py raises for constant_norm_rescale /
        # layer_norm), and SAETrainer.fit folds the factor into the weights at the end, so the saved SAE
        # takes raw activations.
        normalize_activations="expected_average_only_in",
        # Left at TopKTrainingSAEConfig's defaults (sae_lens/saes/topk_sae.py), which its docstring motivates:
        #   aux_loss_coefficient=1.0 — AuxK: the top d_in/2 dead latents reconstruct the residual;
        #   rescale_acts_by_decoder_norm=True — "a good idea since decoder norm can randomly drift";
        #   decoder_init_norm=0.1 (TrainingSAEConfig: Anthropic's "heuristic" init), apply_b_dec_to_input=True.
    )
    sae = TopKTrainingSAE(sae_cfg)
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch,
        train_batch_size_samples=batch,
        # LanguageModelSAERunnerConfig defaults (sae_lens/config.py); the docs' TopK section sets nothing else,
        # and the tutorial's lr=5e-5 is tuned for its L1 SAE ("lower the better" for l1_coefficient 5).
        lr=3e-4, adam_beta1=0.9, adam_beta2=0.999, lr_scheduler_name="constant", lr_warm_up_steps=0,
        lr_end=3e-4 / 10,  # runner __post_init__: lr_end = lr / 10 (start of the final linear decay)
        # docs/training_saes.md basic setup and the tutorial: `lr_decay_steps = total_training_steps // 5`
        # ("20% of training"; the JumpReLU section attributes the final-20% decay to Anthropic).
        lr_decay_steps=steps // 5,
        # Runner defaults: a latent is dead (AuxK pool) after 1000 steps without firing; sparsity stats reset
        # every 2000 steps. (With fewer than 1000 steps AuxK therefore never switches on — as in SAELens.)
        dead_feature_window=1000, feature_sampling_window=2000, n_batches_for_norm_estimate=1000,
        device="cpu", autocast=False,
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(stream, batch))
    # SAETrainer.fit estimates the scale from n_batches_for_norm_estimate batches of its data provider; do
    # that with SAELens' own code on the same rows (cycled), before the clock starts, so `fit` skips it.
    trainer.activation_scaler.estimate_scaling_factor(
        d_in=d_in, data_provider=batches(stream, batch, cycle=True),
        n_batches_for_norm_estimate=cfg.n_batches_for_norm_estimate)
    scale = trainer.activation_scaler.scaling_factor
    normalisation = sae_cfg.normalize_activations  # `fit` resets it to "none" once the scale is folded in
    started = time.perf_counter()
    trainer.fit()  # trains total_training_samples, then folds the scale into W_enc / W_dec / b_dec
    secs = time.perf_counter() - started
    dead_own = int(trainer.dead_neurons.sum())
    sae.save_inference_model(str(out))  # SAELens' inference layout (folds decoder norms into the encoder)
    return {
        "config": {
            "library": f"sae-lens {__import__('sae_lens').__version__}",
            "sae": "TopKTrainingSAE",
            "d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch, "steps": steps, "tokens": steps * batch,
            "normalize_activations": normalisation, "input_scale": scale,
            "aux_loss_coefficient": sae_cfg.aux_loss_coefficient,
            "rescale_acts_by_decoder_norm": sae_cfg.rescale_acts_by_decoder_norm,
            "decoder_init_norm": sae_cfg.decoder_init_norm, "apply_b_dec_to_input": sae_cfg.apply_b_dec_to_input,
            "optimizer": f"Adam(betas=({cfg.adam_beta1}, {cfg.adam_beta2})), grad-norm clip 1.0",
            "lr": cfg.lr, "lr_scheduler": cfg.lr_scheduler_name, "lr_warm_up_steps": cfg.lr_warm_up_steps,
            "lr_decay_steps": cfg.lr_decay_steps, "lr_end": cfg.lr_end,
            "dead_feature_window_steps": cfg.dead_feature_window,
            "feature_sampling_window_steps": cfg.feature_sampling_window,
            "auxk_can_switch_on": steps > cfg.dead_feature_window,
            "seed": 42,
        },
        "dead_at_end_by_own_rule": dead_own / d_sae,
        "train_seconds": secs,
    }


# ------------------------------------------------------------------------------------------------- sparsify


def train_sparsify(stream, d_in: int, d_sae: int, k: int, batch: int, out: Path) -> dict:
    import torch
    from schedulefree import ScheduleFreeWrapper
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.config import TrainConfig
    from sparsify.sign_sgd import SignSGD

    steps = len(stream) // batch
    # sparsify's README trains with `TrainConfig(SaeConfig(), batch_size=16)`: every option at its default
    # (sparsify/config.py), with expansion and k set to saeflow's here.
    tc = TrainConfig(SparseCoderConfig(num_latents=d_sae, k=k))
    assert tc.optimizer == "signum" and tc.loss_fn == "fvu" and tc.k_decay_steps == 0 and tc.sae.activation == "topk"
    assert tc.grad_acc_steps == 1 and tc.micro_acc_steps == 1 and not tc.sae.multi_topk and not tc.sae.skip_connection
    torch.manual_seed(tc.init_seeds[0])  # Trainer.__init__: torch.manual_seed(seed) before each SparseCoder
    sae = SparseCoder(d_in, tc.sae, device="cpu", dtype=torch.float32)
    # Trainer.__init__, case "signum" (the default optimizer): ScheduleFreeWrapper(SignSGD, momentum=0.95),
    # lr = 5e-3 / sqrt(num_latents / 2**14), no scheduler (lr_warmup_steps is "only used if optimizer is adam";
    # the 2e-4 / sqrt(num_latents / 2**14) rule is the "adam" branch, not the default).
    lr = tc.lr or 5e-3 / (sae.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    started = time.perf_counter()
    # One pass of Trainer.fit's hook + step (loss_fn "fvu", no grad accumulation), per batch of activations.
    for step, x in enumerate(batches(stream, batch)):
        if step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)  # "Ensure the preactivations are centered at initialization"
        if tc.sae.normalize_decoder:
            sae.set_decoder_norm_to_unit_norm()
        # auxk_alpha defaults to 0.0, so there is no dead mask and no AuxK term; a latent counts as dead after
        # dead_feature_threshold = 10M tokens without firing (only used for AuxK and logging).
        dead_mask = since_fired > tc.dead_feature_threshold if tc.auxk_alpha > 0 else None
        total_variance = (x - x.mean(0)).pow(2).sum()
        o = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[o.latent_indices.flatten()] = True
        (o.fvu + tc.auxk_alpha * o.auxk_loss + o.multi_topk_fvu / 8).backward()
        if tc.sae.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            since_fired += len(x)
            since_fired[did_fire] = 0
            did_fire.zero_()
    secs = time.perf_counter() - started
    opt.eval()  # Trainer._checkpoint: switch the schedule-free optimizer to its averaged weights before saving
    # The same weights in SAELens' TopK layout (sparsify: relu then top-k; SAELens: top-k then relu — the same
    # latents), so that `measure` reads all three SAEs with one code path.
    lens = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=True,
                                 rescale_acts_by_decoder_norm=False, normalize_activations="none"))
    with torch.no_grad():
        lens.W_enc.copy_(sae.encoder.weight.T)
        lens.b_enc.copy_(sae.encoder.bias)
        lens.W_dec.copy_(sae.W_dec)
        lens.b_dec.copy_(sae.b_dec)
    lens.save_model(str(out))
    return {
        "config": {
            "library": f"eai-sparsify {_version('eai-sparsify')}",
            "sae": "SparseCoder (eager embedding_bag decoder)" if not torch.cuda.is_available() else "SparseCoder",
            "d_in": d_in, "d_sae": d_sae, "k": k, "batch": batch, "steps": steps, "tokens": steps * batch,
            "input_normalisation": "none (raw activations; the loss is the batch FVU)",
            "loss_fn": tc.loss_fn, "normalize_decoder": tc.sae.normalize_decoder,
            "optimizer": "ScheduleFreeWrapper(SignSGD, momentum=0.95) (TrainConfig.optimizer='signum')",
            "lr": lr, "lr_rule": "5e-3 / sqrt(num_latents / 2**14)", "lr_schedule": "none (schedule-free)",
            "b_dec_init": "mean of the first batch", "auxk_alpha": tc.auxk_alpha,
            "dead_feature_threshold_tokens": tc.dead_feature_threshold, "k_decay_steps": tc.k_decay_steps,
            "seed": tc.init_seeds[0],
        },
        "dead_at_end_by_own_rule": float((since_fired > tc.dead_feature_threshold).float().mean()),
        "train_seconds": secs,
        "_sae": sae,
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache")
    p.add_argument("pipeline", nargs="?", default="quality")
    p.add_argument("--stage", default="sae", help="the pipeline's train stage (default: sae)")
    p.add_argument("--val-rows", type=int, default=8192)
    args = p.parse_args()

    sae_dir, capture = find_objects(Path(args.cache), args.pipeline, args.stage)
    train = read_json(sae_dir / "train.json", "train.json")
    cfg = read_json(sae_dir / "cfg.json", "SAE cfg.json")
    manifest = read_json(sae_dir / "manifest.json", "manifest")
    if cfg.get("architecture") != "topk":
        raise Fail(f"stage `{args.stage}` trained a `{cfg.get('architecture')}` SAE; this comparison is for TopK")
    try:
        hook, d_in, d_sae, k = train["hook"], int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
        tokens, steps = int(train["tokens"]), int(train["steps"])
    except (KeyError, TypeError, ValueError) as e:
        raise Fail(f"{sae_dir}: train.json / cfg.json lack {e}") from None
    if (train.get("d_sae"), train.get("k")) != (d_sae, k):
        raise Fail(f"{sae_dir}: train.json (d_sae {train.get('d_sae')}, k {train.get('k')}) disagrees with cfg.json")
    batch = tokens // steps

    try:
        import numpy as np  # noqa: F401
        import pyarrow  # noqa: F401
        with contextlib.redirect_stdout(sys.stderr):
            import torch
            if not torch.cuda.is_available():
                # sparsify picks its Triton decoder whenever triton imports; Triton has no CPU driver.
                os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
            import sae_lens
            import sparsify  # noqa: F401
    except ImportError as e:
        raise Fail(f"{e}; install torch, sae-lens=={SAELENS_VERSION}, eai-sparsify=={SPARSIFY_VERSION}, "
                   "numpy and pyarrow (see bench/train.sh)") from None
    for name, have, want in [("sae-lens", sae_lens.__version__, SAELENS_VERSION),
                             ("eai-sparsify", _version("eai-sparsify"), SPARSIFY_VERSION)]:
        if have != want:
            print(f"warning: {name} {have} installed, the benchmark pins {want}", file=sys.stderr)
    torch.set_num_threads(2)

    x, split = read_acts(capture, hook)
    if x.shape[1] != d_in:
        raise Fail(f"capture rows have width {x.shape[1]}, the SAE's d_in is {d_in}")
    train_x, val = x[split == "train"], np.ascontiguousarray(x[split == "val"][: args.val_rows])
    del x
    if len(train_x) == 0:
        raise Fail(f"capture {capture} has no `train` rows")
    if len(val) == 0:
        raise Fail(f"capture {capture} has no `val` rows to measure on (splits: {sorted(set(split.tolist()))})")
    stream = TrainingStream(train_x, steps * batch)
    print(f"{hook}: d_in {d_in}, d_sae {d_sae}, k {k}; {steps} steps of {batch} tokens from {len(train_x):,} "
          f"train rows; measuring on {len(val):,} val rows", file=sys.stderr)

    metrics = manifest.get("metrics", {})
    rate = metrics.get("tokens_per_s", train.get("tokens_per_s"))
    saeflow = {
        "config": {"library": f"saeflow {manifest.get('saeflow_version', '?')}", "object": sae_dir.name,
                   "params": manifest.get("params"), "lr": train.get("lr"), "input_scale": train.get("input_scale"),
                   "steps": steps, "batch": batch, "tokens": tokens},
        **measure(sae_dir, val),
        "tokens_per_s": rate,  # the train stage's own figure (manifest metrics; absent if restored from a checkpoint)
        "train_seconds": tokens / rate if rate else None,
        "dead_at_end_by_own_rule": train.get("dead_fraction"),
    }
    results = {"saeflow": saeflow}
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        lens = train_saelens(stream, d_in, d_sae, k, batch, Path(tmp) / "saelens")
        results["saelens"] = {**lens, **measure(Path(tmp) / "saelens", val)}
        sp = train_sparsify(stream, d_in, d_sae, k, batch, Path(tmp) / "sparsify")
        results["sparsify"] = {**sp, **measure(Path(tmp) / "sparsify", val)}
        own = sp.pop("_sae")
        results["sparsify"].pop("_sae")
        with torch.no_grad():  # sparsify's own encode/decode on the same rows must give the same FVU
            v = torch.from_numpy(val)
            out = torch.cat([own(v[i:i + 2048]).sae_out for i in range(0, len(v), 2048)]).double()
            own_fvu = float((out - v.double()).pow(2).sum() / (v.double() - v.double().mean(0)).pow(2).sum())
        results["sparsify"]["val_fvu_own_forward"] = own_fvu
        if not math.isclose(own_fvu, results["sparsify"]["val_fvu"], rel_tol=1e-3, abs_tol=1e-6):
            raise Fail(f"sparsify's own forward gives FVU {own_fvu}, its SAELens export {results['sparsify']['val_fvu']}")
    for name in ("saelens", "sparsify"):
        r = results[name]
        r["tokens_per_s"] = r["config"]["tokens"] / r["train_seconds"]

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown CPU")
    report = {"cpu": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "hook": hook, "d_in": d_in, "d_sae": d_sae, "k": k, "steps": steps, "batch": batch, "tokens": steps * batch,
              "train_rows": len(train_x), "val_rows": len(val), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "capture": capture.name, **results}
    print(json.dumps(report, indent=1, default=float))
    print()
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {report['date']}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| trainer | val FVU | L0 | dead on val | training tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    labels = {"saeflow": "saeflow", "saelens": f"SAELens {sae_lens.__version__}",
              "sparsify": f"sparsify {_version('eai-sparsify')}"}
    for name, label in labels.items():
        r = results[name]
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "–"
        print(f"| {label} | {r['val_fvu']:.4f} | {r['l0']:.1f} | {100 * r['dead_on_val']:.1f}% | {tps} |")


if __name__ == "__main__":
    try:
        main()
    except Fail as e:
        sys.exit(f"quality.py: {e}")
