//! The transformer's ops that candle runs slowly on CPU, on [`crate::kernels`] as candle custom ops:
//! dense linear layers (weights packed once), the q/k/v head split with rotary embeddings, RMSNorm, SwiGLU
//! (`silu(gate)·up`) and causal attention (with left padding, sliding windows and score softcaps). Each
//! function takes tensors on any device and
//! uses candle's own ops off the CPU, so the model code does not branch on the device (and a CUDA build
//! runs unchanged).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

pub use crate::kernels::attention::Visibility;
use crate::kernels::attention::{self, Extents};
use crate::kernels::{vector, written};

/// Whether `t` can take the CPU kernels.
fn on_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous f32 elements behind a CPU tensor's layout.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op}: expects a contiguous f32 tensor"),
    }
}

/// RMSNorm over the last axis: `x / √(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if on_cpu_f32(x) && on_cpu_f32(weight) {
        return x
            .contiguous()?
            .apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm(eps));
    }
    candle_nn::ops::rms_norm(x, weight, eps)
}

struct RmsNorm(f32);

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, weight) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
        );
        if l1.dims().last() != Some(&weight.len()) || weight.is_empty() {
            candle_core::bail!(
                "rms-norm: input {:?}, weight of {}",
                l1.dims(),
                weight.len()
            );
        }
        // SAFETY: `rms_norm` writes every row of `out` (x and out have the same whole rows).
        let out = unsafe { written(x.len(), |out| vector::rms_norm(x, weight, self.0, out)) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x + y` and [`rms_norm`] of the sum: on CPU f32 tensors of one shape one pass
/// ([`vector::add_rms_norm`], the same bits as the two ops), candle's add and [`rms_norm`] elsewhere.
pub fn add_rms_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    if ![x, y, weight].iter().all(|t| on_cpu_f32(t)) || x.dims() != y.dims() {
        let sum = (x + y)?;
        let normed = rms_norm(&sum, weight, eps)?;
        return Ok((sum, normed));
    }
    let (x, y, weight) = (x.contiguous()?, y.contiguous()?, weight.contiguous()?);
    let width = weight.elem_count();
    if x.dims().last() != Some(&width) || width == 0 {
        candle_core::bail!("add-rms-norm: input {:?}, weight of {width}", x.dims());
    }
    let n = x.elem_count();
    let (sum, normed) = {
        let op = "add-rms-norm";
        let ((sx, lx), (sy, ly), (sw, lw)) = (
            x.storage_and_layout(),
            y.storage_and_layout(),
            weight.storage_and_layout(),
        );
        let (
            candle_core::Storage::Cpu(sx),
            candle_core::Storage::Cpu(sy),
            candle_core::Storage::Cpu(sw),
        ) = (&*sx, &*sy, &*sw)
        else {
            candle_core::bail!("{op}: expects CPU tensors");
        };
        let (x, y, w) = (
            f32_slice(sx, lx, op)?,
            f32_slice(sy, ly, op)?,
            f32_slice(sw, lw, op)?,
        );
        let mut normed = Vec::new();
        // SAFETY: `add_rms_norm` writes every element of both (n floats each, whole rows).
        let sum = unsafe {
            written(n, |sum| {
                normed = written(n, |normed| vector::add_rms_norm(x, y, w, eps, sum, normed))
            })
        };
        (sum, normed)
    };
    Ok((
        Tensor::from_vec(sum, x.shape(), x.device())?,
        Tensor::from_vec(normed, x.shape(), x.device())?,
    ))
}

/// SwiGLU of `[…, 2h]` (gate and up projections side by side, as one product over the stacked weights
/// gives them) → `silu(gate) · up`, `[…, h]`.
pub fn swiglu(x: &Tensor) -> candle_core::Result<Tensor> {
    if on_cpu_f32(x) {
        return x.contiguous()?.apply_op1_no_bwd(&Swiglu);
    }
    candle_nn::ops::swiglu(x)
}

struct Swiglu;

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let mut dims = l.dims().to_vec();
        let width = match dims.last_mut() {
            Some(last) if *last > 0 && *last % 2 == 0 => {
                *last /= 2;
                *last
            }
            _ => candle_core::bail!("swiglu: input {dims:?} does not end in an even width"),
        };
        let mut out = vec![0f32; x.len() / 2];
        vector::swiglu(x, width, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Rotary position tables for [`split_heads`]: `cos`, `sin` `[t, head_dim / 2]` (every sequence at the
/// same positions) or `[batch, t, head_dim / 2]`.
pub struct Rotary<'a> {
    /// Cosines of each position's angles.
    pub cos: &'a Tensor,
    /// Sines of the same.
    pub sin: &'a Tensor,
    /// Pairs `(2i, 2i + 1)` rotate together (GPT-J style) rather than `(i, i + head_dim / 2)`.
    pub interleaved: bool,
}

/// `qkv [batch, t, (nq + 2·nkv)·head_dim]` (a fused q/k/v projection) split into `q [batch, nq, t,
/// head_dim]` and `k, v [batch, nkv, t, head_dim]`, q and k rotated by `rotary`. On CPU f32 one parallel
/// pass writes all three (three strided copies and two rotations, each single-threaded or a pass of its
/// own, took ~4% of a SmolLM2 forward); elsewhere candle's ops. Both compute each rotated value with the
/// same operations as candle's `rope` / `rope_i`, so the results are bit-identical.
pub fn split_heads(
    qkv: &Tensor,
    nq: usize,
    nkv: usize,
    head_dim: usize,
    rotary: Option<Rotary>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (bsz, t, _) = qkv.dims3()?;
    let cpu = on_cpu_f32(qkv)
        && rotary
            .as_ref()
            .is_none_or(|r| on_cpu_f32(r.cos) && on_cpu_f32(r.sin));
    if !cpu {
        let qkv = qkv.reshape((bsz, t, nq + 2 * nkv, head_dim))?;
        let heads = |from: usize, n: usize| qkv.narrow(2, from, n)?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (heads(0, nq)?, heads(nq, nkv)?, heads(nq + nkv, nkv)?);
        return Ok(match rotary {
            Some(r) => {
                let (cos, sin) = (r.cos.to_dtype(q.dtype())?, r.sin.to_dtype(q.dtype())?);
                let rotate = if r.interleaved {
                    candle_nn::rotary_emb::rope_i
                } else {
                    candle_nn::rotary_emb::rope
                };
                (rotate(&q, &cos, &sin)?, rotate(&k, &cos, &sin)?, v)
            }
            None => (q, k, v),
        });
    }
    let op = SplitHeads {
        nq,
        nkv,
        head_dim,
        interleaved: rotary.as_ref().is_some_and(|r| r.interleaved),
    };
    let qkv = qkv.contiguous()?;
    let flat = match &rotary {
        Some(r) => qkv.apply_op3_no_bwd(&r.cos.contiguous()?, &r.sin.contiguous()?, &op)?,
        None => qkv.apply_op1_no_bwd(&op)?,
    };
    // The output is q, k and v one after another, each contiguous.
    let (q_len, kv_len) = (bsz * nq * t * head_dim, bsz * nkv * t * head_dim);
    Ok((
        flat.narrow(0, 0, q_len)?.reshape((bsz, nq, t, head_dim))?,
        flat.narrow(0, q_len, kv_len)?
            .reshape((bsz, nkv, t, head_dim))?,
        flat.narrow(0, q_len + kv_len, kv_len)?
            .reshape((bsz, nkv, t, head_dim))?,
    ))
}

struct SplitHeads {
    nq: usize,
    nkv: usize,
    head_dim: usize,
    interleaved: bool,
}

impl SplitHeads {
    /// q, k and v heads, flat one after another; `tables` = (cos, sin, their extents).
    fn run(
        &self,
        qkv: &[f32],
        l: &Layout,
        tables: Option<(&[f32], &[f32], &[usize])>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (bsz, t, width) = l.shape().dims3()?;
        let (nq, nkv, hd) = (self.nq, self.nkv, self.head_dim);
        let heads = nq + 2 * nkv;
        if width != heads * hd || hd % 2 != 0 {
            candle_core::bail!(
                "split-heads: qkv {:?} against {heads} heads of {hd}",
                l.dims()
            );
        }
        let half = hd / 2;
        // Per sequence, the table rows of its positions (the same rows for every sequence when 2-D).
        let per_sequence = match tables {
            Some((cos, sin, dims)) => {
                let per_batch = match dims {
                    [rows, h] if *rows == t && *h == half => false,
                    [b, rows, h] if *b == bsz && *rows == t && *h == half => true,
                    _ => candle_core::bail!(
                        "split-heads: rotary tables {dims:?} for {bsz} × {t} positions of {hd}"
                    ),
                };
                if cos.len() != sin.len() {
                    candle_core::bail!("split-heads: cos and sin differ in size");
                }
                Some((cos, sin, per_batch))
            }
            None => None,
        };
        // SAFETY: every chunk's rows are written whole: copied, or rotated pair by pair (hd is even).
        let out = unsafe {
            written(bsz * heads * t * hd, |out| {
                out.par_chunks_mut(t * hd)
                    .enumerate()
                    .for_each(|(chunk, dst)| {
                        // Chunks: q of every sequence (nq heads each), then k, then v.
                        let (b, head, rotated) = if chunk < bsz * nq {
                            (chunk / nq, chunk % nq, true)
                        } else if chunk < bsz * (nq + nkv) {
                            let c = chunk - bsz * nq;
                            (c / nkv, nq + c % nkv, true)
                        } else {
                            let c = chunk - bsz * (nq + nkv);
                            (c / nkv, nq + nkv + c % nkv, false)
                        };
                        for (i, dst) in dst.chunks_exact_mut(hd).enumerate() {
                            let src = &qkv[((b * t + i) * heads + head) * hd..][..hd];
                            match per_sequence {
                                Some((cos, sin, per_batch)) if rotated => {
                                    let row = if per_batch { b * t + i } else { i };
                                    let (cos, sin) =
                                        (&cos[row * half..][..half], &sin[row * half..][..half]);
                                    if self.interleaved {
                                        for j in 0..half {
                                            let (x, y) = (src[2 * j], src[2 * j + 1]);
                                            dst[2 * j].write(x * cos[j] - y * sin[j]);
                                            dst[2 * j + 1].write(x * sin[j] + y * cos[j]);
                                        }
                                    } else {
                                        for j in 0..half {
                                            let (x, y) = (src[j], src[j + half]);
                                            dst[j].write(x * cos[j] - y * sin[j]);
                                            dst[j + half].write(x * sin[j] + y * cos[j]);
                                        }
                                    }
                                }
                                _ => {
                                    for (d, &s) in dst.iter_mut().zip(src) {
                                        d.write(s);
                                    }
                                }
                            }
                        }
                    })
            })
        };
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(f32_slice(s, l, "split-heads")?, l, None)
    }
}

impl CustomOp3 for SplitHeads {
    fn name(&self) -> &'static str {
        "split-heads"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s1, l1, "split-heads")?;
        let (cos, sin) = (
            f32_slice(s2, l2, "split-heads")?,
            f32_slice(s3, l3, "split-heads")?,
        );
        if l2.dims() != l3.dims() {
            candle_core::bail!("split-heads: cos {:?} and sin {:?}", l2.dims(), l3.dims());
        }
        self.run(qkv, l1, Some((cos, sin, l2.dims())))
    }
}

