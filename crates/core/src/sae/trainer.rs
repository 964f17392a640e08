//! The training loop: batches from the activation store, a TopK step, gradient clipping, decoder handling,
//! Adam with warm-up and final decay, dead-latent statistics, validation, logs and exact-resume checkpoints.
//!
//! Recipe (see ARCHITECTURE.md): inputs scaled so E‖x‖ = √d_in (the capture's mean norm gives the scale);
//! decoder rows random unit vectors, encoder = decoder, b_dec = mean of the first batch (sparsify); every
//! step: loss = MSE + AuxK, global gradient-norm clip, the decoder gradient's component along each row
//! removed, Adam, decoder rows renormalised (OpenAI / sparsify). A latent is dead after `dead_tokens` tokens
//! without firing. Everything runs in a fixed order, so a fixed thread count gives bit-identical weights,
//! and a resumed run (state + data position from the last checkpoint) ends with the same bits.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::adam::{AdamConfig, Moments};
use super::step::{Grads, Precision, Sparsity, StepStats, Weights};
use crate::data::activations::{ActivationStore, ReadOptions};

/// Everything that shapes a training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Latents.
    pub d_sae: usize,
    /// Architecture and its sparsity rule: TopK(k); BatchTopK(k) (the k·n largest activations of the batch,
    /// a global threshold learned as an EMA of the smallest kept one, exported as a JumpReLU); JumpReLU
    /// (learned per-latent thresholds, L0 penalty); ReLU (L1 penalty).
    pub sparsity: Sparsity,
    /// Steps over which the L0/L1 coefficient ramps up linearly from 0.
    pub penalty_warmup_steps: u64,
    /// Where steps run: the sparse CPU path, or dense tensor operations on a device.
    pub engine: Engine,
    /// Peak learning rate.
    pub lr: f32,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Fraction of the steps at the end over which the rate decays linearly to 0.
    pub decay_fraction: f64,
    /// Tokens per step.
    pub batch_size: usize,
    /// Optimiser steps.
    pub steps: u64,
    /// AuxK coefficient (0 = off).
    pub aux_coef: f32,
    /// Tokens without firing after which a latent counts as dead.
    pub dead_tokens: u64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f32,
    /// Seed of initialisation and data order.
    pub seed: u64,
    /// Adam settings.
    pub adam: AdamConfig,
    /// Steps between log rows (and validation).
    pub log_every: u64,
    /// Steps between checkpoints.
    pub checkpoint_every: u64,
    /// Splits to train on (`None`: all).
    pub train_splits: Option<Vec<String>>,
    /// Split and number of rows held out for validation.
    pub validation: Option<(String, usize)>,
    /// Input scale (√d_in / E‖x‖), folded back into the weights at export.
    pub scale: f32,
    /// Rows in the reader's mixing buffer.
    pub buffer_rows: usize,
}

/// Which implementation of the training step runs.
#[derive(Debug, Clone)]
pub enum Engine {
    /// [`Weights::step`](super::step::Weights::step): sparse, multithreaded, CPU, ranking TopK latents
    /// by an encoder product at this precision.
    Sparse(Precision),
    /// `dense::step` on a device (GPUs; also the CPU reference).
    Dense(Device),
}

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

/// Where a run reports to.
pub trait Callbacks {
    /// Called after every step with the number of steps done.
    fn progress(&self, _step: u64) {}
    /// Polled between steps; `true` stops every member with a checkpoint.
    fn cancelled(&self) -> bool {
        false
    }
    /// A line for the user.
    fn log(&self, _msg: &str) {}
}

/// Why a run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum Stop {
    /// Asked to stop; a checkpoint at `step` was written.
    #[error("stopped at step {0} (checkpoint written)")]
    Cancelled(u64),
}

