//! Llama-family models: GGUF files (weights dequantized at load) and Hugging Face directories
//! (`config.json` + `*.safetensors` shards in f32/f16/bf16, see [`super::hf`]) of Llama and Qwen2 (a Llama
//! with q/k/v biases).

use std::path::Path;

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};

use super::transformer::{BlockWeights, Config, Matrix, Mlp, Norm, Rope, RopeScaling, Weights};

/// Metadata of a GGUF file that loading needs besides tensors.
pub struct GgufInfo {
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

fn meta_u32(c: &gguf_file::Content, key: &str, path: &Path) -> anyhow::Result<u32> {
    c.metadata
        .get(key)
        .with_context(|| format!("{}: GGUF metadata `{key}` is missing", path.display()))?
        .to_u32()
        .map_err(|e| anyhow::anyhow!("{}: GGUF `{key}`: {e}", path.display()))
}

fn meta_f32(c: &gguf_file::Content, key: &str) -> Option<f32> {
    c.metadata.get(key).and_then(|v| v.to_f32().ok())
}

/// Where each Llama weight lives in one file layout (`{i}` = block index); block entries are attn_norm,
/// q, k, v, o, mlp_norm, gate, up, down.
struct Layout {
    embed: &'static str,
    final_norm: &'static str,
    lm_head: &'static str,
    block: [&'static str; 9],
}

const GGUF_LAYOUT: Layout = Layout {
    embed: "token_embd.weight",
    final_norm: "output_norm.weight",
    lm_head: "output.weight",
    block: [
        "blk.{i}.attn_norm.weight",
        "blk.{i}.attn_q.weight",
        "blk.{i}.attn_k.weight",
        "blk.{i}.attn_v.weight",
        "blk.{i}.attn_output.weight",
        "blk.{i}.ffn_norm.weight",
        "blk.{i}.ffn_gate.weight",
        "blk.{i}.ffn_up.weight",
        "blk.{i}.ffn_down.weight",
    ],
};

const HF_LAYOUT: Layout = Layout {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    lm_head: "lm_head.weight",
    block: [
        "model.layers.{i}.input_layernorm.weight",
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
        "model.layers.{i}.self_attn.o_proj.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
        "model.layers.{i}.mlp.down_proj.weight",
    ],
};

/// Collects a Llama's weights through `get` (name → matrix); without an lm_head it is tied.
fn assemble(
    layout: &Layout,
    n_layer: usize,
    has_head: bool,
    mut get: impl FnMut(&str) -> anyhow::Result<Matrix>,
) -> anyhow::Result<Weights> {
    let embed = get(layout.embed)?.dense()?;
    let mut blocks = Vec::new();
    for i in 0..n_layer {
        let mut t = |k: usize| get(&layout.block[k].replace("{i}", &i.to_string()));
        blocks.push(BlockWeights::new(
            Some(t(0)?.dense()?),
            (t(1)?, t(2)?, t(3)?, t(4)?),
            Some(t(5)?.dense()?),
            Some(t(6)?),
            t(7)?,
            t(8)?,
        ));
    }
    let final_norm = Some(get(layout.final_norm)?.dense()?);
    let lm_head = if has_head {
        get(layout.lm_head)?
    } else {
        Matrix::Dense(embed.clone())
    };
    Ok(Weights {
        embed,
        blocks,
        final_norm,
        final_norm_bias: None,
        lm_head,
        positions: None,
    })
}

/// A Llama `Config`; `dims` = (d_model, n_layer, n_head, n_kv_head, head_dim, d_mlp), `norm_rope` = (eps, theta).
fn llama_config(
    vocab_size: usize,
    dims: (usize, usize, usize, usize, usize, usize),
    norm_rope: (f64, f64),
    rope: (Rope, RopeScaling),
    max_seq_len: usize,
) -> Config {
    let (rope, rope_scaling) = rope;
    let (d_model, n_layer, n_head, n_kv_head, head_dim, d_mlp) = dims;
    Config {
        family: "llama".into(),
        vocab_size,
        d_model,
        n_layer,
        n_head,
        n_kv_head,
        head_dim,
        d_mlp,
        norm: Norm::Rms,
        norm_eps: norm_rope.0,
        rope_theta: norm_rope.1,
        rope: Some(rope),
        rope_scaling,
        rope_tables_bf16: false,
        rope_negative: false,
        qk_norm: false,
        embed_norm: false,
        mlp: Mlp::SwiGlu,
        embed_scale: None,
        attn_scale: None,
        attn_softcap: None,
        attn_windows: Vec::new(),
        softcap: None,
        max_seq_len,
    }
}

/// Reads a GGUF header (metadata and tensor infos) after checking it with [`super::gguf_check::check`],
/// so a corrupt or hostile file fails with an error before candle allocates anything for it, and every
/// tensor it lists lies inside the file. `what` names the input in errors.
pub fn read_gguf<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
    what: &str,
) -> anyhow::Result<gguf_file::Content> {
    super::gguf_check::check(reader)
        .with_context(|| format!("{what}: not a readable GGUF file"))?;
    gguf_file::Content::read(reader)
        .map_err(|e| anyhow::anyhow!("{what}: not a readable GGUF file: {e}"))
}

/// Loads a GGUF model of an architecture llama.cpp and saeflow share: `llama`, `qwen2` (q/k/v biases),
/// `gemma2` (post-norms, GeGLU, softcaps, sliding-window layers; llama.cpp's converter stores norms as
/// `1 + w`) or `gpt2` (learned positions, LayerNorms and biases). By default every tensor is dequantized to
/// f32 on `device`; with `quantized`, 2-D weight matrices other than the embeddings stay quantized and
/// multiply through `QMatMul`.
pub fn load_gguf(
    path: &Path,
    device: &Device,
    quantized: bool,
) -> anyhow::Result<(Config, Weights, GgufInfo)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = read_gguf(&mut file, &path.display().to_string())?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if !["llama", "qwen2", "gemma2", "gpt2"].contains(&arch.as_str()) {
        bail!(
            "{}: GGUF architecture `{arch}` is not supported (llama, qwen2, gemma2, gpt2)",
            path.display()
        );
    }
    let key = |k: &str| format!("{arch}.{k}");
    let n_layer = meta_u32(&content, &key("block_count"), path)? as usize;
    let d_model = meta_u32(&content, &key("embedding_length"), path)? as usize;
    let n_head = meta_u32(&content, &key("attention.head_count"), path)? as usize;
    let n_kv_head =
        meta_u32(&content, &key("attention.head_count_kv"), path).unwrap_or(n_head as u32) as usize;
    let d_mlp = meta_u32(&content, &key("feed_forward_length"), path)? as usize;
    let context = meta_u32(&content, &key("context_length"), path).unwrap_or(4096) as usize;
    let eps_key = if arch == "gpt2" {
        "attention.layer_norm_epsilon"
    } else {
        "attention.layer_norm_rms_epsilon"
    };
    let eps = meta_f32(&content, &key(eps_key)).unwrap_or(1e-5) as f64;
    let theta = meta_f32(&content, &key("rope.freq_base")).unwrap_or(10000.0) as f64;
    if n_head == 0 || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
        bail!(
            "{}: inconsistent attention heads ({n_head} heads, {n_kv_head} kv heads)",
            path.display()
        );
    }
    // Gemma 2 heads are wider than d_model / n_head; llama.cpp records their width.
    let head_dim = match meta_u32(&content, &key("attention.key_length"), path) {
        Ok(w) => w as usize,
        Err(_) if d_model.is_multiple_of(n_head) => d_model / n_head,
        Err(_) => bail!(
            "{}: width {d_model} is not a multiple of {n_head} heads and no `{}` is given",
            path.display(),
            key("attention.key_length")
        ),
    };
    let scaling = if arch == "gpt2" {
        RopeScaling::None
    } else {
        gguf_rope_scaling(&content, &mut file, path, &arch, head_dim)?
    };
    let mut get = |name: &str| -> anyhow::Result<Matrix> {
        let q = content
            .tensor(&mut file, name, device)
            .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        let embedding = name == GGUF_LAYOUT.embed || name == "position_embd.weight";
        if quantized && q.rank() == 2 && !embedding {
            return Ok(Matrix::Quantized(std::sync::Arc::new(q)));
        }
        Ok(Matrix::Dense(q.dequantize(device)?))
    };
    let has = |name: &str| content.tensor_infos.contains_key(name);
    let has_head = has("output.weight");
    let mut weights = if arch == "gpt2" {
        gpt2_gguf_weights(n_layer, d_model, has_head, &mut get)?
    } else {
        assemble(&GGUF_LAYOUT, n_layer, has_head, &mut get)?
    };
    let vector = |get: &mut dyn FnMut(&str) -> anyhow::Result<Matrix>,
                  name: String|
     -> anyhow::Result<Tensor> { Ok(get(&name)?.dense()?) };
    for (i, block) in weights.blocks.iter_mut().enumerate() {
        let b = |s: &str| format!("blk.{i}.{s}");
        if arch == "qwen2" {
            let q = vector(&mut get, b("attn_q.bias"))?;
            let k = vector(&mut get, b("attn_k.bias"))?;
            let v = vector(&mut get, b("attn_v.bias"))?;
            block.qkv_bias = Some(Tensor::cat(&[q, k, v], 0)?);
        }
        if arch == "gemma2" {
            block.post_norms = Some((
                vector(&mut get, b("post_attention_norm.weight"))?,
                vector(&mut get, b("post_ffw_norm.weight"))?,
            ));
        }
    }
    let mut config = llama_config(
        weights.embed.dim(0)?,
        (d_model, n_layer, n_head, n_kv_head, head_dim, d_mlp),
        (eps, theta),
        // llama.cpp stores a Llama's Q/K permuted for interleaved pairs; Qwen2 and Gemma 2 keep
        // Hugging Face's halves (its NEOX rotary).
        (
            if arch == "llama" {
                Rope::Interleaved
            } else {
                Rope::HalfSplit
            },
            scaling,
        ),
        context,
    );
    config.family = arch.clone();
    match arch.as_str() {
        "gemma2" => {
            let f = |k: &str| meta_f32(&content, &key(k)).map(f64::from);
            let window = meta_u32(&content, &key("attention.sliding_window"), path)? as usize;
            config.mlp = Mlp::GeGlu;
            config.embed_scale = Some((d_model as f64).sqrt());
            // llama.cpp: scores scaled by 1/√head_dim, except the 27B (46 layers), by 1/√(d_model / heads).
            let scalar = if n_layer == 46 {
                d_model / n_head
            } else {
                head_dim
            };
            config.attn_scale = Some(1.0 / (scalar as f64).sqrt());
            config.attn_softcap = f("attn_logit_softcapping");
            config.softcap = f("final_logit_softcapping");
            // Local layers first, alternating (llama.cpp's swa pattern 2, as transformers' default).
            config.attn_windows = (0..n_layer)
                .map(|i| (i % 2 == 0).then_some(window))
                .collect();
        }
        "gpt2" => {
            config.norm = Norm::Layer;
            config.mlp = Mlp::Gelu;
            config.rope = None;
        }
        _ => {}
    }
    if !content
        .tensor_infos
        .keys()
        .all(|name| expected_gguf_tensor(&arch, name))
    {
        let odd: Vec<&String> = content
            .tensor_infos
            .keys()
            .filter(|name| !expected_gguf_tensor(&arch, name))
            .take(5)
            .collect();
        bail!(
            "{}: tensors a {arch} model does not have, e.g. {odd:?}; refusing rather than computing without them",
            path.display()
        );
    }
    let u = |k: &str| content.metadata.get(k).and_then(|v| v.to_u32().ok());
    let info = GgufInfo {
        add_bos: content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
        bos: u("tokenizer.ggml.bos_token_id"),
        eos: u("tokenizer.ggml.eos_token_id"),
        chat_template: content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned(),
    };
    Ok((config, weights, info))
}

