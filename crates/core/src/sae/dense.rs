//! The training step of [`super::step`] as dense candle tensor operations on any device: the engine of the
//! device-resident trainer ([`super::trainer`]'s `Engine::Dense`), and the sparse CPU path's reference in
//! tests. Same conventions, same losses, same gradients, for every architecture (TopK + AuxK, BatchTopK,
//! JumpReLU, ReLU).
//!
//! Everything here stays on the tensors' device: weights in, gradients and the step's sums ([`Sums`]) out, as
//! tensors. Nothing is copied to or from the host, so the trainer can keep its whole state on a GPU and
//! fetch a few scalars a step.
//!
//! Latent selection (the part candle's ops do poorly on a GPU: its CUDA `arg_sort` holds a whole row in
//! shared memory, so it fails past ~12k latents) goes through [`top_k_mask`], and the products with
//! TopK-sparse activations (decoder, decoder gradient, encoder gradient) through [`sparse_matmul`] and
//! [`masked_dots`]: on CUDA tensors they use the kernels of [`crate::kernels::cuda`], elsewhere candle's
//! ops (the reference, and what the CPU device runs).

use candle_core::{DType, Device, Tensor, D};

use super::step::{L0Mode, Sparsity, Weights};

/// An SAE's parameters as f32 tensors on one device; `w_enc` and `w_dec` are `[d_sae, d_in]`.
#[derive(Debug, Clone)]
pub struct DenseWeights {
    /// Encoder rows `[d_sae, d_in]`.
    pub w_enc: Tensor,
    /// Encoder bias `[d_sae]`.
    pub b_enc: Tensor,
    /// Decoder rows `[d_sae, d_in]`.
    pub w_dec: Tensor,
    /// Decoder bias `[d_in]`.
    pub b_dec: Tensor,
    /// JumpReLU thresholds `[d_sae]`; `None` for the other architectures.
    pub threshold: Option<Tensor>,
}

/// Gradients of [`DenseWeights`], same shapes, plus how many tokens each latent was active on.
#[derive(Debug, Clone)]
pub struct DenseGrads {
    /// d loss / d w_enc.
    pub w_enc: Tensor,
    /// d loss / d b_enc.
    pub b_enc: Tensor,
    /// d loss / d w_dec.
    pub w_dec: Tensor,
    /// d loss / d b_dec.
    pub b_dec: Tensor,
    /// d loss / d threshold (JumpReLU).
    pub threshold: Option<Tensor>,
    /// Tokens on which each latent was active, `[d_sae]` f32.
    pub fired: Tensor,
}

/// What a step measured, as one `[SUMS]` f64 tensor on the device (index with the constants below).
pub type Sums = Tensor;
/// Number of entries in [`Sums`].
pub const SUMS: usize = 5;
/// Σ ‖x̂ − x‖² over the batch.
pub const SQ: usize = 0;
/// The AuxK loss (weighted, per token).
pub const AUX: usize = 1;
/// The sparsity penalty (weighted, per token).
pub const PENALTY: usize = 2;
/// Active (token, latent) pairs.
pub const ACTIVE: usize = 3;
/// The smallest positive kept activation (+∞ when none).
pub const MIN_ACTIVE: usize = 4;

/// A 0/1 mask (same dtype) of `t > c`, as `sign(relu(t − c))`: candle's scalar comparisons copy the scalar
/// to the device first, and this engine moves nothing it does not count.
pub fn above(t: &Tensor, c: f64) -> candle_core::Result<Tensor> {
    t.affine(1.0, -c)?.relu()?.sign()
}

/// Σ of every element in f64: rows summed in f32 first (no `[n, m]` f64 copy), then in f64.
fn total(t: &Tensor) -> candle_core::Result<Tensor> {
    let rows = if t.rank() > 1 {
        t.sum(D::Minus1)?
    } else {
        t.clone()
    };
    rows.to_dtype(DType::F64)?.sum_all()
}

impl DenseWeights {
    /// Copies host weights to `device`.
    pub fn upload(w: &Weights, device: &Device) -> candle_core::Result<Self> {
        let (m, d) = (w.d_sae, w.d_in);
        Ok(Self {
            w_enc: Tensor::from_slice(&w.w_enc, (m, d), device)?,
            b_enc: Tensor::from_slice(&w.b_enc, m, device)?,
            w_dec: Tensor::from_slice(&w.w_dec, (m, d), device)?,
            b_dec: Tensor::from_slice(&w.b_dec, d, device)?,
            threshold: if w.threshold.is_empty() {
                None
            } else {
                Some(Tensor::from_slice(&w.threshold, m, device)?)
            },
        })
    }

