//! What a finished run leaves: the SAE in SAELens layout with the input scale folded back in, and SAELens'
//! per-latent firing densities.

use candle_core::{Device, Tensor};

use super::{State, TrainConfig};
use crate::sae::format::{Activation, Provenance, Sae};
use crate::sae::step::Sparsity;

impl State {
    /// The trained SAE in SAELens layout, with the input scale folded into the weights: trained on s·x,
    /// so W_enc ← s·W_encᵀ, W_dec ← W_dec / s, b_dec ← b_dec / s gives the same latents on raw x.
    pub fn to_sae(&self, cfg: &TrainConfig, from: &Provenance) -> anyhow::Result<Sae> {
        let weights = &self.weights;
        let (d, m, s) = (weights.d_in, weights.d_sae, cfg.scale);
        let cpu = Device::Cpu;
        let w_enc = Tensor::from_slice(&weights.w_enc, (m, d), &cpu)?
            .t()?
            .contiguous()?
            * s as f64;
        // The fold keeps pre-activations unchanged, so thresholds carry over as they are.
        let (activation, threshold, sae_cfg) = match cfg.sparsity {
            Sparsity::TopK(k) => (Activation::TopK(k), None, Sae::topk_cfg(d, m, k, from)),
            Sparsity::BatchTopK(_) => (
                Activation::JumpRelu,
                Some(Tensor::full(self.threshold as f32, m, &cpu)?),
                Sae::jumprelu_cfg(d, m, "batchtopk", from),
            ),
            Sparsity::JumpRelu { .. } => (
                Activation::JumpRelu,
                Some(Tensor::from_slice(&weights.threshold, m, &cpu)?),
                Sae::jumprelu_cfg(d, m, "jumprelu", from),
            ),
            Sparsity::Relu { .. } | Sparsity::Threshold(_) => {
                (Activation::Relu, None, Sae::standard_cfg(d, m, from))
            }
        };
        Ok(Sae {
            activation,
            w_enc: w_enc?,
            b_enc: Tensor::from_slice(&weights.b_enc, m, &cpu)?,
            w_dec: (Tensor::from_slice(&weights.w_dec, (m, d), &cpu)? / s as f64)?,
            b_dec: (Tensor::from_slice(&weights.b_dec, d, &cpu)? / s as f64)?,
            threshold,
            apply_b_dec_to_input: true,
            input_norm: crate::sae::format::InputNorm::None,
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