impl TrainConfig {
    /// How latents are chosen (and penalised) at step `t` (1-based): penalties ramp up over
    /// `penalty_warmup_steps`.
    pub fn training_sparsity(&self, t: u64) -> Sparsity {
        let ramp = if self.penalty_warmup_steps > 0 {
            (t as f32 / self.penalty_warmup_steps as f32).min(1.0)
        } else {
            1.0
        };
        match self.sparsity {
            Sparsity::JumpRelu {
                l0,
                bandwidth,
                mode,
                pre_act,
            } => Sparsity::JumpRelu {
                l0: l0 * ramp,
                bandwidth,
                mode,
                pre_act,
            },
            Sparsity::Relu { l1 } => Sparsity::Relu { l1: l1 * ramp },
            other => other,
        }
    }

    /// Whether decoder rows are kept at unit norm (all but ReLU, whose L1 is weighted by the norms).
    pub fn unit_decoder(&self) -> bool {
        !matches!(self.sparsity, Sparsity::Relu { .. })
    }

    /// Learning rate at step `t` (1-based): linear warm-up, constant, linear decay to 0 at the end.
    pub fn lr_at(&self, t: u64) -> f32 {
        let warm = if self.warmup_steps > 0 && t <= self.warmup_steps {
            t as f32 / self.warmup_steps as f32
        } else {
            1.0
        };
        let decay_steps = (self.decay_fraction * self.steps as f64).round() as u64;
        let decay_start = self.steps - decay_steps.min(self.steps);
        let decay = if decay_steps > 0 && t > decay_start {
            (self.steps - t + 1) as f32 / (decay_steps + 1) as f32
        } else {
            1.0
        };
        self.lr * warm.min(decay)
    }
}

