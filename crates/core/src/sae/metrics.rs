//! How well an SAE reconstructs held-out activations and how sparse it is: the formulas of SAELens'
//! `run_evals` (`sae_lens/evals.py`, SAEBench's core eval uses the same), documented one by one in
//! `schemas/eval.md`.
//!
//! Each batch is reduced on its device to per-token and per-feature vectors, which are added up on the
//! host in f64, in row order: the result depends on the rows and the batch size, never on the thread count.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

/// Edges of the feature-density histogram: log10 density from −7 to 0 in steps of ½ (a feature below
/// 1e-7 but not dead falls in the first bin).
pub const DENSITY_LOG10_EDGES: [f64; 15] = [
    -7.0, -6.5, -6.0, -5.5, -5.0, -4.5, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0,
];

/// Running sums over the evaluated tokens.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    tokens: u64,
    /// The first batch's mean: sums of `x − shift` keep the pooled variance free of cancellation when
    /// activations have a large common component.
    shift: Option<Tensor>,
    sum_shifted: Vec<f64>,
    sum_sq_shifted: f64,
    sum_sq_residual: f64,
    sum_cos: f64,
    sum_norm_in: f64,
    sum_norm_out: f64,
    sum_ratio: f64,
    sum_sq_norm_out: f64,
    sum_dot: f64,
    sum_l0: f64,
    sum_l1: f64,
    fires: Vec<u64>,
    act_sum: Vec<f64>,
    act_max: Vec<f32>,
}

/// Per-feature numbers of an evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureStats {
    /// Tokens the feature is non-zero on.
    pub fires: Vec<u64>,
    /// `fires / tokens` (SAELens' `feature_density`).
    pub density: Vec<f64>,
    /// Mean activation over the tokens it fires on (0 when it never fires).
    pub mean_when_active: Vec<f64>,
    /// Largest activation.
    pub max: Vec<f32>,
}

/// The reconstruction and sparsity metrics (names as SAELens reports them where it has them).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Tokens evaluated.
    pub tokens: u64,
    /// Mean over tokens of ‖x − x̂‖² (summed over dimensions).
    pub mse: f64,
    /// Fraction of variance unexplained: `mse` / pooled variance (mean of ‖x − mean(x)‖²).
    pub fvu: f64,
    /// 1 − `fvu`.
    pub explained_variance: f64,
    /// Mean cosine similarity of x and x̂ (0 for a token where either is zero).
    pub cossim: f64,
    /// Mean ‖x‖.
    pub l2_norm_in: f64,
    /// Mean ‖x̂‖.
    pub l2_norm_out: f64,
    /// Mean of ‖x̂‖ / ‖x‖ (‖x‖ below 1e-4 counts as 1, as in SAELens).
    pub l2_ratio: f64,
    /// mean(‖x̂‖²) / mean(x·x̂): below 1 the SAE shrinks, above it inflates (Wright & Sharkey; SAEBench).
    pub relative_reconstruction_bias: f64,
    /// Mean number of non-zero latents per token.
    pub l0: f64,
    /// Mean sum of |latent| per token.
    pub l1: f64,
    /// Fraction of features that never fire on the evaluated tokens.
    pub dead_fraction: f64,
    /// Fraction of features firing on more than 1% of tokens.
    pub dense_1pct_fraction: f64,
    /// Fraction of features firing on more than 10% of tokens.
    pub dense_10pct_fraction: f64,
    /// Features per bin of log10 density, bins between consecutive [`DENSITY_LOG10_EDGES`] (dead
    /// features are not in it).
    pub density_histogram: Vec<u64>,
}

impl Reconstruction {
    /// Empty sums for an SAE of `d_in` inputs and `d_sae` latents.
    pub fn new(d_in: usize, d_sae: usize) -> Self {
        Self {
            tokens: 0,
            shift: None,
            sum_shifted: vec![0.0; d_in],
            sum_sq_shifted: 0.0,
            sum_sq_residual: 0.0,
            sum_cos: 0.0,
            sum_norm_in: 0.0,
            sum_norm_out: 0.0,
            sum_ratio: 0.0,
            sum_sq_norm_out: 0.0,
            sum_dot: 0.0,
            sum_l0: 0.0,
            sum_l1: 0.0,
            fires: vec![0; d_sae],
            act_sum: vec![0.0; d_sae],
            act_max: vec![0.0; d_sae],
        }
    }

