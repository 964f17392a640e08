//! The step against its definitions: every architecture's gradients against finite differences of a loss
//! written out in f64, hand-computed threshold gradients, bf16-ranked TopK against exact TopK, and batch sums
//! independent of the thread count.

#![allow(clippy::needless_range_loop, clippy::type_complexity)] // index loops mirror the formulas

use super::*;
use crate::kernels::test_data::random;
use crate::sae::select::top_k;

/// Small random weights with non-negative thresholds.
pub(crate) fn random_weights(d: usize, m: usize) -> Weights {
    Weights {
        d_in: d,
        d_sae: m,
        w_enc: random(m * d, 1, 0.5),
        b_enc: random(m, 2, 0.1),
        w_dec: random(m * d, 3, 0.5),
        b_dec: random(d, 4, 0.1),
        threshold: random(m, 5, 0.2).iter().map(|t| t.abs()).collect(),
    }
}

/// The loss written out with plain loops in f64, straight from the definition. With `residual`, AuxK
/// fits that fixed residual (the detached x − x̂ of the unperturbed parameters). `batch` selects the
/// k·n largest ReLU'd pre-activations of the whole batch (BatchTopK) instead of k per token.
fn reference_loss(
    p: &Weights,
    x: &[f32],
    mode: Sparsity,
    dead: &[bool],
    coef: f64,
    residual: Option<&[f64]>,
) -> (f64, Vec<f64>) {
    let (d, m) = (p.d_in, p.d_sae);
    let n = x.len() / d;
    let (mut mse, mut aux) = (0.0, 0.0);
    let mut resid = Vec::new();
    let num_dead = dead.iter().filter(|&&b| b).count();
    let k_aux = (d / 2).min(num_dead);
    let pre: Vec<Vec<f64>> = (0..n)
        .map(|t| {
            (0..m)
                .map(|j| {
                    (0..d)
                        .map(|i| (x[t * d + i] - p.b_dec[i]) as f64 * p.w_enc[j * d + i] as f64)
                        .sum::<f64>()
                        + p.b_enc[j] as f64
                })
                .collect()
        })
        .collect();
    let (k, batch) = match mode {
        Sparsity::TopK(k) => (k, false),
        Sparsity::BatchTopK(k) => (k, true),
        _ => (0, false),
    };
    let mut penalty = 0.0;
    let mut batch_pick = vec![Vec::new(); n];
    if batch {
        let mut all: Vec<(usize, usize)> =
            (0..n).flat_map(|t| (0..m).map(move |j| (t, j))).collect();
        all.sort_by(|&(t, j), &(u, l)| {
            pre[u][l]
                .max(0.0)
                .partial_cmp(&pre[t][j].max(0.0))
                .unwrap()
                .then((t, j).cmp(&(u, l)))
        });
        for &(t, j) in &all[..k * n] {
            batch_pick[t].push(j);
        }
    }
    for t in 0..n {
        let xt = &x[t * d..][..d];
        let pre = &pre[t];
        let pick = |k: usize, ok: &dyn Fn(usize) -> bool| {
            let mut idx: Vec<usize> = (0..m).filter(|&j| ok(j)).collect();
            idx.sort_by(|&a, &b| pre[b].partial_cmp(&pre[a]).unwrap().then(a.cmp(&b)));
            idx.truncate(k);
            idx
        };
        let mut xhat: Vec<f64> = p.b_dec.iter().map(|&b| b as f64).collect();
        let chosen: Vec<usize> = match mode {
            Sparsity::TopK(_) => pick(k, &|_| true),
            Sparsity::BatchTopK(_) => batch_pick[t].clone(),
            Sparsity::JumpRelu {
                l0, mode, pre_act, ..
            } => {
                let on: Vec<usize> = (0..m)
                    .filter(|&j| pre[j] > p.threshold[j] as f64 && pre[j] > 0.0)
                    .collect();
                let norm = |j: usize| {
                    (0..d)
                        .map(|i| (p.w_dec[j * d + i] as f64).powi(2))
                        .sum::<f64>()
                        .sqrt()
                };
                penalty += match mode {
                    L0Mode::Step => l0 as f64 * on.len() as f64,
                    L0Mode::Tanh(c) => on
                        .iter()
                        .map(|&j| l0 as f64 * (c as f64 * pre[j] * norm(j)).tanh())
                        .sum(),
                };
                for j in (0..m).filter(|&j| dead[j] && pre[j] < p.threshold[j] as f64) {
                    penalty += pre_act as f64 * (p.threshold[j] as f64 - pre[j]) * norm(j);
                }
                on
            }
            Sparsity::Relu { l1 } => {
                let on: Vec<usize> = (0..m).filter(|&j| pre[j] > 0.0).collect();
                for &j in &on {
                    let norm = (0..d)
                        .map(|i| (p.w_dec[j * d + i] as f64).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    penalty += l1 as f64 * pre[j] * norm;
                }
                on
            }
            Sparsity::Threshold(_) => unreachable!(),
        };
        for j in chosen {
            for i in 0..d {
                xhat[i] += pre[j].max(0.0) * p.w_dec[j * d + i] as f64;
            }
        }
        let r: Vec<f64> = (0..d).map(|i| xt[i] as f64 - xhat[i]).collect();
        mse += r.iter().map(|v| v * v).sum::<f64>();
        if coef > 0.0 && k_aux > 0 {
            let target = residual.map_or(r.clone(), |res| res[t * d..][..d].to_vec());
            let mut a = vec![0.0; d];
            for j in pick(k_aux, &|j| dead[j]) {
                for i in 0..d {
                    a[i] += pre[j].max(0.0) * p.w_dec[j * d + i] as f64;
                }
            }
            let scale = (num_dead as f64 / (d / 2) as f64).min(1.0);
            aux += coef * scale * (0..d).map(|i| (a[i] - target[i]).powi(2)).sum::<f64>();
        }
        resid.extend(r);
    }
    ((mse + aux + penalty) / n as f64, resid)
}

fn check(dead: &[bool], coef: f32, sparsity: Sparsity) {
    let (d, m, n) = (6, 16, 5);
    let p = random_weights(d, m);
    let x = random(n * d, 9, 1.0);
    let mut g = Grads::default();
    let stats = p.step(&x, sparsity, Precision::F32, dead, coef, &mut g);
    let (loss, residual) = reference_loss(&p, &x, sparsity, dead, coef as f64, None);
    assert!(
        ((stats.mse + stats.aux + stats.penalty) - loss).abs() < 1e-4 * loss,
        "{stats:?} vs {loss}"
    );
    // Central differences on every parameter, AuxK's residual held fixed as in the detached gradient.
    let h = 1e-3f32;
    let fields: [(&str, fn(&mut Weights) -> &mut Vec<f32>, &Vec<f32>); 4] = [
        ("w_enc", |p| &mut p.w_enc, &g.w_enc),
        ("b_enc", |p| &mut p.b_enc, &g.b_enc),
        ("w_dec", |p| &mut p.w_dec, &g.w_dec),
        ("b_dec", |p| &mut p.b_dec, &g.b_dec),
    ];
    for (name, field, grad) in fields {
        for i in 0..grad.len() {
            let mut plus = p.clone();
            field(&mut plus)[i] += h;
            let mut minus = p.clone();
            field(&mut minus)[i] -= h;
            let lp = reference_loss(&plus, &x, sparsity, dead, coef as f64, Some(&residual)).0;
            let lm = reference_loss(&minus, &x, sparsity, dead, coef as f64, Some(&residual)).0;
            let numeric = (lp - lm) / (2.0 * h as f64);
            assert!(
                (numeric - grad[i] as f64).abs() < 2e-3 * (1.0 + numeric.abs()),
                "{name}[{i}]: analytic {} vs numeric {numeric}",
                grad[i]
            );
        }
    }
}

#[test]
fn relu_l1_gradients_match_finite_differences() {
    // The L1 is weighted by decoder-row norms, so the decoder gradient has a norm term too.
    check(&[false; 16], 0.0, Sparsity::Relu { l1: 0.3 });
}

#[test]
fn jumprelu_weight_gradients_match_finite_differences() {
    // With thresholds fixed, the L0 term is locally constant: only the reconstruction moves.
    check(
        &[false; 16],
        0.0,
        Sparsity::JumpRelu {
            l0: 0.5,
            bandwidth: 1e-6,
            mode: L0Mode::Step,
            pre_act: 0.0,
        },
    );
}

#[test]
fn jumprelu_tanh_and_pre_activation_gradients_match_finite_differences() {
    // Anthropic's setup: the tanh penalty moves with the weights (and decoder norms); the
    // pre-activation loss pulls dead latents' pre-activations up towards their thresholds.
    let dead: Vec<bool> = (0..16).map(|j| j % 3 == 0).collect();
    check(
        &dead,
        0.0,
        Sparsity::JumpRelu {
            l0: 0.5,
            bandwidth: 1e-6,
            mode: L0Mode::Tanh(4.0),
            pre_act: 0.3,
        },
    );
}

/// d 2, two latents, identity encoder and decoder, θ = [0.5, 0.5]: for x = [1, 0] the pre-activations are
/// [0.7, 0.2], latent 0 active, both within a bandwidth-1 window of their thresholds.
fn two_latents() -> Weights {
    Weights {
        d_in: 2,
        d_sae: 2,
        w_enc: vec![1.0, 0.0, 0.0, 1.0],
        b_enc: vec![-0.3, 0.2],
        w_dec: vec![1.0, 0.0, 0.0, 1.0],
        b_dec: vec![0.0, 0.0],
        threshold: vec![0.5, 0.5],
    }
}

#[test]
fn jumprelu_tanh_and_pre_activation_threshold_gradients_by_hand() {
    // The case below with λ 0.4 in tanh mode (c 2) and latent 1 dead (pre-activation loss 0.1).
    // Latent 0 (a 0.7): tanh(1.4) = 0.885352, sech² = 0.216152, d pen/d a = 0.4·2·0.216152 = 0.172922;
    // θ-grad = −(0.5/1)·(−0.6 + 0.172922) = 0.213539; b_enc-grad = −0.6 + 0.172922.
    // Latent 1 (in the window, a 0): d pen/d a = 0.8, θ-grad = −0.5·0.8 + 0.1 (pull) = −0.3;
    // b_enc-grad = −0.1. Penalty 0.4·0.885352 + 0.1·(0.5 − 0.2) = 0.384141.
    let p = two_latents();
    let mut g = Grads::default();
    let stats = p.step(
        &[1.0, 0.0],
        Sparsity::JumpRelu {
            l0: 0.4,
            bandwidth: 1.0,
            mode: L0Mode::Tanh(2.0),
            pre_act: 0.1,
        },
        Precision::F32,
        &[false, true],
        0.0,
        &mut g,
    );
    let near = |a: f64, b: f64| (a - b).abs() < 1e-5;
    assert!(near(stats.penalty, 0.384141), "{stats:?}");
    assert!(near(g.threshold[0] as f64, 0.213539), "{:?}", g.threshold);
    assert!(near(g.threshold[1] as f64, -0.3), "{:?}", g.threshold);
    assert!(near(g.b_enc[0] as f64, -0.6 + 0.172922), "{:?}", g.b_enc);
    assert!(near(g.b_enc[1] as f64, -0.1), "{:?}", g.b_enc);
}

#[test]
fn jumprelu_threshold_gradient_is_saelens_straight_through_estimate() {
    // One token, d 2, two latents with θ = [0.5, 0.5], bandwidth 1: pre = [0.7, 0.2] (inside the
    // kernel window |pre − θ| < 0.5 for both). x = [1, 0], W_dec = I, b_dec = 0 → x̂ = [0.7, 0],
    // g = 2(x̂ − x) = [−0.6, 0]; d a/d θ = −θ/ε·g·W_dec[j]: latent 0: −0.5·(−0.6) = 0.3, latent 1: 0;
    // L0 (λ = 0.4): −(1/ε)·λ per latent in the window → −0.4. So θ-grad = [−0.1, −0.4].
    let p = two_latents();
    let mut g = Grads::default();
    let stats = p.step(
        &[1.0, 0.0],
        Sparsity::JumpRelu {
            l0: 0.4,
            bandwidth: 1.0,
            mode: L0Mode::Step,
            pre_act: 0.0,
        },
        Precision::F32,
        &[false, false],
        0.0,
        &mut g,
    );
    assert!((stats.penalty - 0.4).abs() < 1e-6, "{stats:?}");
    assert!(
        (g.threshold[0] - -0.1).abs() < 1e-6 && (g.threshold[1] - -0.4).abs() < 1e-6,
        "{:?}",
        g.threshold
    );
}

#[test]
fn batch_top_k_gradients_match_finite_differences() {
    check(&[false; 16], 0.0, Sparsity::BatchTopK(3));
    let dead: Vec<bool> = (0..16).map(|j| j % 4 == 1).collect();
    check(&dead, 0.25, Sparsity::BatchTopK(3));
}

#[test]
fn gradients_match_finite_differences_without_auxk() {
    check(&[false; 16], 0.0, Sparsity::TopK(3));
}

#[test]
fn gradients_match_finite_differences_with_auxk_on_dead_latents() {
    let dead: Vec<bool> = (0..16).map(|j| j % 3 == 0).collect();
    check(&dead, 1.0 / 32.0 * 8.0, Sparsity::TopK(3));
}

#[test]
#[cfg_attr(
    missing = "avx2",
    ignore = "needs a CPU with AVX2 (every rounded product does)"
)]
fn rounded_ranked_top_k_chooses_what_exact_top_k_chooses_even_among_near_ties() {
    // Latents come in clusters of 12 encoder rows equal up to 1e-4 relative noise: within a cluster
    // pre-activations differ far below bf16's resolution (~4e-3) and near int16's (~2.5e-4 of the
    // norms' product), so the rounded products cannot rank them and only the exact re-ranking can pick
    // the right ones.
    let (n, d, m, k) = (300, 64, 384, 16);
    let mut p = random_weights(d, m);
    let base = random(m / 12 * d, 21, 1.0);
    let noise = random(m * d, 22, 1e-4);
    for j in 0..m {
        for i in 0..d {
            p.w_enc[j * d + i] = base[(j / 12) * d + i] * (1.0 + noise[j * d + i]);
        }
    }
    p.b_enc.iter_mut().for_each(|b| *b *= 1e-3);
    let x = random(n * d, 23, 2.0);
    let mut pre = Vec::new();
    // Every rounded product this CPU has (AMX, AVX512-BF16, AVX2 int16), each giving the same choice and
    // values.
    let kernels = Kernel::ALL
        .into_iter()
        .filter(|k| k.rounds() && k.available());
    let runs: Vec<_> = kernels
        .map(|kernel| (kernel, p.top_k_on(kernel, &x, k, &mut pre, false)))
        .collect();
    assert!(runs.iter().any(|(kernel, _)| *kernel == Kernel::Avx2Int16));
    let (_, (centered, sel, exact)) = &runs[0];
    for (kernel, (_, other, _)) in &runs[1..] {
        assert_eq!(
            (&other.index, &other.value),
            (&sel.index, &sel.value),
            "{kernel:?}"
        );
    }
    assert!(*exact >= k as f64, "{exact} candidates per token");
    let mut near_ties = 0;
    for t in 0..n {
        let c = &centered[t * d..][..d];
        let values: Vec<f32> = (0..m)
            .map(|j| dot(c, &p.w_enc[j * d..][..d]) + p.b_enc[j])
            .collect();
        let want = top_k(&values, k, |_| true);
        let got = &sel.index[t * k..][..k];
        assert_eq!(got, want.as_slice(), "token {t}");
        for (s, &j) in got.iter().enumerate() {
            assert_eq!(
                sel.value[t * k + s].to_bits(),
                values[j as usize].max(0.0).to_bits()
            );
        }
        // Count the tokens whose k-th and (k+1)-th exact values are closer than bf16 can tell.
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        near_ties += ((sorted[k - 1] - sorted[k]).abs() < 4e-3 * sorted[k - 1].abs()) as usize;
    }
    assert!(
        near_ties > n / 4,
        "only {near_ties} tokens with near-ties at the cut"
    );
    // The f32 path chooses the same sets of latents but for rare ties at the cut within f32 rounding
    // (its GEMM sums in another order than `dot`).
    let (_, f32_sel, none) = p.top_k(Precision::F32, &x, k, &mut pre, false);
    assert_eq!(none, 0.0);
    let set = |s: &Selection, t: usize| {
        let mut v = s.index[t * k..][..k].to_vec();
        v.sort();
        v
    };
    let differing = (0..n).filter(|&t| set(&f32_sel, t) != set(sel, t)).count();
    assert!(
        differing <= n / 100,
        "{differing} tokens whose f32 and rounded-ranked choices differ"
    );
}

