#!/usr/bin/env python3
"""SAE quality against SAELens' own trainer on the same activations and hyperparameters.

Trains a SAELens TopK SAE (TopKTrainingSAE + SAETrainer.step, sae-lens 6.x) on the training split of a saeflow
capture — inputs scaled by √d_in / mean norm, as saeflow does, one pass, same batch size, learning rate,
warm-up and final decay — then evaluates it and the SAE saeflow exported (loaded with SAELens'
`SAE.load_from_disk`) with the same code on the same held-out rows: FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖², L0, and the
fraction of latents that never fire on those rows.

  python bench/quality_saelens.py CAPTURE_DIR SAEFLOW_SAE_DIR [--val-rows 8192]
(hyperparameters are read from the saeflow SAE's train.json and cfg.json)
"""
import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch


def acts(capture: Path, hook: str) -> np.ndarray:
    info = json.loads((capture / "capture.json").read_text())
    assert info["dtype"] == "f32", "use an f32 capture"
    parts = []
    for i in range(len(info["shards"])):
        col = pq.read_table(capture / f"acts-{hook}-{i:05d}.parquet").column("act").combine_chunks()
        parts.append(np.frombuffer(col.buffers()[1], dtype="<f4").reshape(len(col), -1))
    return np.concatenate(parts)


def evaluate(encode, decode, x: torch.Tensor) -> dict:
    with torch.no_grad():
        a = encode(x)
        x_hat = decode(a)
    fvu = float(((x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    return {"val_fvu": round(fvu, 4), "l0": round(float((a > 0).sum(-1).float().mean()), 2),
            "never_fired_on_val": round(float(((a > 0).sum(0) == 0).float().mean()), 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("capture")
    p.add_argument("saeflow_sae")
    p.add_argument("--val-rows", type=int, default=8192)
    args = p.parse_args()
    capture, ours_dir = Path(args.capture), Path(args.saeflow_sae)
    train = json.loads((ours_dir / "train.json").read_text())
    hook, k, d_in, d_sae = train["hook"], train["k"], train["d_in"], train["d_sae"]
    steps, lr, scale = train["steps"], train["lr"], train["input_scale"]
    batch = train["tokens"] // steps
    x = acts(capture, hook)
    split = np.array(pq.read_table(capture / "tokens.parquet", columns=["split"]).column("split").to_pylist())
    train_x, val_x = x[split == "train"], x[split == "val"][: args.val_rows]
    torch.set_num_threads(2)

    from sae_lens import SAE
    ours = SAE.load_from_disk(str(ours_dir), device="cpu")
    ours_eval = evaluate(ours.encode, ours.decode, torch.from_numpy(val_x.copy()))

    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device="cpu"))
    warmup = min(1000, steps // 10)
    cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr / 10,
        lr_warm_up_steps=warmup, lr_decay_steps=round(0.2 * steps), device="cpu",
    )
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train_x))
    started = time.time()
    for s in range(steps):
        idx = order[(s * batch) % len(order):][:batch]
        if len(idx) < batch:
            order = rng.permutation(len(train_x))
            idx = order[:batch]
        trainer.step(torch.from_numpy(train_x[idx] * scale))
        trainer.n_training_steps += 1
    secs = time.time() - started
    theirs_eval = evaluate(sae.encode, sae.decode, torch.from_numpy(val_x * scale))
    print(json.dumps({"hook": hook, "d_in": d_in, "d_sae": d_sae, "k": k, "steps": steps, "batch": batch, "lr": lr,
                      "train_rows": len(train_x), "val_rows": len(val_x),
                      "saeflow": ours_eval,
                      "saelens": {**theirs_eval, "tokens_per_s": round(steps * batch / secs)}}, indent=1))


if __name__ == "__main__":
    main()
