//! One hookable decoder-only transformer covering nanochat, the Llama family (Llama, Qwen2), Gemma 2 and
//! GPT-2.
//!
//! The architectures differ only in details that [`Config`] and the optional parts of [`BlockWeights`]
//! name: RMSNorm or LayerNorm, with or without weights and biases, norms after the sublayers too (Gemma 2),
//! an extra norm after the embedding, a scaled embedding, QK-norm, rotary layout, scaling and table
//! precision or learned positions, ReLU² / SwiGLU / GeGLU / GELU MLPs, biases, sliding-window layers and
//! softcapped attention scores and logits.
//! Every block exposes TransformerLens hook points; each accepts an intervention (a function of the
//! activation) and can be captured. The forward pass stops after the last block a caller needs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};

use super::cpu_ops;

/// Where rotary embeddings pair channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rope {
    /// Channel i with i + d/2 (nanochat, Hugging Face Llama).
    HalfSplit,
    /// Channel 2i with 2i+1 (llama.cpp's permuted GGUF Q/K layout).
    Interleaved,
}

/// How rotary frequencies are rescaled so a model reaches past the context it was first trained on.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain rotary: frequency `i` is `theta^(-2i/head_dim)`.
    None,
    /// Every frequency divided by `factor` (Hugging Face `rope_type = "linear"`, GGUF `linear`): positions
    /// interpolated.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1 and later (Hugging Face `rope_type = "llama3"`): frequencies whose wavelength exceeds
    /// `original_context / low_freq_factor` are divided by `factor`, those shorter than
    /// `original_context / high_freq_factor` kept, and those between blended smoothly.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Where low frequencies start, as a fraction of the original context per wavelength.
        low_freq_factor: f64,
        /// Where high frequencies start.
        high_freq_factor: f64,
        /// The context length the model was trained on before scaling.
        original_context: f64,
    },
    /// One divisor per frequency: how llama.cpp's GGUF files carry Llama 3 scaling (`rope_freqs.weight`).
    Divisors(Vec<f64>),
    /// Dynamic NTK (Hugging Face `rope_type = "dynamic"`): plain up to `original_context` positions; a
    /// forward reaching `n` > `original_context` positions uses the base
    /// `theta · (factor·n/original_context − (factor − 1))^(d/(d−2))` for its queries and new keys, while
    /// cached keys keep the frequencies they were rotated with (as `transformers` computes it with a cache).
    Dynamic {
        /// The scaling factor.
        factor: f64,
        /// `max_position_embeddings`: where scaling starts.
        original_context: usize,
    },
}

impl RopeScaling {
    /// The inverse frequencies of the `head_dim / 2` rotary pairs, with base `theta`, as Hugging Face
    /// `transformers` (`modeling_rope_utils`) and llama.cpp compute them.
    pub fn inverse_frequencies(&self, theta: f64, head_dim: usize) -> Vec<f64> {
        let plain = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64));
        match self {
            RopeScaling::None | RopeScaling::Dynamic { .. } => plain.collect(),
            RopeScaling::Linear { factor } => plain.map(|f| f / factor).collect(),
            RopeScaling::Divisors(d) => plain.zip(d).map(|(f, d)| f / d).collect(),
            &RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => plain
                .map(|f| {
                    let wavelength = 2.0 * std::f64::consts::PI / f;
                    if wavelength < original_context / high_freq_factor {
                        f
                    } else if wavelength > original_context / low_freq_factor {
                        f / factor
                    } else {
                        let smooth = (original_context / wavelength - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect(),
        }
    }
}

impl RopeScaling {
    /// Dynamic NTK's inverse frequencies for a forward reaching `positions` positions (`None` when the
    /// scaling is not dynamic or `positions` is within the original context: the plain tables apply).
    pub fn dynamic_frequencies(
        &self,
        theta: f64,
        head_dim: usize,
        positions: usize,
    ) -> Option<Vec<f64>> {
        let &RopeScaling::Dynamic {
            factor,
            original_context,
        } = self
        else {
            return None;
        };
        if positions <= original_context {
            return None;
        }
        let d = head_dim as f64;
        let base = theta
            * (factor * positions as f64 / original_context as f64 - (factor - 1.0))
                .powf(d / (d - 2.0));
        Some(RopeScaling::None.inverse_frequencies(base, head_dim))
    }
}

/// The MLP's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    /// `down(relu(up(x))²)` (nanochat).
    ReluSquared,
    /// `down(silu(gate(x)) * up(x))` (Llama).
    SwiGlu,
    /// `down(gelu_tanh(gate(x)) * up(x))` (Gemma 2).
    GeGlu,
    /// `down(gelu_tanh(up(x)))` (GPT-2's `gelu_new`).
    Gelu,
}

/// The normalisation every norm of the model uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// `x / √(mean(x²) + eps) · w` (Gemma's `1 + w` is folded into `w` at load).
    Rms,
    /// `(x − mean) / √(var + eps) · w + b` (GPT-2).
    Layer,
}

/// Architecture hyperparameters.
#[derive(Debug, Clone)]
pub struct Config {
    /// Family name, for summaries.
    pub family: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Residual width.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (fewer than `n_head` for GQA/MQA).
    pub n_kv_head: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// MLP hidden width.
    pub d_mlp: usize,
    /// Norm kind.
    pub norm: Norm,
    /// Norm epsilon.
    pub norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Rotary channel pairing; `None` = no rotary: positions come from a learned table
    /// ([`Weights::positions`], GPT-2).
    pub rope: Option<Rope>,
    /// Rotary frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Round the rotary cos/sin tables to bf16 (nanochat does).
    pub rope_tables_bf16: bool,
    /// Rotate by −θ instead of θ: nanochat computes `y1 = x1·cos + x2·sin, y2 = −x1·sin + x2·cos`.
    pub rope_negative: bool,
    /// RMSNorm of q and k (per head) after rotary.
    pub qk_norm: bool,
    /// RMSNorm right after the token embedding.
    pub embed_norm: bool,
    /// MLP form.
    pub mlp: Mlp,
    /// The token embedding is multiplied by this (Gemma: √d_model).
    pub embed_scale: Option<f64>,
    /// Attention scores are `q·k · attn_scale` (default `1/√head_dim`; Gemma 2: `query_pre_attn_scalar^-½`).
    pub attn_scale: Option<f64>,
    /// Attention scores become `c·tanh(score/c)` before the softmax when set (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Per layer, the sliding window of local attention (`None` = full); empty = full everywhere.
    pub attn_windows: Vec<Option<usize>>,
    /// `logits = c·tanh(logits/c)` when set.
    pub softcap: Option<f64>,
    /// Longest sequence the rotary tables cover.
    pub max_seq_len: usize,
}

