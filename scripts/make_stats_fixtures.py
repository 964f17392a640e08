#!/usr/bin/env python3
"""Reference values for saeflow's statistics (crates/core/src/stats), from scipy and sklearn.

Writes tests/fixtures/stats.json: two-sample cases (scores, classes) with sklearn's roc_auc_score, scipy's
mannwhitneyu U and two-sided asymptotic p-value (tie and continuity corrections), p-value lists with
scipy's Benjamini-Hochberg q-values, logistic regressions, numpy percentiles, and cluster-bootstrap AUROC
intervals computed on stored draws. Run once with scipy and scikit-learn installed; the output is committed,
so the tests need neither:

    python3 scripts/make_stats_fixtures.py > tests/fixtures/stats.json
"""
import json
import sys

import numpy as np
import scipy
import sklearn
from scipy.stats import false_discovery_control, mannwhitneyu
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score


def f32(values):
    # The tests read scores as f32: compute the references on the same (rounded) numbers.
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def case(name, scores, positive):
    scores = np.asarray(f32(scores), dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    res = mannwhitneyu(scores[positive], scores[~positive], alternative="two-sided", method="asymptotic")
    return {
        "name": name,
        "scores": scores.tolist(),
        "positive": positive.tolist(),
        "auroc": float(roc_auc_score(positive, scores)),
        "u": float(res.statistic),
        "p": float(res.pvalue),
    }


rng = np.random.default_rng(0)
cases = []
# Continuous scores, a modest shift.
n = 200
pos = rng.random(n) < 0.3
cases.append(case("normal shift", rng.normal(size=n) + 0.4 * pos, pos))
# Heavy ties: scores on a coarse grid.
n = 300
pos = rng.random(n) < 0.5
cases.append(case("coarse grid", np.round(rng.normal(size=n) + 0.2 * pos, 1), pos))
# A sparse feature: mostly zeros, positive activations more often on positives (the label stage's case).
n = 5000
pos = rng.random(n) < 0.2
fires = rng.random(n) < np.where(pos, 0.05, 0.01)
cases.append(case("sparse feature", np.where(fires, rng.exponential(2.0, n), 0.0), pos))
# Strong separation: p far into the tail.
n = 400
pos = np.arange(n) % 2 == 0
cases.append(case("strong separation", rng.normal(size=n) + 3.0 * pos, pos))
# Imbalanced and small.
pos = np.array([True] + [False] * 11)
cases.append(case("one positive", rng.normal(size=12), pos))

bh = []
for name, p in [
    ("uniform", rng.random(50)),
    ("mixed", np.concatenate([rng.random(40), rng.random(10) * 1e-4])),
    ("ties", np.array([0.01, 0.01, 0.02, 0.5, 0.5, 1.0])),
]:
    bh.append({"name": name, "p": p.tolist(), "q": false_discovery_control(p, method="bh").tolist()})

logistic = []
for c, n, d, shift in [(1.0, 300, 5, 0.8), (0.01, 200, 3, 0.5), (10.0, 400, 8, 0.3)]:
    y = rng.random(n) < 0.4
    x = np.asarray(rng.normal(size=(n, d)) + shift * y[:, None] * rng.normal(size=d), dtype=np.float32)
    model = LogisticRegression(C=c, tol=1e-12, max_iter=100000).fit(x.astype(np.float64), y)
    logistic.append({
        "c": c,
        "d": d,
        "x": [float(v) for v in x.reshape(-1)],
        "y": y.tolist(),
        "coef": model.coef_[0].tolist(),
        "intercept": float(model.intercept_[0]),
    })

# numpy's default (linear) percentile, for the bootstrap's interval ends.
percentiles = []
for values in [rng.normal(size=37), rng.random(200), np.array([1.0, 1.0, 2.0, 10.0])]:
    q = [0.0, 2.5, 33.3, 50.0, 97.5, 100.0]
    percentiles.append({"values": values.tolist(), "q": q, "want": np.percentile(values, q).tolist()})


def bootstrap_case(name, scores, positive, cluster, resamples=200):
    # Clusters in ascending id order; each draw picks cluster indices with replacement; every document of
    # a drawn cluster enters the resample; sklearn's AUROC per resample (one-class resamples skipped);
    # numpy's 2.5th and 97.5th percentiles.
    scores = np.asarray(f32(scores), dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    ids = sorted(set(cluster))
    groups = [[i for i, c in enumerate(cluster) if c == cid] for cid in ids]
    draws = rng.integers(0, len(groups), size=(resamples, len(groups)))
    stats = []
    for draw in draws:
        rows = [i for g in draw for i in groups[g]]
        if positive[rows].all() or not positive[rows].any():
            continue
        stats.append(roc_auc_score(positive[rows], scores[rows]))
    low, high = np.percentile(stats, [2.5, 97.5])
    return {
        "name": name,
        "scores": scores.tolist(),
        "positive": positive.tolist(),
        "cluster": [int(c) for c in cluster],
        "draws": draws.tolist(),
        "estimate": float(roc_auc_score(positive, scores)),
        "low": float(low),
        "high": float(high),
        "resamples": len(stats),
    }


bootstrap = []
# Contrast pairs: each pair one positive and one negative document, a modest shift.
n = 80
cluster = [i // 2 for i in range(n)]
pos = np.array([i % 2 == 0 for i in range(n)])
bootstrap.append(bootstrap_case("pairs", rng.normal(size=n) + 0.5 * pos, pos, cluster))
# Unpaired documents (singleton clusters with scattered ids) and heavy ties.
n = 60
pos = rng.random(n) < 0.3
bootstrap.append(bootstrap_case("singletons, ties", np.round(rng.normal(size=n) + 0.3 * pos, 0), pos,
                                [int(c) for c in rng.permutation(10 * n)[:n]]))
# Few positives: some resamples hold none and are skipped.
n = 30
pos = np.array([i < 2 for i in range(n)])
bootstrap.append(bootstrap_case("two positives", rng.normal(size=n) + pos, pos, list(range(n))))

json.dump(
    {
        "generated_by": "scripts/make_stats_fixtures.py",
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "two_sample": cases,
        "benjamini_hochberg": bh,
        "logistic": logistic,
        "percentile": percentiles,
        "cluster_bootstrap": bootstrap,
    },
    sys.stdout,
    separators=(",", ":"),
)
sys.stdout.write("\n")