#[test]
fn batch_sums_match_their_f64_definitions_for_any_thread_count() {
    let (n, d) = (700, 37); // blocks of rows that do not divide n, rows not a multiple of eight
    let x = random(n * d, 21, 3.0);
    let y = random(n * d, 22, 1.0);
    let mean: Vec<f64> = (0..d)
        .map(|c| (0..n).map(|t| x[t * d + c] as f64).sum::<f64>() / n as f64)
        .collect();
    let variance: f64 = (0..n * d)
        .map(|i| (x[i] as f64 - mean[i % d]).powi(2))
        .sum();
    let difference: f64 = (0..n * d).map(|i| ((x[i] - y[i]) as f64).powi(2)).sum();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut e = x.clone();
            let sq = add_scaled(&mut e, &y, -1.0, d);
            (total_variance(&x, d), sq, e)
        })
    };
    let (var1, sq1, e1) = run(1);
    assert!(
        (var1 - variance).abs() <= 1e-9 * variance,
        "{var1} vs {variance}"
    );
    assert!(
        (sq1 - difference).abs() <= 1e-9 * difference,
        "{sq1} vs {difference}"
    );
    assert!(e1
        .iter()
        .zip(x.iter().zip(&y))
        .all(|(e, (a, b))| *e == a - b));
    for threads in [2, 3, 8] {
        let (var, sq, e) = run(threads);
        assert_eq!(
            (var.to_bits(), sq.to_bits()),
            (var1.to_bits(), sq1.to_bits())
        );
        assert_eq!(e, e1);
    }
}

