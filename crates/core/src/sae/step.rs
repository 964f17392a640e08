//! An SAE's training step on the CPU, for every architecture it trains (TopK, BatchTopK, JumpReLU, ReLU:
//! [`Sparsity`]): the weights ([`Weights`]), one batch's loss and closed-form gradients ([`Weights::step`]
//! into [`Grads`]) and what the step measured ([`StepStats`]). The gradients use the sparsity: after the
//! one dense product (pre-activations = encoder · input), every other product touches only each token's
//! selected latents (chosen by [`super::select`]) and the k_aux dead latents of AuxK, and the weight
//! gradients are accumulated per latent in token order, so a step is deterministic whatever the thread
//! scheduling.
//!
//! Conventions (OpenAI / SAELens): `pre = (x − b_dec)·W_encᵀ + b_enc`, the selected pre-activations are
//! kept and ReLU'd, `x̂ = Σ a_j W_dec[j] + b_dec`; loss = mean over tokens of ‖x̂ − x‖², plus the
//! architecture's sparsity penalty (JumpReLU's L0, ReLU's L1; see [`Sparsity`]), plus AuxK when
//! `aux_coef` is positive (the trainer sets it for TopK and BatchTopK):
//! `aux_coef · min(dead / k_aux, 1) · mean ‖Σ_{j∈topk_aux(dead)} relu(pre_j) W_dec[j] − (x − x̂)‖²` with the
//! residual detached and k_aux = d/2 (sparsify's form; no b_dec in the auxiliary reconstruction, as in
//! current SAELens). Encoder weights are held as `[d_sae, d_in]` rows (sparsify's layout) so both weight
//! gradients are row updates.

use rayon::prelude::*;

use super::select::{keep, select_above, select_batch, select_rows, top_k_unrestricted, Selection};
use crate::kernels::gemm::{
    int16_rounding_norms, matmul_nt_bias, matmul_nt_bias_visit, Kernel, Precision,
};
use crate::kernels::simd::{axpy, bf16_rounding_norms, dot, dot4, prefetch};
use crate::kernels::written;

/// Tokens per block of the passes taken latent by latent (the exact re-ranking, decoding): a block's rows
/// (2.3 KB each at d_in 576) stay in L2 while each encoder or decoder row is read once.
const BLOCK_ROWS: usize = 512;

/// Rows per parallel task of the step's elementwise passes over the batch.
const ROWS_PER_TASK: usize = 64;

/// Items bucketed by latent, each latent's in the order given (a counting sort).
struct ByLatent<T> {
    starts: Vec<usize>,
    items: Vec<T>,
}

impl<T: Copy + Default> ByLatent<T> {
    /// `items()` yields (latent, item) pairs; it is called twice (to count, then to place).
    fn new<I: Iterator<Item = (u32, T)>>(latents: usize, items: impl Fn() -> I) -> Self {
        let mut starts = vec![0usize; latents + 1];
        for (j, _) in items() {
            starts[j as usize + 1] += 1;
        }
        for j in 0..latents {
            starts[j + 1] += starts[j];
        }
        let mut placed = vec![T::default(); starts[latents]];
        let mut fill = starts.clone();
        for (j, item) in items() {
            placed[fill[j as usize]] = item;
            fill[j as usize] += 1;
        }
        ByLatent {
            starts,
            items: placed,
        }
    }

    /// Each latent with its items, in latent order.
    fn iter(&self) -> impl Iterator<Item = (usize, &[T])> {
        let items = &self.items;
        let bucket = move |(j, w): (usize, &[usize])| (j, &items[w[0]..w[1]]);
        self.starts.windows(2).enumerate().map(bucket)
    }
}

/// The weights of an SAE of any architecture, row-major: `w_enc` and `w_dec` are `[d_sae, d_in]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights {
    /// Input width.
    pub d_in: usize,
    /// Number of latents.
    pub d_sae: usize,
    /// Encoder rows (latent j's input direction is row j).
    pub w_enc: Vec<f32>,
    /// Encoder bias `[d_sae]`.
    pub b_enc: Vec<f32>,
    /// Decoder rows.
    pub w_dec: Vec<f32>,
    /// Decoder bias `[d_in]`.
    pub b_dec: Vec<f32>,
    /// Per-latent thresholds `[d_sae]` (JumpReLU; empty for the other architectures).
    pub threshold: Vec<f32>,
}

/// Gradients, same shapes as [`Weights`].
#[derive(Debug, Clone, Default)]
pub struct Grads {
    /// d loss / d w_enc.
    pub w_enc: Vec<f32>,
    /// d loss / d b_enc.
    pub b_enc: Vec<f32>,
    /// d loss / d w_dec.
    pub w_dec: Vec<f32>,
    /// d loss / d b_dec.
    pub b_dec: Vec<f32>,
    /// d loss / d threshold (JumpReLU's straight-through estimate).
    pub threshold: Vec<f32>,
    /// Tokens on which each latent was active (filled by [`Weights::step`]).
    pub fired: Vec<u32>,
    /// Scratch: the step's pre-activations, kept so the next step reuses the allocation (a fresh 75 MB
    /// buffer per step cost ~10 ms of page faults).
    pub pre: Vec<f32>,
}