/// A linear layer's `[out, in]` f32 weight on a CPU with AVX-512 or AVX2, packed once for `kernels::gemm`'s
/// kernels, which on Intel Xeon run the forward's products 1.4–2× faster than candle's `gemm` crate
/// (BENCHMARKS, "The forward's linear layers alone") and sum each output in a fixed order whatever the
/// thread count (and the same bits on AVX2 as on AVX-512). Packing per call cost a quarter of a forward's products and more than a decode step's
/// product, so only the packed copy is kept.
#[derive(Clone)]
pub struct PackedWeight(std::sync::Arc<crate::kernels::gemm::PackedB>);

impl PackedWeight {
    /// Packs `w` `[out, in]` where it is an f32 CPU tensor and the CPU has AVX-512 or AVX2; `None`
    /// elsewhere (the layer stays a tensor, multiplied by candle's matmul).
    pub fn new(w: &Tensor) -> candle_core::Result<Option<Self>> {
        if !on_cpu_f32(w) || crate::kernels::gemm::PackedB::kernel().is_none() {
            return Ok(None);
        }
        let (rows, inner) = w.dims2()?;
        let w = w.contiguous()?;
        // Packed straight from the tensor's storage (a copy of the values first would add the largest
        // matrix, the 113 MB embedding of SmolLM2, to the peak memory).
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            return Ok(None);
        };
        let values = f32_slice(storage, layout, "packing a linear layer")?;
        let packed = crate::kernels::gemm::PackedB::new(values, rows, inner);
        Ok(Some(Self(std::sync::Arc::new(packed))))
    }

    /// The weight as an `[out, in]` CPU tensor again (exactly).
    pub fn to_tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::from_vec(
            self.0.unpack(),
            (self.0.rows(), self.0.depth()),
            &candle_core::Device::Cpu,
        )
    }
}