/// Whether a GGUF tensor name is one the loader of `arch` reads.
fn expected_gguf_tensor(arch: &str, name: &str) -> bool {
    let top = [
        "token_embd.weight",
        "output_norm.weight",
        "output.weight",
        "rope_freqs.weight",
    ];
    if top.contains(&name)
        || (arch == "gpt2" && ["output_norm.bias", "position_embd.weight"].contains(&name))
    {
        return true;
    }
    let Some(rest) = name.strip_prefix("blk.") else {
        return false;
    };
    let Some((_, part)) = rest.split_once('.') else {
        return false;
    };
    let mut known = vec![
        "attn_norm.weight",
        "attn_output.weight",
        "ffn_norm.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ];
    match arch {
        "gpt2" => known.extend([
            "attn_qkv.weight",
            "attn_qkv.bias",
            "attn_norm.bias",
            "attn_output.bias",
            "ffn_norm.bias",
            "ffn_up.bias",
            "ffn_down.bias",
        ]),
        _ => known.extend([
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "ffn_gate.weight",
        ]),
    }
    match arch {
        "qwen2" => known.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]),
        "gemma2" => known.extend(["post_attention_norm.weight", "post_ffw_norm.weight"]),
        _ => {}
    }
    known.contains(&part)
}

/// GPT-2's weights as llama.cpp's converter writes them: `attn_qkv` fused (`[3·d, d]`), biases beside every
/// projection and norm, learned positions in `position_embd.weight`.
fn gpt2_gguf_weights(
    n_layer: usize,
    d: usize,
    has_head: bool,
    get: &mut dyn FnMut(&str) -> anyhow::Result<Matrix>,
) -> anyhow::Result<Weights> {
    let mut dense = |name: &str| -> anyhow::Result<Tensor> { Ok(get(name)?.dense()?) };
    let embed = dense("token_embd.weight")?;
    let positions = dense("position_embd.weight")?;
    let mut blocks = Vec::new();
    for i in 0..n_layer {
        let mut t = |s: &str| dense(&format!("blk.{i}.{s}"));
        let qkv = t("attn_qkv.weight")?;
        let part = |k: usize| -> anyhow::Result<Matrix> { Ok(qkv.narrow(0, k * d, d)?.into()) };
        let mut block = BlockWeights::new(
            Some(t("attn_norm.weight")?),
            (
                part(0)?,
                part(1)?,
                part(2)?,
                t("attn_output.weight")?.into(),
            ),
            Some(t("ffn_norm.weight")?),
            None,
            t("ffn_up.weight")?.into(),
            t("ffn_down.weight")?.into(),
        );
        block.qkv_bias = Some(t("attn_qkv.bias")?);
        block.norm_biases = Some((t("attn_norm.bias")?, t("ffn_norm.bias")?));
        block.out_biases = Some((
            t("attn_output.bias")?,
            t("ffn_up.bias")?,
            t("ffn_down.bias")?,
        ));
        blocks.push(block);
    }
    let lm_head = if has_head {
        get("output.weight")?
    } else {
        Matrix::Dense(embed.clone())
    };
    let mut dense = |name: &str| -> anyhow::Result<Tensor> { Ok(get(name)?.dense()?) };
    Ok(Weights {
        final_norm: Some(dense("output_norm.weight")?),
        final_norm_bias: Some(dense("output_norm.bias")?),
        embed,
        blocks,
        lm_head,
        positions: Some(positions),
    })
}