fn unit_rows(w: &mut [f32], d: usize) {
    w.par_chunks_mut(d).for_each(|row| {
        let norm = super::step::dot(row, row).sqrt();
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

    /// One optimiser step on a normalised batch; returns its statistics.
    pub fn step(
        &mut self,
        cfg: &TrainConfig,
        x: &[f32],
        grads: &mut Grads,
    ) -> anyhow::Result<StepStats> {
        let dead = self.dead(cfg);
        let aux_coef = match cfg.sparsity {
            Sparsity::TopK(_) | Sparsity::BatchTopK(_) => cfg.aux_coef,
            _ => 0.0,
        };
        let sparsity = cfg.training_sparsity(self.step + 1);
        let stats = match &cfg.engine {
            Engine::Sparse(precision) => self
                .weights
                .step(x, sparsity, *precision, &dead, aux_coef, grads),
            Engine::Dense(device) => {
                super::dense::step(&self.weights, x, sparsity, &dead, aux_coef, device, grads)?
            }
        };
        if matches!(cfg.sparsity, Sparsity::BatchTopK(_)) && stats.min_active > 0.0 {
            self.threshold = 0.99 * self.threshold + 0.01 * stats.min_active;
        }
        let d = self.weights.d_in;
        // Remove the part of each decoder row's gradient along the (unit) row: only directions can change.
        let unit = cfg.unit_decoder();
        grads
            .w_dec
            .par_chunks_mut(d)
            .zip(self.weights.w_dec.par_chunks(d))
            .for_each(|(g, w)| {
                let along = super::step::dot(g, w);
                if unit && along != 0.0 {
                    g.iter_mut().zip(w).for_each(|(g, w)| *g -= along * w);
                }
            });
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
        let scale = if cfg.grad_clip > 0.0 && norm > cfg.grad_clip as f64 {
            (cfg.grad_clip as f64 / norm) as f32
        } else {
            1.0
        };
        self.step += 1;
        let lr = cfg.lr_at(self.step);
        let p = &mut self.weights;
        let [m_we, m_be, m_wd, m_bd, m_th] = &mut self.moments;
        m_we.update(&cfg.adam, &mut p.w_enc, &grads.w_enc, scale, lr, self.step);
        m_be.update(&cfg.adam, &mut p.b_enc, &grads.b_enc, scale, lr, self.step);
        m_wd.update(&cfg.adam, &mut p.w_dec, &grads.w_dec, scale, lr, self.step);
        m_bd.update(&cfg.adam, &mut p.b_dec, &grads.b_dec, scale, lr, self.step);
        if !p.threshold.is_empty() {
            m_th.update(
                &cfg.adam,
                &mut p.threshold,
                &grads.threshold,
                scale,
                lr,
                self.step,
            );
            // A negative threshold would let negative pre-activations through (SAELens uses relu(θ)).
            p.threshold.iter_mut().for_each(|t| *t = t.max(0.0));
        }
        if unit {
            unit_rows(&mut p.w_dec, d);
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

    fn tensors(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let f = |v: &[f32]| Tensor::from_slice(v, v.len(), &cpu);
        let p = &self.weights;
        let i = |v: &[u64]| {
            let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
            Tensor::from_vec(v, self.since_fired.len(), &cpu)
        };
        let mut out = vec![
            ("w_enc".to_string(), f(&p.w_enc)?),
            ("threshold".into(), f(&p.threshold)?),
            ("b_enc".into(), f(&p.b_enc)?),
            ("w_dec".into(), f(&p.w_dec)?),
            ("b_dec".into(), f(&p.b_dec)?),
            ("since_fired".into(), i(&self.since_fired)?),
            ("fired_total".into(), i(&self.fired_total)?),
        ];
        for (name, m) in ["w_enc", "b_enc", "w_dec", "b_dec", "threshold"]
            .iter()
            .zip(&self.moments)
        {
            out.push((format!("adam_m.{name}"), f(&m.m)?));
            out.push((format!("adam_v.{name}"), f(&m.v)?));
        }
        Ok(out)
    }

    /// Writes a checkpoint into `dir/step-N/` (temporary name, fsync, rename) and drops older ones.
    pub fn save_checkpoint(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("tmp-{}", self.step));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let tensors: std::collections::HashMap<String, Tensor> =
            self.tensors()?.into_iter().collect();
        candle_core::safetensors::save(&tensors, tmp.join("state.safetensors"))?;
        let meta =
            serde_json::json!({"step": self.step, "log": self.log, "threshold": self.threshold});
        std::fs::write(tmp.join("state.json"), serde_json::to_vec(&meta)?)?;
        for f in ["state.safetensors", "state.json"] {
            std::fs::File::open(tmp.join(f))?.sync_all()?;
        }
        let dest = dir.join(format!("step-{:09}", self.step));
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::rename(&tmp, &dest)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.path() != dest {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        Ok(())
    }

    /// The latest complete checkpoint in `dir`, if any.
    pub fn load_checkpoint(dir: &Path, d_in: usize, d_sae: usize) -> anyhow::Result<Option<Self>> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(None);
        };
        let mut steps: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
            })
            .collect();
        steps.sort();
        let Some(last) = steps.pop() else {
            return Ok(None);
        };
        let ts = candle_core::safetensors::load(last.join("state.safetensors"), &Device::Cpu)
            .with_context(|| format!("reading checkpoint {}", last.display()))?;
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(last.join("state.json"))?)?;
        let f = |name: &str| -> anyhow::Result<Vec<f32>> {
            Ok(ts
                .get(name)
                .with_context(|| format!("checkpoint lacks {name}"))?
                .to_vec1()?)
        };
        let u = |name: &str| -> anyhow::Result<Vec<u64>> {
            let v: Vec<i64> = ts
                .get(name)
                .with_context(|| format!("checkpoint lacks {name}"))?
                .to_vec1()?;
            Ok(v.into_iter().map(|x| x as u64).collect())
        };
        let weights = Weights {
            d_in,
            d_sae,
            w_enc: f("w_enc")?,
            b_enc: f("b_enc")?,
            w_dec: f("w_dec")?,
            b_dec: f("b_dec")?,
            threshold: f("threshold")?,
        };
        if weights.w_enc.len() != d_in * d_sae || weights.b_dec.len() != d_in {
            bail!(
                "checkpoint {} has other shapes than this run",
                last.display()
            );
        }
        let m = |name: &str| -> anyhow::Result<Moments> {
            Ok(Moments {
                m: f(&format!("adam_m.{name}"))?,
                v: f(&format!("adam_v.{name}"))?,
            })
        };
        Ok(Some(Self {
            moments: [
                m("w_enc")?,
                m("b_enc")?,
                m("w_dec")?,
                m("b_dec")?,
                m("threshold")?,
            ],
            weights,
            step: meta["step"].as_u64().context("checkpoint without step")?,
            since_fired: u("since_fired")?,
            fired_total: u("fired_total")?,
            log: serde_json::from_value(meta["log"].clone())?,
            threshold: meta["threshold"].as_f64().unwrap_or(0.0),
        }))
    }
}

