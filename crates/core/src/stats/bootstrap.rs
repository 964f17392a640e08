//! 95% intervals for AUROC by a percentile bootstrap over clusters (and for a mean, over its values).
//!
//! The unit of analysis is a document, but documents are not independent: the two sides of a contrast pair
//! share a prompt, so they are resampled together. Each resample draws clusters (pairs; an unpaired
//! document is its own cluster) with replacement until it has as many as the data, takes every document of
//! each drawn cluster (with multiplicity), and computes the AUROC; the interval is the 2.5th and 97.5th
//! percentile of those AUROCs (numpy's default linear interpolation). Resamples that hold only one class
//! have no AUROC and are skipped (their count is reported).
//!
//! Written here because no maintained Rust crate offers a cluster bootstrap; the percentile follows
//! `numpy.percentile(method="linear")` and the per-resample AUROC sklearn's `roc_auc_score`, and the tests
//! compare against both on the same draws (`scripts/make_stats_fixtures.py`).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::TwoSample;

/// A point estimate with its 95% bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// The statistic on the data as they are.
    pub estimate: f64,
    /// 2.5th percentile of the resampled statistics.
    pub low: f64,
    /// 97.5th percentile.
    pub high: f64,
    /// Resamples that had a statistic (the others held one class only).
    pub resamples: usize,
}

/// The `q`-th percentile (0–100) of ascending `sorted` values, interpolating linearly between the two
/// nearest ranks as numpy does by default. `None` for no values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = q.clamp(0.0, 100.0) / 100.0 * last as f64;
    let below = rank.floor() as usize;
    let above = (below + 1).min(last);
    let t = rank - below as f64;
    Some(sorted[below] + (sorted[above] - sorted[below]) * t)
}

/// Documents grouped by cluster id, clusters in ascending id order (so draws index a fixed order).
pub fn clusters(cluster: &[u64]) -> Vec<Vec<usize>> {
    let mut by_id: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, &c) in cluster.iter().enumerate() {
        by_id.entry(c).or_default().push(i);
    }
    by_id.into_values().collect()
}

/// `resamples` draws of cluster indices, each as many as there are clusters, with replacement, from a
/// ChaCha8 stream seeded with `seed`.
pub fn draws(n_clusters: usize, resamples: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..resamples)
        .map(|_| {
            (0..n_clusters)
                .map(|_| rng.random_range(0..n_clusters))
                .collect()
        })
        .collect()
}

/// AUROC of `scores` as a detector of `positive`; `None` when one class is absent.
pub fn auroc(scores: &[f32], positive: &[bool]) -> Option<f64> {
    let t = TwoSample::dense(scores, positive);
    (t.n_pos > 0 && t.n_neg > 0).then_some(t.auroc)
}

/// The AUROC and its interval over the given cluster draws (indices into `groups`).
pub fn auroc_interval_from_draws(
    scores: &[f32],
    positive: &[bool],
    groups: &[Vec<usize>],
    draws: &[Vec<usize>],
) -> Option<Interval> {
    let estimate = auroc(scores, positive)?;
    let mut stats = Vec::with_capacity(draws.len());
    let (mut s, mut p) = (Vec::new(), Vec::new());
    for draw in draws {
        s.clear();
        p.clear();
        for &g in draw {
            for &i in &groups[g] {
                s.push(scores[i]);
                p.push(positive[i]);
            }
        }
        if let Some(a) = auroc(&s, &p) {
            stats.push(a);
        }
    }
    stats.sort_unstable_by(f64::total_cmp);
    Some(Interval {
        estimate,
        low: percentile(&stats, 2.5)?,
        high: percentile(&stats, 97.5)?,
        resamples: stats.len(),
    })
}

/// The AUROC of `scores` for `positive` with a 95% interval from `resamples` cluster-bootstrap resamples
/// (documents sharing a `cluster` id are drawn together), seeded. `None` when one class is absent.
pub fn auroc_interval(
    scores: &[f32],
    positive: &[bool],
    cluster: &[u64],
    resamples: usize,
    seed: u64,
) -> Option<Interval> {
    let groups = clusters(cluster);
    auroc_interval_from_draws(
        scores,
        positive,
        &groups,
        &draws(groups.len(), resamples, seed),
    )
}

