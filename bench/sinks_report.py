#!/usr/bin/env python3
"""The "Attention sinks" table of BENCHMARKS.md from a cache that ran pipelines/sinks.toml: per capture, the
sequence-start tokens left out, the top-0.5% share of the squared norm before and after, and the FVU, L0 and
dead fraction of the SAE trained and evaluated on it.

  python3 bench/sinks_report.py CACHE_DIR [PIPELINE_NAME]
"""
import json
import sys
from pathlib import Path


def main() -> None:
    cache = Path(sys.argv[1])
    pipeline = sys.argv[2] if len(sys.argv) > 2 else "sinks"
    refs = {p.stem: json.loads(p.read_text())["key"] for p in (cache / "refs" / pipeline).glob("*.json")}
    obj = lambda name: cache / "objects" / refs[name]
    print("| capture | tokens stored | sequence starts left out | top 0.5% share before | after | SAE FVU (test) | L0 | dead |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in sorted(n for n in refs if n.startswith("acts")):
        info = json.loads((obj(name) / "capture.json").read_text())
        sinks = info["sinks"]
        (hook, share), = sinks["top_half_percent_share"].items()
        suffix = name[len("acts"):]  # "[drop_first=0]"
        ev = json.loads((obj("eval[acts" + suffix[1:]) / "eval.json").read_text())
        print(
            f"| `{name}` | {info['tokens']:,} | {sinks['dropped_first']:,} | {100 * share['before']:.1f}% "
            f"| {100 * share['after']:.1f}% | {ev['reconstruction_quality']['fvu']:.3f} "
            f"| {ev['sparsity']['l0']:.1f} | {ev['sparsity']['dead_fraction']:.3f} |"
        )


if __name__ == "__main__":
    main()