impl State {
    /// The trained SAE in SAELens layout, with the input scale folded into the weights: trained on s·x,
    /// so W_enc ← s·W_encᵀ, W_dec ← W_dec / s, b_dec ← b_dec / s gives the same latents on raw x.
    pub fn to_sae(
        &self,
        cfg: &TrainConfig,
        from: &super::format::Provenance,
    ) -> anyhow::Result<super::format::Sae> {
        let p = &self.weights;
        let (d, m, s) = (p.d_in, p.d_sae, cfg.scale);
        let cpu = Device::Cpu;
        let w_enc = Tensor::from_slice(&p.w_enc, (m, d), &cpu)?
            .t()?
            .contiguous()?
            * s as f64;
        // The fold keeps pre-activations unchanged, so thresholds carry over as they are.
        use super::format::{Activation, Sae};
        let (activation, threshold, sae_cfg) = match cfg.sparsity {
            Sparsity::TopK(k) => (Activation::TopK(k), None, Sae::topk_cfg(d, m, k, from)),
            Sparsity::BatchTopK(_) => (
                Activation::JumpRelu,
                Some(Tensor::full(self.threshold as f32, m, &cpu)?),
                Sae::jumprelu_cfg(d, m, "batchtopk", from),
            ),
            Sparsity::JumpRelu { .. } => (
                Activation::JumpRelu,
                Some(Tensor::from_slice(&p.threshold, m, &cpu)?),
                Sae::jumprelu_cfg(d, m, "jumprelu", from),
            ),
            Sparsity::Relu { .. } | Sparsity::Threshold(_) => {
                (Activation::Relu, None, Sae::standard_cfg(d, m, from))
            }
        };
        Ok(super::format::Sae {
            activation,
            w_enc: w_enc?,
            b_enc: Tensor::from_slice(&p.b_enc, m, &cpu)?,
            w_dec: (Tensor::from_slice(&p.w_dec, (m, d), &cpu)? / s as f64)?,
            b_dec: (Tensor::from_slice(&p.b_dec, d, &cpu)? / s as f64)?,
            threshold,
            apply_b_dec_to_input: true,
            layer_norm: false,
            cfg: sae_cfg,
        })
    }

    /// SAELens' `sparsity.safetensors` content: log10 of each latent's firing rate over the run.
    pub fn log_density(&self, cfg: &TrainConfig) -> Vec<f32> {
        let tokens = (self.step * cfg.batch_size as u64).max(1) as f64;
        self.fired_total
            .iter()
            .map(|&f| (f as f64 / tokens + 1e-10).log10() as f32)
            .collect()
    }
}

/// The training data as an endless sequence of full batches (epochs reshuffled with `seed + epoch`).
struct Data<'a> {
    store: &'a ActivationStore,
    cfg: &'a TrainConfig,
    epoch: u64,
    batches: Option<crate::data::activations::reader::Batches>,
}

impl<'a> Data<'a> {
    fn new(store: &'a ActivationStore, cfg: &'a TrainConfig) -> Self {
        Self {
            store,
            cfg,
            epoch: 0,
            batches: None,
        }
    }

    fn next(&mut self) -> anyhow::Result<(Vec<f32>, Vec<u64>)> {
        for _attempt in 0..2 {
            if self.batches.is_none() {
                let options = ReadOptions {
                    batch_size: self.cfg.batch_size,
                    shuffle: Some(self.cfg.seed.wrapping_add(self.epoch)),
                    buffer_rows: self.cfg.buffer_rows,
                    splits: self.cfg.train_splits.clone(),
                    dtype: DType::F32,
                };
                self.batches = Some(self.store.batches(&options, &Device::Cpu)?);
            }
            if let Some(batch) = self.batches.as_mut().expect("set above").next() {
                let batch = batch?;
                if batch.rows.len() == self.cfg.batch_size {
                    let mut x: Vec<f32> = batch.acts.flatten_all()?.to_vec1()?;
                    x.iter_mut().for_each(|v| *v *= self.cfg.scale);
                    return Ok((x, batch.rows));
                }
            }
            // End of an epoch (a short last batch is dropped, so every step has the same size).
            self.batches = None;
            self.epoch += 1;
        }
        bail!(
            "fewer than {} training rows: lower batch_size or capture more tokens",
            self.cfg.batch_size
        )
    }
}