/// `x · wᵀ` for `x [rows, in]` (f32 on the CPU) against a packed weight.
pub fn linear_packed(x: &Tensor, w: &PackedWeight) -> candle_core::Result<Tensor> {
    if !on_cpu_f32(x) {
        candle_core::bail!("packed linear layers take f32 CPU inputs");
    }
    x.contiguous()?.apply_op1_no_bwd(&PackedLinear(w.0.clone()))
}

/// A SwiGLU MLP's gate and up weights (`[width, in]` each) packed together for [`swiglu_linear`], where
/// the CPU fuses the activation into the product ([`crate::kernels::gemm::PackedGlu`]: AVX2 without
/// AVX-512).
#[derive(Clone)]
pub struct GluWeight(std::sync::Arc<crate::kernels::gemm::PackedGlu>);

impl GluWeight {
    /// Packs `gate` and `up` where they are f32 CPU tensors of one shape and the CPU fuses; `None`
    /// elsewhere (they stay a stacked linear layer followed by [`swiglu`]).
    pub fn new(gate: &Tensor, up: &Tensor) -> candle_core::Result<Option<Self>> {
        if !on_cpu_f32(gate) || !on_cpu_f32(up) || gate.dims() != up.dims() {
            return Ok(None);
        }
        let (width, inner) = gate.dims2()?;
        let (gate, up) = (
            gate.flatten_all()?.to_vec1::<f32>()?,
            up.flatten_all()?.to_vec1::<f32>()?,
        );
        let packed = crate::kernels::gemm::PackedGlu::new(&gate, &up, width, inner);
        Ok(packed.map(|p| Self(std::sync::Arc::new(p))))
    }