/// A hook point inside a block, in forward order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookPoint {
    /// Residual stream entering the block.
    ResidPre,
    /// Attention output, before it is added to the residual.
    AttnOut,
    /// Residual after the attention sublayer.
    ResidMid,
    /// MLP output, before it is added.
    MlpOut,
    /// Residual leaving the block.
    ResidPost,
}

impl HookPoint {
    const ALL: [(HookPoint, &'static str); 5] = [
        (HookPoint::ResidPre, "hook_resid_pre"),
        (HookPoint::AttnOut, "hook_attn_out"),
        (HookPoint::ResidMid, "hook_resid_mid"),
        (HookPoint::MlpOut, "hook_mlp_out"),
        (HookPoint::ResidPost, "hook_resid_post"),
    ];
}

/// A hook: `blocks.{layer}.{point}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hook {
    /// Block index.
    pub layer: usize,
    /// Point inside the block.
    pub point: HookPoint,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = HookPoint::ALL
            .iter()
            .find(|(p, _)| *p == self.point)
            .expect("every point has a name")
            .1;
        write!(f, "blocks.{}.{name}", self.layer)
    }
}

impl FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            let points: Vec<&str> = HookPoint::ALL.iter().map(|(_, n)| *n).collect();
            format!(
                "invalid hook `{s}`: expected blocks.N.<{}>",
                points.join("|")
            )
        };
        let rest = s.strip_prefix("blocks.").ok_or_else(bad)?;
        let (layer, point) = rest.split_once('.').ok_or_else(bad)?;
        let layer = layer.parse().map_err(|_| bad())?;
        let point = HookPoint::ALL
            .iter()
            .find(|(_, n)| *n == point)
            .ok_or_else(bad)?
            .0;
        Ok(Hook { layer, point })
    }
}

/// A function replacing an activation (SAE splice, steering vector, clamp).
pub type Intervention = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// What a forward pass should record, change and return.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Activations to return.
    pub capture: BTreeSet<Hook>,
    /// Interventions to apply.
    pub interventions: BTreeMap<Hook, Intervention>,
    /// Whether logits are needed (otherwise the pass stops after the last hooked block).
    pub logits: bool,
    /// Logits at each row's last position only (`[batch, 1, vocab]`): what generation needs from a
    /// prefill, without the vocabulary-wide product over every prompt position.
    pub last_logits: bool,
}

impl Hooks {
    /// Only logits.
    pub fn logits() -> Self {
        Hooks {
            logits: true,
            ..Default::default()
        }
    }
    /// Capture these hooks, no logits.
    pub fn capture(hooks: impl IntoIterator<Item = Hook>) -> Self {
        Hooks {
            capture: hooks.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct Output {
    /// `[batch, seq, vocab]` when requested.
    pub logits: Option<Tensor>,
    /// `[batch, seq, d_model]` per captured hook.
    pub activations: BTreeMap<Hook, Tensor>,
}

/// Keys and values of earlier positions, per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Keeps the batch rows `index` (u32 ids, in that order) of every layer's keys and values: rows of a
    /// batched generation that finished leave it.
    pub fn keep_rows(&mut self, index: &Tensor) -> candle_core::Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(index, 0)?;
            *v = v.index_select(index, 0)?;
        }
        Ok(())
    }
}

/// A weight matrix `[out, in]`: dense f32, or GGUF-quantized blocks multiplied by candle's `QMatMul`
/// (which rounds activations to 8 bits: an opt-in trading accuracy for memory, see README).
#[derive(Debug, Clone)]
pub enum Matrix {
    /// A dense tensor.
    Dense(Tensor),
    /// A quantized tensor.
    Quantized(Arc<candle_core::quantized::QTensor>),
}

impl Matrix {
    /// Shape `[out, in]`.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Matrix::Dense(t) => t.dims().to_vec(),
            Matrix::Quantized(q) => q.shape().dims().to_vec(),
        }
    }
    /// The matrix as a dense f32 tensor (dequantizing if needed).
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            Matrix::Dense(t) => Ok(t.clone()),
            Matrix::Quantized(q) => q.dequantize(&q.device()),
        }
    }
}

impl From<Tensor> for Matrix {
    fn from(t: Tensor) -> Self {
        Matrix::Dense(t)
    }
}

/// Weights of one block (linear weights are `[out, in]`). Fields after `down` are parts only some
/// families have ([`BlockWeights::new`] leaves them out).
#[derive(Debug, Clone)]
pub struct BlockWeights {
    /// Pre-attention norm weight (None = parameter-free).
    pub attn_norm: Option<Tensor>,
    /// Query projection.
    pub q: Matrix,
    /// Key projection.
    pub k: Matrix,
    /// Value projection.
    pub v: Matrix,
    /// Biases of q, k and v side by side (`[q_out + 2·kv_out]`; Qwen2 has them, Llama does not).
    pub qkv_bias: Option<Tensor>,
    /// Output projection.
    pub o: Matrix,
    /// Pre-MLP RMSNorm weight.
    pub mlp_norm: Option<Tensor>,
    /// Gate projection (SwiGLU only).
    pub gate: Option<Matrix>,
    /// Up projection (nanochat's `c_fc`).
    pub up: Matrix,
    /// Down projection (nanochat's `mlp.c_proj`).
    pub down: Matrix,
    /// LayerNorm biases of the pre-attention and pre-MLP norms (GPT-2).
    pub norm_biases: Option<(Tensor, Tensor)>,
    /// Norms of the attention and MLP outputs before they join the residual (Gemma 2).
    pub post_norms: Option<(Tensor, Tensor)>,
    /// Biases of the output, MLP-in (up; gate and up for gated MLPs) and down projections (GPT-2).
    pub out_biases: Option<(Tensor, Tensor, Tensor)>,
}

