#!/usr/bin/env python3
"""The "Attention sinks" table of BENCHMARKS.md from a cache that ran pipelines/sinks.toml: per capture, the
sequence-start tokens left out, norms read back from the act shards (median, mean at position 0, max), the
share of the total squared norm held by tokens above 10x the median norm and by the top 0.5% of tokens
(capture.json's own `sinks` figure), and the FVU, L0 and dead fraction of the SAE trained and evaluated on it.

  python3 bench/sinks_report.py CACHE_DIR [PIPELINE_NAME]      # needs numpy and pyarrow
"""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def squared_norms(obj: Path) -> tuple[np.ndarray, np.ndarray]:
    info = json.loads((obj / "capture.json").read_text())
    (hook,) = info["hooks"]
    parts = []
    for f in sorted(obj.glob(f"acts-{hook}-*.parquet")):
        col = pq.read_table(f).column("act").combine_chunks()
        parts.append(np.frombuffer(col.buffers()[1], dtype="<f4").reshape(len(col), -1))
    x = np.concatenate(parts).astype(np.float64)
    pos = pq.read_table(obj / "tokens.parquet").column("pos").to_numpy()
    return (x**2).sum(1), pos


def main() -> None:
    cache = Path(sys.argv[1])
    pipeline = sys.argv[2] if len(sys.argv) > 2 else "sinks"
    refs = {p.stem: json.loads(p.read_text())["key"] for p in (cache / "refs" / pipeline).glob("*.json")}
    obj = lambda name: cache / "objects" / refs[name]
    print("| capture | tokens stored | sequence starts left out | norm outliers left out | median norm | mean norm at pos 0 | max norm "
          "| share of Σ‖x‖² above 10× median | top 0.5% share (capture.json) | SAE FVU (test) | L0 | dead |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    # Each capture and the eval of the SAE trained on it.
    evals = {n: "eval[acts." + n[len("acts["):] for n in refs if n.startswith("acts[")}
    evals["acts_cut"] = "eval_cut"
    for name in sorted(evals):
        info = json.loads((obj(name) / "capture.json").read_text())
        sinks = info["sinks"]
        ((_, share),) = sinks["top_half_percent_share"].items()
        n2, pos = squared_norms(obj(name))
        norms = np.sqrt(n2)
        median = np.median(norms)
        outlier = n2[norms > 10 * median].sum() / n2.sum()
        at0 = f"{norms[pos == 0].mean():,.0f}" if (pos == 0).any() else "– (left out)"
        ev = json.loads((obj(evals[name]) / "eval.json").read_text())
        print(
            f"| `{name}` | {info['tokens']:,} | {sinks['dropped_first']:,} | {sinks.get('dropped_norm', 0):,} | {median:,.0f} | {at0} | {norms.max():,.0f} "
            f"| {100 * outlier:.1f}% | {100 * share['after']:.1f}% | {ev['reconstruction_quality']['fvu']:.3f} "
            f"| {ev['sparsity']['l0']:.1f} | {ev['sparsity']['dead_fraction']:.3f} |"
        )


if __name__ == "__main__":
    main()
