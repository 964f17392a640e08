//! What shapes a training run ([`TrainConfig`]), where its steps run ([`Engine`]), and the schedules the
//! configuration implies: learning rate, penalty warm-up, unit decoder rows.

use candle_core::Device;

use crate::kernels::gemm::Precision;
use crate::sae::adam::AdamConfig;
use crate::sae::step::Sparsity;

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
    /// [`Weights::step`](crate::sae::step::Weights::step): sparse, multithreaded, CPU, ranking TopK latents
    /// by an encoder product at this precision.
    Sparse(Precision),
    /// [`dense::step`](crate::sae::dense::step) on a device (GPUs; also the CPU reference).
    Dense(Device),
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small TopK configuration for unit tests (8 latents, k 2, batches of 4).
    pub(crate) fn test_config(steps: u64, warmup: u64, decay: f64) -> TrainConfig {
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
    fn the_learning_rate_warms_up_holds_and_decays_to_zero() {
        let c = test_config(10, 4, 0.2);
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
