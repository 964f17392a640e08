//! The same training step as [`super::step`], written with dense candle tensor operations on any device:
//! the reference the sparse CPU path is tested against, and the path for GPUs (selected by the trainer's
//! engine). Same conventions, same losses, same gradients (BatchTopK excepted: its batch-wide selection
//! stays on the sparse path).

use anyhow::bail;
use candle_core::{DType, Device, Tensor, D};

use super::step::{total_variance, Grads, L0Mode, Sparsity, StepStats, Weights};

fn host(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// A `[n, m]` 0/1 mask with ones at the `k` largest entries of each row of `x` among `allowed` columns
/// (ties: lower column first, as the sparse path).
fn top_k_mask(x: &Tensor, k: usize, allowed: Option<&Tensor>) -> anyhow::Result<Tensor> {
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
    Ok(x.zeros_like()?.scatter_add(&top, &ones, D::Minus1)?)
}

/// Loss and gradients of one batch on `device`, written into `grads` (host buffers).
pub fn step(
    p: &Weights,
    x: &[f32],
    sparsity: Sparsity,
    dead: &[bool],
    aux_coef: f32,
    device: &Device,
    grads: &mut Grads,
) -> anyhow::Result<StepStats> {
    let (d, m) = (p.d_in, p.d_sae);
    let n = x.len() / d;
    let xs = Tensor::from_slice(x, (n, d), device)?;
    let w_enc = Tensor::from_slice(&p.w_enc, (m, d), device)?;
    let b_enc = Tensor::from_slice(&p.b_enc, m, device)?;
    let w_dec = Tensor::from_slice(&p.w_dec, (m, d), device)?;
    let b_dec = Tensor::from_slice(&p.b_dec, d, device)?;

    let centered = xs.broadcast_sub(&b_dec)?;
    let pre = centered.matmul(&w_enc.t()?)?.broadcast_add(&b_enc)?;
    let positive = pre.gt(0f32)?.to_dtype(DType::F32)?;
    let selected = match sparsity {
        Sparsity::TopK(k) => top_k_mask(&pre, k, None)?,
        Sparsity::Relu { .. } => positive.clone(),
        Sparsity::JumpRelu { .. } => {
            let theta = Tensor::from_slice(&p.threshold, m, device)?;
            pre.broadcast_gt(&theta)?.to_dtype(DType::F32)?
        }
        Sparsity::BatchTopK(_) | Sparsity::Threshold(_) => {
            bail!("the dense engine does not train BatchTopK; use the sparse engine (CPU)")
        }
    };
    // Active = selected and positive (ReLU); these pass gradients to their pre-activations.
    let active = (&selected * &positive)?;
    let acts = (&pre * &active)?;
    let recon = acts.matmul(&w_dec)?.broadcast_add(&b_dec)?;
    let err = (&recon - &xs)?;
    let sq = err
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let g_main = (&err * (2.0 / n as f64))?;

    // AuxK (TopK only): the k_aux largest dead pre-activations reconstruct the detached residual.
    let num_dead = dead.iter().filter(|&&b| b).count();
    let k_aux = (d / 2).min(num_dead);
    let mut aux_loss = 0.0;
    let mut aux_parts = None;
    if aux_coef > 0.0 && k_aux > 0 && matches!(sparsity, Sparsity::TopK(_)) {
        let scale = (num_dead as f32 / (d / 2) as f32).min(1.0);
        let dead_mask = Tensor::from_vec(
            dead.iter().map(|&b| u8::from(b)).collect::<Vec<_>>(),
            (1, m),
            device,
        )?;
        let aux_active = (top_k_mask(&pre, k_aux, Some(&dead_mask))? * &positive)?;
        let aux_acts = (&pre * &aux_active)?;
        let aux_err = (aux_acts.matmul(&w_dec)? + &err)?;
        let weight = (aux_coef * scale) as f64;
        aux_loss = weight
            * aux_err
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
            / n as f64;
        let g_aux = (aux_err * (2.0 * weight / n as f64))?;
        aux_parts = Some((aux_active, aux_acts, g_aux));
    }

    // d loss / d a = g · W_decᵀ, into the pre-activations of active latents.
    let mut grad_pre = (g_main.matmul(&w_dec.t()?)? * &active)?;
    let mut g_w_dec = acts.t()?.matmul(&g_main)?;
    if let Some((aux_active, aux_acts, g_aux)) = &aux_parts {
        grad_pre = (grad_pre + (g_aux.matmul(&w_dec.t()?)? * aux_active)?)?;
        g_w_dec = (g_w_dec + aux_acts.t()?.matmul(g_aux)?)?;
    }
    let mut penalty = 0.0;
    if let Sparsity::Relu { l1 } = sparsity {
        let l1n = (l1 / n as f32) as f64;
        let norms = w_dec.sqr()?.sum(1)?.sqrt()?; // [m]
        penalty = l1n
            * acts
                .broadcast_mul(&norms.unsqueeze(0)?)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        grad_pre = (grad_pre + active.broadcast_mul(&(norms.unsqueeze(0)? * l1n)?)?)?;
        // d/dW_dec[j] of ‖W_dec[j]‖·Σ_t a_tj = (Σ_t a_tj)·W_dec[j]/‖W_dec[j]‖.
        let sums = acts.sum(0)?; // [m]
        let coef = ((sums / norms)? * l1n)?;
        g_w_dec = (g_w_dec + w_dec.broadcast_mul(&coef.unsqueeze(1)?)?)?;
    }
    grads.threshold.clear();
    if let Sparsity::JumpRelu {
        l0,
        bandwidth,
        mode,
        pre_act,
    } = sparsity
    {
        let l0n = (l0 / n as f32) as f64;
        let norms = w_dec.sqr()?.sum(1)?.sqrt()?.unsqueeze(0)?; // [1, m]
        let theta = Tensor::from_slice(&p.threshold, (1, m), device)?;
        let z = (pre.broadcast_sub(&theta)? / bandwidth as f64)?;
        let window = (z.gt(-0.5)?.to_dtype(DType::F32)? * z.lt(0.5)?.to_dtype(DType::F32)?)?;
        // d loss / d a at every pair (the straight-through threshold gradient uses it in the window).
        let mut da = g_main.matmul(&w_dec.t()?)?;
        let mut theta_grad = Tensor::zeros((n, m), DType::F32, device)?;
        let mut norm_coef = Tensor::zeros((1, m), DType::F32, device)?;
        let sum = |t: &Tensor| -> anyhow::Result<f64> {
            Ok(t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
        };
        match mode {
            L0Mode::Step => {
                penalty = l0n * sum(&active)?;
                theta_grad = (theta_grad - (&window * (l0n / bandwidth as f64))?)?;
            }
            L0Mode::Tanh(c) => {
                let scale = (&norms * c as f64)?;
                let th = acts.broadcast_mul(&scale)?.tanh()?;
                let sech2 = (th.sqr()?.neg()? + 1.0)?;
                penalty = l0n * sum(&th)?;
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
            let dead_mask = Tensor::from_vec(
                dead.iter()
                    .map(|&b| f32::from(u8::from(b)))
                    .collect::<Vec<_>>(),
                (1, m),
                device,
            )?;
            let below = pre
                .broadcast_lt(&theta)?
                .to_dtype(DType::F32)?
                .broadcast_mul(&dead_mask)?;
            let gap = (theta.broadcast_sub(&pre)? * &below)?;
            penalty += pn * sum(&gap.broadcast_mul(&norms)?)?;
            let pull = (below.broadcast_mul(&norms)? * pn)?;
            grad_pre = (grad_pre - &pull)?;
            theta_grad = (theta_grad + pull)?;
            norm_coef = (norm_coef + (gap.sum_keepdim(0)? * pn)?)?;
        }
        grads.threshold = host(&theta_grad.sum(0)?)?;
        // d‖w‖/dw = w/‖w‖ for the penalties that depend on the decoder norms.
        g_w_dec = (g_w_dec + w_dec.broadcast_mul(&(norm_coef / norms)?.t()?)?)?;
    }
    let g_b_enc = grad_pre.sum(0)?;
    let g_w_enc = grad_pre.t()?.matmul(&centered)?;
    let g_b_dec = (g_main.sum(0)? - g_b_enc.unsqueeze(0)?.matmul(&w_enc)?.squeeze(0)?)?;
    grads.w_enc = host(&g_w_enc)?;
    grads.b_enc = host(&g_b_enc)?;
    grads.w_dec = host(&g_w_dec)?;
    grads.b_dec = host(&g_b_dec)?;
    grads.fired = host(&active.sum(0)?)?.iter().map(|&c| c as u32).collect();
    let kept = host(&acts)?;
    let active_count = kept.iter().filter(|&&a| a > 0.0).count();
    Ok(StepStats {
        mse: sq / n as f64,
        aux: aux_loss,
        fvu: sq / total_variance(x, d).max(f64::MIN_POSITIVE),
        l0: active_count as f64 / n as f64,
        min_active: kept
            .iter()
            .copied()
            .filter(|&a| a > 0.0)
            .reduce(f32::min)
            .unwrap_or(0.0) as f64,
        penalty,
        exact_per_token: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::Precision;
    use crate::kernels::test_data::random;
    use crate::sae::step::tests::random_weights;

    /// The dense path agrees with the sparse one on every gradient, for every architecture it trains.
    #[test]
    fn dense_and_sparse_steps_agree() {
        let (d, m, n) = (8, 24, 12);
        let p = random_weights(d, m);
        let x = random(n * d, 9, 1.0);
        let dead: Vec<bool> = (0..m).map(|j| j % 3 == 0).collect();
        for (sparsity, aux) in [
            (Sparsity::TopK(4), 0.0),
            (Sparsity::TopK(4), 0.5),
            (Sparsity::Relu { l1: 0.3 }, 0.0),
            (
                Sparsity::JumpRelu {
                    l0: 0.5,
                    bandwidth: 0.2,
                    mode: L0Mode::Tanh(4.0),
                    pre_act: 0.3,
                },
                0.0,
            ),
            (
                Sparsity::JumpRelu {
                    l0: 0.5,
                    bandwidth: 0.2,
                    mode: L0Mode::Step,
                    pre_act: 0.0,
                },
                0.0,
            ),
        ] {
            let mut sparse = Grads::default();
            let a = p.step(&x, sparsity, Precision::F32, &dead, aux, &mut sparse);
            let mut dense = Grads::default();
            let b = step(&p, &x, sparsity, &dead, aux, &Device::Cpu, &mut dense).unwrap();
            let close = |u: f64, v: f64| (u - v).abs() <= 1e-4 * (1.0 + u.abs());
            assert!(
                close(a.mse, b.mse) && close(a.aux, b.aux) && close(a.penalty, b.penalty),
                "{sparsity:?}: {a:?} vs {b:?}"
            );
            assert_eq!(a.l0, b.l0);
            for (name, u, v) in [
                ("w_enc", &sparse.w_enc, &dense.w_enc),
                ("b_enc", &sparse.b_enc, &dense.b_enc),
                ("w_dec", &sparse.w_dec, &dense.w_dec),
                ("b_dec", &sparse.b_dec, &dense.b_dec),
                ("threshold", &sparse.threshold, &dense.threshold),
            ] {
                assert_eq!(u.len(), v.len(), "{sparsity:?} {name}");
                for (i, (u, v)) in u.iter().zip(v.iter()).enumerate() {
                    assert!(
                        close(*u as f64, *v as f64),
                        "{sparsity:?} aux {aux}: {name}[{i}] sparse {u} dense {v}"
                    );
                }
            }
            assert_eq!(sparse.fired, dense.fired, "{sparsity:?}");
        }
    }
}