/// What one step measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Mean squared reconstruction error per token (summed over dimensions).
    pub mse: f64,
    /// AuxK loss (already weighted).
    pub aux: f64,
    /// Reconstruction error over the batch's total variance.
    pub fvu: f64,
    /// Mean number of non-zero latents per token.
    pub l0: f64,
    /// Smallest positive activation kept (0 if none).
    pub min_active: f64,
    /// The sparsity penalty (L0 for JumpReLU, L1 for ReLU), already weighted.
    pub penalty: f64,
    /// Latents per token whose pre-activation a bf16-ranked TopK recomputed in f32 (0 otherwise).
    pub exact_per_token: f64,
}

/// JumpReLU's sparsity penalty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum L0Mode {
    /// λ·(number of active latents), threshold gradient through the step's straight-through estimate
    /// (Google DeepMind).
    Step,
    /// `λ·Σ tanh(c·a_j·‖W_dec[j]‖)` with scale c (Anthropic); differentiable in the activations.
    Tanh(f32),
}

/// How latents are chosen per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsity {
    /// The k largest pre-activations of each token, ReLU'd (TopK).
    TopK(usize),
    /// The k·n largest ReLU'd pre-activations of the whole batch of n tokens (BatchTopK training).
    BatchTopK(usize),
    /// Every pre-activation above a threshold (BatchTopK at inference: a JumpReLU with one threshold).
    Threshold(f32),
    /// Pre-activations above each latent's learned threshold; trained with a sparsity penalty (`l0`, in
    /// `mode`) and straight-through threshold gradients with a rectangle kernel of width `bandwidth`, plus
    /// optionally Anthropic's pre-activation loss on dead latents (SAELens' `JumpReLUTrainingSAE`).
    JumpRelu {
        /// Sparsity coefficient.
        l0: f32,
        /// Kernel width.
        bandwidth: f32,
        /// How the sparsity is penalised.
        mode: L0Mode,
        /// Coefficient of `Σ_dead relu(θ_j − pre_j)·‖W_dec[j]‖` (0: off; Anthropic uses 3e-6).
        pre_act: f32,
    },
    /// ReLU with an L1 penalty on activations weighted by decoder-row norms (SAELens `standard`).
    Relu {
        /// L1 coefficient.
        l1: f32,
    },
}

/// ‖v‖², ‖ṽ‖² and ‖v − ṽ‖² for ṽ the rounding of `v` that a `precision` product multiplies.
fn rounding_norms(precision: Precision, v: &[f32]) -> [f32; 3] {
    match precision {
        Precision::Bf16 => bf16_rounding_norms(v),
        Precision::Int16 => int16_rounding_norms(v),
        Precision::F32 => {
            let norm = dot(v, v);
            [norm, norm, 0.0]
        }
    }
}

/// Largest encoder row norm, largest norm of a row's rounding residual, largest |b_enc|: the weights'
/// part of [`Weights::top_k`]'s bound.
pub struct WeightBounds {
    norm: f64,
    residual: f64,
    bias: f64,
}

impl WeightBounds {
    fn of(weights: &Weights, precision: Precision) -> Self {
        let (norm, residual) = weights
            .w_enc
            .par_chunks(weights.d_in)
            .map(|w| {
                let [norm, _, residual] = rounding_norms(precision, w);
                (norm as f64, residual as f64)
            })
            .reduce(|| (0.0, 0.0), |a, b| (a.0.max(b.0), a.1.max(b.1)));
        let (mut norm, residual) = (norm.sqrt(), residual.sqrt());
        if norm < 1e-15 && weights.w_enc.iter().any(|&w| w != 0.0) {
            // f32 squares that may have underflowed bound nothing (see `Weights::top_k`).
            norm = f64::INFINITY;
        }
        // ‖w̃‖ ≤ ‖w‖ + ‖δw‖ bounds the rounded rows the product used.
        WeightBounds {
            norm: norm + residual,
            residual,
            bias: weights
                .b_enc
                .iter()
                .fold(0f64, |a, &b| a.max(b.abs() as f64)),
        }
    }
}

impl Weights {
    /// Pre-activations `[n, d_sae]` of the (already normalised) inputs `x` `[n, d_in]`, and the centred
    /// inputs x − b_dec.
    pub fn pre_activations(&self, x: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut pre = Vec::new();
        let centered = self.pre_activations_into(x, n, &mut pre);
        (centered, pre)
    }

