//! The complete training state ([`State`]: weights, Adam moments, firing statistics, log) and one optimiser
//! step on it: the architecture's step, decoder-gradient projection, gradient clipping, Adam, decoder
//! renormalisation and dead-latent counts.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::resident::Resident;
use super::upload::upload_batch;
use super::{Engine, TrainConfig};
use crate::sae::adam::Moments;
use crate::sae::step::{total_variance, Grads, Sparsity, StepStats, Weights};

/// One row of `train_log.parquet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    /// Step just finished (1-based).
    pub step: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Total loss of that step.
    pub loss: f64,
    /// Reconstruction part.
    pub mse: f64,
    /// AuxK part.
    pub aux: f64,
    /// Sparsity penalty part (JumpReLU L0, ReLU L1).
    #[serde(default)]
    pub penalty: f64,
    /// Batch FVU.
    pub fvu: f64,
    /// Batch L0.
    pub l0: f64,
    /// Fraction of latents dead.
    pub dead_fraction: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Validation FVU / L0, when a validation split exists.
    pub val_fvu: Option<f64>,
    /// Validation L0.
    pub val_l0: Option<f64>,
}

/// The complete training state (what a checkpoint holds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// Weights.
    pub weights: Weights,
    /// Adam moments of w_enc, b_enc, w_dec, b_dec, threshold.
    pub moments: [Moments; 5],
    /// Steps done.
    pub step: u64,
    /// Tokens since each latent last fired.
    pub since_fired: Vec<u64>,
    /// Tokens each latent fired on, over the whole run (for `sparsity.safetensors`).
    pub fired_total: Vec<u64>,
    /// Log rows so far.
    pub log: Vec<LogRow>,
    /// BatchTopK's learned threshold (EMA of the smallest kept activation, rate 0.01, as SAELens).
    pub threshold: f64,
}

/// Scales every row (`d` wide) to unit norm.
fn unit_rows(w: &mut [f32], d: usize) {
    w.par_chunks_mut(d).for_each(|row| {
        let norm = crate::kernels::simd::dot(row, row).sqrt();
        // f32 epsilon as in sparsify, so an all-zero row stays finite.
        let inv = 1.0 / (norm + f32::EPSILON);
        row.iter_mut().for_each(|v| *v *= inv);
    });
}

/// Σ v² in f64, over fixed chunks in parallel (8 lanes each) and summed in chunk order: deterministic,
/// and not one serial chain of 5M dependent adds.
fn sum_squares(v: &[f32]) -> f64 {
    let partial: Vec<f64> = v
        .par_chunks(1 << 14)
        .map(|chunk| {
            let mut lanes = [0f64; 8];
            let body = chunk.chunks_exact(8);
            let tail: f64 = body.remainder().iter().map(|&x| x as f64 * x as f64).sum();
            for c in body {
                for l in 0..8 {
                    lanes[l] += c[l] as f64 * c[l] as f64;
                }
            }
            lanes.iter().sum::<f64>() + tail
        })
        .collect();
    partial.iter().sum()
}

