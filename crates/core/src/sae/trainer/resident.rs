//! The device-resident engine (`Engine::Dense`): the whole training state — weights, Adam moments,
//! firing counters — lives as tensors on one device, and one optimiser step is [`dense::step`] plus the
//! recipe's update (decoder-gradient projection, clip, Adam, renormalisation, dead counts) in tensor ops.
//! Per step only the batch goes in and a few scalars come out; the state is copied out only when a
//! checkpoint is written, a validation row or the end needs it. [`Traffic`] counts every byte it moves, so
//! tests hold it to that on any device (the CPU device included).

use candle_core::{DType, Device, Tensor};

pub use super::upload::Traffic;
use super::{State, TrainConfig};
use crate::sae::adam::{AdamConfig, Moments};
use crate::sae::dense::{self, above, DenseWeights, SUMS};
use crate::sae::step::{Sparsity, StepStats};

/// Scalars a step returns beyond [`Sums`]: dead latents after the update, Σ W_dec (non-finite iff some
/// weight is).
const DEAD: usize = SUMS;
const W_DEC_SUM: usize = SUMS + 1;
/// f64 scalars a step copies out.
pub const STEP_SCALARS: usize = SUMS + 2;

/// Elements of one `[tokens, d_sae]` f32 intermediate a step may hold (2²⁷: 512 MiB; a step holds about ten).
const CHUNK_ELEMENTS: usize = 1 << 27;

/// Adam's moments of one parameter tensor.
struct DeviceMoments {
    m: Tensor,
    v: Tensor,
}

/// A training state on a device: what `Engine::Dense` trains with (the trainer makes one per member;
/// `saeflow bench train --device` drives one directly).
pub struct Resident {
    weights: DenseWeights,
    /// Moments of w_enc, b_enc, w_dec, b_dec and (JumpReLU) threshold.
    moments: Vec<DeviceMoments>,
    /// Tokens since each latent last fired (f64: exact to 2⁵³).
    since_fired: Tensor,
    /// Tokens each latent fired on.
    fired_total: Tensor,
    /// Dead latents now (from the last step's scalars; sizes AuxK's selection).
    num_dead: usize,
    /// The validation rows and their total variance.
    val: Option<(Tensor, f64)>,
    /// Most tokens a step computes at once (a larger batch is split and its gradients summed: the dense
    /// `[tokens, d_sae]` intermediates are what fills a GPU's memory). BatchTopK is never split.
    chunk_tokens: usize,
    /// Per-step traffic so far (batches and scalars).
    pub step_traffic: Traffic,
    /// Whole-state copies so far (setup, checkpoints, the end).
    pub sync_traffic: Traffic,
}

fn counts_of(v: &[u64], device: &Device) -> candle_core::Result<Tensor> {
    let f: Vec<f64> = v.iter().map(|&c| c as f64).collect();
    Tensor::from_vec(f, v.len(), device)
}

/// Σ t² in f64 as a 0-d tensor.
fn sum_squares(t: &Tensor) -> candle_core::Result<Tensor> {
    let rows = if t.rank() > 1 {
        t.sqr()?.sum(1)?
    } else {
        t.sqr()?
    };
    rows.to_dtype(DType::F64)?.sum_all()
}

