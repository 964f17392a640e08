#!/usr/bin/env python3
"""The "Controls" tables of BENCHMARKS.md from a cache that ran pipelines/controls.toml: per layer, the cities
truth probes (DiffMean, logistic) with 95% intervals beside the lexical and shuffled-label baselines; the RepE
instructed pairs; and the negative control (labels shuffled within source and split) next to the same units
with their real labels: features labelled by Benjamini–Hochberg against alpha × tests, and every method's
interval.

  python3 bench/controls_report.py CACHE_DIR [PIPELINE_NAME]      # needs pyarrow
"""
import json
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq


def evaluation(obj: Path) -> dict:
    """(class, method) -> row of the pooled scope."""
    t = pq.read_table(obj / "evaluation.parquet").to_pylist()
    return {(r["class"], r["method"]): r for r in t if r["scope"] == "pooled"}


def cell(r: dict | None) -> str:
    if r is None or r["auroc"] is None:
        return "–"
    return f"{r['auroc']:.3f} [{r['auroc_low']:.3f}, {r['auroc_high']:.3f}]"


def main() -> None:
    cache = Path(sys.argv[1])
    pipeline = sys.argv[2] if len(sys.argv) > 2 else "controls"
    refs = {p.stem: json.loads(p.read_text())["key"] for p in (cache / "refs" / pipeline).glob("*.json")}
    obj = lambda name: cache / "objects" / refs[name]

    print("Positive control: `cities` (true vs false), last token, test split; class `true` against `false`.\n")
    methods = ["diffmean", "logistic", "lexical", "shuffled_diffmean", "shuffled_logistic"]
    print("| layer | test statements (true / false) | " + " | ".join(methods) + " | DiffMean within pairs |")
    print("| --- | --- | " + " | ".join("---" for _ in methods) + " | --- |")
    layers = sorted(
        (int(re.search(r"blocks\.(\d+)\.", n).group(1)), n) for n in refs if n.startswith("truth[")
    )
    for layer, name in layers:
        e = evaluation(obj(name))
        d = e[("true", "diffmean")]
        print(
            f"| {layer} | {d['n_pos']} / {d['n_neg']} | "
            + " | ".join(cell(e.get(("true", m))) for m in methods)
            + f" | {d['within_pair_auroc']:.3f} |"
        )

    print("\nPlumbing check: RepE instructed pairs (identical completions after an honest or untruthful "
          "instruction), layer 15, mean over completion tokens; `deceptive` against `honest`.\n")
    e = evaluation(obj("instructed"))
    methods = ["diffmean", "logistic", "lexical", "source_only", "shuffled_diffmean", "shuffled_logistic"]
    print("| test documents (deceptive / honest) | " + " | ".join(methods) + " | DiffMean within pairs |")
    print("| --- | " + " | ".join("---" for _ in methods) + " | --- |")
    d = e[("deceptive", "diffmean")]
    print(f"| {d['n_pos']} / {d['n_neg']} | " + " | ".join(cell(e.get(("deceptive", m))) for m in methods)
          + f" | {d['within_pair_auroc']:.3f} |")

    print("\nNegative control: the `cities` units, layer 15, SAE trained on TruthfulQA text; real labels vs "
          "labels shuffled within source and split (`shuffle_labels`). Class `true`.\n")
    methods = ["best_feature", "sparse_probe_k1", "sparse_probe_k5", "sparse_probe_k20", "diffmean", "logistic"]
    print("| labels | features labelled (BH, α = 0.01) | α × tests | " + " | ".join(methods) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |")
    for name, what in [("cities_features", "real"), ("shuffled", "shuffled")]:
        summary = json.loads((obj(name) / "label.json").read_text())
        e = evaluation(obj(name))
        print(
            f"| {what} | {summary['labelled']} | {summary['alpha'] * summary['tests']:.0f} | "
            + " | ".join(cell(e.get(("true", m))) for m in methods)
            + " |"
        )


if __name__ == "__main__":
    main()
