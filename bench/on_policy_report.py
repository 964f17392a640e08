#!/usr/bin/env python3
"""The "On-policy deception" tables of BENCHMARKS.md from a cache that ran pipelines/on-policy.toml: how many
questions pass the knowledge filter, how often the model complies with each instruction (95% intervals over
questions), then every method's held-out AUROC with its 95% interval on the model's own graded answers —
fitted and chosen on RepE's instructed pairs — pooled and per instruction, beside the source-only (knowing
the instruction alone), lexical and shuffled-label baselines and the shuffled-label stage (a null).

  python3 bench/on_policy_report.py CACHE_DIR [PIPELINE_NAME]      # needs pyarrow
"""
import json
import random
import sys
from pathlib import Path

import pyarrow.parquet as pq

# The per-scope AUROC table, printed as the deception tables print it.
from deception_report import scope_table


def rate(r: dict | None) -> str:
    if r is None:
        return "–"
    return f"{100 * r['rate']:.0f}% [{100 * r['low']:.0f}, {100 * r['high']:.0f}]"


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """Mann-Whitney AUROC, ties counted half."""
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def instruction_only(rows: list[dict]) -> str:
    """The AUROC of knowing the instruction alone (score 1 under the lie instruction) on the kept answers, with
    a 95% percentile-bootstrap interval over questions (a question's answers are resampled together)."""
    rows = [r for r in rows if r["label"] in ("deceptive", "honest")]
    score = lambda r: 1.0 if r["instruction"] == "lie" else 0.0
    estimate = auroc([score(r) for r in rows], [r["label"] == "deceptive" for r in rows])
    by_pair: dict = {}
    for r in rows:
        by_pair.setdefault(r["pair_id"], []).append(r)
    pairs = list(by_pair.values())
    rng = random.Random(0)
    stats = []
    for _ in range(1000):
        drawn = [r for _ in pairs for r in rng.choice(pairs)]
        a = auroc([score(r) for r in drawn], [r["label"] == "deceptive" for r in drawn])
        if a is not None:
            stats.append(a)
    stats.sort()
    low, high = stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1]
    return f"{estimate:.2f} [{low:.2f}, {high:.2f}]"


def table(obj: Path, title: str) -> None:
    rows = pq.read_table(obj / "evaluation.parquet").to_pylist()
    summary = json.loads((obj / "label.json").read_text())
    by = {(r["scope"], r["method"]): r for r in rows}
    scopes = ["pooled"] + sorted({r["scope"] for r in rows if r["scope"].startswith("source:")})
    print(f"{title}: `deceptive` against `honest`, {summary['units']} documents (pool = {summary['pool']}, "
          f"positions = {summary['positions']}); fitted on `{summary['fit_split']}`, chosen on "
          f"`{summary['val_split']}` (instructed pairs), reported on `{summary['test_split']}` (the answers).\n")
    scope_table(by, scopes)
    print()


def main() -> None:
    cache = Path(sys.argv[1])
    pipeline = sys.argv[2] if len(sys.argv) > 2 else "on-policy"
    refs = {p.stem: json.loads(p.read_text())["key"] for p in (cache / "refs" / pipeline).glob("*.json")}
    obj = lambda name: cache / "objects" / refs[name]

    answers = json.loads((obj("answers") / "summary.json").read_text())
    known = answers["knowledge_filter"]
    print(f"{answers['questions']} questions, {answers['answers']} answers; knowledge filter: {known['passed']} of "
          f"{known['of']} questions answered correctly when told the truth ({rate(known['known'])}); "
          f"{answers['problems']} answers with a grading problem.\n")
    print("| instruction | wants | grades | complied on known questions [95% CI] | labels kept |")
    print("| --- | --- | --- | --- | --- |")
    for name, i in answers["instructions"].items():
        grades = ", ".join(f"{k} {v}" for k, v in i["grades"].items())
        labels = ", ".join(f"{k} {v}" for k, v in i["kept_labels"].items())
        print(f"| {name} | {i['wants']} | {grades} | {rate(i['complied'])} of {i['complied_of']} | {labels} |")
    print()
    kept = pq.read_table(obj("answers") / "rows.parquet").to_pylist()
    print(f"Knowing the instruction alone (score 1 under the lie instruction), pooled over the kept answers: AUROC "
          f"{instruction_only(kept)} (bootstrap over questions). Within `told_lie` it is 0.50 by construction.\n")
    table(obj("on_policy"), "Trained on instructed pairs, tested on the model's own answers")
    table(obj("shuffled"), "The same with labels shuffled within source and split (a null)")


if __name__ == "__main__":
    main()