    /// x − b_dec, row by row: written in place in blocks of rows (collecting a `flat_map_iter`, whose
    /// length rayon cannot know, took ~3 ms a step at batch 4096 for a 9 MB subtraction).
    fn centered(&self, x: &[f32]) -> Vec<f32> {
        let d = self.d_in;
        // (Every value below is written only if the bias is a whole row.)
        assert_eq!(self.b_dec.len(), d, "b_dec has d_in values");
        // SAFETY: every one of the x.len() values is written (`x` and `out` split alike).
        unsafe {
            written(x.len(), |out| {
                x.par_chunks(ROWS_PER_TASK * d)
                    .zip(out.par_chunks_mut(ROWS_PER_TASK * d))
                    .for_each(|(x, out)| {
                        for (x, out) in x.chunks(d).zip(out.chunks_mut(d)) {
                            for ((o, a), b) in out.iter_mut().zip(x).zip(&self.b_dec) {
                                o.write(a - b);
                            }
                        }
                    })
            })
        }
    }

    /// [`Weights::pre_activations`] into a reused buffer; returns the centred inputs.
    pub fn pre_activations_into(&self, x: &[f32], n: usize, pre: &mut Vec<f32>) -> Vec<f32> {
        let d = self.d_in;
        let centered = self.centered(x);
        pre.resize(n * self.d_sae, 0.0);
        matmul_nt_bias(
            &centered,
            &self.w_enc,
            Some(&self.b_enc),
            pre,
            n,
            self.d_sae,
            d,
        );
        centered
    }

    /// The latents each token keeps.
    pub fn select(&self, pre: &[f32], sparsity: Sparsity) -> Selection {
        let m = self.d_sae;
        match sparsity {
            Sparsity::TopK(k) => select_rows(pre, m, k, None),
            Sparsity::BatchTopK(k) => select_batch(pre, m, k * (pre.len() / m)),
            Sparsity::Threshold(t) => select_above(pre, m, &|_| t),
            Sparsity::JumpRelu { .. } => select_above(pre, m, &|j| self.threshold[j]),
            Sparsity::Relu { .. } => select_above(pre, m, &|_| 0.0),
        }
    }

    /// The exact pre-activation of latent `j` for a centred input row.
    fn exact_pre(&self, centered: &[f32], j: usize) -> f32 {
        let d = self.d_in;
        dot(centered, &self.w_enc[j * d..][..d]) + self.b_enc[j]
    }

    /// Centred inputs x − b_dec, each token's top k latents, and how many latents per token had their
    /// pre-activation recomputed exactly (0 for f32). `pre` holds the pre-activations afterwards (the
    /// product's: bf16's for a bf16 product) if `keep_pre`; otherwise it is untouched (the product is
    /// scanned task by task as it is made, in cache, and stored only when asked).
    ///
    /// With a bf16 product the selection is made exact: per token, every latent whose bf16
    /// pre-activation is within twice a bound E of the k-th largest is a candidate; candidates get their
    /// f32 pre-activation and the k largest of those are kept, ties to the lower index. E bounds
    /// |bf16 product − f32 dot| for any latent: with x̃, w̃ the bf16 roundings,
    /// δx = x − x̃, δw = w − w̃, exactly x·w = x̃·w̃ + δx·w + x̃·δw, so rounding the inputs moves a
    /// pre-activation by at most ‖δx‖·max‖w‖ + ‖x̃‖·max‖δw‖ (Cauchy–Schwarz); f32 summation in either
    /// product adds at most γ(d+1)·(‖x‖·max‖w‖ + max|b|), γ(n) = n·2⁻²⁴/(1 − n·2⁻²⁴), with 1% on top
    /// for the norms' own rounding. At least k latents have f32 values ≥ (k-th bf16 value) − E, and a
    /// latent below (k-th bf16 value) − 2E has an f32 value below that: it cannot be among the f32 top k.
    /// So the choice is f32 TopK's (up to the order in which f32 sums round), and the activations are
    /// f32 dots.
    pub fn top_k(
        &self,
        precision: Precision,
        x: &[f32],
        k: usize,
        pre: &mut Vec<f32>,
        keep_pre: bool,
    ) -> (Vec<f32>, Selection, f64) {
        self.top_k_on(Kernel::best(precision), x, k, pre, keep_pre)
    }

