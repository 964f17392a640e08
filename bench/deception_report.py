#!/usr/bin/env python3
"""The "Deception" tables of BENCHMARKS.md from a cache that ran pipelines/deception.toml: per source and pooled,
every method's held-out AUROC with its 95% interval (documents, mean over completion tokens; chosen on
validation, reported on test), the within-pair AUROC where a source has pairs, the train-on-A/test-on-B matrix
of the logistic probe, the shuffled-label null (features labelled by BH against alpha x tests), and the
steering effects (probe probability of the generations and KL on neutral text, with intervals) of each target
against random directions of the same size.

  python3 bench/deception_report.py CACHE_DIR [PIPELINE_NAME]      # needs pyarrow
"""
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

METHODS = [
    "best_feature", "sparse_probe_k1", "sparse_probe_k5", "sparse_probe_k20", "diffmean", "logistic",
    "source_only", "lexical", "shuffled_diffmean", "shuffled_logistic",
]


def cell(r: dict | None) -> str:
    if r is None or r["auroc"] is None:
        return "–"
    return f"{r['auroc']:.2f} [{r['auroc_low']:.2f}, {r['auroc_high']:.2f}]"


def scope_table(by: dict, scopes: list[str]) -> None:
    """One row per scope: test documents, every method's AUROC [95% interval], the probe within pairs."""
    print("| scope | test docs (dec. / hon.) | " + " | ".join(METHODS) + " | logistic within pairs |")
    print("| --- | --- | " + " | ".join("---" for _ in METHODS) + " | --- |")
    for scope in scopes:
        d = by[(scope, "diffmean")]
        pair = by[(scope, "logistic")]["within_pair_auroc"]
        print(f"| {scope.removeprefix('source:')} | {d['n_pos']} / {d['n_neg']} | "
              + " | ".join(cell(by.get((scope, m))) for m in METHODS)
              + f" | {'–' if pair is None else f'{pair:.2f}'} |")


def main() -> None:
    cache = Path(sys.argv[1])
    pipeline = sys.argv[2] if len(sys.argv) > 2 else "deception"
    refs = {p.stem: json.loads(p.read_text())["key"] for p in (cache / "refs" / pipeline).glob("*.json")}
    obj = lambda name: cache / "objects" / refs[name]

    rows = pq.read_table(obj("deceptive") / "evaluation.parquet").to_pylist()
    summary = json.loads((obj("deceptive") / "label.json").read_text())
    by = {(r["scope"], r["method"]): r for r in rows}
    scopes = ["pooled"] + sorted({r["scope"] for r in rows if r["scope"].startswith("source:")})
    print(f"`deceptive` against `honest`; {summary['units']} documents (pool = {summary['pool']}, positions = "
          f"{summary['positions']}); {summary['labelled']} of {summary['tests']} features labelled (BH, alpha = "
          f"{summary['alpha']}); best feature chosen on `{summary['val_split']}`.\n")
    scope_table(by, scopes)

    matrix = [r for r in rows if r["scope"].startswith("train:") and r["method"] == "logistic"]
    sources = sorted({r["scope"].split("/source:")[1] for r in matrix})
    trained = sorted({r["scope"].split("/")[0].removeprefix("train:") for r in matrix})
    cells = {tuple(r["scope"].removeprefix("train:").split("/source:")): r for r in matrix}
    print("\nThe logistic probe trained on one source (rows) and tested on each (columns), AUROC [95% interval]:\n")
    print("| trained on \\ tested on | " + " | ".join(sources) + " |")
    print("| --- | " + " | ".join("---" for _ in sources) + " |")
    for a in trained:
        print(f"| {a} | " + " | ".join(cell(cells.get((a, b))) for b in sources) + " |")

    null = json.loads((obj("shuffled") / "label.json").read_text())
    nrows = {r["method"]: r for r in pq.read_table(obj("shuffled") / "evaluation.parquet").to_pylist()
             if r["scope"] == "pooled"}
    print(f"\nNull (labels shuffled within source and split): {null['labelled']} features labelled, alpha x tests = "
          f"{null['alpha'] * null['tests']:.0f}; pooled: "
          + "; ".join(f"{m} {cell(nrows.get(m))}" for m in ["sparse_probe_k20", "diffmean", "logistic"]))

    if "steer" not in refs:
        return
    steer = json.loads((obj("steer") / "steer.json").read_text())
    effects = pq.read_table(obj("steer") / "effects.parquet").to_pylist()
    print(f"\nSteering at {steer['hook']}: strength 1 = an added vector of norm {steer['residual_norm']:.1f} (the "
          f"median residual norm of the prompts' tokens); {steer['prompts']} test prompts, probe class "
          f"`{steer['probe_class']}`.\n")
    print("| target | strength | probe probability of the generation [95% interval over prompts] "
          "| DiffMean score | KL on neutral text [95% interval over texts] |")
    print("| --- | --- | --- | --- | --- |")
    f = lambda r, k, n=3: "–" if r[k] is None else f"{r[k]:.{n}f} [{r[k + '_low']:.{n}f}, {r[k + '_high']:.{n}f}]"
    for r in effects:
        print(f"| {r['target']} | {r['strength']:+.2f} | {f(r, 'probe_probability')} | {f(r, 'diffmean_score', 2)} "
              f"| {f(r, 'kl_neutral')} |")


if __name__ == "__main__":
    main()