#[test]
fn decoding_sums_each_tokens_latents_for_any_thread_count() {
    // Three blocks of tokens (the last one short), ReLU'd zeros among the activations.
    let (n, d, m, k) = (2 * BLOCK_ROWS + 77, 37, 50, 5);
    let p = random_weights(d, m);
    let picks = random(n * k, 31, 1.0);
    let acts = random(n * k, 32, 1.0);
    let sel = Selection {
        offsets: (0..=n).map(|t| t * k).collect(),
        // Distinct latents per token: k consecutive ones from a random start.
        index: (0..n * k)
            .map(|e| ((picks[e - e % k].abs() * 1000.0) as usize + e % k) as u32 % m as u32)
            .collect(),
        value: acts.iter().map(|a| a.max(0.0)).collect(),
    };
    for bias in [false, true] {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| p.decode(&sel, bias))
        };
        let got = run(1);
        for t in 0..n {
            for c in 0..d {
                let mut want = if bias { p.b_dec[c] as f64 } else { 0.0 };
                for e in sel.offsets[t]..sel.offsets[t + 1] {
                    let j = sel.index[e] as usize;
                    want += sel.value[e] as f64 * p.w_dec[j * d + c] as f64;
                }
                assert!((got[t * d + c] as f64 - want).abs() < 1e-5, "token {t}");
            }
        }
        assert!(got
            .iter()
            .zip(run(3))
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}