    /// Copies the weights back into host `w` (same shapes).
    pub fn download(&self, w: &mut Weights) -> candle_core::Result<()> {
        let host = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        w.w_enc = host(&self.w_enc)?;
        w.b_enc = host(&self.b_enc)?;
        w.w_dec = host(&self.w_dec)?;
        w.b_dec = host(&self.b_dec)?;
        w.threshold = match &self.threshold {
            Some(t) => host(t)?,
            None => Vec::new(),
        };
        Ok(())
    }

    /// Bytes of the weights (what an upload or download moves).
    pub fn bytes(&self) -> u64 {
        let count = |t: &Tensor| t.elem_count() as u64 * 4;
        count(&self.w_enc)
            + count(&self.b_enc)
            + count(&self.w_dec)
            + count(&self.b_dec)
            + self.threshold.as_ref().map_or(0, count)
    }

    /// `(x − b_dec, (x − b_dec)·W_encᵀ + b_enc)` for a batch `x` `[n, d_in]`.
    pub fn pre_activations(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let centered = x.broadcast_sub(&self.b_dec)?;
        let pre = centered
            .matmul(&self.w_enc.t()?)?
            .broadcast_add(&self.b_enc)?;
        Ok((centered, pre))
    }

    /// Which latents each token keeps under `sparsity`, as a `[n, d_sae]` 0/1 f32 mask (before the ReLU).
    pub fn select(&self, pre: &Tensor, sparsity: Sparsity) -> candle_core::Result<Tensor> {
        match sparsity {
            Sparsity::TopK(k) => top_k_mask(pre, k, None),
            Sparsity::BatchTopK(k) => batch_top_k_mask(pre, k * pre.dim(0)?),
            Sparsity::Threshold(t) => above(pre, t as f64),
            Sparsity::Relu { .. } => above(pre, 0.0),
            Sparsity::JumpRelu { .. } => {
                let theta = self.threshold.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("JumpReLU weights without thresholds".into())
                })?;
                pre.broadcast_gt(theta)?.to_dtype(DType::F32)
            }
        }
    }

    /// The kept activations `relu(pre)·selected` of a batch, `[n, d_sae]`.
    pub fn encode(&self, x: &Tensor, sparsity: Sparsity) -> candle_core::Result<Tensor> {
        let (_, pre) = self.pre_activations(x)?;
        let selected = self.select(&pre, sparsity)?;
        pre.relu()? * selected
    }

    /// `(Σ ‖x̂ − x‖², active pairs)` of a batch without gradients (validation), as a `[2]` f64 tensor.
    pub fn evaluate(&self, x: &Tensor, sparsity: Sparsity) -> candle_core::Result<Tensor> {
        let acts = self.encode(x, sparsity)?;
        let recon =
            sparse_matmul(&acts, &self.w_dec, bounded(sparsity))?.broadcast_add(&self.b_dec)?;
        let sq = total(&(recon - x)?.sqr()?)?;
        let active = total(&above(&acts, 0.0)?)?;
        Tensor::stack(&[sq, active], 0)
    }
}

/// Whether `sparsity` bounds the active latents of a token (TopK, BatchTopK: k of d_sae), so products
/// with the activations are worth computing as sparse ones. ReLU and JumpReLU may be dense early on.
fn bounded(sparsity: Sparsity) -> bool {
    matches!(sparsity, Sparsity::TopK(_) | Sparsity::BatchTopK(_))
}

/// `s · b`, where `s` `[rows, cols]` has few nonzeros per row when `sparse`: then on CUDA the kernel of
/// [`crate::kernels::cuda::sparse_rows_matmul`] sums only those; otherwise (and on other devices) a matmul.
pub fn sparse_matmul(s: &Tensor, b: &Tensor, sparse: bool) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if sparse && s.device().is_cuda() && crate::kernels::cuda::enabled() {
        return crate::kernels::cuda::sparse_rows_matmul(s, b);
    }
    let _ = sparse;
    s.matmul(b)
}