    /// The weights as one `[2·width, in]` CPU tensor, gate rows first (exactly).
    pub fn to_tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::from_vec(
            self.0.unpack(),
            (2 * self.0.width(), self.0.depth()),
            &candle_core::Device::Cpu,
        )
    }
}

/// `silu(x · gateᵀ) · (x · upᵀ)` for `x [rows, in]` (f32 on the CPU): [`swiglu`] of the stacked product,
/// bit for bit, without writing that product.
pub fn swiglu_linear(x: &Tensor, w: &GluWeight) -> candle_core::Result<Tensor> {
    if !on_cpu_f32(x) {
        candle_core::bail!("fused SwiGLU layers take f32 CPU inputs");
    }
    x.contiguous()?.apply_op1_no_bwd(&SwigluLinear(w.0.clone()))
}

struct SwigluLinear(std::sync::Arc<crate::kernels::gemm::PackedGlu>);

impl CustomOp1 for SwigluLinear {
    fn name(&self) -> &'static str {
        "swiglu-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (rows, inner) = l.shape().dims2()?;
        if inner != self.0.depth() {
            candle_core::bail!(
                "swiglu-linear: x {:?} against weights of depth {}",
                l.dims(),
                self.0.depth()
            );
        }
        let y = crate::kernels::gemm::product_glu(x, rows, &self.0);
        Ok((CpuStorage::F32(y), Shape::from((rows, self.0.width()))))
    }
}