/// Rows of the validation split, normalised, in store order.
fn validation_rows(store: &ActivationStore, cfg: &TrainConfig) -> anyhow::Result<Option<Vec<f32>>> {
    let Some((split, rows)) = &cfg.validation else {
        return Ok(None);
    };
    let options = ReadOptions {
        batch_size: *rows,
        splits: Some(vec![split.clone()]),
        ..ReadOptions::default()
    };
    match store.batches(&options, &Device::Cpu)?.next() {
        Some(b) => {
            let b = b?;
            let mut x: Vec<f32> = b.acts.flatten_all()?.to_vec1()?;
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                bail!(
                    "non-finite activation in tokens.parquet row {} (column {}) of the capture",
                    b.rows[i / store.d_model()],
                    i % store.d_model()
                );
            }
            x.iter_mut().for_each(|v| *v *= cfg.scale);
            Ok(Some(x))
        }
        None => Ok(None),
    }
}

/// One SAE of a group trained on a shared pass over the data.
pub struct Run<'a> {
    /// Its configuration (the data settings must equal the other members').
    pub cfg: &'a TrainConfig,
    /// Its checkpoint directory.
    pub checkpoints: PathBuf,
    /// Where it reports.
    pub callbacks: &'a dyn Callbacks,
}

/// Trains (or resumes from the checkpoint in `checkpoints`) to `cfg.steps` steps.
pub fn train(
    store: &ActivationStore,
    cfg: &TrainConfig,
    checkpoints: &Path,
    callbacks: &dyn Callbacks,
) -> anyhow::Result<State> {
    let run = Run {
        cfg,
        checkpoints: checkpoints.to_path_buf(),
        callbacks,
    };
    train_group(store, &[run])
        .pop()
        .expect("one result per run")
}

/// A group member during the pass.
enum Member {
    Training {
        state: Box<State>,
        grads: Box<Grads>,
        last_good: u64,
    },
    Finished(anyhow::Result<Box<State>>),
}

/// Trains several SAEs on one pass over the activations: each batch is read once and fed to every member
/// whose next step it is. Members only differ in what the data order does not depend on (architecture,
/// size, k, penalties, learning rate and schedule, step count); each ends exactly as it would alone, and
/// resumes from its own checkpoints. Returns one result per run, in order.
pub fn train_group(store: &ActivationStore, runs: &[Run]) -> Vec<anyhow::Result<State>> {
    let mut members: Vec<Member> = Vec::new();
    if let Err(e) = shared_pass(store, runs, &mut members) {
        // Errors of the shared data (unreadable store, NaN in a batch) stop every member still training.
        let msg = format!("{e:#}");
        members.resize_with(runs.len(), || {
            Member::Finished(Err(anyhow::anyhow!(msg.clone())))
        });
        for m in &mut members {
            if matches!(m, Member::Training { .. }) {
                *m = Member::Finished(Err(anyhow::anyhow!(msg.clone())));
            }
        }
    }
    members
        .into_iter()
        .map(|m| match m {
            Member::Finished(result) => result.map(|state| *state),
            Member::Training { .. } => unreachable!("the pass finishes every member"),
        })
        .collect()
}