impl BlockWeights {
    /// A block with the parts every family has; norms `None` are parameter-free.
    pub fn new(
        attn_norm: Option<Tensor>,
        (q, k, v, o): (Matrix, Matrix, Matrix, Matrix),
        mlp_norm: Option<Tensor>,
        gate: Option<Matrix>,
        up: Matrix,
        down: Matrix,
    ) -> Self {
        BlockWeights {
            attn_norm,
            q,
            k,
            v,
            qkv_bias: None,
            o,
            mlp_norm,
            gate,
            up,
            down,
            norm_biases: None,
            post_norms: None,
            out_biases: None,
        }
    }
}

/// All weights.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[vocab, d_model]`.
    pub embed: Tensor,
    /// Blocks in order.
    pub blocks: Vec<BlockWeights>,
    /// Final norm weight (None = parameter-free).
    pub final_norm: Option<Tensor>,
    /// Final LayerNorm bias (GPT-2).
    pub final_norm_bias: Option<Tensor>,
    /// `[vocab, d_model]` (the embedding itself when tied).
    pub lm_head: Matrix,
    /// Learned position embeddings `[max_seq_len, d_model]`, added to the token embedding (GPT-2; with
    /// `Config::rope = None`).
    pub positions: Option<Tensor>,
}

/// `y = x·Wᵀ` as one GEMM over all tokens: `[batch, seq, in]` is flattened to `[batch·seq, in]` and
/// multiplied by the `[out, in]` weight. Much faster on CPU than candle's batched broadcast matmul, which runs
/// one small GEMM per sequence.
enum Linear {
    /// Candle's matmul (GPUs, CPUs without AVX2).
    Dense {
        w: Tensor,
    },
    /// f32 on a CPU with AVX-512 or AVX2: the weight packed once for `kernels::gemm` (`cpu_ops::linear_packed`).
    Packed {
        w: cpu_ops::PackedWeight,
    },
    /// bf16 compute on the CPU: the weight rounded to bf16 (held as f32), inputs rounded to bf16 as they
    /// are multiplied, f32 sums (`cpu_ops::linear_bf16`: AMX tiles with the weight packed once, where the
    /// CPU has them).
    Bf16 {
        w: cpu_ops::Bf16Weight,
    },
    Quantized(candle_core::quantized::QMatMul),
    /// Quantized maps of one input, outputs side by side (quantized blocks are not concatenated).
    Stacked(Vec<Linear>),
    /// A SwiGLU MLP's gate and up maps, whose forward is `silu(gate) · up` (the activation stored as the
    /// product is computed: `cpu_ops::swiglu_linear`).
    Glu {
        w: cpu_ops::GluWeight,
    },
}

impl Linear {
    fn new(w: &Matrix) -> candle_core::Result<Self> {
        Ok(match w {
            Matrix::Dense(w) => match cpu_ops::PackedWeight::new(w)? {
                Some(w) => Linear::Packed { w },
                None => Linear::Dense { w: w.contiguous()? },
            },
            Matrix::Quantized(q) => {
                Linear::Quantized(candle_core::quantized::QMatMul::from_arc(q.clone())?)
            }
        })
    }

    /// A SwiGLU MLP's input maps: [`Linear::Glu`] where the CPU fuses the activation into the product,
    /// else gate and up [`Linear::stacked`] (the caller applies SwiGLU: see [`Linear::applies_swiglu`]).
    fn swiglu(gate: &Matrix, up: &Matrix) -> candle_core::Result<Self> {
        if let (Matrix::Dense(g), Matrix::Dense(u)) = (gate, up) {
            if let Some(w) = cpu_ops::GluWeight::new(g, u)? {
                return Ok(Linear::Glu { w });
            }
        }
        Linear::stacked(&[gate, up])
    }

    /// Whether [`Linear::forward`] gives SwiGLU's output rather than the gate and up products.
    fn applies_swiglu(&self) -> bool {
        matches!(self, Linear::Glu { .. })
    }

    /// Maps of one input with their outputs side by side on the last axis: one GEMM over the stacked
    /// weights where they are dense (one pass over the input, one larger product), else one per map.
    fn stacked(ws: &[&Matrix]) -> candle_core::Result<Self> {
        let dense: Option<Vec<&Tensor>> = ws
            .iter()
            .map(|w| match w {
                Matrix::Dense(t) => Some(t),
                Matrix::Quantized(_) => None,
            })
            .collect();
        match (ws, dense) {
            ([w], _) => Linear::new(w),
            (_, Some(ts)) => Linear::new(&Matrix::Dense(Tensor::cat(&ts, 0)?)),
            (_, None) => Ok(Linear::Stacked(
                ws.iter()
                    .map(|w| Linear::new(w))
                    .collect::<candle_core::Result<_>>()?,
            )),
        }
    }

