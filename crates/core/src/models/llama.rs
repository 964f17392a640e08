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

/// Loads a GGUF Llama model. By default every tensor is dequantized to f32 on `device`; with `quantized`,
/// 2-D weight matrices other than the embedding stay quantized and multiply through `QMatMul`.
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
    if arch != "llama" {
        bail!(
            "{}: GGUF architecture `{arch}` is not supported (llama only)",
            path.display()
        );
    }
    let n_layer = meta_u32(&content, "llama.block_count", path)? as usize;
    let d_model = meta_u32(&content, "llama.embedding_length", path)? as usize;
    let n_head = meta_u32(&content, "llama.attention.head_count", path)? as usize;
    let n_kv_head =
        meta_u32(&content, "llama.attention.head_count_kv", path).unwrap_or(n_head as u32) as usize;
    let d_mlp = meta_u32(&content, "llama.feed_forward_length", path)? as usize;
    let context = meta_u32(&content, "llama.context_length", path).unwrap_or(4096) as usize;
    let eps = meta_f32(&content, "llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64;
    let theta = meta_f32(&content, "llama.rope.freq_base").unwrap_or(10000.0) as f64;
    if n_head == 0
        || n_kv_head == 0
        || !d_model.is_multiple_of(n_head)
        || !n_head.is_multiple_of(n_kv_head)
    {
        bail!("{}: inconsistent attention heads ({n_head} heads, {n_kv_head} kv heads, width {d_model})", path.display());
    }
    let scaling = gguf_rope_scaling(&content, &mut file, path, d_model / n_head)?;
    let get = |name: &str| -> anyhow::Result<Matrix> {
        let q = content
            .tensor(&mut file, name, device)
            .map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        if quantized && q.rank() == 2 && name != GGUF_LAYOUT.embed {
            return Ok(Matrix::Quantized(std::sync::Arc::new(q)));
        }
        Ok(Matrix::Dense(q.dequantize(device)?))
    };
    let has_head = content.tensor_infos.contains_key("output.weight");
    let weights = assemble(&GGUF_LAYOUT, n_layer, has_head, get)?;
    let config = llama_config(
        weights.embed.dim(0)?,
        (d_model, n_layer, n_head, n_kv_head, d_model / n_head, d_mlp),
        (eps, theta),
        // llama.cpp stores Q/K permuted for interleaved pairs
        (Rope::Interleaved, scaling),
        context,
    );
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

/// The rotary scaling a GGUF file asks for: `llama.rope.scaling.type` (`none`, `linear` with
/// `llama.rope.scaling.factor`) or per-frequency divisors in the tensor `rope_freqs.weight` (how llama.cpp
/// converts Llama 3's scaling). Anything else, or a rotary width other than the head's, is an error naming
/// the field: computing plain rotary for a scaled model would give wrong outputs without a word.
fn gguf_rope_scaling(
    content: &gguf_file::Content,
    file: &mut std::fs::File,
    path: &Path,
    head_dim: usize,
) -> anyhow::Result<RopeScaling> {
    let what = path.display();
    if let Ok(dims) = meta_u32(content, "llama.rope.dimension_count", path) {
        if dims as usize != head_dim {
            bail!(
                "{what}: GGUF `llama.rope.dimension_count` is {dims}, but heads are {head_dim} wide; \
                 partial rotary is not supported"
            );
        }
    }
    let kind = content
        .metadata
        .get("llama.rope.scaling.type")
        .map(|v| v.to_string().cloned())
        .transpose()
        .map_err(|e| anyhow::anyhow!("{what}: GGUF `llama.rope.scaling.type`: {e}"))?;
    let mut scaling = match kind.as_deref() {
        None | Some("none") => RopeScaling::None,
        Some("linear") => {
            let factor = meta_f32(content, "llama.rope.scaling.factor")
                .filter(|f| f.is_finite() && *f > 0.0)
                .with_context(|| {
                    format!("{what}: GGUF `llama.rope.scaling.factor` is missing or not positive")
                })?;
            RopeScaling::Linear {
                factor: factor as f64,
            }
        }
        Some(other) => bail!(
            "{what}: GGUF `llama.rope.scaling.type` is `{other}`, which saeflow does not compute \
             (none, linear)"
        ),
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        if scaling != RopeScaling::None {
            bail!("{what}: GGUF has both `llama.rope.scaling.type` and `rope_freqs.weight`");
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
    /// Qwen2's sliding-window attention switch.
    #[serde(default)]
    use_sliding_window: bool,
}

impl HfConfig {
    /// The family, from `model_type`: Llama, or Qwen2 (Llama with q/k/v biases).
    fn family(&self, path: &Path) -> anyhow::Result<&'static str> {
        match self.model_type.as_deref() {
            Some("qwen2") if self.use_sliding_window => bail!(
                "{}: `use_sliding_window` is true; Qwen2's sliding-window attention is not supported",
                path.display()
            ),
            Some("qwen2") => Ok("qwen2"),
            _ => Ok("llama"),
        }
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
    let family = hf.family(&cfg_path)?;
    let (theta, scaling) = super::hf::rope(&hf.rope, &cfg_path)?;
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
        hf.max_position_embeddings.unwrap_or(4096),
    );
    Ok((
        Config {
            family: family.into(),
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