    /// [`Weights::top_k`] with the encoder product on `kernel`.
    pub(crate) fn top_k_on(
        &self,
        kernel: Kernel,
        x: &[f32],
        k: usize,
        pre: &mut Vec<f32>,
        keep_pre: bool,
    ) -> (Vec<f32>, Selection, f64) {
        let (d, m) = (self.d_in, self.d_sae);
        let n = x.len() / d;
        let centered = self.centered(x);
        let b_enc = Some(&self.b_enc[..]);
        // Each task's rows are scanned as soon as the product makes them, in cache; stored only if asked.
        if keep_pre {
            pre.resize(n * m, 0.0);
        }
        let out = keep_pre.then_some(&mut pre[..]);
        let (w_enc, x) = (&self.w_enc[..], &centered[..]);
        if !kernel.rounds() {
            let (mut index, mut value) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k));
            let top_k = |_, rows: &[f32]| select_rows(rows, m, k, None);
            for part in matmul_nt_bias_visit(kernel, x, w_enc, b_enc, out, n, m, d, top_k) {
                index.extend(part.index);
                value.extend(part.value);
            }
            let offsets = (0..=n).map(|t| t * k).collect();
            let selection = Selection {
                offsets,
                index,
                value,
            };
            return (centered, selection, 0.0);
        }
        // Each token's candidates: the values within its slack (twice its bound E, with 1% for the norms'
        // rounding) of its k-th largest.
        let precision = kernel.precision();
        let weights = WeightBounds::of(self, precision);
        let gamma = {
            let nu = (d + 1) as f64 * f64::powi(2.0, -24);
            nu / (1.0 - nu)
        };
        let candidates_of = |t: usize, row: &[f32]| {
            let x = &centered[t * d..][..d];
            let [norm, rounded, residual] = rounding_norms(precision, x).map(|v| (v as f64).sqrt());
            let bound = residual * weights.norm
                + rounded * weights.residual
                + 2.0 * gamma * (norm * weights.norm + weights.bias);
            let slack = (2.0 * 1.01 * bound) as f32;
            // A norm whose f32 squares may have underflowed (below 1e-15) bounds nothing, nor does one
            // that overflowed: then every latent is a candidate (a zero row's pre-activations are the
            // bias, exact either way).
            let underflow = norm < 1e-15 && x.iter().any(|&v| v != 0.0);
            if !slack.is_finite() || underflow {
                return row.iter().zip(0..).map(|(&v, j)| (v, j)).collect();
            }
            let mut list = Vec::new();
            top_k_unrestricted(row, k, slack, &mut list);
            list
        };
        let scan = |row0: usize, rows: &[f32]| -> Vec<_> {
            let rows = rows.chunks(m).enumerate();
            rows.map(|(t, row)| candidates_of(row0 + t, row)).collect()
        };
        let candidates: Vec<Vec<(f32, u32)>> =
            matmul_nt_bias_visit(kernel, x, w_enc, b_enc, out, n, m, d, scan)
                .into_iter()
                .flatten()
                .collect();
        let exact: usize = candidates.iter().map(Vec::len).sum();
        // Their exact values, then per token the k largest, ties to the lower index. (`pre` keeps the bf16
        // values: AuxK ranks dead latents on them; writing the exact values back, to random places in
        // 75 MB, cost 2 ms a step.)
        let mut index = vec![0u32; n * k];
        let mut value = vec![0f32; n * k];
        index
            .par_chunks_mut(k.max(1) * BLOCK_ROWS)
            .zip(value.par_chunks_mut(k.max(1) * BLOCK_ROWS))
            .zip(candidates.into_par_iter().chunks(BLOCK_ROWS))
            .enumerate()
            .for_each(|(block, ((index, value), mut lists))| {
                let rows = lists.len();
                self.exact_candidates(&centered[block * BLOCK_ROWS * d..][..rows * d], &mut lists);
                for (t, best) in lists.iter_mut().enumerate() {
                    // As f32 TopK, never a NaN (a row of them keeps fewer than k latents).
                    best.retain(|c| !c.0.is_nan());
                    best.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    keep(best, k, &mut index[t * k..][..k], &mut value[t * k..][..k]);
                }
            });
        let selection = Selection {
            offsets: (0..=n).map(|t| t * k).collect(),
            index,
            value,
        };
        (centered, selection, exact as f64 / n.max(1) as f64)
    }

    /// Replaces each candidate's value with its exact pre-activation, `dot(x_t, W_enc[j]) + b_enc[j]`, for
    /// the rows `centered` (one list per row). The dots are taken latent by latent, every row wanting
    /// latent j in turn: the block's rows stay in L2 and each encoder row is read once per block, where
    /// token by token each candidate read its own encoder row from L3 (54 random 2.3 KB rows per token).
    fn exact_candidates(&self, centered: &[f32], lists: &mut [Vec<(f32, u32)>]) {
        let d = self.d_in;
        // (row, slot) of every candidate, by latent.
        let pairs = ByLatent::new(self.d_sae, || {
            lists.iter().enumerate().flat_map(|(t, list)| {
                let slots = list.iter().enumerate();
                slots.map(move |(s, &(_, j))| (j, (t as u32, s as u32)))
            })
        });
        let row = |t: u32| &centered[t as usize * d..][..d];
        for (j, mine) in pairs.iter() {
            let w = &self.w_enc[j * d..][..d];
            // `dot4` with the encoder row shared gives `dot(x_t, w)`'s bits for four rows at once.
            for group in mine.chunks(4) {
                let ts = std::array::from_fn(|i| group[i.min(group.len() - 1)].0);
                let dots = dot4(w, ts.map(row));
                for (&(t, s), dot) in group.iter().zip(dots) {
                    lists[t as usize][s as usize].0 = dot + self.b_enc[j];
                }
            }
        }
    }

    /// `Σ_j a_j W_dec[j]` (+ b_dec when `bias`) for every token of a selection, each token's terms added in
    /// latent order. Computed latent by latent over blocks of tokens: a block's sums stay in L2 while each
    /// decoder row is read once, where token by token every selected latent read its own row from L3.
    pub fn decode(&self, sel: &Selection, bias: bool) -> Vec<f32> {
        let d = self.d_in;
        let n = sel.offsets.len() - 1;
        assert_eq!(self.b_dec.len(), d, "b_dec has d_in values");
        // SAFETY: the blocks write all n·d values.
        unsafe { written(n * d, |out| self.decode_into(sel, bias, out)) }
    }

    /// [`Weights::decode`] into `out` (n·d values, each written).
    fn decode_into(&self, sel: &Selection, bias: bool, out: &mut [std::mem::MaybeUninit<f32>]) {
        let d = self.d_in;
        out.par_chunks_mut(BLOCK_ROWS * d)
            .enumerate()
            .for_each(|(block, rows)| {
                let first = block * BLOCK_ROWS;
                // Each block starts its own rows (from the bias, or zero), in parallel and in cache for the
                // sums, where `vec![0.0; n·d]` zeroed all 9 MB on one thread first.
                for row in rows.chunks_mut(d) {
                    for (o, &b) in row.iter_mut().zip(&self.b_dec) {
                        o.write(if bias { b } else { 0.0 });
                    }
                }
                // SAFETY: every value of `rows` was written just above.
                let rows =
                    unsafe { &mut *(rows as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
                let terms = ByLatent::new(self.d_sae, || {
                    (0..rows.len() / d).flat_map(|t| {
                        let entries = sel.offsets[first + t]..sel.offsets[first + t + 1];
                        entries.map(move |e| (sel.index[e], (t, sel.value[e])))
                    })
                });
                for (j, mine) in terms.iter() {
                    let w = &self.w_dec[j * d..][..d];
                    for &(t, a) in mine {
                        if a != 0.0 {
                            axpy(a, w, &mut rows[t * d..][..d]);
                        }
                    }
                }
            });
    }

    /// Reconstruction statistics of a batch without gradients (validation).
    pub fn evaluate(&self, x: &[f32], sparsity: Sparsity) -> StepStats {
        let n = x.len() / self.d_in;
        let (_, pre) = self.pre_activations(x, n);
        let sel = self.select(&pre, sparsity);
        let recon = self.decode(&sel, true);
        let sq: f64 = recon
            .iter()
            .zip(x)
            .map(|(r, x)| ((r - x) as f64).powi(2))
            .sum();
        StepStats {
            mse: sq / n as f64,
            aux: 0.0,
            fvu: sq / total_variance(x, self.d_in).max(f64::MIN_POSITIVE),
            l0: sel.value.iter().filter(|&&a| a > 0.0).count() as f64 / n as f64,
            min_active: min_active(&sel),
            penalty: 0.0,
            exact_per_token: 0.0,
        }
    }

    /// Loss and gradients for a batch `x` `[n, d_in]` (already normalised). `dead` marks latents that have
    /// not fired recently (AuxK draws on them); `aux_coef` = 0 switches AuxK off. With
    /// [`Precision::Bf16`] or [`Precision::Int16`] (TopK only) the encoder product that ranks the latents
    /// rounds its inputs and the chosen activations are exact (see [`Weights::top_k`]).
    pub fn step(
        &self,
        x: &[f32],
        sparsity: Sparsity,
        precision: Precision,
        dead: &[bool],
        aux_coef: f32,
        grads: &mut Grads,
    ) -> StepStats {
        let (d, m) = (self.d_in, self.d_sae);
        let n = x.len() / d;
        let mut pre = std::mem::take(&mut grads.pre);
        // Whether the ranking product really rounded (then the AuxK values are recomputed exactly too).
        let refine = matches!(sparsity, Sparsity::TopK(_)) && Kernel::best(precision).rounds();
        // AuxK on dead latents: reconstruct the residual x − x̂ from the top k_aux dead pre-activations.
        let num_dead = dead.iter().filter(|&&x| x).count();
        let k_aux = (d / 2).min(num_dead);
        let aux_on = aux_coef > 0.0 && k_aux > 0;
        let (centered, sel, exact) = match sparsity {
            Sparsity::TopK(k) => self.top_k(precision, x, k, &mut pre, aux_on),
            _ => {
                let centered = self.pre_activations_into(x, n, &mut pre);
                (centered, self.select(&pre, sparsity), 0.0)
            }
        };
        let recon = self.decode(&sel, true);
        // e = x̂ − x; d mse / d x̂ = 2e/n.
        let mut err = recon;
        let sq = add_scaled(&mut err, x, -1.0, d);
        let g_scale = 2.0 / n as f32;

        let (aux_sel, aux_err, aux_loss, aux_scale) = if aux_on {
            let scale = (num_dead as f32 / (d / 2) as f32).min(1.0);
            let mut aux = select_rows(&pre, m, k_aux, Some(&|j| dead[j]));
            if refine {
                // Ranked by the approximate product (AuxK is a heuristic pull on dead latents), but
                // trained on exact values.
                aux.value
                    .par_chunks_mut(k_aux)
                    .zip(aux.index.par_chunks(k_aux))
                    .enumerate()
                    .for_each(|(t, (val, idx))| {
                        for (v, &j) in val.iter_mut().zip(idx) {
                            *v = self.exact_pre(&centered[t * d..][..d], j as usize).max(0.0);
                        }
                    });
            }
            let aux_recon = self.decode(&aux, false);
            // aux_recon − (x − x̂) = aux_recon + e
            let mut aux_err = aux_recon;
            let aux_sq = add_scaled(&mut aux_err, &err, 1.0, d);
            let weight = aux_coef * scale;
            let loss = weight as f64 * aux_sq / n as f64;
            (Some(aux), aux_err, loss, weight)
        } else {
            (None, Vec::new(), 0.0, 0.0)
        };

        // d loss / d x̂ per token, for the main and the auxiliary reconstruction.
        // (In place: the buffers are 2.4M values at batch 4096, and fresh ones cost their page faults.)
        let mut g_main = err;
        g_main.par_iter_mut().for_each(|e| *e *= g_scale);
        let mut g_aux = aux_err;
        let aux_g_scale = 2.0 * aux_scale / n as f32;
        g_aux.par_iter_mut().for_each(|e| *e *= aux_g_scale);

        // One entry per (token, selected latent), bucketed by latent with a stable counting sort: within a
        // bucket, main entries in token order, then AuxK entries in token order. Each latent's gradients are
        // then summed by one thread in that fixed order (deterministic), with its decoder row kept in cache.
        #[derive(Clone, Copy, Default)]
        struct Entry {
            token: u32,
            act: f32,
            aux: bool,
        }
        let mut starts = vec![0usize; m + 1];
        let selections: Vec<(&Selection, bool)> = std::iter::once((&sel, false))
            .chain(aux_sel.as_ref().map(|a| (a, true)))
            .collect();
        for (s, _) in &selections {
            for &j in &s.index {
                starts[j as usize + 1] += 1;
            }
        }
        for j in 0..m {
            starts[j + 1] += starts[j];
        }
        let mut entries = vec![Entry::default(); starts[m]];
        let mut fill = starts.clone();
        for (s, aux) in &selections {
            for t in 0..n {
                for e in s.offsets[t]..s.offsets[t + 1] {
                    let j = s.index[e] as usize;
                    entries[fill[j]] = Entry {
                        token: t as u32,
                        act: s.value[e],
                        aux: *aux,
                    };
                    fill[j] += 1;
                }
            }
        }
        // Sized once; each latent's rows are zeroed by the thread that sums into them (in cache, and in
        // parallel: a 21 MB memset up front cost ~2 ms a step).
        grads.w_enc.resize(m * d, 0.0);
        grads.w_dec.resize(m * d, 0.0);
        grads.b_enc.clear();
        grads.b_enc.resize(m, 0.0);
        grads.fired.clear();
        grads.fired.resize(m, 0);
        // ReLU's L1 on a_j·‖W_dec[j]‖: a gradient λ‖W_dec[j]‖/n on each active pre-activation, and
        // λ(Σ_t a_tj)/n · W_dec[j]/‖W_dec[j]‖ on the decoder row.
        let l1 = match sparsity {
            Sparsity::Relu { l1 } => l1 / n as f32,
            _ => 0.0,
        };
        // JumpReLU's tanh penalty λ/n·tanh(c·a·‖W_dec[j]‖): its derivative in a passes to active
        // pre-activations; (λ/n, c).
        let tanh = match sparsity {
            Sparsity::JumpRelu {
                l0,
                mode: L0Mode::Tanh(c),
                ..
            } => Some((l0 / n as f32, c)),
            _ => None,
        };
        let pre_act = match sparsity {
            Sparsity::JumpRelu { pre_act, .. } if pre_act > 0.0 => pre_act / n as f32,
            _ => 0.0,
        };
        let dec_norms: Vec<f32> = if l1 > 0.0 || tanh.is_some() || pre_act > 0.0 {
            self.w_dec.chunks(d).map(|w| dot(w, w).sqrt()).collect()
        } else {
            Vec::new()
        };
        // Per latent: d loss / d ‖W_dec[j]‖ (applied to the row at the end) and the penalty's value.
        let mut norm_coefs = vec![0f32; m];
        let mut penalties = vec![0f64; m];
        grads
            .w_enc
            .par_chunks_mut(d)
            .zip(grads.w_dec.par_chunks_mut(d))
            .zip(grads.b_enc.par_iter_mut())
            .zip(norm_coefs.par_iter_mut().zip(penalties.par_iter_mut()))
            .enumerate()
            .for_each(|(j, (((genc, gdec), gb), (norm_coef, penalty)))| {
                genc.fill(0.0);
                gdec.fill(0.0);
                let w = &self.w_dec[j * d..][..d];
                let l1_pre = if l1 > 0.0 { l1 * dec_norms[j] } else { 0.0 };
                let mine = &entries[starts[j]..starts[j + 1]];
                for (i, e) in mine.iter().enumerate() {
                    if let Some(next) = mine.get(i + 1) {
                        let t = next.token as usize;
                        prefetch(&(if next.aux { &g_aux } else { &g_main })[t * d..][..d]);
                        prefetch(&centered[t * d..][..d]);
                    }
                    if e.act == 0.0 {
                        // ReLU'd to zero: no reconstruction term and no gradient to the pre-activation.
                        continue;
                    }
                    let t = e.token as usize;
                    let g = &(if e.aux { &g_aux } else { &g_main })[t * d..][..d];
                    // d loss / d a_j = g_t · W_dec[j], passed to the pre-activation (positive, so ReLU' = 1).
                    let mut grad_pre = dot(g, w);
                    if !e.aux {
                        grad_pre += l1_pre;
                        if l1 > 0.0 {
                            *norm_coef += l1 * e.act;
                            *penalty += (l1 * e.act * dec_norms[j]) as f64;
                        }
                        if let Some((l0n, c)) = tanh {
                            let th = (c * e.act * dec_norms[j]).tanh();
                            let sech2 = 1.0 - th * th;
                            grad_pre += l0n * c * dec_norms[j] * sech2;
                            *norm_coef += l0n * c * e.act * sech2;
                            *penalty += (l0n * th) as f64;
                        }
                    }
                    axpy(e.act, g, gdec);
                    *gb += grad_pre;
                    axpy(grad_pre, &centered[t * d..][..d], genc);
                }
            });

        // JumpReLU thresholds (SAELens' straight-through estimator, rectangle kernel of width ε): for every
        // pair with |pre − θ| < ε/2, d loss/d θ = −(θ/ε)·(d loss/d a), where d loss/d a = g_t·W_dec[j] plus,
        // in tanh mode, the penalty's λ/n·c‖W_dec[j]‖·sech²(c·a·‖W_dec[j]‖) at the pair's a (0 when off);
        // in step mode the L0 adds −(1/ε)·λ/n per pair and is worth λ/n per active pair. The pre-activation
        // loss (dead latents, pre < θ) adds λ'/n·‖W_dec[j]‖ to θ and takes it from the pre-activation.
        grads.threshold.clear();
        if let Sparsity::JumpRelu {
            l0,
            bandwidth,
            mode,
            ..
        } = sparsity
        {
            let l0n = l0 / n as f32;
            if mode == L0Mode::Step {
                penalties[0] += l0n as f64 * sel.index.len() as f64;
            }
            grads.threshold.resize(m, 0.0);
            grads
                .threshold
                .par_iter_mut()
                .zip(grads.w_enc.par_chunks_mut(d))
                .zip(grads.b_enc.par_iter_mut())
                .zip(norm_coefs.par_iter_mut().zip(penalties.par_iter_mut()))
                .enumerate()
                .for_each(|(j, (((gt, genc), gb), (norm_coef, penalty)))| {
                    let theta = self.threshold[j];
                    let w = &self.w_dec[j * d..][..d];
                    let dead_pull = if pre_act > 0.0 && dead[j] {
                        pre_act * dec_norms[j]
                    } else {
                        0.0
                    };
                    for t in 0..n {
                        let v = pre[t * m + j];
                        let z = (v - theta) / bandwidth;
                        if z > -0.5 && z < 0.5 {
                            let g = &g_main[t * d..][..d];
                            let mut da = dot(g, w);
                            match mode {
                                L0Mode::Step => *gt -= l0n / bandwidth,
                                L0Mode::Tanh(c) => {
                                    let a = if v > theta && v > 0.0 { v } else { 0.0 };
                                    let th = (c * a * dec_norms[j]).tanh();
                                    da += l0n * c * dec_norms[j] * (1.0 - th * th);
                                }
                            }
                            *gt += -(theta / bandwidth) * da;
                        }
                        if dead_pull > 0.0 && v < theta {
                            *gt += dead_pull;
                            *gb -= dead_pull;
                            for (o, c) in genc.iter_mut().zip(&centered[t * d..][..d]) {
                                *o -= dead_pull * c;
                            }
                            *norm_coef += pre_act * (theta - v);
                            *penalty += (dead_pull * (theta - v)) as f64;
                        }
                    }
                });
        }
        // Penalties that depend on ‖W_dec[j]‖ pull along the row: d‖w‖/dw = w/‖w‖.
        grads
            .w_dec
            .par_chunks_mut(d)
            .zip(norm_coefs.par_iter())
            .enumerate()
            .for_each(|(j, (gdec, &coef))| {
                if coef != 0.0 && dec_norms[j] > 0.0 {
                    let f = coef / dec_norms[j];
                    for (o, w) in gdec.iter_mut().zip(&self.w_dec[j * d..][..d]) {
                        *o += f * w;
                    }
                }
            });
        let penalty: f64 = penalties.iter().sum();
        // b_dec: through x̂ directly, and through the centred encoder input (−W_encᵀ · Σ_t d pre_t). One thread,
        // rows in order, streams the 9 MB of errors and the 10 MB of encoder rows in ~2 ms a step at batch
        // 4096 (AMD Zen 3); tasks over ranges of columns, which read every row in 256-byte pieces, took 6–7 ms.
        let mut g_bdec = vec![0f32; d];
        for row in g_main.chunks(d) {
            for (o, g) in g_bdec.iter_mut().zip(row) {
                *o += g;
            }
        }
        for (j, &gb) in grads.b_enc.iter().enumerate() {
            if gb != 0.0 {
                for (o, w) in g_bdec.iter_mut().zip(&self.w_enc[j * d..][..d]) {
                    *o -= gb * w;
                }
            }
        }
        grads.b_dec = g_bdec;

        for (j, &a) in sel.index.iter().zip(&sel.value) {
            if a > 0.0 {
                grads.fired[*j as usize] += 1;
            }
        }
        grads.pre = pre;
        StepStats {
            mse: sq / n as f64,
            aux: aux_loss,
            fvu: sq / total_variance(x, d).max(f64::MIN_POSITIVE),
            l0: sel.value.iter().filter(|&&a| a > 0.0).count() as f64 / n as f64,
            min_active: min_active(&sel),
            penalty,
            exact_per_token: exact,
        }
    }
}

/// `a += sign·b` element by element (rows of `d`), returning Σ a² — in parallel: the step's error vectors
/// are n·d values (2.4M at batch 4096), ~4 ms on one thread. The squares are summed in f64, eight lanes
/// per row and the rows in order, so the bits do not depend on the thread count.
fn add_scaled(a: &mut [f32], b: &[f32], sign: f32, d: usize) -> f64 {
    let row_sums: Vec<f64> = a
        .par_chunks_mut(d)
        .zip(b.par_chunks(d))
        .map(|(a, b)| {
            let mut lanes = [0f64; 8];
            for (i, (a, b)) in a.iter_mut().zip(b).enumerate() {
                *a += sign * b;
                lanes[i % 8] += (*a as f64) * (*a as f64);
            }
            lanes.iter().sum()
        })
        .collect();
    row_sums.iter().sum()
}

/// The smallest positive selected activation (BatchTopK's threshold tracks it); 0 when none.
fn min_active(sel: &Selection) -> f64 {
    sel.value
        .iter()
        .copied()
        .filter(|&a| a > 0.0)
        .reduce(f32::min)
        .unwrap_or(0.0) as f64
}

/// Σ over tokens of ‖x − mean(x)‖² (the batch's total variance, FVU's denominator).
pub fn total_variance(x: &[f32], d: usize) -> f64 {
    // In parallel over fixed blocks of rows whose partial sums are added in block order: the same bits for
    // any thread count (one thread took ~1 ms a step at batch 4096).
    const ROWS: usize = 256;
    let n = x.len() / d;
    let partial_sums: Vec<Vec<f64>> = x
        .par_chunks(ROWS * d)
        .map(|block| {
            let mut sums = vec![0f64; d];
            for row in block.chunks(d) {
                for (s, &v) in sums.iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
            sums
        })
        .collect();
    let mut mean = vec![0f64; d];
    for sums in &partial_sums {
        for (m, s) in mean.iter_mut().zip(sums) {
            *m += s;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let row_sums: Vec<f64> = x
        .par_chunks(d)
        .map(|row| {
            row.iter()
                .zip(&mean)
                .map(|(&v, mu)| (v as f64 - mu).powi(2))
                .sum::<f64>()
        })
        .collect();
    row_sums.iter().sum()
}

#[cfg(test)]
pub(crate) mod tests;