    /// The same map with dense weights held as `dtype`; quantized blocks cannot be. On the CPU, bf16 keeps
    /// f32 storage with bf16 products ([`Linear::Bf16`]).
    fn to_dtype(&self, dtype: DType) -> anyhow::Result<Self> {
        Ok(match self {
            Linear::Dense { w } if dtype == DType::BF16 && w.device().is_cpu() => Linear::Bf16 {
                w: cpu_ops::Bf16Weight::new(w)?,
            },
            Linear::Dense { w } => Linear::Dense {
                w: w.to_dtype(dtype)?,
            },
            Linear::Packed { w } if dtype == DType::F32 => Linear::Packed {
                w: cpu_ops::PackedWeight::clone(w),
            },
            Linear::Packed { w } => Linear::Dense { w: w.to_tensor()? }.to_dtype(dtype)?,
            Linear::Glu { w } if dtype == DType::F32 => Linear::Glu { w: w.clone() },
            // Other dtypes multiply the stacked weights and apply SwiGLU after.
            Linear::Glu { w } => Linear::Dense { w: w.to_tensor()? }.to_dtype(dtype)?,
            Linear::Bf16 { .. } => anyhow::bail!("bf16 weights cannot be converted again"),
            Linear::Quantized(_) => {
                anyhow::bail!("quantized weights run in f32 only (use dtype = \"f32\")")
            }
            Linear::Stacked(maps) => Linear::Stacked(
                maps.iter()
                    .map(|m| m.to_dtype(dtype))
                    .collect::<anyhow::Result<_>>()?,
            ),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Every token's row through one product: [.., in] as [rows, in], back as [.., out].
        let flat = |product: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
            let mut dims = x.dims().to_vec();
            let inner = *dims.last().expect("non-scalar");
            let y = product(&x.reshape((x.elem_count() / inner.max(1), inner))?)?;
            *dims.last_mut().expect("non-scalar") = y.dim(1)?;
            y.reshape(dims)
        };
        match self {
            Linear::Dense { w } => flat(&|x| cpu_ops::linear(x, w)),
            Linear::Packed { w } => flat(&|x| cpu_ops::linear_packed(x, w)),
            Linear::Bf16 { w } => flat(&|x| cpu_ops::linear_bf16(x, w)),
            Linear::Glu { w } => flat(&|x| cpu_ops::swiglu_linear(x, w)),
            Linear::Quantized(q) => candle_core::Module::forward(q, x),
            Linear::Stacked(maps) => {
                let outs: Vec<Tensor> = maps
                    .iter()
                    .map(|m| m.forward(x))
                    .collect::<candle_core::Result<_>>()?;
                Tensor::cat(&outs, D::Minus1)
            }
        }
    }
}

/// A norm's weight and, for LayerNorm, bias.
struct NormWeights {
    weight: Tensor,
    bias: Tensor,
}

impl NormWeights {
    fn to_dtype(&self, dtype: DType) -> candle_core::Result<Self> {
        Ok(Self {
            weight: self.weight.to_dtype(dtype)?,
            bias: self.bias.to_dtype(dtype)?,
        })
    }
}

/// `t` as `dtype`, when there is one.
fn opt_dtype(t: &Option<Tensor>, dtype: DType) -> candle_core::Result<Option<Tensor>> {
    t.as_ref().map(|t| t.to_dtype(dtype)).transpose()
}

struct Block {
    attn_norm: NormWeights,
    /// q, k and v side by side.
    qkv: Linear,
    qkv_bias: Option<Tensor>,
    o: Linear,
    mlp_norm: NormWeights,
    /// Gated MLPs: gate and up side by side; otherwise up.
    mlp_in: Linear,
    down: Linear,
    post_norms: Option<(NormWeights, NormWeights)>,
    /// Output, MLP-in and down biases.
    out_biases: Option<(Tensor, Tensor, Tensor)>,
}

/// Where the tokens of one forward call sit: after `start` cached positions, each row `padding[b]`
/// positions late (left padding of a batch).
struct Placement {
    start: usize,
    /// Per (row, kv head) pair, the first key the row sees: its padding.
    first_key: Vec<usize>,
    /// `[batch · t]` positions of each row's tokens (0 for padding) when any row is padded.
    position_ids: Option<Tensor>,
    /// Rotary (cos, sin) `[batch, t, head_dim/2]` computed for this call alone (dynamic NTK past the
    /// original context); `None` = rows of the model's tables.
    tables: Option<(Tensor, Tensor)>,
}

impl Placement {
    fn new(
        start: usize,
        t: usize,
        bsz: usize,
        padding: &[usize],
        kv_heads: usize,
        device: &Device,
    ) -> anyhow::Result<Self> {
        if padding.iter().all(|&p| p == 0) {
            return Ok(Placement {
                start,
                first_key: Vec::new(),
                position_ids: None,
                tables: None,
            });
        }
        if padding.len() != bsz {
            anyhow::bail!("padding of {} rows for a batch of {bsz}", padding.len());
        }
        if let Some(p) = padding.iter().find(|&&p| p >= start + t) {
            anyhow::bail!(
                "a row padded by {p} of {} positions has no token",
                start + t
            );
        }
        let ids: Vec<u32> = padding
            .iter()
            .flat_map(|&p| (start..start + t).map(move |j| j.saturating_sub(p) as u32))
            .collect();
        Ok(Placement {
            start,
            first_key: padding
                .iter()
                .flat_map(|&p| std::iter::repeat_n(p, kv_heads))
                .collect(),
            position_ids: Some(Tensor::from_vec(ids, bsz * t, device)?),
            tables: None,
        })
    }