/// The rotary scaling a GGUF file asks for: `llama.rope.scaling.type` (`none`, `linear` with
/// `llama.rope.scaling.factor`) or per-frequency divisors in the tensor `rope_freqs.weight` (how llama.cpp
/// converts Llama 3's scaling). Anything else, or a rotary width other than the head's, is an error naming
/// the field: computing plain rotary for a scaled model would give wrong outputs without a word.
fn gguf_rope_scaling(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
    path: &Path,
    arch: &str,
    head_dim: usize,
) -> anyhow::Result<RopeScaling> {
    let what = path.display();
    let dims_key = format!("{arch}.rope.dimension_count");
    let type_key = format!("{arch}.rope.scaling.type");
    let factor_key = format!("{arch}.rope.scaling.factor");
    if let Ok(dims) = meta_u32(content, &dims_key, path) {
        if dims as usize != head_dim {
            bail!(
                "{what}: GGUF `{dims_key}` is {dims}, but heads are {head_dim} wide; partial rotary is not \
                 supported"
            );
        }
    }
    let kind = content
        .metadata
        .get(&type_key)
        .map(|v| v.to_string().cloned())
        .transpose()
        .map_err(|e| anyhow::anyhow!("{what}: GGUF `{type_key}`: {e}"))?;
    let mut scaling = match kind.as_deref() {
        None | Some("none") => RopeScaling::None,
        Some("linear") => {
            let factor = meta_f32(content, &factor_key)
                .filter(|f| f.is_finite() && *f > 0.0)
                .with_context(|| {
                    format!("{what}: GGUF `{factor_key}` is missing or not positive")
                })?;
            RopeScaling::Linear {
                factor: factor as f64,
            }
        }
        Some(other) => bail!(
            "{what}: GGUF `{type_key}` is `{other}`, which saeflow does not compute (none, linear)"
        ),
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        if scaling != RopeScaling::None {
            bail!("{what}: GGUF has both `{type_key}` and `rope_freqs.weight`");
        }
        let divisors: Vec<f32> = content
            .tensor(file, "rope_freqs.weight", &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_vec1())
            .map_err(|e| anyhow::anyhow!("{what}: tensor `rope_freqs.weight`: {e}"))?;
        if divisors.len() != head_dim / 2 || divisors.iter().any(|d| !d.is_finite() || *d <= 0.0) {
            bail!(
                "{what}: tensor `rope_freqs.weight` must hold {} positive numbers (one per rotary pair); \
                 it has {}",
                head_dim / 2,
                divisors.len()
            );
        }
        scaling = RopeScaling::Divisors(divisors.into_iter().map(f64::from).collect());
    }
    Ok(scaling)
}

