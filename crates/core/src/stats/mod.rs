//! Statistics for labelling, evaluating and steering features: AUROC, the Mann–Whitney U test,
//! Benjamini–Hochberg FDR control, Spearman correlation; cluster-bootstrap intervals in [`bootstrap`];
//! linear probes in [`probe`]; operating points in [`threshold`]. Written here because
//! no maintained crate offers a tie-corrected Mann–Whitney test or BH; the formulas follow scipy
//! (`scipy.stats.mannwhitneyu` with `method="asymptotic"`, `scipy.stats.false_discovery_control`,
//! `spearmanr`) and sklearn (`roc_auc_score`), and the tests compare against
//! their outputs stored as fixtures (`scripts/make_stats_fixtures.py`).
//!
//! SAE activations are mostly zero, so the two-sample statistics take scores as sorted groups of tied
//! values; [`TwoSample::sparse`] builds the groups from the non-zero entries alone (the zeros are one group
//! below every positive activation) in O(nnz log nnz).

pub mod baselines;
pub mod bootstrap;
pub mod features;
pub mod logistic;
pub mod probe;
pub mod threshold;

/// One group of tied scores: how many positives and negatives share the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tie {
    pos: u64,
    neg: u64,
}

/// A two-sample comparison of scores between positives (class members) and negatives (the rest).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwoSample {
    /// Positives.
    pub n_pos: u64,
    /// Negatives.
    pub n_neg: u64,
    /// Mann–Whitney U of the positives: pairs (positive, negative) with the positive scoring higher, ties
    /// counting one half.
    pub u: f64,
    /// Area under the ROC curve of the scores as a detector of positives: U / (n_pos · n_neg), 0.5 for
    /// no separation (sklearn's `roc_auc_score`, ties included).
    pub auroc: f64,
    /// Two-sided p-value of the rank test (normal approximation with tie and continuity corrections, as
    /// scipy's asymptotic method); 1 when every score ties.
    pub p: f64,
}

impl TwoSample {
    /// From dense scores and class membership. Scores must not be NaN.
    pub fn dense(scores: &[f32], positive: &[bool]) -> Self {
        assert_eq!(scores.len(), positive.len());
        let mut order: Vec<(f32, bool)> = scores
            .iter()
            .copied()
            .zip(positive.iter().copied())
            .collect();
        order.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        Self::from_sorted(groups(&order))
    }

    /// From the non-zero scores (value, is positive) of a mostly-zero feature over `n_pos` positives and
    /// `n_neg` negatives; every omitted score is 0 and every listed one must be > 0 (ReLU'd activations).
    pub fn sparse(nonzero: &mut [(f32, bool)], n_pos: u64, n_neg: u64) -> Self {
        debug_assert!(nonzero.iter().all(|e| e.0 > 0.0));
        nonzero.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let nz_pos = nonzero.iter().filter(|e| e.1).count() as u64;
        let zeros = Tie {
            pos: n_pos - nz_pos,
            neg: n_neg - (nonzero.len() as u64 - nz_pos),
        };
        Self::from_sorted(std::iter::once(zeros).chain(groups(nonzero)))
    }

    /// From tie groups in ascending order of score.
    fn from_sorted(groups: impl Iterator<Item = Tie>) -> Self {
        // Rank sum of the positives with average ranks for ties, and Σ(t³ − t) for the variance.
        let (mut below, mut rank_sum, mut tie_term, mut n_pos, mut n_neg) =
            (0f64, 0f64, 0f64, 0u64, 0u64);
        for g in groups {
            let t = (g.pos + g.neg) as f64;
            if t == 0.0 {
                continue;
            }
            let average_rank = below + (t + 1.0) / 2.0;
            rank_sum += g.pos as f64 * average_rank;
            tie_term += t * t * t - t;
            below += t;
            n_pos += g.pos;
            n_neg += g.neg;
        }
        let (n1, n2) = (n_pos as f64, n_neg as f64);
        let u = rank_sum - n1 * (n1 + 1.0) / 2.0;
        let pairs = n1 * n2;
        let auroc = if pairs > 0.0 { u / pairs } else { 0.5 };
        let n = n1 + n2;
        let variance = if n > 1.0 {
            pairs / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)))
        } else {
            0.0
        };
        // scipy: U = max(U₁, U₂), z = (U − n₁n₂/2 − ½)/σ, p = 2·sf(z), clipped to 1.
        let p = if variance > 0.0 {
            let z = (u.max(pairs - u) - pairs / 2.0 - 0.5) / variance.sqrt();
            (2.0 * normal_sf(z)).min(1.0)
        } else {
            1.0
        };
        TwoSample {
            n_pos,
            n_neg,
            u,
            auroc,
            p,
        }
    }
}