    /// Sets [`Placement::tables`] when `config`'s dynamic NTK scaling applies to a row: each row's
    /// frequencies follow the positions it reaches (so a batched row computes what it would alone).
    fn with_dynamic_rotary(
        mut self,
        config: &Config,
        t: usize,
        padding: &[usize],
        device: &Device,
    ) -> candle_core::Result<Self> {
        let reach = |b: usize| self.start + t - padding.get(b).copied().unwrap_or(0);
        let rows = padding.len().max(1);
        let scaled = (0..rows).any(|b| {
            config
                .rope_scaling
                .dynamic_frequencies(config.rope_theta, config.head_dim, reach(b))
                .is_some()
        });
        if config.rope.is_none() || !scaled {
            return Ok(self);
        }
        let half = config.head_dim / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for b in 0..rows {
            let inverse = config
                .rope_scaling
                .dynamic_frequencies(config.rope_theta, config.head_dim, reach(b))
                .unwrap_or_else(|| {
                    config
                        .rope_scaling
                        .inverse_frequencies(config.rope_theta, config.head_dim)
                });
            let pad = padding.get(b).copied().unwrap_or(0);
            for j in self.start..self.start + t {
                let position = j.saturating_sub(pad) as f64;
                for inv in &inverse {
                    cos.push((position * inv).cos() as f32);
                    sin.push((position * inv).sin() as f32);
                }
            }
        }
        let shape = (rows, t, half);
        let (cos, sin) = (
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        );
        self.tables = Some(if padding.is_empty() {
            (cos.squeeze(0)?, sin.squeeze(0)?)
        } else {
            (cos, sin)
        });
        Ok(self)
    }
}

/// RMSNorm of `x` computed in f32 (`transformers` upcasts norms too), returned in `x`'s dtype.
fn rms_in_f32(x: &Tensor, weight: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    let f32 = DType::F32;
    cpu_ops::rms_norm(&x.to_dtype(f32)?, &weight.to_dtype(f32)?, eps)?.to_dtype(x.dtype())
}

/// A loaded, hookable transformer.
pub struct Transformer {
    /// Hyperparameters.
    pub config: Config,
    device: Device,
    embed: Tensor,
    positions: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: NormWeights,
    lm_head: Linear,
    ones: Tensor,
    ones_head: Tensor,
    /// Rotary tables `[max_seq_len, head_dim/2]` (empty without rotary).
    cos: Tensor,
    sin: Tensor,
    /// What [`Self::dtype`] reports.
    compute: DType,
}

fn rotary_tables(c: &Config, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    if c.rope.is_none() {
        let empty = Tensor::zeros((0, c.head_dim / 2), DType::F32, device)?;
        return Ok((empty.clone(), empty));
    }
    let half = c.head_dim / 2;
    let (mut cos, mut sin) = (
        Vec::with_capacity(c.max_seq_len * half),
        Vec::with_capacity(c.max_seq_len * half),
    );
    let inverse = c.rope_scaling.inverse_frequencies(c.rope_theta, c.head_dim);
    for t in 0..c.max_seq_len {
        for (i, inv) in inverse.iter().enumerate() {
            if c.rope_tables_bf16 {
                // nanochat computes the table in float32 (as torch does), then rounds it to bf16.
                let inv = 1.0f32 / (c.rope_theta as f32).powf((2 * i) as f32 / c.head_dim as f32);
                let f = t as f32 * inv;
                cos.push(half::bf16::from_f32(f.cos()).to_f32());
                sin.push(half::bf16::from_f32(f.sin()).to_f32());
            } else {
                let f = t as f64 * inv;
                cos.push(f.cos() as f32);
                sin.push(f.sin() as f32);
            }
        }
    }
    if c.rope_negative {
        sin.iter_mut().for_each(|v| *v = -*v);
    }
    Ok((
        Tensor::from_vec(cos, (c.max_seq_len, half), device)?,
        Tensor::from_vec(sin, (c.max_seq_len, half), device)?,
    ))
}

impl Transformer {
    /// Builds the model from f32 weights on `device`; shapes are checked against `config`.
    pub fn new(config: Config, w: Weights, device: &Device) -> anyhow::Result<Self> {
        let c = &config;
        let expect = |t: &[usize], dims: &[usize], name: &str| -> anyhow::Result<()> {
            if t != dims {
                anyhow::bail!("weight `{name}` has shape {t:?}, expected {dims:?}");
            }
            Ok(())
        };
        expect(w.embed.dims(), &[c.vocab_size, c.d_model], "embedding")?;
        expect(&w.lm_head.dims(), &[c.vocab_size, c.d_model], "lm_head")?;
        if w.blocks.len() != c.n_layer {
            anyhow::bail!(
                "{} blocks of weights for {} layers",
                w.blocks.len(),
                c.n_layer
            );
        }
        let ones = Tensor::ones(c.d_model, DType::F32, device)?;
        let zeros = Tensor::zeros(c.d_model, DType::F32, device)?;
        let norm = |w: &Option<Tensor>, b: Option<&Tensor>| NormWeights {
            weight: w.clone().unwrap_or_else(|| ones.clone()),
            bias: b.cloned().unwrap_or_else(|| zeros.clone()),
        };
        match (&w.positions, c.rope) {
            (Some(p), None) => expect(p.dims(), &[c.max_seq_len, c.d_model], "position embedding")?,
            (None, Some(_)) => {}
            (Some(_), Some(_)) => {
                anyhow::bail!("a model has rotary or learned positions, not both")
            }
            (None, None) => {
                anyhow::bail!("a model without rotary needs learned position embeddings")
            }
        }
        if !c.attn_windows.is_empty() && c.attn_windows.len() != c.n_layer {
            anyhow::bail!(
                "{} attention windows for {} layers",
                c.attn_windows.len(),
                c.n_layer
            );
        }
        let mut blocks = Vec::new();
        // Blocks by value: each one's separate q/k/v and gate/up are freed once stacked (peak memory).
        for (i, b) in w.blocks.into_iter().enumerate() {
            let n = |s: &str| format!("block {i} {s}");
            expect(&b.q.dims(), &[c.n_head * c.head_dim, c.d_model], &n("q"))?;
            expect(&b.k.dims(), &[c.n_kv_head * c.head_dim, c.d_model], &n("k"))?;
            expect(&b.v.dims(), &[c.n_kv_head * c.head_dim, c.d_model], &n("v"))?;
            expect(&b.o.dims(), &[c.d_model, c.n_head * c.head_dim], &n("o"))?;
            expect(&b.up.dims(), &[c.d_mlp, c.d_model], &n("up"))?;
            expect(&b.down.dims(), &[c.d_model, c.d_mlp], &n("down"))?;
            if let Some(g) = &b.gate {
                expect(&g.dims(), &[c.d_mlp, c.d_model], &n("gate"))?;
            }
            if let Some(bias) = &b.qkv_bias {
                let width = (c.n_head + 2 * c.n_kv_head) * c.head_dim;
                expect(bias.dims(), &[width], &n("qkv bias"))?;
            }
            let (nb, pn) = (b.norm_biases.as_ref(), b.post_norms.as_ref());
            let vectors = [
                (b.attn_norm.as_ref(), "attn_norm"),
                (b.mlp_norm.as_ref(), "mlp_norm"),
                (nb.map(|p| &p.0), "attn_norm bias"),
                (nb.map(|p| &p.1), "mlp_norm bias"),
                (pn.map(|p| &p.0), "post-attention norm"),
                (pn.map(|p| &p.1), "post-MLP norm"),
                (b.out_biases.as_ref().map(|p| &p.0), "o bias"),
                (b.out_biases.as_ref().map(|p| &p.2), "down bias"),
            ];
            for (t, name) in vectors {
                if let Some(t) = t {
                    expect(t.dims(), &[c.d_model], &n(name))?;
                }
            }
            let gated = matches!(c.mlp, Mlp::SwiGlu | Mlp::GeGlu);
            if gated != b.gate.is_some() {
                anyhow::bail!("block {i}: gate weights belong to gated MLPs (SwiGLU, GeGLU) only");
            }
            if let Some((_, up_bias, _)) = &b.out_biases {
                let width = if gated { 2 * c.d_mlp } else { c.d_mlp };
                expect(up_bias.dims(), &[width], &n("MLP-in bias"))?;
            }
            blocks.push(Block {
                attn_norm: norm(&b.attn_norm, nb.map(|p| &p.0)),
                qkv: Linear::stacked(&[&b.q, &b.k, &b.v])?,
                qkv_bias: b.qkv_bias.clone(),
                o: Linear::new(&b.o)?,
                mlp_norm: norm(&b.mlp_norm, nb.map(|p| &p.1)),
                mlp_in: match &b.gate {
                    // (An MLP-in bias goes between the product and the activation: not fused.)
                    Some(gate) if c.mlp == Mlp::SwiGlu && b.out_biases.is_none() => {
                        Linear::swiglu(gate, &b.up)?
                    }
                    Some(gate) => Linear::stacked(&[gate, &b.up])?,
                    None => Linear::new(&b.up)?,
                },
                down: Linear::new(&b.down)?,
                post_norms: pn
                    .map(|(a, m)| (norm(&Some(a.clone()), None), norm(&Some(m.clone()), None))),
                out_biases: b.out_biases.clone(),
            });
        }
        let (cos, sin) = rotary_tables(c, device)?;
        Ok(Transformer {
            device: device.clone(),
            embed: w.embed.clone(),
            positions: w.positions.clone(),
            final_norm: norm(&w.final_norm, w.final_norm_bias.as_ref()),
            lm_head: Linear::new(&w.lm_head)?,
            compute: w.embed.dtype(),
            ones_head: Tensor::ones(c.head_dim, DType::F32, device)?,
            ones,
            blocks,
            cos,
            sin,
            config,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the forward computes in (on GPUs its weights' dtype; on the CPU bf16 is the linear layers'
    /// products, see [`Self::to_dtype`]).
    pub fn dtype(&self) -> DType {
        self.compute
    }

    /// The same model computing in `dtype` (bf16 or f16 on GPUs): weights and tables converted, while
    /// norms, attention softmax and outputs stay f32 — norms and the softmax run on f32 copies (as
    /// `transformers` does), interventions see and return f32, and captured activations and logits come
    /// out as f32 whatever the compute dtype.
    pub fn to_dtype(mut self, dtype: DType) -> anyhow::Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            anyhow::bail!("a model computes in f32, bf16 or f16, not {dtype:?}");
        }
        // On the CPU, bf16 means bf16 products in the linear layers (~95% of the work: AMX tiles or
        // AVX512-BF16) with everything else in f32 — candle's CPU bf16 ops are slow, our f32 kernels are not.
        let tables = if dtype == DType::BF16 && self.device.is_cpu() {
            DType::F32
        } else {
            dtype
        };
        // Block by block, each block's old weights dropped once converted (peak memory: one copy more
        // than the model, not two).
        let blocks = std::mem::take(&mut self.blocks)
            .into_iter()
            .map(|b| -> anyhow::Result<Block> {
                Ok(Block {
                    attn_norm: b.attn_norm.to_dtype(tables)?,
                    qkv: b.qkv.to_dtype(dtype)?,
                    qkv_bias: opt_dtype(&b.qkv_bias, tables)?,
                    o: b.o.to_dtype(dtype)?,
                    mlp_norm: b.mlp_norm.to_dtype(tables)?,
                    mlp_in: b.mlp_in.to_dtype(dtype)?,
                    down: b.down.to_dtype(dtype)?,
                    post_norms: match &b.post_norms {
                        Some((a, m)) => Some((a.to_dtype(tables)?, m.to_dtype(tables)?)),
                        None => None,
                    },
                    out_biases: match &b.out_biases {
                        Some((o, up, down)) => Some((
                            o.to_dtype(tables)?,
                            up.to_dtype(tables)?,
                            down.to_dtype(tables)?,
                        )),
                        None => None,
                    },
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Transformer {
            embed: self.embed.to_dtype(tables)?,
            positions: opt_dtype(&self.positions, tables)?,
            blocks,
            final_norm: self.final_norm.to_dtype(tables)?,
            lm_head: self.lm_head.to_dtype(dtype)?,
            ones: self.ones.to_dtype(tables)?,
            ones_head: self.ones_head.to_dtype(tables)?,
            cos: self.cos.to_dtype(tables)?,
            sin: self.sin.to_dtype(tables)?,
            compute: dtype,
            ..self
        })
    }

    /// Checks that a hook exists in this model; the error lists what does.
    pub fn check_hook(&self, hook: &Hook) -> anyhow::Result<()> {
        if hook.layer >= self.config.n_layer {
            anyhow::bail!(
                "hook `{hook}` is beyond the model: it has {} blocks (blocks.0 … blocks.{})",
                self.config.n_layer,
                self.config.n_layer - 1
            );
        }
        Ok(())
    }

    fn norm(&self, x: &Tensor, w: &NormWeights) -> candle_core::Result<Tensor> {
        let eps = self.config.norm_eps as f32;
        let (dtype, f32) = (x.dtype(), DType::F32);
        let (x, weight) = (x.to_dtype(f32)?, w.weight.to_dtype(f32)?);
        let y = match self.config.norm {
            Norm::Rms => cpu_ops::rms_norm(&x, &weight, eps)?,
            Norm::Layer => {
                candle_nn::ops::layer_norm(&x.contiguous()?, &weight, &w.bias.to_dtype(f32)?, eps)?
            }
        };
        y.to_dtype(dtype)
    }

    /// The residual add `x + y` and, where it can be fused with it, the norm `norm` of the sum that comes
    /// next: an RMSNorm of f32 CPU tensors with no intervention at the `between` hooks (which may change
    /// the sum before the norm sees it). `None` for the norm means the caller norms the sum itself.
    fn add_and_norm(
        &self,
        hooks: &Hooks,
        x: &Tensor,
        y: &Tensor,
        between: &[Hook],
        norm: Option<&NormWeights>,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let fusable = self.config.norm == Norm::Rms
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && between.iter().all(|h| !hooks.interventions.contains_key(h));
        match norm {
            Some(w) if fusable && w.weight.dtype() == DType::F32 => {
                let eps = self.config.norm_eps as f32;
                let (sum, normed) = cpu_ops::add_rms_norm(x, y, &w.weight, eps)?;
                Ok((sum, Some(normed)))
            }
            _ => Ok(((x + y)?, None)),
        }
    }

    fn at(
        &self,
        hooks: &Hooks,
        out: &mut BTreeMap<Hook, Tensor>,
        layer: usize,
        point: HookPoint,
        x: Tensor,
    ) -> candle_core::Result<Tensor> {
        let hook = Hook { layer, point };
        let x = match hooks.interventions.get(&hook) {
            Some(f) => f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?,
            None => x,
        };
        if hooks.capture.contains(&hook) {
            out.insert(hook, x.to_dtype(DType::F32)?);
        }
        Ok(x)
    }

    fn attention(
        &self,
        b: &Block,
        x: &Tensor,
        layer: usize,
        cache: Option<&mut KvCache>,
        at: &Placement,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (bsz, t, _) = x.dims3()?;
        let start = at.start;
        // One product for q, k and v, split into [batch, heads, t, head_dim] groups (and rotated) in one pass.
        let (nq, nkv) = (c.n_head, c.n_kv_head);
        let mut qkv = b.qkv.forward(x)?;
        if let Some(bias) = &b.qkv_bias {
            qkv = qkv.broadcast_add(bias)?;
        }
        let (mut q, mut k, v) = match c.rope {
            Some(rope) => {
                let (cos, sin) = match (&at.tables, &at.position_ids) {
                    (Some((cos, sin)), _) => (cos.clone(), sin.clone()),
                    (None, Some(ids)) => {
                        let half = c.head_dim / 2;
                        let rows =
                            |table: &Tensor| table.index_select(ids, 0)?.reshape((bsz, t, half));
                        (rows(&self.cos)?, rows(&self.sin)?)
                    }
                    (None, None) => (self.cos.narrow(0, start, t)?, self.sin.narrow(0, start, t)?),
                };
                let rotary = cpu_ops::Rotary {
                    cos: &cos,
                    sin: &sin,
                    interleaved: rope == Rope::Interleaved,
                };
                cpu_ops::split_heads(&qkv, nq, nkv, c.head_dim, Some(rotary))?
            }
            None => cpu_ops::split_heads(&qkv, nq, nkv, c.head_dim, None)?,
        };
        if c.qk_norm {
            let eps = c.norm_eps as f32;
            q = rms_in_f32(&q, &self.ones_head, eps)?;
            k = rms_in_f32(&k, &self.ones_head, eps)?;
        }
        let (k, v) = match cache {
            Some(cache) => {
                if cache.layers.len() <= layer {
                    cache.layers.resize(layer + 1, None);
                }
                let kv = match &cache.layers[layer] {
                    Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                    None => (k, v),
                };
                cache.layers[layer] = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        // GQA without copying keys/values: the `groups` query heads sharing a kv head are stacked along the
        // query axis ([b, kv_heads, groups·t, d]), so each kv head's keys and values serve them all.
        let groups = c.n_head / c.n_kv_head;
        let q = q.reshape((bsz, c.n_kv_head, groups * t, c.head_dim))?;
        let scale = c
            .attn_scale
            .unwrap_or_else(|| 1.0 / (c.head_dim as f64).sqrt());
        let vis = cpu_ops::Visibility {
            first_key: &at.first_key,
            window: c.attn_windows.get(layer).copied().flatten(),
            softcap: c.attn_softcap.map(|s| s as f32),
        };
        let y = cpu_ops::causal_attention(&q, &k, &v, scale, t, start, vis)?;
        let y = b.o.forward(&y)?;
        match &b.out_biases {
            Some((o, _, _)) => y.broadcast_add(o),
            None => Ok(y),
        }
    }

    fn mlp(&self, b: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = b.mlp_in.forward(x)?;
        if let Some((_, bias, _)) = &b.out_biases {
            h = h.broadcast_add(bias)?;
        }
        let h = match self.config.mlp {
            _ if b.mlp_in.applies_swiglu() => h,
            Mlp::ReluSquared => h.relu()?.sqr()?,
            Mlp::SwiGlu => cpu_ops::swiglu(&h)?,
            Mlp::GeGlu => {
                let d = self.config.d_mlp;
                (h.narrow(D::Minus1, 0, d)?.gelu()? * h.narrow(D::Minus1, d, d)?)?
            }
            Mlp::Gelu => h.gelu()?,
        };
        let y = b.down.forward(&h)?;
        match &b.out_biases {
            Some((_, _, down)) => y.broadcast_add(down),
            None => Ok(y),
        }
    }

    /// Runs token ids `[batch, seq]` (right-padded batches are fine: attention is causal). With a cache,
    /// positions continue after the cached ones and the cache is extended.
    pub fn forward(
        &self,
        tokens: &Tensor,
        hooks: &Hooks,
        cache: Option<&mut KvCache>,
    ) -> anyhow::Result<Output> {
        self.forward_padded(tokens, hooks, cache, &[])
    }

    /// [`Transformer::forward`] of a left-padded batch: row `b` starts with `padding[b]` filler tokens
    /// that no other position attends to, and its real tokens take positions 0, 1, … as if alone (so each
    /// row computes what it would unbatched). The padding holds for the whole cache: pass the same
    /// `padding` with every continuation. Empty = no padding.
    pub fn forward_padded(
        &self,
        tokens: &Tensor,
        hooks: &Hooks,
        mut cache: Option<&mut KvCache>,
        padding: &[usize],
    ) -> anyhow::Result<Output> {
        let c = &self.config;
        let (bsz, t) = tokens.dims2()?;
        let start = cache.as_ref().map_or(0, |k| k.len);
        let at = Placement::new(start, t, bsz, padding, c.n_kv_head, &self.device)?
            .with_dynamic_rotary(c, t, padding, &self.device)?;
        let shortest = padding.iter().copied().min().unwrap_or(0);
        if start + t - shortest > c.max_seq_len {
            anyhow::bail!(
                "sequence of {} tokens exceeds the model's {} positions",
                start + t - shortest,
                c.max_seq_len
            );
        }
        for h in hooks.capture.iter().chain(hooks.interventions.keys()) {
            self.check_hook(h)?;
        }
        let last = if hooks.logits {
            c.n_layer
        } else {
            hooks
                .capture
                .iter()
                .chain(hooks.interventions.keys())
                .map(|h| h.layer + 1)
                .max()
                .unwrap_or(0)
        };
        let mut out = BTreeMap::new();
        let mut x = self
            .embed
            .embedding(&tokens.flatten_all()?)?
            .reshape((bsz, t, c.d_model))?;
        if let Some(scale) = c.embed_scale {
            x = (x * scale)?;
        }
        if let Some(table) = &self.positions {
            let rows = match &at.position_ids {
                Some(ids) => table.index_select(ids, 0)?.reshape((bsz, t, c.d_model))?,
                None => table.narrow(0, start, t)?,
            };
            x = x.broadcast_add(&rows)?;
        }
        if c.embed_norm {
            x = rms_in_f32(&x, &self.ones, c.norm_eps as f32)?;
        }
        // The next block's attention-norm input, when the residual add that made `x` computed it too.
        let mut normed: Option<Tensor> = None;
        for (i, b) in self.blocks.iter().enumerate().take(last) {
            x = self.at(hooks, &mut out, i, HookPoint::ResidPre, x)?;
            let h = match normed.take() {
                Some(h) => h,
                None => self.norm(&x, &b.attn_norm)?,
            };
            let mut a = self.attention(b, &h, i, cache.as_deref_mut(), &at)?;
            if let Some((post, _)) = &b.post_norms {
                a = self.norm(&a, post)?;
            }
            let a = self.at(hooks, &mut out, i, HookPoint::AttnOut, a)?;
            let mid = [Hook {
                layer: i,
                point: HookPoint::ResidMid,
            }];
            let (sum, h) = self.add_and_norm(hooks, &x, &a, &mid, Some(&b.mlp_norm))?;
            x = self.at(hooks, &mut out, i, HookPoint::ResidMid, sum)?;
            let h = match h {
                Some(h) => h,
                None => self.norm(&x, &b.mlp_norm)?,
            };
            let mut m = self.mlp(b, &h)?;
            if let Some((_, post)) = &b.post_norms {
                m = self.norm(&m, post)?;
            }
            let m = self.at(hooks, &mut out, i, HookPoint::MlpOut, m)?;
            let between = [
                Hook {
                    layer: i,
                    point: HookPoint::ResidPost,
                },
                Hook {
                    layer: i + 1,
                    point: HookPoint::ResidPre,
                },
            ];
            let next = self.blocks.get(i + 1).filter(|_| i + 1 < last);
            let (sum, h) =
                self.add_and_norm(hooks, &x, &m, &between, next.map(|n| &n.attn_norm))?;
            x = self.at(hooks, &mut out, i, HookPoint::ResidPost, sum)?;
            normed = h;
        }
        if let Some(cache) = cache {
            cache.len += t;
        }
        let logits = if hooks.logits {
            let x = if hooks.last_logits && t > 1 {
                x.narrow(1, t - 1, 1)?
            } else {
                x
            };
            let x = self.norm(&x, &self.final_norm)?;
            let mut logits = self.lm_head.forward(&x)?;
            logits = logits.to_dtype(DType::F32)?;
            if let Some(cap) = c.softcap {
                logits = ((logits / cap)?.tanh()? * cap)?;
            }
            Some(logits)
        } else {
            None
        };
        Ok(Output {
            logits,
            activations: out,
        })
    }
}

/// Mean next-token negative log-likelihood of `ids` under `logits` (`[seq, vocab]` for the same ids).
pub fn mean_nll(logits: &Tensor, ids: &[u32]) -> anyhow::Result<f64> {
    if ids.len() < 2 {
        anyhow::bail!("need at least two tokens for a next-token loss");
    }
    let logp = candle_nn::ops::log_softmax(&logits.narrow(0, 0, ids.len() - 1)?, D::Minus1)?;
    let targets = Tensor::from_vec(ids[1..].to_vec(), ids.len() - 1, logits.device())?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(-(picked.mean_all()?.to_scalar::<f32>()? as f64))
}

/// Next-token negative log-likelihood at every position but the last: `[batch, seq − 1]` from logits
/// `[batch, seq, vocab]` of the token ids `[batch, seq]` (TransformerLens' per-token loss).
pub fn next_token_nll(logits: &Tensor, tokens: &Tensor) -> candle_core::Result<Tensor> {
    let (_, t, _) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1)?, D::Minus1)?;
    let targets = tokens.narrow(1, 1, t - 1)?.unsqueeze(2)?;
    logp.gather(&targets.contiguous()?, 2)?.squeeze(2)?.neg()
}

/// KL(p ‖ q) of the next-token distributions at every position: `[batch, seq]` from logits
/// `[batch, seq, vocab]` of the reference `p` and the approximation `q`.
pub fn kl_per_position(p_logits: &Tensor, q_logits: &Tensor) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(p_logits, D::Minus1)?;
    let logq = candle_nn::ops::log_softmax(q_logits, D::Minus1)?;
    (logp.exp()? * (&logp - logq)?)?.sum(D::Minus1)
}
