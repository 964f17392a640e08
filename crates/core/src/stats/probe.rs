//! Linear probes on labelled tokens, the baselines the `label` stage measures SAE features against: a
//! logistic probe on raw activations, and k-sparse logistic probes on SAE latents (SAEBench's sparse
//! probing). Both fit [`logistic`] regressions over [`C_GRID`] on a fit sample and keep the C with the best
//! AUROC on a validation sample, as a cross-validated sklearn pipeline would.

use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use super::features::{Codes, FeatureClass, TokenInfo};
use super::logistic::{self, Logistic};
use super::TwoSample;

/// Raw activations of a sample of token rows (sorted) and their classes.
#[derive(Debug, Default)]
pub struct Sample {
    /// Token rows, ascending.
    pub rows: Vec<usize>,
    /// Class of each row.
    pub class: Vec<u16>,
    /// `rows.len() × d`.
    pub x: Vec<f32>,
}

/// Up to `n` of `rows`, chosen uniformly with the seeded generator.
pub fn sample_rows(rng: &mut ChaCha8Rng, rows: &[usize], n: usize) -> Vec<usize> {
    sample(rng, rows.len(), n.min(rows.len()))
        .into_iter()
        .map(|i| rows[i])
        .collect()
}

/// The regularisation strengths (sklearn's C) tried; the one with the best validation AUROC is kept.
pub const C_GRID: [f64; 7] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0];

/// A logistic probe on raw activations, as a direction and bias in activation space.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Weights on raw activations, `d` of them.
    pub direction: Vec<f32>,
    /// Intercept: direction·x + bias is the log-odds of the class.
    pub bias: f64,
    /// The C chosen.
    pub c: f64,
    /// AUROC on the validation sample with that C.
    pub val_auroc: f64,
}

/// Fits class `c` against the rest on standardised activations (per-dimension mean and deviation of the
/// fit sample, as a StandardScaler pipeline would), choosing C on the validation sample; returns it mapped
/// back to raw activations.
pub fn fit_dense_probe(fit: &Sample, val: &Sample, c: u16, d: usize) -> Probe {
    let n = fit.rows.len().max(1) as f64;
    let mean: Vec<f64> = (0..d)
        .map(|j| fit.x.chunks(d).map(|x| x[j] as f64).sum::<f64>() / n)
        .collect();
    let scale: Vec<f64> = (0..d)
        .map(|j| {
            let var = fit
                .x
                .chunks(d)
                .map(|x| (x[j] as f64 - mean[j]).powi(2))
                .sum::<f64>()
                / n;
            if var > 0.0 {
                var.sqrt()
            } else {
                1.0
            }
        })
        .collect();
    let standard = |x: &[f32]| -> Vec<f32> {
        x.chunks(d)
            .flat_map(|row| (0..d).map(|j| ((row[j] as f64 - mean[j]) / scale[j]) as f32))
            .collect()
    };
    let (xf, xv) = (standard(&fit.x), standard(&val.x));
    let yf: Vec<bool> = fit.class.iter().map(|&k| k == c).collect();
    let yv: Vec<bool> = val.class.iter().map(|&k| k == c).collect();
    let (model, c_best, val_auroc) = best_over_c(&xf, &yf, &xv, &yv, d);
    let direction: Vec<f32> = (0..d)
        .map(|j| (model.weights[j] / scale[j]) as f32)
        .collect();
    let bias = model.bias
        - (0..d)
            .map(|j| model.weights[j] * mean[j] / scale[j])
            .sum::<f64>();
    Probe {
        direction,
        bias,
        c: c_best,
        val_auroc,
    }
}

/// Fits every C of the grid; keeps the best validation AUROC (ties: the smaller C).
fn best_over_c(xf: &[f32], yf: &[bool], xv: &[f32], yv: &[bool], d: usize) -> (Logistic, f64, f64) {
    let mut best: Option<(Logistic, f64, f64)> = None;
    for c in C_GRID {
        let model = logistic::fit(xf, yf, d, c);
        let scores: Vec<f32> = xv.chunks(d).map(|x| model.score(x) as f32).collect();
        let auroc = TwoSample::dense(&scores, yv).auroc;
        if best.as_ref().is_none_or(|b| auroc > b.2) {
            best = Some((model, c, auroc));
        }
    }
    best.expect("a non-empty grid")
}

/// A logistic probe on k SAE latents (SAEBench's sparse probing): the k latents with the largest
/// |mean activation difference| between the class and the rest on the fit split.
#[derive(Debug, Clone)]
pub struct SparseProbe {
    /// The class detected.
    pub class: u16,
    /// Index of the class among the tested ones.
    pub position: usize,
    /// Latents used.
    pub k: usize,
    /// The latents, largest mean difference first.
    pub features: Vec<u32>,
    /// The C chosen on the validation sample.
    pub c: f64,
    /// Rank test and AUROC on the test split.
    pub test: TwoSample,
}

