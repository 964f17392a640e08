//! Linear probes on labelled units (documents or tokens), the baselines the `label` stage measures SAE
//! features against: a logistic probe on raw activations, on bags of tokens, or on k SAE latents
//! (SAEBench's sparse probing). Each fits [`logistic`] regressions over [`C_GRID`] on a fit sample and
//! keeps the C with the best AUROC on a validation sample, as a cross-validated sklearn pipeline would.

use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;

use super::logistic::{self, Logistic};
use super::TwoSample;

/// Features of a sample of units (rows, sorted) and their classes.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