fn shared_pass(
    store: &ActivationStore,
    runs: &[Run],
    members: &mut Vec<Member>,
) -> anyhow::Result<()> {
    let Some(first_run) = runs.first() else {
        return Ok(());
    };
    let data_cfg = first_run.cfg;
    for r in runs {
        let c = r.cfg;
        if (
            c.batch_size,
            c.seed,
            &c.train_splits,
            c.scale.to_bits(),
            c.buffer_rows,
            &c.validation,
        ) != (
            data_cfg.batch_size,
            data_cfg.seed,
            &data_cfg.train_splits,
            data_cfg.scale.to_bits(),
            data_cfg.buffer_rows,
            &data_cfg.validation,
        ) {
            bail!("members of a training group must share batch size, seed, splits, scale and validation");
        }
    }
    let d_in = store.d_model();
    let val = validation_rows(store, data_cfg)?;
    let mut first_batch = None;
    for r in runs {
        let member = match State::load_checkpoint(&r.checkpoints, d_in, r.cfg.d_sae) {
            Ok(Some(state)) => {
                r.callbacks.log(&format!(
                    "resuming from the checkpoint at step {}",
                    state.step
                ));
                Member::Training {
                    last_good: state.step,
                    state: Box::new(state),
                    grads: Box::default(),
                }
            }
            Ok(None) => {
                if first_batch.is_none() {
                    first_batch = Some(Data::new(store, data_cfg).next()?.0);
                }
                let first = first_batch.as_deref().expect("read above");
                Member::Training {
                    state: Box::new(State::init(r.cfg, d_in, first)),
                    grads: Box::default(),
                    last_good: 0,
                }
            }
            Err(e) => Member::Finished(Err(e)),
        };
        members.push(member);
    }
    let steps_done = |m: &Member| match m {
        Member::Training { state, .. } => Some(state.step),
        Member::Finished(_) => None,
    };
    let Some(mut position) = members.iter().filter_map(steps_done).min() else {
        return Ok(());
    };
    // Every epoch yields exactly ⌊rows / batch⌋ full batches, so whole epochs are skipped and only the
    // current one is replayed up to the earliest member's step (reading is far cheaper than training).
    let mut data = Data::new(store, data_cfg);
    let rows = match &data_cfg.train_splits {
        Some(splits) => splits
            .iter()
            .map(|s| store.info.splits.get(s).copied().unwrap_or(0))
            .sum(),
        None => store.rows(),
    };
    let per_epoch = (rows / data_cfg.batch_size as u64).max(1);
    data.epoch = position / per_epoch;
    for _ in 0..position % per_epoch {
        data.next()?;
    }
    loop {
        let cancelled = runs.iter().any(|r| r.callbacks.cancelled());
        for (m, r) in members.iter_mut().zip(runs) {
            let Member::Training { state, .. } = m else {
                continue;
            };
            let finished = if state.step >= r.cfg.steps {
                None
            } else if cancelled {
                Some(state.save_checkpoint(&r.checkpoints).map(|()| state.step))
            } else {
                continue;
            };
            let taken = std::mem::replace(m, Member::Finished(Ok(Box::default())));
            let Member::Training { state, .. } = taken else {
                unreachable!("matched above")
            };
            *m = Member::Finished(match finished {
                None => Ok(state),
                Some(Ok(step)) => Err(Stop::Cancelled(step).into()),
                Some(Err(e)) => Err(e),
            });
        }
        if members.iter().all(|m| matches!(m, Member::Finished(_))) {
            return Ok(());
        }
        let (x, rows) = data.next()?;
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            bail!(
                "non-finite activation in tokens.parquet row {} (column {}) of the capture",
                rows[i / d_in],
                i % d_in
            );
        }
        for (m, r) in members.iter_mut().zip(runs) {
            if let Member::Training {
                state,
                grads,
                last_good,
            } = m
            {
                if state.step != position {
                    continue; // resumed ahead of this batch
                }
                if let Err(e) = member_step(state, r, &x, grads, val.as_deref(), last_good) {
                    *m = Member::Finished(Err(e));
                }
            }
        }
        position += 1;
    }
}