/// `(a · bᵀ) ⊙ mask` for `a` `[rows, d]`, `b` `[cols, d]` and a mask `[rows, cols]` with few nonzeros per
/// row when `sparse`: then on CUDA [`crate::kernels::cuda::masked_row_dots`] computes only the kept dot
/// products; otherwise (and on other devices) a matmul and a product.
pub fn masked_dots(
    a: &Tensor,
    b: &Tensor,
    mask: &Tensor,
    sparse: bool,
) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if sparse && a.device().is_cuda() && crate::kernels::cuda::enabled() {
        return crate::kernels::cuda::masked_row_dots(a, b, mask);
    }
    let _ = sparse;
    a.matmul(&b.t()?)? * mask
}

/// A `[n, m]` 0/1 f32 mask with ones at the `k` largest entries of each row of `x` among the columns where
/// `allowed` (`[1, m]` u8) is 1; ties go to the lower column (as the sparse path). On CUDA the fused kernel
/// ([`crate::kernels::cuda::top_k_mask`]) computes it; elsewhere candle's `arg_sort`.
pub fn top_k_mask(x: &Tensor, k: usize, allowed: Option<&Tensor>) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && crate::kernels::cuda::enabled() {
        return crate::kernels::cuda::top_k_mask(x, k, allowed);
    }
    top_k_mask_reference(x, k, allowed)
}

/// [`top_k_mask`] with candle's ops on any device (the reference the CUDA kernel is tested against).
pub fn top_k_mask_reference(
    x: &Tensor,
    k: usize,
    allowed: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let x = match allowed {
        Some(mask) => {
            let neg = Tensor::full(f32::NEG_INFINITY, x.dims(), x.device())?;
            mask.broadcast_as(x.dims())?.where_cond(x, &neg)?
        }
        None => x.clone(),
    };
    let top = x
        .arg_sort_last_dim(false)?
        .narrow(D::Minus1, 0, k)?
        .contiguous()?;
    let ones = Tensor::ones(top.dims(), DType::F32, x.device())?;
    x.zeros_like()?.scatter_add(&top, &ones, D::Minus1)
}

/// The `total` largest ReLU'd entries of the whole `[n, m]` batch (BatchTopK), as a 0/1 f32 mask. Entries
/// equal to the cut are all kept: the sparse path keeps only as many as `total` allows, so the two differ
/// only on exact float ties at the cut.
pub fn batch_top_k_mask(pre: &Tensor, total: usize) -> candle_core::Result<Tensor> {
    let values = pre.relu()?;
    let total = total.min(values.elem_count());
    if total == 0 {
        return values.zeros_like();
    }
    let cut = kth_largest(&values.flatten_all()?, total)?;
    values.broadcast_ge(&cut)?.to_dtype(DType::F32)
}

/// The `k`-th largest entry (1-based) of a vector, as a `[1]` tensor on its device.
fn kth_largest(v: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if v.device().is_cuda() && crate::kernels::cuda::enabled() {
        return crate::kernels::cuda::kth_largest(v, k);
    }
    let (sorted, _) = v.sort_last_dim(false)?;
    sorted.narrow(0, k - 1, 1)
}