/// `x · wᵀ` for a weight kept as a tensor `[out, in]` (GPUs, CPUs without AVX2): candle's matmul
/// against a transposed view.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.matmul(&w.t()?)
}

/// A linear layer's input and weight elements, and `(rows, in, out)`.
type LinearOperands<'a> = (&'a [f32], &'a [f32], (usize, usize, usize));

/// The operands of `op`'s `x [rows, in] · w [out, in]ᵀ`: their f32 elements and `(rows, in, out)`.
fn linear_operands<'a>(
    op: &str,
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<LinearOperands<'a>> {
    let (x, w) = (f32_slice(s1, l1, op)?, f32_slice(s2, l2, op)?);
    let ((rows, inner), (out, inner_w)) = (l1.shape().dims2()?, l2.shape().dims2()?);
    if inner != inner_w {
        candle_core::bail!("{op}: x {:?} against w {:?}", l1.dims(), l2.dims());
    }
    Ok((x, w, (rows, inner, out)))
}

/// Rows below which the bf16 products of a CPU without AMX stay on candle's matmul of rounded values:
/// `kernels::gemm` packs that weight on every call, which for the few rows of a decode step (one per
/// sequence) costs more than the product itself (3.5× slower generation on SmolLM2 when the f32 path did).
pub const GEMM_MIN_ROWS: usize = 64;

/// `x · wᵀ` on AVX-512 or AVX2 against a packed f32 weight.
struct PackedLinear(std::sync::Arc<crate::kernels::gemm::PackedB>);

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (rows, inner) = l.shape().dims2()?;
        let (out, depth) = (self.0.rows(), self.0.depth());
        if inner != depth {
            candle_core::bail!("linear: x {:?} against a weight of depth {depth}", l.dims());
        }
        let y = crate::kernels::gemm::product(x, rows, &self.0, None);
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
}

/// A linear layer's `[out, in]` weight for bf16 products on the CPU: where the CPU has AMX, packed once
/// into AMX tiles' layout (packing per call cost ~10% of a product, and all of it for a decode step's few
/// rows; only the packed bf16 copy is kept), else its values rounded to bf16, held as f32.
pub struct Bf16Weight {
    form: Bf16Form,
}

enum Bf16Form {
    Packed(std::sync::Arc<crate::kernels::amx::PackedB>),
    Rounded(Tensor),
}

impl Bf16Weight {
    /// Rounds (or packs) the f32 CPU weight `w` `[out, in]`.
    pub fn new(w: &Tensor) -> candle_core::Result<Self> {
        let (rows, inner) = w.dims2()?;
        let form = if crate::kernels::amx::available() {
            let values = w.flatten_all()?.to_vec1::<f32>()?;
            let packed = crate::kernels::amx::PackedB::new(&values, rows, inner);
            Bf16Form::Packed(std::sync::Arc::new(packed))
        } else {
            let rounded = w.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            Bf16Form::Rounded(rounded.contiguous()?)
        };
        Ok(Self { form })
    }
}

/// `x · wᵀ` with `x [rows, in]` rounded to bf16 and f32 sums (the numbers of `kernels::gemm`'s
/// `Precision::Bf16`): AMX on the packed weight where available (any row count), else the best bf16 kernel
/// (`gemm::Kernel::best`), or for fewer than [`GEMM_MIN_ROWS`] rows candle's f32 matmul of the rounded
/// values (same products, another summation order).
pub fn linear_bf16(x: &Tensor, w: &Bf16Weight) -> candle_core::Result<Tensor> {
    if !on_cpu_f32(x) {
        candle_core::bail!("bf16 linear layers on the CPU take f32 CPU inputs");
    }
    let x = x.contiguous()?;
    match &w.form {
        Bf16Form::Packed(packed) => x.apply_op1_no_bwd(&AmxLinear(packed.clone())),
        Bf16Form::Rounded(rounded) if x.dim(0)? < GEMM_MIN_ROWS => {
            let x = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            x.matmul(&rounded.t()?)
        }
        Bf16Form::Rounded(rounded) => x.apply_op2_no_bwd(rounded, &LinearBf16),
    }
}