impl State {
    /// Fresh parameters: random unit decoder rows, encoder = decoder, b_dec = mean of `first_batch`.
    pub fn init(cfg: &TrainConfig, d_in: usize, first_batch: &[f32]) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut w_dec: Vec<f32> = (0..cfg.d_sae * d_in)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        unit_rows(&mut w_dec, d_in);
        let n = first_batch.len() / d_in;
        let mut b_dec = vec![0f64; d_in];
        for row in first_batch.chunks(d_in) {
            for (b, &v) in b_dec.iter_mut().zip(row) {
                *b += v as f64;
            }
        }
        let weights = Weights {
            d_in,
            d_sae: cfg.d_sae,
            w_enc: w_dec.clone(),
            b_enc: vec![0.0; cfg.d_sae],
            w_dec,
            b_dec: b_dec.iter().map(|b| (b / n as f64) as f32).collect(),
            // SAELens' initial JumpReLU threshold.
            threshold: match cfg.sparsity {
                Sparsity::JumpRelu { .. } => vec![0.01; cfg.d_sae],
                _ => Vec::new(),
            },
        };
        Self {
            moments: [
                Moments::zeros(weights.w_enc.len()),
                Moments::zeros(weights.b_enc.len()),
                Moments::zeros(weights.w_dec.len()),
                Moments::zeros(weights.b_dec.len()),
                Moments::zeros(weights.threshold.len()),
            ],
            weights,
            step: 0,
            since_fired: vec![0; cfg.d_sae],
            fired_total: vec![0; cfg.d_sae],
            log: Vec::new(),
            threshold: 0.0,
        }
    }

    /// How the exported SAE chooses latents: TopK, or BatchTopK's learned threshold.
    pub fn inference_sparsity(&self, cfg: &TrainConfig) -> Sparsity {
        match cfg.sparsity {
            Sparsity::BatchTopK(_) => Sparsity::Threshold(self.threshold as f32),
            other => other,
        }
    }

    /// Latents that have not fired for more than `dead_tokens` tokens.
    pub fn dead(&self, cfg: &TrainConfig) -> Vec<bool> {
        self.since_fired
            .iter()
            .map(|&t| t > cfg.dead_tokens)
            .collect()
    }

    /// BatchTopK's threshold follows the smallest kept activation of each step (EMA, rate 0.01).
    pub(super) fn track_threshold(&mut self, cfg: &TrainConfig, stats: &StepStats) {
        if matches!(cfg.sparsity, Sparsity::BatchTopK(_)) && stats.min_active > 0.0 {
            self.threshold = 0.99 * self.threshold + 0.01 * stats.min_active;
        }
    }

    /// One optimiser step on a normalised batch; returns its statistics. On `Engine::Dense` the state goes
    /// to the device and back for this one step (the trainer keeps it there instead; see `resident`).
    pub fn step(
        &mut self,
        cfg: &TrainConfig,
        x: &[f32],
        grads: &mut Grads,
    ) -> anyhow::Result<StepStats> {
        let precision = match &cfg.engine {
            Engine::Sparse(precision) => *precision,
            Engine::Dense(device) => {
                let d = self.weights.d_in;
                let mut resident = Resident::new(self, cfg, device, None)?;
                let (batch, _) = upload_batch(x, d, device)?;
                let variance = total_variance(x, d);
                let (stats, _) = resident.step(cfg, self.step + 1, &batch, variance)?;
                resident.download(self)?;
                self.step += 1;
                self.track_threshold(cfg, &stats);
                return Ok(stats);
            }
        };
        let dead = self.dead(cfg);
        let aux_coef = match cfg.sparsity {
            Sparsity::TopK(_) | Sparsity::BatchTopK(_) => cfg.aux_coef,
            _ => 0.0,
        };
        let sparsity = cfg.training_sparsity(self.step + 1);
        let stats = self
            .weights
            .step(x, sparsity, precision, &dead, aux_coef, grads);
        self.track_threshold(cfg, &stats);
        let d = self.weights.d_in;
        // Remove the part of each decoder row's gradient along the (unit) row: only directions can change.
        let unit = cfg.unit_decoder();
        grads
            .w_dec
            .par_chunks_mut(d)
            .zip(self.weights.w_dec.par_chunks(d))
            .for_each(|(g, w)| {
                let along = crate::kernels::simd::dot(g, w);
                if unit && along != 0.0 {
                    g.iter_mut().zip(w).for_each(|(g, w)| *g -= along * w);
                }
            });
        // The gradient's norm only when it is clipped (a pass over 21 MB, ~1 ms a step, otherwise unused).
        let scale = if cfg.grad_clip > 0.0 {
            let norm = [
                &grads.w_enc,
                &grads.b_enc,
                &grads.w_dec,
                &grads.b_dec,
                &grads.threshold,
            ]
            .iter()
            .map(|g| sum_squares(g))
            .sum::<f64>()
            .sqrt();
            // min(1, clip / ‖g‖). A NaN norm leaves the scale at 1 (`f64::min` ignores NaN): the NaN
            // gradient still reaches the weights, where the trainer's finiteness check stops the run.
            (cfg.grad_clip as f64 / norm).min(1.0) as f32
        } else {
            1.0
        };
        self.step += 1;
        let lr = cfg.lr_at(self.step);
        let weights = &mut self.weights;
        let [m_we, m_be, m_wd, m_bd, m_th] = &mut self.moments;
        m_we.update(
            &cfg.adam,
            &mut weights.w_enc,
            &grads.w_enc,
            scale,
            lr,
            self.step,
        );
        m_be.update(
            &cfg.adam,
            &mut weights.b_enc,
            &grads.b_enc,
            scale,
            lr,
            self.step,
        );
        m_wd.update(
            &cfg.adam,
            &mut weights.w_dec,
            &grads.w_dec,
            scale,
            lr,
            self.step,
        );
        m_bd.update(
            &cfg.adam,
            &mut weights.b_dec,
            &grads.b_dec,
            scale,
            lr,
            self.step,
        );
        if !weights.threshold.is_empty() {
            m_th.update(
                &cfg.adam,
                &mut weights.threshold,
                &grads.threshold,
                scale,
                lr,
                self.step,
            );
            // A negative threshold would let negative pre-activations through (SAELens uses relu(θ)).
            weights.threshold.iter_mut().for_each(|t| *t = t.max(0.0));
        }
        if unit {
            unit_rows(&mut weights.w_dec, d);
        }
        let n = (x.len() / d) as u64;
        for ((since, total), &f) in self
            .since_fired
            .iter_mut()
            .zip(self.fired_total.iter_mut())
            .zip(&grads.fired)
        {
            *since = if f > 0 { 0 } else { *since + n };
            *total += f as u64;
        }
        Ok(stats)
    }
}