/// The mean of `values` with a 95% percentile-bootstrap interval (`resamples` resamples of the values with
/// replacement, seeded) — for per-prompt effects, where each value is one prompt. `None` for no values.
pub fn mean_interval(values: &[f64], resamples: usize, seed: u64) -> Option<Interval> {
    let mean = |v: &mut dyn Iterator<Item = f64>| {
        let (sum, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
        sum / n.max(1) as f64
    };
    if values.is_empty() {
        return None;
    }
    let mut stats: Vec<f64> = draws(values.len(), resamples, seed)
        .iter()
        .map(|d| mean(&mut d.iter().map(|&i| values[i])))
        .collect();
    stats.sort_unstable_by(f64::total_cmp);
    Some(Interval {
        estimate: mean(&mut values.iter().copied()),
        low: percentile(&stats, 2.5)?,
        high: percentile(&stats, 97.5)?,
        resamples: stats.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::tests::fixtures;

    fn f64s(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    #[test]
    fn percentiles_match_numpy() {
        let f = fixtures();
        for case in f["percentile"].as_array().unwrap() {
            let mut values = f64s(&case["values"]);
            values.sort_unstable_by(f64::total_cmp);
            for (q, want) in f64s(&case["q"]).into_iter().zip(f64s(&case["want"])) {
                let got = percentile(&values, q).unwrap();
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "q {q}: {got} vs {want}"
                );
            }
        }
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 97.5), Some(3.0));
    }

    #[test]
    fn cluster_bootstrap_matches_sklearn_and_numpy_on_the_same_draws() {
        let f = fixtures();
        for case in f["cluster_bootstrap"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let scores: Vec<f32> = f64s(&case["scores"]).iter().map(|&v| v as f32).collect();
            let positive: Vec<bool> = case["positive"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect();
            let cluster: Vec<u64> = case["cluster"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            let draws: Vec<Vec<usize>> = case["draws"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    d.as_array()
                        .unwrap()
                        .iter()
                        .map(|i| i.as_u64().unwrap() as usize)
                        .collect()
                })
                .collect();
            let groups = clusters(&cluster);
            let got = auroc_interval_from_draws(&scores, &positive, &groups, &draws).unwrap();
            let want = |k: &str| case[k].as_f64().unwrap();
            for (what, g, w) in [
                ("estimate", got.estimate, want("estimate")),
                ("low", got.low, want("low")),
                ("high", got.high, want("high")),
            ] {
                assert!((g - w).abs() < 1e-12, "{name}: {what} {g} vs {w}");
            }
            assert_eq!(
                got.resamples as u64,
                case["resamples"].as_u64().unwrap(),
                "{name}"
            );
        }
    }

    #[test]
    fn a_null_interval_covers_one_half_about_95_percent_of_the_time() {
        // 400 null data sets of 60 pairs (pairs share a random shift, labels independent of scores).
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut covered = 0;
        let trials = 400;
        for t in 0..trials {
            let (mut scores, mut positive, mut cluster) = (Vec::new(), Vec::new(), Vec::new());
            for pair in 0..60u64 {
                let shift: f32 = rng.random::<f32>() * 2.0;
                for _ in 0..2 {
                    scores.push(shift + rng.random::<f32>());
                    positive.push(rng.random::<bool>());
                    cluster.push(pair);
                }
            }
            let i = auroc_interval(&scores, &positive, &cluster, 300, t as u64).unwrap();
            assert!(i.low <= i.estimate && i.estimate <= i.high, "{i:?}");
            covered += usize::from(i.low <= 0.5 && 0.5 <= i.high);
        }
        let rate = covered as f64 / trials as f64;
        // Binomial(400, 0.95) has sd 1.1%: [0.91, 0.99] is a ±3.5 sd band around 0.95.
        assert!((0.91..=0.99).contains(&rate), "coverage {rate}");
    }

    #[test]
    fn pairs_are_drawn_together_and_draws_repeat_by_seed() {
        assert_eq!(clusters(&[5, 1, 5, 9]), vec![vec![1], vec![0, 2], vec![3]]);
        assert_eq!(draws(4, 3, 1), draws(4, 3, 1));
        assert_ne!(draws(4, 3, 1), draws(4, 3, 2));
        assert!(draws(4, 50, 3).iter().flatten().all(|&i| i < 4));
        // One class only: no AUROC, no interval.
        assert_eq!(
            auroc_interval(&[0.1, 0.2], &[true, true], &[0, 1], 10, 0),
            None
        );
    }

    #[test]
    fn mean_interval_is_the_percentiles_of_resampled_means() {
        let values = [1.0, 2.0, 4.0, 8.0, 16.0];
        let i = mean_interval(&values, 200, 3).unwrap();
        assert_eq!(i.estimate, 6.2);
        let mut means: Vec<f64> = draws(5, 200, 3)
            .iter()
            .map(|d| d.iter().map(|&k| values[k]).sum::<f64>() / 5.0)
            .collect();
        means.sort_unstable_by(f64::total_cmp);
        assert_eq!(
            (i.low, i.high),
            (
                percentile(&means, 2.5).unwrap(),
                percentile(&means, 97.5).unwrap()
            )
        );
        assert!(i.low < i.estimate && i.estimate < i.high);
        let constant = mean_interval(&[0.5; 7], 100, 0).unwrap();
        assert_eq!(
            (constant.low, constant.estimate, constant.high),
            (0.5, 0.5, 0.5)
        );
        assert_eq!(mean_interval(&[], 100, 0), None);
    }
}
