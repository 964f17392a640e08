//! Adam over flat f32 parameter buffers, elementwise and multithreaded (so deterministic).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Adam hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// β₁.
    pub beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// First and second moments of one parameter buffer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Moments {
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

impl Moments {
    /// Zero moments for `n` parameters.
    pub fn zeros(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One Adam update of `params` with `grad` (scaled by `grad_scale`, e.g. for clipping) at step `t`
    /// (1-based) and learning rate `lr`.
    pub fn update(
        &mut self,
        cfg: &AdamConfig,
        params: &mut [f32],
        grad: &[f32],
        grad_scale: f32,
        lr: f32,
        t: u64,
    ) {
        let c1 = 1.0 - cfg.beta1.powi(t as i32);
        let c2 = 1.0 - cfg.beta2.powi(t as i32);
        let step = lr / c1;
        let c2_sqrt = c2.sqrt();
        params
            .par_chunks_mut(1 << 14)
            .zip(self.m.par_chunks_mut(1 << 14))
            .zip(self.v.par_chunks_mut(1 << 14))
            .zip(grad.par_chunks(1 << 14))
            .for_each(|(((p, m), v), g)| {
                for i in 0..p.len() {
                    let g = g[i] * grad_scale;
                    m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
                    v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
                    p[i] -= step * m[i] / (v[i].sqrt() / c2_sqrt + cfg.eps);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_torch_adam_formula_by_hand() {
        // torch.optim.Adam, lr 0.1, one parameter 1.0, gradients 0.5 then -0.2:
        // step 1: m=0.05, v=0.00025, m̂=0.5, v̂=0.25 → p = 1 − 0.1·0.5/(0.5+1e-8) = 0.9
        // step 2: m=0.025, v=0.00028975, m̂=0.025/0.19=0.131579, v̂=0.00028975/0.001999=0.144947
        //         → p = 0.9 − 0.1·0.131579/0.380719 = 0.865439
        let cfg = AdamConfig::default();
        let mut p = [1.0f32];
        let mut s = Moments::zeros(1);
        s.update(&cfg, &mut p, &[0.5], 1.0, 0.1, 1);
        assert!((p[0] - 0.9).abs() < 1e-6, "{}", p[0]);
        s.update(&cfg, &mut p, &[-0.2], 1.0, 0.1, 2);
        assert!((p[0] - 0.865439).abs() < 1e-5, "{}", p[0]);
    }
}