/// Sparse probes for k = 1, 2, 5, 10, 20 and every tested class, scored on the test split from the codes.
/// `fit` and `val` give the rows and classes the probes fit and choose C on (their `x` is not read: the
/// latents' values come from `codes`); `fit_stats` ranks the latents.
pub fn sparse_probes(
    codes: &Codes,
    tokens: &TokenInfo,
    fit_stats: &[FeatureClass],
    fit: &Sample,
    val: &Sample,
    test: u8,
    classes: &[u16],
) -> Vec<SparseProbe> {
    let test_rows: Vec<usize> = (0..tokens.class.len())
        .filter(|&r| tokens.class[r].is_some() && tokens.split[r] == test)
        .collect();
    // The code of feature f on a row (0 when it did not fire): columns are sorted by row.
    let code = |f: u32, r: usize| {
        let column = &codes.columns[f as usize];
        column
            .binary_search_by_key(&(r as u32), |e| e.0)
            .map_or(0.0, |i| column[i].1)
    };
    let dense = |features: &[u32], rows: &[usize]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&r| features.iter().map(move |&f| code(f, r)))
            .collect()
    };
    let mut out = Vec::new();
    for (position, &c) in classes.iter().enumerate() {
        let mut ranked: Vec<&FeatureClass> = fit_stats.iter().filter(|s| s.class == c).collect();
        ranked.sort_by(|a, b| {
            (b.mean_pos - b.mean_neg)
                .abs()
                .total_cmp(&(a.mean_pos - a.mean_neg).abs())
                .then(a.feature.cmp(&b.feature))
        });
        for k in [1usize, 2, 5, 10, 20] {
            if k > ranked.len() {
                break;
            }
            let features: Vec<u32> = ranked[..k].iter().map(|s| s.feature).collect();
            let y = |sample: &Sample| sample.class.iter().map(|&x| x == c).collect::<Vec<_>>();
            let (model, c_best, _) = best_over_c(
                &dense(&features, &fit.rows),
                &y(fit),
                &dense(&features, &val.rows),
                &y(val),
                k,
            );
            let xt = dense(&features, &test_rows);
            let scores: Vec<f32> = xt.chunks(k).map(|x| model.score(x) as f32).collect();
            let positive: Vec<bool> = test_rows
                .iter()
                .map(|&r| tokens.class[r] == Some(c))
                .collect();
            out.push(SparseProbe {
                class: c,
                position,
                k,
                features,
                c: c_best,
                test: TwoSample::dense(&scores, &positive),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::features::feature_classes;

    #[test]
    fn a_dense_probe_maps_back_to_raw_activations() {
        // Dimension 0 is the class (±1, jittered), dimension 1 is noise on a larger scale. Rows alternate
        // classes; the first 12 are the fit sample, the next 12 the validation sample.
        let sample = |rows: std::ops::Range<usize>| {
            let class: Vec<u16> = rows.clone().map(|r| (r % 2) as u16).collect();
            let x = rows
                .clone()
                .flat_map(|r| {
                    let sign = if r % 2 == 1 { 1.0 } else { -1.0 };
                    [
                        sign * (1.0 + 0.1 * (r % 3) as f32),
                        10.0 * ((r * 7) % 5) as f32,
                    ]
                })
                .collect();
            Sample {
                rows: rows.collect(),
                class,
                x,
            }
        };
        let (fit, val) = (sample(0..12), sample(12..24));
        let probe = fit_dense_probe(&fit, &val, 1, 2);
        assert_eq!(probe.val_auroc, 1.0);
        assert!(C_GRID.contains(&probe.c), "{probe:?}");
        assert!(probe.direction[0] > 0.0, "{probe:?}");
        // Scored on raw activations, the probe must rank the validation rows as it did standardised.
        let scores: Vec<f32> = val
            .x
            .chunks(2)
            .map(|x| {
                let dot: f64 = x
                    .iter()
                    .zip(&probe.direction)
                    .map(|(&a, &w)| a as f64 * w as f64)
                    .sum();
                (dot + probe.bias) as f32
            })
            .collect();
        let positive: Vec<bool> = val.class.iter().map(|&k| k == 1).collect();
        assert_eq!(TwoSample::dense(&scores, &positive).auroc, 1.0);
    }

    #[test]
    fn sparse_probes_take_the_latents_that_differ_most() {
        // 12 rows in splits fit (0), val (1), test (2) of 4 rows each, classes alternating. Latent 2 fires
        // on class 1 only; latent 0 on every third row; latent 1 everywhere alike.
        let mut codes = Codes::new(3);
        let mut rows = Vec::new();
        for r in 0..12 {
            let latent_0 = if r % 3 == 0 { 0.5 } else { 0.0 };
            let latent_2 = if r % 2 == 1 { 1.0 + r as f32 } else { 0.0 };
            rows.extend([latent_0, 0.2, latent_2]);
        }
        codes.push(&rows).unwrap();
        let tokens = TokenInfo {
            class: (0..12).map(|r| Some((r % 2) as u16)).collect(),
            doc: (0..12).collect(),
            split: (0..12).map(|r| (r / 4) as u8).collect(),
        };
        let split_sample = |split: usize| Sample {
            rows: (4 * split..4 * split + 4).collect(),
            class: (4 * split..4 * split + 4).map(|r| (r % 2) as u16).collect(),
            x: Vec::new(),
        };
        let fit_stats = feature_classes(&codes, &tokens, 0, 2);
        let probes = sparse_probes(
            &codes,
            &tokens,
            &fit_stats,
            &split_sample(0),
            &split_sample(1),
            2,
            &[1],
        );
        // k = 1 and 2; k = 5 is more latents than there are.
        assert_eq!(probes.iter().map(|p| p.k).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!((probes[0].class, probes[0].position), (1, 0));
        assert_eq!(probes[0].features, vec![2]);
        assert_eq!(probes[0].test.auroc, 1.0);
        assert_eq!((probes[0].test.n_pos, probes[0].test.n_neg), (2, 2));
    }
}