/// `x · wᵀ` on AMX against a packed weight.
struct AmxLinear(std::sync::Arc<crate::kernels::amx::PackedB>);

impl CustomOp1 for AmxLinear {
    fn name(&self) -> &'static str {
        "linear-amx"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (rows, inner) = l.shape().dims2()?;
        let (out, depth) = (self.0.rows(), self.0.depth());
        if inner != depth {
            candle_core::bail!(
                "linear-amx: x {:?} against a weight of depth {depth}",
                l.dims()
            );
        }
        let y = crate::kernels::amx::product(x, rows, &self.0, None);
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
}

/// `x · wᵀ` with bf16-rounded inputs on the best bf16 kernel of a CPU without AMX (`w` already rounded).
struct LinearBf16;

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use crate::kernels::gemm::{bf16_bits, matmul_nt_bias_with, Kernel, Precision};
        let (x, w, (rows, inner, out)) = linear_operands(self.name(), s1, l1, s2, l2)?;
        let mut y = vec![0f32; rows * out];
        let kernel = Kernel::best(Precision::Bf16);
        if kernel.precision() == Precision::Bf16 {
            matmul_nt_bias_with(kernel, x, w, None, &mut y, rows, out, inner);
        } else {
            // No bf16 kernel on this CPU: the same products from rounded inputs, in f32.
            let x: Vec<f32> = x
                .iter()
                .map(|&v| f32::from_bits(bf16_bits(v) << 16))
                .collect();
            matmul_nt_bias_with(kernel, &x, w, None, &mut y, rows, out, inner);
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }
}