/// `config.json` of a Hugging Face Llama or Qwen2 model (the fields used).
#[derive(Debug, serde::Deserialize)]
struct HfConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(flatten)]
    rope: super::hf::RopeFields,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    /// `llama` (or absent, in old configs) or `qwen2`.
    #[serde(default)]
    model_type: Option<String>,
    /// Qwen2's sliding-window attention: the switch, the window, and the first layer that uses it (where
    /// `layer_types` is absent).
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default)]
    sliding_window: Option<usize>,
    #[serde(default = "default_max_window_layers")]
    max_window_layers: usize,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
}

fn default_max_window_layers() -> usize {
    28
}

impl HfConfig {
    /// The family, from `model_type`: Llama, or Qwen2 (Llama with q/k/v biases).
    fn family(&self) -> &'static str {
        match self.model_type.as_deref() {
            Some("qwen2") => "qwen2",
            _ => "llama",
        }
    }

    /// Per layer, the sliding window (Qwen2 with `use_sliding_window`: layers from `max_window_layers` on,
    /// as transformers' `Qwen2Config` derives `layer_types`; a Llama has none).
    fn windows(&self, path: &Path) -> anyhow::Result<Vec<Option<usize>>> {
        let window = self.sliding_window.filter(|_| self.use_sliding_window);
        super::hf::layer_windows(
            path,
            self.num_hidden_layers,
            self.layer_types.as_deref(),
            |i| window.is_some() && i >= self.max_window_layers,
            window,
        )
    }

    /// Refuses dimensions no model has (see [`super::hf::check_dims`]) and heads that do not divide the
    /// width or each other.
    fn check(&self, path: &Path) -> anyhow::Result<()> {
        const LIMIT: usize = 1 << 20;
        super::hf::check_dims(
            path,
            &[
                ("vocab_size", Some(self.vocab_size), 1 << 24),
                ("hidden_size", Some(self.hidden_size), LIMIT),
                ("intermediate_size", Some(self.intermediate_size), LIMIT),
                ("num_hidden_layers", Some(self.num_hidden_layers), 4096),
                ("num_attention_heads", Some(self.num_attention_heads), 4096),
                ("num_key_value_heads", self.num_key_value_heads, 4096),
                ("head_dim", self.head_dim, LIMIT),
            ],
        )?;
        let heads = self.num_attention_heads;
        if let Some(kv) = self.num_key_value_heads {
            if !heads.is_multiple_of(kv) {
                bail!(
                    "{}: `num_attention_heads` ({heads}) is not a multiple of `num_key_value_heads` ({kv})",
                    path.display()
                );
            }
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            bail!(
                "{}: `hidden_size` ({}) is not a multiple of `num_attention_heads` ({heads}) and no \
                 `head_dim` is given",
                path.display(),
                self.hidden_size
            );
        }
        Ok(())
    }
}