#[test]
#[cfg_attr(
    missing = "avx2",
    ignore = "needs a CPU with AVX2 (every rounded product does)"
)]
fn rounded_ranking_keeps_f32_top_k_on_tiny_huge_and_non_finite_inputs() {
    // Rows whose squares underflow or overflow f32 (no bound holds: every latent is a candidate), rows
    // with NaN (f32 TopK keeps no NaN) or ∞ (it keeps the +∞ values, lowest index first), and a zero row.
    let (d, m, k) = (40, 96, 5);
    let p = random_weights(d, m);
    let mut x = random(8 * d, 31, 1.0);
    for (row, scale) in [(1, 1e-25), (2, 1e25), (3, 1e-40)] {
        x[row * d..][..d].iter_mut().for_each(|v| *v *= scale);
    }
    x[4 * d + 7] = f32::NAN;
    x[5 * d + 3] = f32::INFINITY;
    x[6 * d..][..d].fill(0.0);
    let kernels = Kernel::ALL
        .into_iter()
        .filter(|k| k.rounds() && k.available());
    let mut ran = false;
    for kernel in kernels {
        ran |= kernel == Kernel::Avx2Int16;
        let (centered, sel, _) = p.top_k_on(kernel, &x, k, &mut Vec::new(), false);
        for t in 0..8 {
            let c = &centered[t * d..][..d];
            let values: Vec<f32> = (0..m)
                .map(|j| dot(c, &p.w_enc[j * d..][..d]) + p.b_enc[j])
                .collect();
            let want = top_k(&values, k, |_| true);
            let got = &sel.index[t * k..][..want.len()];
            assert_eq!(got, want.as_slice(), "{kernel:?} token {t}");
            for (s, &j) in want.iter().enumerate() {
                let value = values[j as usize].max(0.0);
                assert_eq!(
                    sel.value[t * k + s].to_bits(),
                    value.to_bits(),
                    "{kernel:?}"
                );
            }
        }
    }
    assert!(ran, "the int16 product ran");
}