/// Causal attention with GQA: `q [batch, kv_heads, groups·t, head_dim]` (the `groups` query heads sharing
/// a kv head stacked along the query axis), `k, v [batch, kv_heads, s, head_dim]` → `softmax(scale ·
/// q·kᵀ) · v` by token, heads side by side: `[batch, t, kv_heads·groups·head_dim]` (query head
/// `h·groups + g` is row block `g` of kv head `h`), as the output projection reads it. Query row `r`
/// (position `start + r % t`) sees keys `0..=start + r % t` only, narrowed further by `vis` (left padding
/// per `batch × kv_heads` pair, sliding window, score softcap).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t: usize,
    start: usize,
    vis: Visibility,
) -> candle_core::Result<Tensor> {
    let (bsz, kv_heads, rows, head_dim) = q.dims4()?;
    let keys = k.dim(2)?;
    if t == 0 || rows % t != 0 {
        candle_core::bail!("causal-attention: {rows} query rows are not groups of {t}");
    }
    if [q, k, v].iter().all(|x| on_cpu_f32(x)) {
        let extents = Extents {
            pairs: bsz * kv_heads,
            rows,
            t,
            keys,
            start,
            head_dim,
        };
        let op = CausalAttention {
            extents,
            kv_heads,
            scale,
            first_key: vis.first_key.to_vec(),
            window: vis.window,
            softcap: vis.softcap,
        };
        return q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    let by_pair = candle_attention(q, k, v, scale, t, start, vis)?;
    // [batch, kv_heads, groups, t, d] → [batch, t, kv_heads, groups, d].
    let groups = rows / t;
    by_pair
        .reshape((bsz, kv_heads * groups, t, head_dim))?
        .transpose(1, 2)?
        .reshape((bsz, t, kv_heads * groups * head_dim))
}

/// [`causal_attention`] by candle's ops, in `q`'s layout.
fn candle_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    t: usize,
    start: usize,
    vis: Visibility,
) -> candle_core::Result<Tensor> {
    let (bsz, kv_heads, rows, _) = q.dims4()?;
    let keys = k.dim(2)?;
    // Elsewhere (CUDA, bf16/f16, f64 tests): candle's ops over the whole score matrix with an additive
    // mask; bf16/f16 scores are masked, capped and softmaxed in f32 (as `transformers` does).
    let low = matches!(q.dtype(), DType::BF16 | DType::F16);
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if low {
        scores = scores.to_dtype(DType::F32)?;
    }
    if let Some(cap) = vis.softcap {
        scores = ((scores / cap as f64)?.tanh()? * cap as f64)?;
    }
    // The additive mask, built on the scores' device from a few small vectors (a `[pairs, rows, keys]`
    // mask built on the host cost one large upload per layer on a GPU): key j is hidden from row r of
    // pair p when j > position(r) or j < first(p, r) = min(max(first_key(p), position(r) + 1 − window),
    // position(r)).
    let device = scores.device();
    let positions: Vec<f32> = (0..rows).map(|r| (start + r % t) as f32).collect();
    let position = Tensor::from_vec(positions, (1, 1, rows, 1), device)?;
    let firsts: Vec<f32> = (0..bsz * kv_heads)
        .map(|pair| vis.first_key.get(pair).copied().unwrap_or(0) as f32)
        .collect();
    let mut first = Tensor::from_vec(firsts, (bsz, kv_heads, 1, 1), device)?;
    if let Some(w) = vis.window {
        first = first.broadcast_maximum(&(&position + (1.0 - w as f64))?)?;
    }
    let first = first.broadcast_minimum(&position)?;
    let key = Tensor::arange(0u32, keys as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((1, 1, 1, keys))?;
    let hidden = key
        .broadcast_gt(&position)?
        .to_dtype(DType::F32)?
        .broadcast_add(&key.broadcast_lt(&first)?.to_dtype(DType::F32)?)?;
    let shape = (bsz, kv_heads, rows, keys);
    let mask = hidden
        .broadcast_as(shape)?
        .gt(0f64)?
        .where_cond(
            &Tensor::full(f32::NEG_INFINITY, shape, device)?,
            &Tensor::zeros(shape, DType::F32, device)?,
        )?
        .to_dtype(scores.dtype())?;
    scores = (scores + mask)?;
    candle_nn::ops::softmax_last_dim(&scores)?
        .to_dtype(v.dtype())?
        .matmul(v)
}

struct CausalAttention {
    extents: Extents,
    kv_heads: usize,
    scale: f64,
    first_key: Vec<usize>,
    window: Option<usize>,
    softcap: Option<f32>,
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = f32_slice(s1, l1, self.name())?;
        let (k, v) = (
            f32_slice(s2, l2, self.name())?,
            f32_slice(s3, l3, self.name())?,
        );
        let e = self.extents;
        if q.len() != e.pairs * e.rows * e.head_dim
            || k.len() != e.pairs * e.keys * e.head_dim
            || v.len() != k.len()
        {
            candle_core::bail!(
                "causal-attention: q {:?}, k {:?}, v {:?} do not fit {e:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let vis = Visibility {
            first_key: &self.first_key,
            window: self.window,
            softcap: self.softcap,
        };
        let (scale, kv_heads) = (self.scale as f32, self.kv_heads);
        // SAFETY: every (token, head) row of the output is copied whole from the one task that computes it.
        let out = unsafe {
            written(q.len(), |out| {
                attention::causal_attention_by_token(q, k, v, e, kv_heads, scale, vis, out)
            })
        };
        let (sequences, width) = (e.pairs / kv_heads, e.rows / e.t * kv_heads * e.head_dim);
        Ok((CpuStorage::F32(out), Shape::from((sequences, e.t, width))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The same values as f32 (our kernels) and as f64 (candle's ops: the path other devices take).
    fn both(dims: &[usize], seed: u64) -> (Tensor, Tensor) {
        let n = dims.iter().product();
        let v = crate::kernels::test_data::random(n, seed, 1.0);
        let t = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
        let wide = t.to_dtype(DType::F64).unwrap();
        (t, wide)
    }

    fn max_diff(fast: &Tensor, reference: &Tensor) -> f64 {
        let fast = fast.to_dtype(DType::F64).unwrap();
        assert_eq!(fast.dims(), reference.dims());
        (fast - reference)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn cpu_kernels_agree_with_candles_ops() {
        let (x, x64) = both(&[2, 5, 48], 1);
        let (w, w64) = both(&[48], 2);
        // candle's fused rms-norm has no f64 kernel; its definition in candle ops instead.
        let ms = (x64.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5).unwrap();
        let want = x64
            .broadcast_div(&ms.sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w64)
            .unwrap();
        assert!(max_diff(&rms_norm(&x, &w, 1e-5).unwrap(), &want) < 1e-5);

        // Rows and widths that fill no register or micro-tile exactly.
        for (rows, inner, out) in [(7, 48, 13), (67, 576, 97), (1, 5, 1), (64, 33, 5)] {
            let (x, x64) = both(&[rows, inner], 7);
            let (w, w64) = both(&[out, inner], 8);
            let got = linear(&x, &w).unwrap();
            assert!(
                max_diff(&got, &linear(&x64, &w64).unwrap()) < 1e-4,
                "{rows}x{inner}x{out}"
            );
        }

        let (g, g64) = both(&[2, 5, 2 * 40], 3);
        assert!(max_diff(&swiglu(&g).unwrap(), &swiglu(&g64).unwrap()) < 1e-5);

        // GQA (3 query heads per kv head) over 6 new positions after 4 cached ones, width 64.
        let (bsz, kv, groups, t, cached, hd) = (2, 2, 3, 6, 4, 64);
        let (q, q64) = both(&[bsz, kv, groups * t, hd], 4);
        let (k, k64) = both(&[bsz, kv, cached + t, hd], 5);
        let (v, v64) = both(&[bsz, kv, cached + t, hd], 6);
        let scale = 1.0 / (hd as f64).sqrt();
        let first_key = [0, 2, 5, 1];
        for vis in [
            Visibility::default(),
            Visibility {
                first_key: &first_key,
                window: Some(3),
                softcap: Some(0.5),
            },
        ] {
            let fast = causal_attention(&q, &k, &v, scale, t, cached, vis).unwrap();
            let reference = causal_attention(&q64, &k64, &v64, scale, t, cached, vis).unwrap();
            assert!(max_diff(&fast, &reference) < 1e-5, "{vis:?}");
        }
    }

    #[test]
    fn split_heads_gives_candles_copies_and_rotations_bit_for_bit() {
        let (bsz, t, nq, nkv, hd) = (2, 5, 6, 2, 8);
        let qkv = both(&[bsz, t, (nq + 2 * nkv) * hd], 3).0;
        let per_position = (both(&[t, hd / 2], 4).0, both(&[t, hd / 2], 5).0);
        let per_sequence = (both(&[bsz, t, hd / 2], 6).0, both(&[bsz, t, hd / 2], 7).0);
        let split = qkv.reshape((bsz, t, nq + 2 * nkv, hd)).unwrap();
        let heads = |from: usize, n: usize| {
            split
                .narrow(2, from, n)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (heads(0, nq), heads(nq, nkv), heads(nq + nkv, nkv));
        let same = |got: &Tensor, want: &Tensor| {
            assert_eq!(got.dims(), want.dims());
            let (got, want) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(got
                .iter()
                .zip(&want)
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        };
        let (gq, gk, gv) = split_heads(&qkv, nq, nkv, hd, None).unwrap();
        same(&gq, &q);
        same(&gk, &k);
        same(&gv, &v);
        for (cos, sin) in [&per_position, &per_sequence] {
            for interleaved in [false, true] {
                let rotate = if interleaved {
                    candle_nn::rotary_emb::rope_i
                } else {
                    candle_nn::rotary_emb::rope
                };
                let rotary = Rotary {
                    cos,
                    sin,
                    interleaved,
                };
                let (gq, gk, gv) = split_heads(&qkv, nq, nkv, hd, Some(rotary)).unwrap();
                same(&gq, &rotate(&q, cos, sin).unwrap());
                same(&gk, &rotate(&k, cos, sin).unwrap());
                same(&gv, &v);
            }
        }
        // Tables that fit neither form are an error, not a panic.
        let wrong = both(&[t + 1, hd / 2], 8).0;
        let rotary = Rotary {
            cos: &wrong,
            sin: &wrong,
            interleaved: false,
        };
        let err = split_heads(&qkv, nq, nkv, hd, Some(rotary)).unwrap_err();
        assert!(err.to_string().contains("rotary tables"), "{err}");
    }
}