/// One step of one member on batch `x`, with its log row, checkpoint and progress report.
fn member_step(
    state: &mut State,
    run: &Run,
    x: &[f32],
    grads: &mut Grads,
    val: Option<&[f32]>,
    last_good: &mut u64,
) -> anyhow::Result<()> {
    let cfg = run.cfg;
    let lr = cfg.lr_at(state.step + 1) as f64;
    let stats = state.step(cfg, x, grads)?;
    let loss = stats.mse + stats.aux + stats.penalty;
    if !loss.is_finite() || state.weights.w_dec.iter().any(|v| !v.is_finite()) {
        bail!(
            "training diverged at step {} (loss {loss}); the last good checkpoint (step {last_good}) is \
             kept: lower lr and rerun to resume from it",
            state.step
        );
    }
    let step = state.step;
    if step.is_multiple_of(cfg.log_every) || step == cfg.steps {
        let v = val.map(|v| state.weights.evaluate(v, state.inference_sparsity(cfg)));
        let dead = state.dead(cfg).iter().filter(|&&b| b).count();
        state.log.push(LogRow {
            step,
            tokens: step * cfg.batch_size as u64,
            loss,
            mse: stats.mse,
            aux: stats.aux,
            penalty: stats.penalty,
            fvu: stats.fvu,
            l0: stats.l0,
            dead_fraction: dead as f64 / cfg.d_sae as f64,
            lr,
            val_fvu: v.map(|s| s.fvu),
            val_l0: v.map(|s| s.l0),
        });
    }
    if step.is_multiple_of(cfg.checkpoint_every) && step < cfg.steps {
        state.save_checkpoint(&run.checkpoints)?;
        *last_good = step;
    }
    run.callbacks.progress(step);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(steps: u64, warmup: u64, decay: f64) -> TrainConfig {
        TrainConfig {
            d_sae: 8,
            sparsity: Sparsity::TopK(2),
            penalty_warmup_steps: 0,
            engine: Engine::Sparse(Default::default()),
            lr: 1.0,
            warmup_steps: warmup,
            decay_fraction: decay,
            batch_size: 4,
            steps,
            aux_coef: 0.0,
            dead_tokens: 10,
            grad_clip: 0.0,
            seed: 0,
            adam: AdamConfig::default(),
            log_every: 1,
            checkpoint_every: 1,
            train_splits: None,
            validation: None,
            scale: 1.0,
            buffer_rows: 16,
        }
    }

    #[test]
    fn checkpoints_round_trip_the_whole_state_of_every_architecture() {
        let x = crate::kernels::test_data::random(4 * 6, 7, 1.0);
        for sparsity in [
            Sparsity::TopK(2),
            Sparsity::BatchTopK(2),
            Sparsity::JumpRelu {
                l0: 0.1,
                bandwidth: 0.5,
                mode: crate::sae::step::L0Mode::Step,
                pre_act: 0.0,
            },
            Sparsity::Relu { l1: 0.1 },
        ] {
            let c = TrainConfig {
                sparsity,
                lr: 0.01,
                aux_coef: 0.5,
                dead_tokens: 0,
                ..cfg(10, 2, 0.2)
            };
            let mut state = State::init(&c, 6, &x);
            let mut grads = Grads::default();
            for _ in 0..3 {
                state.step(&c, &x, &mut grads).unwrap();
            }
            state.log.push(LogRow {
                step: 3,
                tokens: 12,
                loss: 0.1 + 0.2,
                mse: 1.0 / 3.0,
                aux: 0.0,
                penalty: 0.0,
                fvu: 0.7,
                l0: 2.0,
                dead_fraction: 0.0,
                lr: 0.01,
                val_fvu: None,
                val_l0: Some(2.5),
            });
            let dir = tempfile::tempdir().unwrap();
            state.save_checkpoint(dir.path()).unwrap();
            let loaded = State::load_checkpoint(dir.path(), 6, 8).unwrap().unwrap();
            assert_eq!(loaded, state, "{sparsity:?}");
        }
    }

    #[test]
    fn the_learning_rate_warms_up_holds_and_decays_to_zero() {
        let c = cfg(10, 4, 0.2);
        let lrs: Vec<f32> = (1..=10).map(|t| c.lr_at(t)).collect();
        assert_eq!(
            lrs,
            [
                0.25,
                0.5,
                0.75,
                1.0,
                1.0,
                1.0,
                1.0,
                1.0,
                2.0 / 3.0,
                1.0 / 3.0
            ]
        );
    }
}