/// Loss and gradients of the rows `x` `[rows, d_in]` (already normalised) of a batch of `batch_tokens`
/// tokens (the loss is a mean over the batch: a batch split into chunks gives, summed, the whole batch's
/// gradients and sums), on the weights' device. `dead` is a `[1, d_sae]` u8 mask of latents that have not
/// fired recently, `num_dead` its count (AuxK draws on them; `aux_coef` = 0 switches AuxK off). BatchTopK
/// selects over the rows given, so its batch cannot be split.
#[allow(clippy::too_many_arguments)]
pub fn step(
    w: &DenseWeights,
    x: &Tensor,
    batch_tokens: usize,
    sparsity: Sparsity,
    dead: &Tensor,
    num_dead: usize,
    aux_coef: f32,
) -> candle_core::Result<(DenseGrads, Sums)> {
    let (m, d) = w.w_enc.dims2()?;
    let (rows, n) = (x.dim(0)?, batch_tokens);
    let device = x.device();
    let sparse = bounded(sparsity);
    let (centered, pre) = w.pre_activations(x)?;
    let positive = above(&pre, 0.0)?;
    let selected = w.select(&pre, sparsity)?;
    // Active = selected and positive (ReLU); these pass gradients to their pre-activations.
    let active = (&selected * &positive)?;
    let acts = (&pre * &active)?;
    let recon = sparse_matmul(&acts, &w.w_dec, sparse)?.broadcast_add(&w.b_dec)?;
    let err = (&recon - x)?;
    let sq = total(&err.sqr()?)?;
    let g_main = (&err * (2.0 / n as f64))?;
    let zero = Tensor::zeros((), DType::F64, device)?;

    // AuxK (TopK, BatchTopK): the k_aux largest dead pre-activations reconstruct the detached residual.
    let k_aux = (d / 2).min(num_dead);
    let mut aux_loss = zero.clone();
    let mut aux_parts = None;
    let with_aux = matches!(sparsity, Sparsity::TopK(_) | Sparsity::BatchTopK(_));
    if aux_coef > 0.0 && k_aux > 0 && with_aux {
        let scale = (num_dead as f32 / (d / 2) as f32).min(1.0);
        let aux_active = (top_k_mask(&pre, k_aux, Some(dead))? * &positive)?;
        let aux_acts = (&pre * &aux_active)?;
        let aux_err = (sparse_matmul(&aux_acts, &w.w_dec, sparse)? + &err)?;
        let weight = (aux_coef * scale) as f64;
        aux_loss = (total(&aux_err.sqr()?)? * (weight / n as f64))?;
        let g_aux = (aux_err * (2.0 * weight / n as f64))?;
        aux_parts = Some((aux_active, aux_acts, g_aux));
    }

    // d loss / d a = g · W_decᵀ, into the pre-activations of active latents.
    let mut grad_pre = masked_dots(&g_main, &w.w_dec, &active, sparse)?;
    let mut g_w_dec = sparse_matmul(&acts.t()?, &g_main, sparse)?;
    if let Some((aux_active, aux_acts, g_aux)) = &aux_parts {
        grad_pre = (grad_pre + masked_dots(g_aux, &w.w_dec, aux_active, sparse)?)?;
        g_w_dec = (g_w_dec + sparse_matmul(&aux_acts.t()?, g_aux, sparse)?)?;
    }
    let mut penalty = zero.clone();
    let norms = || -> candle_core::Result<Tensor> { w.w_dec.sqr()?.sum(1)?.sqrt() };
    if let Sparsity::Relu { l1 } = sparsity {
        let l1n = (l1 / n as f32) as f64;
        let norms = norms()?; // [m]
        penalty = (total(&acts.broadcast_mul(&norms.unsqueeze(0)?)?)? * l1n)?;
        grad_pre = (grad_pre + active.broadcast_mul(&(norms.unsqueeze(0)? * l1n)?)?)?;
        // d/dW_dec[j] of ‖W_dec[j]‖·Σ_t a_tj = (Σ_t a_tj)·W_dec[j]/‖W_dec[j]‖.
        let coef = ((acts.sum(0)? / norms)? * l1n)?;
        g_w_dec = (g_w_dec + w.w_dec.broadcast_mul(&coef.unsqueeze(1)?)?)?;
    }
    let mut g_threshold = None;
    if let Sparsity::JumpRelu {
        l0,
        bandwidth,
        mode,
        pre_act,
    } = sparsity
    {
        let theta = w
            .threshold
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("JumpReLU weights without thresholds".into()))?
            .unsqueeze(0)?; // [1, m]
        let l0n = (l0 / n as f32) as f64;
        let norms = norms()?.unsqueeze(0)?; // [1, m]
        let z = (pre.broadcast_sub(&theta)? / bandwidth as f64)?;
        let window = (above(&z, -0.5)? * above(&z.neg()?, -0.5)?)?;
        // d loss / d a at every pair (the straight-through threshold gradient uses it in the window).
        let mut da = g_main.matmul(&w.w_dec.t()?)?;
        let mut theta_grad = Tensor::zeros((rows, m), DType::F32, device)?;
        let mut norm_coef = Tensor::zeros((1, m), DType::F32, device)?;
        match mode {
            L0Mode::Step => {
                penalty = (total(&active)? * l0n)?;
                theta_grad = (theta_grad - (&window * (l0n / bandwidth as f64))?)?;
            }
            L0Mode::Tanh(c) => {
                let scale = (&norms * c as f64)?;
                let th = acts.broadcast_mul(&scale)?.tanh()?;
                let sech2 = (th.sqr()?.neg()? + 1.0)?;
                penalty = (total(&th)? * l0n)?;
                let d_pen = (sech2.broadcast_mul(&scale)? * l0n)?;
                grad_pre = (grad_pre + (&d_pen * &active)?)?;
                da = (da + d_pen)?;
                norm_coef = (norm_coef + ((&acts * &sech2)?.sum_keepdim(0)? * (l0n * c as f64))?)?;
            }
        }
        theta_grad =
            (theta_grad + (da.broadcast_mul(&(&theta * (-1.0 / bandwidth as f64))?)? * &window)?)?;
        if pre_act > 0.0 {
            let pn = (pre_act / n as f32) as f64;
            let below = theta
                .broadcast_gt(&pre)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&dead.to_dtype(DType::F32)?)?;
            let gap = (theta.broadcast_sub(&pre)? * &below)?;
            penalty = (penalty + (total(&gap.broadcast_mul(&norms)?)? * pn)?)?;
            let pull = (below.broadcast_mul(&norms)? * pn)?;
            grad_pre = (grad_pre - &pull)?;
            theta_grad = (theta_grad + pull)?;
            norm_coef = (norm_coef + (gap.sum_keepdim(0)? * pn)?)?;
        }
        g_threshold = Some(theta_grad.sum(0)?);
        // d‖w‖/dw = w/‖w‖ for the penalties that depend on the decoder norms.
        g_w_dec = (g_w_dec + w.w_dec.broadcast_mul(&(norm_coef / norms)?.t()?)?)?;
    }
    let g_b_enc = grad_pre.sum(0)?;
    let g_w_enc = sparse_matmul(&grad_pre.t()?, &centered, sparse)?;
    let g_b_dec = (g_main.sum(0)? - g_b_enc.unsqueeze(0)?.matmul(&w.w_enc)?.squeeze(0)?)?;
    let inf = Tensor::full(f32::INFINITY, (rows, m), device)?;
    let min_active = active
        .to_dtype(DType::U8)?
        .where_cond(&acts, &inf)?
        .min_all()?
        .to_dtype(DType::F64)?;
    let sums = Tensor::stack(&[sq, aux_loss, penalty, total(&active)?, min_active], 0)?;
    let grads = DenseGrads {
        w_enc: g_w_enc,
        b_enc: g_b_enc,
        w_dec: g_w_dec,
        b_dec: g_b_dec,
        threshold: g_threshold,
        fired: active.sum(0)?,
    };
    Ok((grads, sums))
}