/// One Adam update of `p` with gradient `g` (times `scale`, the clip factor, when given) at step `t`: the
/// formula of [`Moments::update`].
fn adam(
    p: &Tensor,
    mo: &mut DeviceMoments,
    g: &Tensor,
    scale: Option<&Tensor>,
    cfg: &AdamConfig,
    lr: f32,
    t: u64,
) -> candle_core::Result<Tensor> {
    let g = match scale {
        Some(s) => g.broadcast_mul(s)?,
        None => g.clone(),
    };
    let c1 = 1.0 - cfg.beta1.powi(t as i32);
    let c2 = 1.0 - cfg.beta2.powi(t as i32);
    let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
    mo.m = (mo.m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
    mo.v = (mo.v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
    let denom = (mo.v.sqrt()? / c2.sqrt() as f64)?.affine(1.0, cfg.eps as f64)?;
    p - (mo.m.affine((lr / c1) as f64, 0.0)? / denom)?
}

/// Scales every row to unit norm (f32 epsilon as the host path, so an all-zero row stays finite).
fn unit_rows(w: &Tensor) -> candle_core::Result<Tensor> {
    let norms = w
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .affine(1.0, f32::EPSILON as f64)?;
    w.broadcast_div(&norms)
}

/// A step queued on the device by [`Resident::launch`], not yet read back.
#[must_use = "a launched step must be finished before the next launch"]
pub struct Launched {
    /// [`STEP_SCALARS`] f64 values, still on the device.
    scalars: Tensor,
    tokens: usize,
    variance: f64,
}

impl Resident {
    /// Copies `state` to `device`, with the validation rows `val` (`[rows, d_in]`, normalised).
    pub fn new(
        state: &State,
        cfg: &TrainConfig,
        device: &Device,
        val: Option<&[f32]>,
    ) -> candle_core::Result<Self> {
        let d = state.weights.d_in;
        let weights = DenseWeights::upload(&state.weights, device)?;
        let mut to_device = weights.bytes();
        let params = if state.weights.threshold.is_empty() {
            4
        } else {
            5
        };
        let mut shapes = vec![
            weights.w_enc.shape(),
            weights.b_enc.shape(),
            weights.w_dec.shape(),
            weights.b_dec.shape(),
        ];
        shapes.extend(weights.threshold.as_ref().map(Tensor::shape));
        let moments = state.moments[..params]
            .iter()
            .zip(shapes)
            .map(|(mo, shape)| {
                to_device += 8 * mo.m.len() as u64;
                Ok(DeviceMoments {
                    m: Tensor::from_slice(&mo.m, shape, device)?,
                    v: Tensor::from_slice(&mo.v, shape, device)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        to_device += 16 * state.since_fired.len() as u64;
        let val = match val {
            Some(v) if !v.is_empty() => {
                to_device += std::mem::size_of_val(v) as u64;
                let variance = crate::sae::step::total_variance(v, d);
                Some((Tensor::from_slice(v, (v.len() / d, d), device)?, variance))
            }
            _ => None,
        };
        Ok(Self {
            weights,
            moments,
            since_fired: counts_of(&state.since_fired, device)?,
            fired_total: counts_of(&state.fired_total, device)?,
            num_dead: state.dead(cfg).iter().filter(|&&b| b).count(),
            val,
            chunk_tokens: (CHUNK_ELEMENTS / cfg.d_sae.max(1)).max(1),
            step_traffic: Traffic::default(),
            sync_traffic: Traffic {
                to_device,
                to_host: 0,
            },
        })
    }

    /// Copies the device state into `state` (weights, moments, firing counters).
    pub fn download(&mut self, state: &mut State) -> candle_core::Result<()> {
        self.weights.download(&mut state.weights)?;
        let mut to_host = self.weights.bytes();
        for (host, dev) in state.moments.iter_mut().zip(&self.moments) {
            *host = Moments {
                m: dev.m.flatten_all()?.to_vec1()?,
                v: dev.v.flatten_all()?.to_vec1()?,
            };
            to_host += 8 * host.m.len() as u64;
        }
        let counts = |t: &Tensor| -> candle_core::Result<Vec<u64>> {
            Ok(t.to_vec1::<f64>()?.iter().map(|&c| c as u64).collect())
        };
        state.since_fired = counts(&self.since_fired)?;
        state.fired_total = counts(&self.fired_total)?;
        to_host += 16 * state.since_fired.len() as u64;
        self.sync_traffic.to_host += to_host;
        Ok(())
    }

    /// One optimiser step (the `t`-th, 1-based) on the batch `x` already on the device, whose total
    /// variance is `variance` (FVU's denominator, computed where the batch was read). Returns its
    /// statistics and whether every decoder weight is still finite: [`Self::launch`] then [`Self::finish`].
    pub fn step(
        &mut self,
        cfg: &TrainConfig,
        t: u64,
        x: &Tensor,
        variance: f64,
    ) -> candle_core::Result<(StepStats, bool)> {
        let launched = self.launch(cfg, t, x, variance)?;
        self.finish(launched)
    }

    /// Queues step `t` on the device and returns without waiting for it (on a GPU; the CPU device computes
    /// as it goes): the host can read the next batch meanwhile. [`Self::finish`] must follow before the
    /// next launch (AuxK's size depends on this step's dead count).
    pub fn launch(
        &mut self,
        cfg: &TrainConfig,
        t: u64,
        x: &Tensor,
        variance: f64,
    ) -> candle_core::Result<Launched> {
        let n = x.dim(0)?;
        let aux_coef = match cfg.sparsity {
            Sparsity::TopK(_) | Sparsity::BatchTopK(_) => cfg.aux_coef,
            _ => 0.0,
        };
        let dead_tokens = cfg.dead_tokens as f64;
        let dead = above(&self.since_fired, dead_tokens)?
            .to_dtype(DType::U8)?
            .unsqueeze(0)?;
        let w = &self.weights;
        let sparsity = cfg.training_sparsity(t);
        let chunk = match sparsity {
            Sparsity::BatchTopK(_) => n,
            _ => self.chunk_tokens.min(n),
        };
        let mut summed: Option<(dense::DenseGrads, dense::Sums)> = None;
        for start in (0..n).step_by(chunk) {
            let rows = x.narrow(0, start, chunk.min(n - start))?;
            let (g, s) = dense::step(w, &rows, n, sparsity, &dead, self.num_dead, aux_coef)?;
            summed = Some(match summed {
                None => (g, s),
                Some((g0, s0)) => (g0.add(&g)?, dense::add_sums(&s0, &s)?),
            });
        }
        let (mut g, sums) = summed.expect("a batch has rows");
        let unit = cfg.unit_decoder();
        if unit {
            // Only directions of decoder rows may change: remove each row's gradient along the row.
            let along = (&g.w_dec * &w.w_dec)?.sum_keepdim(1)?;
            g.w_dec = (&g.w_dec - w.w_dec.broadcast_mul(&along)?)?;
        }
        let mut grads = vec![&g.w_enc, &g.b_enc, &g.w_dec, &g.b_dec];
        grads.extend(g.threshold.as_ref());
        let scale = if cfg.grad_clip > 0.0 {
            let mut norm2 = sum_squares(grads[0])?;
            for g in &grads[1..] {
                norm2 = (norm2 + sum_squares(g)?)?;
            }
            // min(1, clip / ‖g‖) without leaving the device.
            let clip = cfg.grad_clip as f64;
            let norm = norm2
                .sqrt()?
                .affine(1.0, -clip)?
                .relu()?
                .affine(1.0, clip)?;
            Some((norm.recip()? * clip)?.to_dtype(DType::F32)?)
        } else {
            None
        };
        let lr = cfg.lr_at(t);
        let mut params = vec![&w.w_enc, &w.b_enc, &w.w_dec, &w.b_dec];
        params.extend(w.threshold.as_ref());
        let mut updated = Vec::with_capacity(params.len());
        for ((p, g), mo) in params.iter().zip(&grads).zip(&mut self.moments) {
            updated.push(adam(p, mo, g, scale.as_ref(), &cfg.adam, lr, t)?);
        }
        let mut updated = updated.into_iter();
        let mut next = || updated.next().expect("one update per parameter");
        let (w_enc, b_enc, mut w_dec, b_dec) = (next(), next(), next(), next());
        // A negative threshold would let negative pre-activations through (SAELens uses relu(θ)).
        let threshold = match &w.threshold {
            Some(_) => Some(next().relu()?),
            None => None,
        };
        if unit {
            w_dec = unit_rows(&w_dec)?;
        }
        self.weights = DenseWeights {
            w_enc,
            b_enc,
            w_dec,
            b_dec,
            threshold,
        };
        let fired = g.fired.to_dtype(DType::F64)?;
        let zeros = self.since_fired.zeros_like()?;
        self.since_fired = above(&fired, 0.0)?
            .to_dtype(DType::U8)?
            .where_cond(&zeros, &self.since_fired.affine(1.0, n as f64)?)?;
        self.fired_total = (&self.fired_total + fired)?;
        let dead_after = above(&self.since_fired, dead_tokens)?.sum_all()?;
        let w_dec_sum = self.weights.w_dec.sum_all()?.to_dtype(DType::F64)?;
        let scalars = Tensor::cat(&[sums, Tensor::stack(&[dead_after, w_dec_sum], 0)?], 0)?;
        Ok(Launched {
            scalars,
            tokens: n,
            variance,
        })
    }

    /// Waits for a launched step and copies its [`STEP_SCALARS`] out: its statistics and whether every
    /// decoder weight is still finite.
    pub fn finish(&mut self, launched: Launched) -> candle_core::Result<(StepStats, bool)> {
        let Launched {
            scalars,
            tokens: n,
            variance,
        } = launched;
        let s: Vec<f64> = scalars.to_vec1()?;
        self.step_traffic.to_host += 8 * STEP_SCALARS as u64;
        self.num_dead = s[DEAD] as usize;
        let min_active = s[dense::MIN_ACTIVE];
        let stats = StepStats {
            mse: s[dense::SQ] / n as f64,
            aux: s[dense::AUX],
            fvu: s[dense::SQ] / variance.max(f64::MIN_POSITIVE),
            l0: s[dense::ACTIVE] / n as f64,
            min_active: if min_active.is_finite() {
                min_active
            } else {
                0.0
            },
            penalty: s[dense::PENALTY],
            exact_per_token: 0.0,
        };
        // Σ W_dec is non-finite iff some decoder weight is (or the sum overflowed: also divergence).
        Ok((stats, s[W_DEC_SUM].is_finite()))
    }

    /// Splits batches into chunks of at most `tokens` tokens (default: what keeps one `[tokens, d_sae]`
    /// intermediate under 512 MiB).
    pub fn with_chunk_tokens(mut self, tokens: usize) -> Self {
        self.chunk_tokens = tokens.max(1);
        self
    }

    /// Dead latents now.
    pub fn dead_count(&self) -> usize {
        self.num_dead
    }

    /// `(FVU, L0)` on the validation rows, choosing latents by `sparsity`; `None` without validation rows.
    pub fn validate(&mut self, sparsity: Sparsity) -> candle_core::Result<Option<(f64, f64)>> {
        let Some((val, variance)) = &self.val else {
            return Ok(None);
        };
        let s: Vec<f64> = self.weights.evaluate(val, sparsity)?.to_vec1()?;
        self.step_traffic.to_host += 16;
        let n = val.dim(0)? as f64;
        Ok(Some((s[0] / variance.max(f64::MIN_POSITIVE), s[1] / n)))
    }
}