    /// Adds a batch: inputs `x` `[n, d_in]`, latents `codes` `[n, d_sae]`, reconstructions `recon` `[n, d_in]`,
    /// all f32 on one device.
    pub fn add(&mut self, x: &Tensor, codes: &Tensor, recon: &Tensor) -> candle_core::Result<()> {
        let n = x.dim(0)?;
        if n == 0 {
            return Ok(());
        }
        let shift = match &self.shift {
            Some(s) => s.clone(),
            None => self.shift.insert(x.mean_keepdim(0)?).clone(),
        };
        let shifted = x.broadcast_sub(&shift)?;
        let active = codes.ne(0f32)?.to_dtype(DType::F32)?;
        let per_token = Tensor::stack(
            &[
                x.sqr()?.sum(D::Minus1)?,
                recon.sqr()?.sum(D::Minus1)?,
                (x * recon)?.sum(D::Minus1)?,
                (x - recon)?.sqr()?.sum(D::Minus1)?,
                shifted.sqr()?.sum(D::Minus1)?,
                active.sum(D::Minus1)?,
                codes.abs()?.sum(D::Minus1)?,
            ],
            0,
        )?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
        let [sq_in, sq_out, dot, sq_res, sq_shifted, l0, l1] = &per_token[..] else {
            unreachable!("seven rows stacked above")
        };
        for i in 0..n {
            let (norm_in, norm_out) = (sq_in[i].sqrt(), sq_out[i].sqrt());
            self.sum_norm_in += norm_in;
            self.sum_norm_out += norm_out;
            self.sum_ratio += norm_out / if norm_in < 1e-4 { 1.0 } else { norm_in };
            if norm_in > 0.0 && norm_out > 0.0 {
                self.sum_cos += dot[i] / (norm_in * norm_out);
            }
            self.sum_sq_norm_out += sq_out[i];
            self.sum_dot += dot[i];
            self.sum_sq_residual += sq_res[i];
            self.sum_sq_shifted += sq_shifted[i];
            self.sum_l0 += l0[i];
            self.sum_l1 += l1[i];
        }
        let column_sums = shifted.sum(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        for (s, v) in self.sum_shifted.iter_mut().zip(column_sums) {
            *s += v;
        }
        let fires = active.sum(0)?.to_vec1::<f32>()?;
        let sums = codes.sum(0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let maxes = codes.max(0)?.to_vec1::<f32>()?;
        for j in 0..self.fires.len() {
            // Exact: a batch has far fewer than 2^24 rows.
            self.fires[j] += fires[j] as u64;
            self.act_sum[j] += sums[j];
            self.act_max[j] = self.act_max[j].max(maxes[j]);
        }
        self.tokens += n as u64;
        Ok(())
    }

    /// Tokens added so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The metrics over every token added.
    pub fn summary(&self) -> (Summary, FeatureStats) {
        let n = self.tokens.max(1) as f64;
        let mean_shifted_sq: f64 = self.sum_shifted.iter().map(|s| (s / n) * (s / n)).sum();
        let variance = self.sum_sq_shifted / n - mean_shifted_sq;
        let mse = self.sum_sq_residual / n;
        // SAELens' convention for a constant input: perfect when the error vanishes too.
        let fvu = if variance < 1e-10 {
            if mse < 1e-10 {
                0.0
            } else {
                1.0
            }
        } else {
            mse / variance
        };
        let density: Vec<f64> = self.fires.iter().map(|&f| f as f64 / n).collect();
        let features = self.fires.len().max(1) as f64;
        let fraction = |keep: &dyn Fn(f64) -> bool| {
            density.iter().filter(|&&d| keep(d)).count() as f64 / features
        };
        let bins = DENSITY_LOG10_EDGES.len() - 1;
        let mut density_histogram = vec![0u64; bins];
        for &d in density.iter().filter(|&&d| d > 0.0) {
            let bin = ((d.log10() - DENSITY_LOG10_EDGES[0]) / 0.5).floor();
            density_histogram[(bin.max(0.0) as usize).min(bins - 1)] += 1;
        }
        let summary = Summary {
            tokens: self.tokens,
            mse,
            fvu,
            explained_variance: 1.0 - fvu,
            cossim: self.sum_cos / n,
            l2_norm_in: self.sum_norm_in / n,
            l2_norm_out: self.sum_norm_out / n,
            l2_ratio: self.sum_ratio / n,
            relative_reconstruction_bias: (self.sum_sq_norm_out / n) / (self.sum_dot / n),
            l0: self.sum_l0 / n,
            l1: self.sum_l1 / n,
            dead_fraction: fraction(&|d| d == 0.0),
            dense_1pct_fraction: fraction(&|d| d > 0.01),
            dense_10pct_fraction: fraction(&|d| d > 0.1),
            density_histogram,
        };
        let stats = FeatureStats {
            mean_when_active: self
                .act_sum
                .iter()
                .zip(&self.fires)
                .map(|(&s, &f)| if f == 0 { 0.0 } else { s / f as f64 })
                .collect(),
            fires: self.fires.clone(),
            density,
            max: self.act_max.clone(),
        };
        (summary, stats)
    }
}

/// Running means of next-token loss and KL over the evaluated positions, for the clean model, the model
/// with the SAE's reconstruction spliced in, and with the activation zero-ablated.
#[derive(Debug, Clone, Default)]
pub struct Downstream {
    ce: [f64; 3],
    ce_positions: u64,
    kl: [f64; 2],
    kl_positions: u64,
}

/// The downstream metrics (SAELens' names).
#[derive(Debug, Clone, Serialize)]
pub struct DownstreamSummary {
    /// Positions whose next-token loss is averaged.
    pub ce_positions: u64,
    /// Positions whose KL is averaged.
    pub kl_positions: u64,
    /// Mean next-token cross-entropy of the clean model (nats).
    pub ce_loss_without_sae: f64,
    /// … with the SAE's reconstruction spliced in at the hook.
    pub ce_loss_with_sae: f64,
    /// … with the hook's activation replaced by zeros.
    pub ce_loss_with_ablation: f64,
    /// (ablation − with SAE) / (ablation − clean): 1 for a perfect reconstruction, 0 for one no better than
    /// zeros ("CE loss recovered").
    pub ce_loss_score: f64,
    /// Mean KL(clean ‖ spliced) of the next-token distributions.
    pub kl_div_with_sae: f64,
    /// Mean KL(clean ‖ ablated).
    pub kl_div_with_ablation: f64,
    /// (KL ablation − KL SAE) / KL ablation.
    pub kl_div_score: f64,
}

impl Downstream {
    /// Adds per-position losses of one sequence: `ce[v][i]` is the loss of variant v (clean, SAE, ablation)
    /// at a counted position; `kl[v][i]` the KL of variant v (SAE, ablation) from the clean distribution.
    pub fn add(&mut self, ce: [&[f32]; 3], kl: [&[f32]; 2]) {
        for (sum, values) in self.ce.iter_mut().zip(ce) {
            *sum += values.iter().map(|&v| v as f64).sum::<f64>();
        }
        for (sum, values) in self.kl.iter_mut().zip(kl) {
            *sum += values.iter().map(|&v| v as f64).sum::<f64>();
        }
        self.ce_positions += ce[0].len() as u64;
        self.kl_positions += kl[0].len() as u64;
    }

    /// Positions whose next-token loss has been added.
    pub fn ce_positions(&self) -> u64 {
        self.ce_positions
    }

    /// The means and scores.
    pub fn summary(&self) -> DownstreamSummary {
        let ce = self.ce.map(|s| s / self.ce_positions.max(1) as f64);
        let kl = self.kl.map(|s| s / self.kl_positions.max(1) as f64);
        DownstreamSummary {
            ce_positions: self.ce_positions,
            kl_positions: self.kl_positions,
            ce_loss_without_sae: ce[0],
            ce_loss_with_sae: ce[1],
            ce_loss_with_ablation: ce[2],
            ce_loss_score: (ce[2] - ce[1]) / (ce[2] - ce[0]),
            kl_div_with_sae: kl[0],
            kl_div_with_ablation: kl[1],
            kl_div_score: (kl[1] - kl[0]) / kl[1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[&[f32]]) -> Tensor {
        let cols = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn hand_computed_tiny_case() {
        // Three tokens in 2-d, three latents.
        //   x  = (3,0) (0,4) (0,0)      x̂ = (3,0) (0,2) (1,0)      codes = (1,0,0) (0,2,0) (0,0,0.5)
        // mean x = (1, 4/3); Σ‖x − mean‖² = (4+16/9) + (1+64/9) + (1+16/9) = 6 + 96/9 = 50/3 → variance 50/9
        // ‖x − x̂‖² = 0, 4, 1 → mse 5/3; fvu = (5/3)/(50/9) = 0.3
        // cos = 1, 1, (x = 0: 0) → 2/3; ‖x‖ = 3, 4, 0 → 7/3; ‖x̂‖ = 3, 2, 1 → 2;
        // ratio = 1, 0.5, 1/1 (‖x‖ < 1e-4 counts as 1) → 2.5/3
        // mean ‖x̂‖² = 14/3, mean x·x̂ = (9 + 8 + 0)/3 = 17/3 → bias 14/17
        // l0 = 1, 1, 1 → 1; l1 = 1, 2, 0.5 → 3.5/3; every latent fires on 1 of 3 tokens.
        let mut r = Reconstruction::new(2, 3);
        let x = t(&[&[3.0, 0.0], &[0.0, 4.0], &[0.0, 0.0]]);
        let recon = t(&[&[3.0, 0.0], &[0.0, 2.0], &[1.0, 0.0]]);
        let codes = t(&[&[1.0, 0.0, 0.0], &[0.0, 2.0, 0.0], &[0.0, 0.0, 0.5]]);
        // Split in two batches: the sums must not care.
        r.add(
            &x.narrow(0, 0, 1).unwrap(),
            &codes.narrow(0, 0, 1).unwrap(),
            &recon.narrow(0, 0, 1).unwrap(),
        )
        .unwrap();
        r.add(
            &x.narrow(0, 1, 2).unwrap(),
            &codes.narrow(0, 1, 2).unwrap(),
            &recon.narrow(0, 1, 2).unwrap(),
        )
        .unwrap();
        let (s, f) = r.summary();
        let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        assert_eq!(s.tokens, 3);
        close(s.mse, 5.0 / 3.0);
        close(s.fvu, 0.3);
        close(s.explained_variance, 0.7);
        close(s.cossim, 2.0 / 3.0);
        close(s.l2_norm_in, 7.0 / 3.0);
        close(s.l2_norm_out, 2.0);
        close(s.l2_ratio, 2.5 / 3.0);
        close(s.relative_reconstruction_bias, 14.0 / 17.0);
        close(s.l0, 1.0);
        close(s.l1, 3.5 / 3.0);
        close(s.dead_fraction, 0.0);
        close(s.dense_10pct_fraction, 1.0);
        assert_eq!(f.fires, vec![1, 1, 1]);
        assert_eq!(f.mean_when_active, vec![1.0, 2.0, 0.5]);
        assert_eq!(f.max, vec![1.0, 2.0, 0.5]);
        // Density 1/3: log10 = −0.477, the last bin.
        assert_eq!(s.density_histogram[13], 3);
    }

    #[test]
    fn variance_survives_a_large_common_component() {
        // x = 1e4 + (±1): the pooled variance is 1 per token; E‖x‖² − ‖Ex‖² in f64 over f32 sums would
        // lose it to cancellation.
        let rows: Vec<Vec<f32>> = (0..1000)
            .map(|i| vec![1e4 + if i % 2 == 0 { 1.0 } else { -1.0 }])
            .collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let x = t(&refs);
        let recon = (x.ones_like().unwrap() * 1e4).unwrap();
        let codes = t(&vec![&[0f32][..]; 1000]);
        let mut r = Reconstruction::new(1, 1);
        for b in 0..4 {
            let rows = 250;
            r.add(
                &x.narrow(0, b * rows, rows).unwrap(),
                &codes.narrow(0, b * rows, rows).unwrap(),
                &recon.narrow(0, b * rows, rows).unwrap(),
            )
            .unwrap();
        }
        let (s, f) = r.summary();
        // Reconstructing every token as the mean leaves all the variance unexplained.
        assert!((s.fvu - 1.0).abs() < 1e-9, "{}", s.fvu);
        assert_eq!(s.dead_fraction, 1.0);
        assert_eq!(f.fires, vec![0]);
        assert_eq!(s.density_histogram.iter().sum::<u64>(), 0);
    }

    #[test]
    fn downstream_scores() {
        let mut d = Downstream::default();
        // clean 1, SAE 1.5, ablation 3 → (3 − 1.5)/(3 − 1) = 0.75; KL 0.5 vs 2 → 0.75.
        d.add(
            [&[1.0, 1.0], &[1.0, 2.0], &[3.0, 3.0]],
            [&[0.5, 0.5, 0.5], &[2.0, 2.0, 2.0]],
        );
        let s = d.summary();
        assert_eq!(s.ce_positions, 2);
        assert_eq!(s.kl_positions, 3);
        assert_eq!(s.ce_loss_score, 0.75);
        assert_eq!(s.kl_div_score, 0.75);
    }
}