impl DenseGrads {
    /// The sum of two chunks' gradients (and firing counts).
    pub fn add(&self, o: &Self) -> candle_core::Result<Self> {
        Ok(Self {
            w_enc: (&self.w_enc + &o.w_enc)?,
            b_enc: (&self.b_enc + &o.b_enc)?,
            w_dec: (&self.w_dec + &o.w_dec)?,
            b_dec: (&self.b_dec + &o.b_dec)?,
            threshold: match (&self.threshold, &o.threshold) {
                (Some(a), Some(b)) => Some((a + b)?),
                _ => None,
            },
            fired: (&self.fired + &o.fired)?,
        })
    }
}

/// [`Sums`] of two chunks of one batch: sums added, the smallest kept activation the smaller.
pub fn add_sums(a: &Sums, b: &Sums) -> candle_core::Result<Sums> {
    let added = (a.narrow(0, 0, MIN_ACTIVE)? + b.narrow(0, 0, MIN_ACTIVE)?)?;
    let least = a
        .narrow(0, MIN_ACTIVE, 1)?
        .minimum(&b.narrow(0, MIN_ACTIVE, 1)?)?;
    Tensor::cat(&[added, least], 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::Precision;
    use crate::kernels::test_data::random;
    use crate::sae::step::tests::random_weights;
    use crate::sae::step::Grads;

    fn host(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The dense path agrees with the sparse one on every gradient, for every architecture.
    #[test]
    fn dense_and_sparse_steps_agree() {
        let (d, m, n) = (8, 24, 12);
        let mut p = random_weights(d, m);
        let x = random(n * d, 9, 1.0);
        let dead: Vec<bool> = (0..m).map(|j| j % 3 == 0).collect();
        let num_dead = dead.iter().filter(|&&b| b).count();
        let dev = Device::Cpu;
        let dead_mask =
            Tensor::from_vec(dead.iter().map(|&b| u8::from(b)).collect(), (1, m), &dev).unwrap();
        let xs = Tensor::from_slice(&x, (n, d), &dev).unwrap();
        let jump = |mode, pre_act| Sparsity::JumpRelu {
            l0: 0.5,
            bandwidth: 0.2,
            mode,
            pre_act,
        };
        for (sparsity, aux) in [
            (Sparsity::TopK(4), 0.0),
            (Sparsity::TopK(4), 0.5),
            (Sparsity::BatchTopK(4), 0.5),
            (Sparsity::Relu { l1: 0.3 }, 0.0),
            (jump(L0Mode::Tanh(4.0), 0.3), 0.0),
            (jump(L0Mode::Step, 0.0), 0.0),
        ] {
            p.threshold = match sparsity {
                Sparsity::JumpRelu { .. } => (0..m).map(|j| 0.05 * (j % 4) as f32).collect(),
                _ => Vec::new(),
            };
            let mut sparse = Grads::default();
            let a = p.step(&x, sparsity, Precision::F32, &dead, aux, &mut sparse);
            let w = DenseWeights::upload(&p, &dev).unwrap();
            let (g, sums) = step(&w, &xs, n, sparsity, &dead_mask, num_dead, aux).unwrap();
            let sums: Vec<f64> = sums.to_vec1().unwrap();
            let close = |u: f64, v: f64| (u - v).abs() <= 1e-4 * (1.0 + u.abs());
            assert!(
                close(a.mse, sums[SQ] / n as f64)
                    && close(a.aux, sums[AUX])
                    && close(a.penalty, sums[PENALTY])
                    && close(a.min_active, sums[MIN_ACTIVE]),
                "{sparsity:?}: {a:?} vs {sums:?}"
            );
            assert_eq!(a.l0, sums[ACTIVE] / n as f64, "{sparsity:?}");
            let threshold = g.threshold.as_ref().map(host).unwrap_or_default();
            for (name, u, v) in [
                ("w_enc", &sparse.w_enc, &host(&g.w_enc)),
                ("b_enc", &sparse.b_enc, &host(&g.b_enc)),
                ("w_dec", &sparse.w_dec, &host(&g.w_dec)),
                ("b_dec", &sparse.b_dec, &host(&g.b_dec)),
                ("threshold", &sparse.threshold, &threshold),
            ] {
                assert_eq!(u.len(), v.len(), "{sparsity:?} {name}");
                for (i, (u, v)) in u.iter().zip(v.iter()).enumerate() {
                    assert!(
                        close(*u as f64, *v as f64),
                        "{sparsity:?} aux {aux}: {name}[{i}] sparse {u} dense {v}"
                    );
                }
            }
            let fired: Vec<u32> = host(&g.fired).iter().map(|&c| c as u32).collect();
            assert_eq!(sparse.fired, fired, "{sparsity:?}");
        }
    }

    /// Selection on a fixed batch is the sparse path's, latent for latent, for every rule.
    #[test]
    fn dense_selection_is_the_sparse_selection() {
        let (d, m, n) = (16, 64, 20);
        let mut p = random_weights(d, m);
        p.threshold = (0..m).map(|j| 0.02 * (j % 7) as f32).collect();
        let x = random(n * d, 3, 1.0);
        let dev = Device::Cpu;
        let w = DenseWeights::upload(&p, &dev).unwrap();
        let xs = Tensor::from_slice(&x, (n, d), &dev).unwrap();
        let (_, pre_host) = p.pre_activations(&x, n);
        let (_, pre) = w.pre_activations(&xs).unwrap();
        for sparsity in [
            Sparsity::TopK(5),
            Sparsity::BatchTopK(5),
            Sparsity::Threshold(0.1),
            Sparsity::Relu { l1: 0.1 },
            Sparsity::JumpRelu {
                l0: 0.1,
                bandwidth: 0.1,
                mode: L0Mode::Step,
                pre_act: 0.0,
            },
        ] {
            let sel = p.select(&pre_host, sparsity);
            let selected = w.select(&pre, sparsity).unwrap();
            let mask = host(&(selected * above(&pre, 0.0).unwrap()).unwrap());
            let mut from_sparse = vec![0f32; n * m];
            for t in 0..n {
                for e in sel.offsets[t]..sel.offsets[t + 1] {
                    if sel.value[e] > 0.0 {
                        from_sparse[t * m + sel.index[e] as usize] = 1.0;
                    }
                }
            }
            assert!(
                mask.iter().sum::<f32>() > 0.0,
                "{sparsity:?} selects nothing"
            );
            assert_eq!(mask, from_sparse, "{sparsity:?}");
        }
    }
}