/// Consecutive equal scores of a sorted list as tie groups.
fn groups(sorted: &[(f32, bool)]) -> impl Iterator<Item = Tie> + '_ {
    sorted.chunk_by(|a, b| a.0 == b.0).map(|run| {
        let pos = run.iter().filter(|e| e.1).count() as u64;
        Tie {
            pos,
            neg: run.len() as u64 - pos,
        }
    })
}

/// P(Z > z) for a standard normal Z, accurate far into the tail (erfc, not 1 − cdf).
pub fn normal_sf(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

/// Benjamini–Hochberg adjusted p-values (q-values): q₍ᵢ₎ = min over j ≥ i of m·p₍ⱼ₎/j, capped at 1, in the
/// input order. Rejecting every hypothesis with q < α controls the false discovery rate at α for
/// independent or positively dependent tests.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_unstable_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut q = vec![0f64; m];
    let mut running = 1f64;
    for (rank, &i) in order.iter().enumerate().rev() {
        running = running.min(p[i] * m as f64 / (rank + 1) as f64);
        q[i] = running;
    }
    q
}

/// The share of `values`' total carried by its largest `fraction` (at least one value): with squared token
/// norms, how much of the activations' second moment a few outlier tokens (attention sinks) hold. `None`
/// for no values or a zero total.
pub fn top_share(values: &[f64], fraction: f64) -> Option<f64> {
    let total: f64 = values.iter().sum();
    if values.is_empty() || total <= 0.0 {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let top = ((fraction * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(sorted[..top].iter().sum::<f64>() / total)
}

/// The share of the total of `squares` (squared norms) held by the values whose root exceeds `factor` × the
/// median root: how much of the activations' second moment a handful of massive tokens carry. `None` for no
/// values or a zero total.
pub fn share_above_median_multiple(squares: &[f64], factor: f64) -> Option<f64> {
    let total: f64 = squares.iter().sum();
    if squares.is_empty() || total <= 0.0 {
        return None;
    }
    let mut sorted = squares.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    // Upper median of the norms (the root is monotone, so it is the root of the squares' median).
    let limit = factor * factor * sorted[sorted.len() / 2];
    Some(squares.iter().filter(|&&v| v > limit).sum::<f64>() / total)
}

/// Spearman's rank correlation (average ranks for ties); `None` with fewer than 3 points or no spread.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            for &k in &order[i..=j] {
                r[k] = (i + j) as f64 / 2.0 + 1.0;
            }
            i = j + 1;
        }
        r
    }
    if x.len() < 3 {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_above_a_median_multiple_by_hand() {
        // Norms 1, 1, 1, 2, 30 → squares 1, 1, 1, 4, 900; median norm 1; above 10 × 1: only 30.
        let squares = [1.0, 900.0, 1.0, 4.0, 1.0];
        assert!(
            (share_above_median_multiple(&squares, 10.0).unwrap() - 900.0 / 907.0).abs() < 1e-12
        );
        assert_eq!(share_above_median_multiple(&squares, 100.0), Some(0.0));
        assert_eq!(share_above_median_multiple(&[], 10.0), None);
    }

    #[test]
    fn top_share_by_hand() {
        // 200 values: one of 100, 199 of 1. The top 0.5% is one value: 100 / 299.
        let mut v = vec![1.0; 199];
        v.insert(57, 100.0);
        assert!((top_share(&v, 0.005).unwrap() - 100.0 / 299.0).abs() < 1e-12);
        // 1% of 200 is two values: 101 / 299.
        assert!((top_share(&v, 0.01).unwrap() - 101.0 / 299.0).abs() < 1e-12);
        // At least one value even for a tiny fraction; all of them for 1.
        assert_eq!(top_share(&[3.0, 1.0], 1e-9), Some(0.75));
        assert_eq!(top_share(&[3.0, 1.0], 1.0), Some(1.0));
        assert_eq!(top_share(&[], 0.1), None);
        assert_eq!(top_share(&[0.0], 0.1), None);
    }

    #[test]
    fn auroc_and_u_by_hand() {
        // Positives {3, 5}, negatives {1, 3, 4}: pairs won 1 (3>1) + ½ (3=3) + 3 (5 beats all) = 4.5 of 6.
        let t = TwoSample::dense(
            &[3.0, 1.0, 5.0, 3.0, 4.0],
            &[true, false, true, false, false],
        );
        assert_eq!((t.n_pos, t.n_neg), (2, 3));
        assert_eq!(t.u, 4.5);
        assert_eq!(t.auroc, 0.75);
        // σ² = 6/12·(6 − (2³−2)/(5·4)) = 0.5·5.7 = 2.85; z = (4.5 − 3 − 0.5)/√2.85 = 0.592349;
        // p = 2·sf(z) = 0.553617.
        assert!((t.p - 0.553_617).abs() < 1e-5, "{}", t.p);
    }

    #[test]
    fn sparse_scores_give_the_dense_answer() {
        let scores = [0.0, 2.0, 0.0, 0.0, 1.5, 0.0, 2.0, 0.3];
        let positive = [true, true, false, false, true, false, false, true];
        let dense = TwoSample::dense(&scores, &positive);
        let mut nonzero: Vec<(f32, bool)> = scores
            .iter()
            .zip(positive)
            .filter(|(s, _)| **s > 0.0)
            .map(|(&s, p)| (s, p))
            .collect();
        assert_eq!(TwoSample::sparse(&mut nonzero, 4, 4), dense);
    }

    #[test]
    fn all_tied_scores_say_nothing() {
        let t = TwoSample::dense(&[1.0; 6], &[true, false, true, false, false, false]);
        assert_eq!((t.auroc, t.p), (0.5, 1.0));
        let t = TwoSample::sparse(&mut [], 10, 20);
        assert_eq!((t.auroc, t.p), (0.5, 1.0));
    }

    /// Cases and scipy/sklearn answers from `scripts/make_stats_fixtures.py`.
    pub(crate) fn fixtures() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/stats.json"
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn close(got: f64, want: f64, relative: f64) -> bool {
        (got - want).abs() <= relative * want.abs().max(f64::MIN_POSITIVE)
    }

    #[test]
    fn two_sample_statistics_match_scipy_and_sklearn() {
        for case in fixtures()["two_sample"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let scores: Vec<f32> = case["scores"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let positive: Vec<bool> = case["positive"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_bool().unwrap())
                .collect();
            let t = TwoSample::dense(&scores, &positive);
            let want = |k: &str| case[k].as_f64().unwrap();
            assert!(close(t.auroc, want("auroc"), 1e-12), "{name}: auroc {t:?}");
            assert!(close(t.u, want("u"), 1e-12), "{name}: U {t:?}");
            // Far-tail p-values (1e-63) come from erfc on both sides; agreement to 1e-9 relative.
            assert!(
                close(t.p, want("p"), 1e-9),
                "{name}: p {} vs {}",
                t.p,
                want("p")
            );
            if scores.iter().all(|&s| s >= 0.0) {
                let mut nonzero: Vec<(f32, bool)> = scores
                    .iter()
                    .zip(&positive)
                    .filter(|(s, _)| **s > 0.0)
                    .map(|(&s, &p)| (s, p))
                    .collect();
                assert_eq!(
                    TwoSample::sparse(&mut nonzero, t.n_pos, t.n_neg),
                    t,
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn benjamini_hochberg_matches_scipy() {
        for case in fixtures()["benjamini_hochberg"].as_array().unwrap() {
            let list = |k: &str| -> Vec<f64> {
                case[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            };
            for (got, want) in benjamini_hochberg(&list("p")).iter().zip(list("q")) {
                assert!(
                    close(*got, want, 1e-12),
                    "{}: {got} vs {want}",
                    case["name"]
                );
            }
        }
    }

    #[test]
    fn benjamini_hochberg_by_hand() {
        // Sorted p 0.01, 0.02, 0.03, 0.5 (m 4): 0.04, 0.04, 0.04, 0.5 after the running minimum.
        let q = benjamini_hochberg(&[0.5, 0.01, 0.03, 0.02]);
        let want = [0.5, 0.04, 0.04, 0.04];
        for (q, w) in q.iter().zip(want) {
            assert!((q - w).abs() < 1e-12, "{q} vs {w}");
        }
        assert_eq!(benjamini_hochberg(&[0.9, 0.8]), vec![0.9, 0.9]);
    }

    #[test]
    fn spearman_matches_hand_values() {
        // Monotone → 1; reversed → −1; scipy.stats.spearmanr([1,2,3,4,5],[2,1,4,3,5]) = 0.8.
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 40.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12);
        // Ties get average ranks: spearmanr([1,2,3,4],[1,1,2,2]) = 0.8944271909999159.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0, 2.0, 2.0]).unwrap();
        assert!((r - 0.894_427_190_999_915_9).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0]), None);
    }
}