fn default_eps() -> f64 {
    1e-5
}

/// Loads a Hugging Face Llama or Qwen2 directory (weights converted to f32) whose `config.json` reads
/// `text`; see [`super::hf::load_dir`].
pub fn load_hf_dir(dir: &Path, text: &str, device: &Device) -> anyhow::Result<(Config, Weights)> {
    let cfg_path = dir.join("config.json");
    let hf: HfConfig = super::hf::parse_config(dir, text, "Llama")?;
    hf.check(&cfg_path)?;
    let family = hf.family();
    let windows = hf.windows(&cfg_path)?;
    let max_positions = hf.max_position_embeddings.unwrap_or(4096);
    let (theta, scaling) = super::hf::rope(&hf.rope, max_positions, &cfg_path)?;
    // Dynamic NTK reaches past the trained context; its tables cover `factor` times it.
    let context = match scaling {
        RopeScaling::Dynamic { factor, .. } => {
            ((max_positions as f64 * factor) as usize).min(super::MAX_POSITIONS)
        }
        _ => max_positions,
    };
    let mut shards = super::hf::Shards::load(dir, device)?;
    // Without an lm_head the output is tied to the embedding.
    let has_head = shards.has("lm_head.weight");
    let mut weights = assemble(&HF_LAYOUT, hf.num_hidden_layers, has_head, |name| {
        Ok(Matrix::Dense(shards.take(name)?))
    })?;
    for (i, block) in weights.blocks.iter_mut().enumerate() {
        let mut bias =
            |m: &str| shards.take_opt(&format!("model.layers.{i}.self_attn.{m}_proj.bias"));
        block.qkv_bias = match (bias("q")?, bias("k")?, bias("v")?) {
            (None, None, None) => None,
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
            _ => bail!(
                "{}: layer {i} has biases on some of its q, k and v projections but not all",
                dir.display()
            ),
        };
    }
    shards.drop_buffers(|name| name.ends_with("rotary_emb.inv_freq"));
    shards.finish(family)?;
    let n_kv_head = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
    let config = llama_config(
        hf.vocab_size,
        (
            hf.hidden_size,
            hf.num_hidden_layers,
            hf.num_attention_heads,
            n_kv_head,
            hf.head_dim
                .unwrap_or(hf.hidden_size / hf.num_attention_heads),
            hf.intermediate_size,
        ),
        (hf.rms_norm_eps, theta),
        (Rope::HalfSplit, scaling),
        context,
    );
    Ok((
        Config {
            family: family.into(),
            attn_windows: windows,
            ..config
        },
        weights,
    ))
}

