#!/usr/bin/env python3
"""Steps of the quickstart pipeline (standard library only).

  split CSV OUT_DIR          deterministic train/test split by hash of the statement
  probe SPLIT_DIR OUT_DIR A  multinomial naive Bayes on words with smoothing A; writes metrics.json
"""
import csv
import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path


def split(src, out):
    rows = list(csv.DictReader(open(src, newline="")))
    parts = {"train": [], "test": []}
    for r in rows:
        h = int(hashlib.blake2b(r["statement"].encode(), digest_size=8).hexdigest(), 16)
        parts["train" if h % 5 else "test"].append(r)
    for name, items in parts.items():
        with open(Path(out) / f"{name}.jsonl", "w") as f:
            for r in items:
                f.write(json.dumps({"text": r["statement"], "label": int(r["label"])}, sort_keys=True) + "\n")


def words(text):
    return text.lower().replace(".", " ").split()


def probe(split_dir, out, alpha):
    alpha = float(alpha)
    load = lambda n: [json.loads(l) for l in open(Path(split_dir) / f"{n}.jsonl")]
    train, test = load("train"), load("test")
    counts = {0: Counter(), 1: Counter()}
    priors = Counter(r["label"] for r in train)
    for r in train:
        counts[r["label"]].update(words(r["text"]))
    vocab = set(counts[0]) | set(counts[1])

    def score(text, c):
        total = sum(counts[c].values()) + alpha * len(vocab)
        return math.log(priors[c] / len(train)) + sum(
            math.log((counts[c][w] + alpha) / total) for w in words(text) if w in vocab
        )

    correct = sum(int(max((0, 1), key=lambda c: score(r["text"], c)) == r["label"]) for r in test)
    metrics = {"alpha": alpha, "train_rows": len(train), "test_rows": len(test), "test_accuracy": round(correct / len(test), 6)}
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    {"split": split, "probe": probe}[sys.argv[1]](*sys.argv[2:])
