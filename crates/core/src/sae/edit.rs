//! Steering edits of a hook's activation: add a direction, or set one SAE feature to a target while keeping
//! everything the SAE does not explain.
//!
//! Clamping follows the SAELens / Neuronpedia convention of editing the latent and keeping the SAE's error
//! term: `x' = decode(f with f_i := t) + (x − decode(f)) = x + (t − f_i(x))·W_dec[i]` (times the input scale
//! for layer-norm SAEs), so the edit touches only the feature's own direction and is exact when t = f_i(x).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::format::Sae;
use crate::models::Intervention;

/// One edit, applied at every position the intervention sees.
#[derive(Debug, Clone)]
pub enum Edit {
    /// x + `amount`·`direction` (`direction` `[d]`: a decoder row, or a DiffMean vector).
    Add {
        /// The direction added.
        direction: Tensor,
        /// Its multiplier.
        amount: f64,
    },
    /// Set SAE latent `feature` to `target`, keeping the SAE's error (`target = 0` ablates it).
    Clamp {
        /// The SAE.
        sae: Sae,
        /// The latent.
        feature: usize,
        /// The value it is set to.
        target: f64,
    },
}

impl Edit {
    /// The edited activation, for `x` of shape `[..., d]`.
    pub fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Edit::Add { direction, amount } => {
                x.broadcast_add(&(direction.to_dtype(x.dtype())? * *amount)?)
            }
            Edit::Clamp {
                sae,
                feature,
                target,
            } => {
                let dims = x.dims().to_vec();
                let d = *dims.last().expect("an activation has a width");
                let flat = x.reshape(((), d))?.to_dtype(DType::F32)?;
                let current = sae.encode(&flat)?.narrow(1, *feature, 1)?;
                let mut amount = (current.neg()? + *target)?;
                if let Some((_, scale)) = sae.norm_stats(&flat)? {
                    // The decoder works in the normalised space: a unit of the latent is `scale` in x.
                    amount = (amount * scale)?;
                }
                let row = sae.w_dec.narrow(0, *feature, 1)?;
                let edited = (flat + amount.broadcast_mul(&row)?)?;
                edited.reshape(dims)?.to_dtype(x.dtype())
            }
        }
    }

    /// The edit as a model intervention.
    pub fn intervention(self) -> Intervention {
        Arc::new(move |x: &Tensor| self.apply(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sae::format::Activation;
    use candle_core::Device;

    /// A TopK (k = 2) SAE of width 3 over 4 inputs with hand-set weights.
    fn sae() -> Sae {
        let cpu = Device::Cpu;
        #[rustfmt::skip]
        let w_enc = Tensor::from_vec(
            vec![
                1.0f32, 0.0, 0.5,
                0.0, 1.0, 0.5,
                0.0, 0.0, 1.0,
                0.5, 0.0, 0.0,
            ],
            (4, 3),
            &cpu,
        )
        .unwrap();
        let w_dec = w_enc.t().unwrap().contiguous().unwrap();
        Sae {
            activation: Activation::TopK(2),
            w_enc,
            w_dec,
            b_enc: Tensor::new(&[0.1f32, -0.2, 0.0], &cpu).unwrap(),
            b_dec: Tensor::new(&[0.0f32, 0.1, 0.0, -0.1], &cpu).unwrap(),
            threshold: None,
            apply_b_dec_to_input: true,
            input_norm: crate::sae::format::InputNorm::None,
            cfg: serde_json::Value::Null,
        }
    }

    fn x() -> Tensor {
        Tensor::new(
            &[[[1.0f32, 2.0, 0.5, -1.0], [0.3, -0.2, 2.0, 0.0]]],
            &Device::Cpu,
        )
        .unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn adding_nothing_and_clamping_to_the_current_value_change_nothing() {
        let x = x();
        let add = Edit::Add {
            direction: Tensor::new(&[1.0f32, -1.0, 2.0, 0.0], &Device::Cpu).unwrap(),
            amount: 0.0,
        };
        assert_eq!(max_abs(&add.apply(&x).unwrap(), &x), 0.0);
        // Token 0's latent 1 is 2.0 − 0.1 − 0.2 = 1.7 (in the top 2): clamping it to 1.7 is exact on token 0.
        let sae = sae();
        let codes = sae.encode(&x.reshape((2, 4)).unwrap()).unwrap();
        let v = codes
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((v - 1.7).abs() < 1e-6);
        let clamp = Edit::Clamp {
            sae,
            feature: 1,
            target: v as f64,
        };
        let first = x.narrow(1, 0, 1).unwrap();
        assert_eq!(max_abs(&clamp.apply(&first).unwrap(), &first), 0.0);
    }

    #[test]
    fn clamping_edits_the_latent_and_keeps_the_error() {
        // x' must equal decode(f with f_i := t) + (x − decode(f)), the SAELens formulation.
        let sae = sae();
        let x = x().reshape((2, 4)).unwrap();
        for (feature, target) in [(0usize, 0.0f64), (2, 3.5), (1, 0.0)] {
            let edited = Edit::Clamp {
                sae: sae.clone(),
                feature,
                target,
            }
            .apply(&x)
            .unwrap();
            let codes = sae.encode(&x).unwrap();
            let error = (&x - sae.decode(&codes).unwrap()).unwrap();
            let mut changed = codes.to_vec2::<f32>().unwrap();
            for row in &mut changed {
                row[feature] = target as f32;
            }
            let changed = Tensor::new(changed, &Device::Cpu).unwrap();
            let expected = (sae.decode(&changed).unwrap() + error).unwrap();
            assert!(max_abs(&edited, &expected) < 1e-6, "feature {feature}");
        }
    }
}