/// Rebuilds a byte-level BPE tokenizer from a GGUF file's metadata (`tokenizer.ggml.*`), for GGUF files
/// without a `tokenizer.json` beside them. Supports the `gpt2` model with the `default`/`gpt2` and
/// `smollm` (digits split off first) pre-tokenizers.
pub fn gguf_tokenizer(path: &Path) -> anyhow::Result<tokenizers::Tokenizer> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = read_gguf(&mut file, &path.display().to_string())?;
    gguf_content_tokenizer(&content, &path.display().to_string())
}

/// [`gguf_tokenizer`] from a GGUF header already read (see [`read_gguf`]); `what` names it in errors.
pub fn gguf_content_tokenizer(
    content: &gguf_file::Content,
    what: &str,
) -> anyhow::Result<tokenizers::Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, PreTokenizerWrapper,
    };
    use tokenizers::AddedToken;

    let text = |k: &str| {
        content
            .metadata
            .get(k)
            .and_then(|v| v.to_string().ok())
            .cloned()
    };
    let list = |k: &str| -> anyhow::Result<&Vec<gguf_file::Value>> {
        content
            .metadata
            .get(k)
            .with_context(|| format!("{}: no `{k}` to rebuild the tokenizer from", what))?
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{}: `{k}`: {e}", what))
    };
    let model = text("tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        bail!("{}: cannot rebuild a `{model}` tokenizer from GGUF metadata; put a tokenizer.json beside it", what);
    }
    let pre = text("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
    let mut pre_tokenizers: Vec<PreTokenizerWrapper> = Vec::new();
    match pre.as_str() {
        "default" | "gpt2" => {}
        "smollm" => pre_tokenizers.push(Digits::new(true).into()),
        other => bail!(
            "{}: pre-tokenizer `{other}` is not supported; put a tokenizer.json beside it",
            what
        ),
    }
    pre_tokenizers.push(ByteLevel::new(false, true, true).into());
    let tokens: Vec<String> = list("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| anyhow::anyhow!("{}: token: {e}", what))
        })
        .collect::<anyhow::Result<_>>()?;
    let merges: Vec<(String, String)> = list("tokenizer.ggml.merges")?
        .iter()
        .map(|v| {
            let m = v
                .to_string()
                .map_err(|e| anyhow::anyhow!("{}: merge: {e}", what))?;
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .with_context(|| format!("{}: malformed merge `{m}`", what))
        })
        .collect::<anyhow::Result<_>>()?;
    let kinds: Vec<i64> = match content
        .metadata
        .get("tokenizer.ggml.token_type")
        .map(|v| v.to_vec())
    {
        Some(Ok(v)) => v
            .iter()
            .map(|t| t.to_i32().map(i64::from).unwrap_or(1))
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow::anyhow!("{}: cannot build the BPE: {e}", what))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pre_tokenizers)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3) are special: matched whole in text, kept out of BPE.
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&kinds)
        .filter(|(_, k)| **k == 3)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| anyhow::anyhow!("{}: special tokens: {e}", what))?;
    Ok(tokenizer)
}
