//! Linear readouts of raw activations: the DiffMean baseline's directions, and the held-out AUROC of any
//! (direction, bias) scorer, the logistic probes' included.

use candle_core::DType;
use saeflow_core::data::activations::{ActivationStore, ReadOptions};
use saeflow_core::stats::features::TokenInfo;
use saeflow_core::stats::TwoSample;

/// DiffMean directions: per tested class, the mean raw activation of its fit tokens minus the mean of the
/// other labelled fit tokens (from per-label sums and counts).
pub(super) fn diffmean_directions(
    class_sums: &[Vec<f64>],
    counts: &[u64],
    classes: &[u16],
) -> Vec<Vec<f32>> {
    let d = class_sums.first().map_or(0, Vec::len);
    let total: Vec<f64> = (0..d)
        .map(|i| class_sums.iter().map(|s| s[i]).sum())
        .collect();
    let n: u64 = counts.iter().sum();
    classes
        .iter()
        .map(|&c| {
            let c = c as usize;
            let (n_pos, n_neg) = (counts[c] as f64, (n - counts[c]) as f64);
            (0..d)
                .map(|i| (class_sums[c][i] / n_pos - (total[i] - class_sums[c][i]) / n_neg) as f32)
                .collect()
        })
        .collect()
}

/// Held-out AUROC of linear scorers (direction, bias), one per tested class in order and then again
/// (the DiffMean directions, then the logistic probes): every labelled token of the test split is scored.
pub(super) fn score_test(
    store: &ActivationStore,
    device: &candle_core::Device,
    tokens: &TokenInfo,
    (split, split_name): (u8, &str),
    classes: &[u16],
    scorers: &[(Vec<f32>, f64)],
    batch_size: usize,
) -> anyhow::Result<Vec<TwoSample>> {
    let mut scores: Vec<Vec<f32>> = vec![Vec::new(); scorers.len()];
    let mut class = Vec::new();
    let options = ReadOptions {
        batch_size,
        splits: Some(vec![split_name.to_string()]),
        ..ReadOptions::default()
    };
    for batch in store.batches(&options, device)? {
        let batch = batch?;
        let acts = batch.acts.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (row, x) in batch.rows.iter().zip(&acts) {
            let r = *row as usize;
            let Some(c) = tokens.class[r] else { continue };
            if tokens.split[r] != split {
                continue;
            }
            class.push(c);
            for (s, (dir, bias)) in scores.iter_mut().zip(scorers) {
                s.push((saeflow_core::kernels::simd::dot(x, dir) as f64 + bias) as f32);
            }
        }
    }
    Ok(scores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let c = classes[i % classes.len()];
            let positive: Vec<bool> = class.iter().map(|&k| k == c).collect();
            TwoSample::dense(s, &positive)
        })
        .collect())
}
