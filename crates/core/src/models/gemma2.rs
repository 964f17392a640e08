//! Gemma 2 from Hugging Face directories (`model_type = "gemma2"`), as `transformers`' `Gemma2ForCausalLM`
//! computes it: the embedding scaled by √d_model, RMSNorms of `1 + w` before *and* after each sublayer,
//! GeGLU MLPs (tanh GELU), attention scores scaled by `query_pre_attn_scalar^-½` and softcapped, local
//! (sliding-window) and global layers as `layer_types` says, and softcapped logits. The hook points keep
//! TransformerLens' meaning: `hook_attn_out` and `hook_mlp_out` are what joins the residual (after the
//! post-norms).

use std::path::Path;

use anyhow::bail;
use candle_core::{Device, Tensor};

use super::hf::{check_dims, parse_config, RopeFields, Shards};
use super::transformer::{BlockWeights, Config, Matrix, Mlp, Norm, Rope, Weights};

/// `config.json` of a Gemma 2 model (the fields used; defaults are `Gemma2Config`'s).
#[derive(Debug, serde::Deserialize)]
struct GemmaConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    #[serde(default = "default_head_dim")]
    head_dim: usize,
    /// transformers ≥ 4.42 (older configs wrote `hidden_act`).
    #[serde(default)]
    hidden_activation: Option<String>,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default = "default_positions")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(flatten)]
    rope: RopeFields,
    #[serde(default = "default_head_dim")]
    query_pre_attn_scalar: usize,
    #[serde(default)]
    sliding_window: Option<usize>,
    /// `sliding_attention` / `full_attention` per layer; absent in configs before transformers 4.53, whose
    /// models alternate starting with a sliding layer.
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default = "default_final_softcap")]
    final_logit_softcapping: Option<f64>,
    #[serde(default = "default_attn_softcap")]
    attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    use_bidirectional_attention: Option<bool>,
}

fn default_head_dim() -> usize {
    256
}
fn default_positions() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-6
}
fn default_final_softcap() -> Option<f64> {
    Some(30.0)
}
fn default_attn_softcap() -> Option<f64> {
    Some(50.0)
}

impl GemmaConfig {
    /// Everything that changes the maths and is not computed here is refused by field.
    fn check(&self, path: &Path) -> anyhow::Result<()> {
        const LIMIT: usize = 1 << 20;
        check_dims(
            path,
            &[
                ("vocab_size", Some(self.vocab_size), 1 << 24),
                ("hidden_size", Some(self.hidden_size), LIMIT),
                ("intermediate_size", Some(self.intermediate_size), LIMIT),
                ("num_hidden_layers", Some(self.num_hidden_layers), 4096),
                ("num_attention_heads", Some(self.num_attention_heads), 4096),
                ("num_key_value_heads", Some(self.num_key_value_heads), 4096),
                ("head_dim", Some(self.head_dim), LIMIT),
                (
                    "query_pre_attn_scalar",
                    Some(self.query_pre_attn_scalar),
                    LIMIT,
                ),
                ("sliding_window", self.sliding_window, 1 << 24),
            ],
        )?;
        let what = path.display();
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "{what}: `num_attention_heads` ({}) is not a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        let activation = self
            .hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref())
            .unwrap_or("gelu_pytorch_tanh");
        if !matches!(activation, "gelu_pytorch_tanh" | "gelu_new") {
            bail!(
                "{what}: `hidden_activation` is \"{activation}\"; saeflow computes Gemma 2's \
                 \"gelu_pytorch_tanh\" only"
            );
        }
        if self.attention_bias {
            bail!("{what}: `attention_bias` is true; Gemma 2 attention without biases only");
        }
        if self.use_bidirectional_attention == Some(true) {
            bail!(
                "{what}: `use_bidirectional_attention` is true; saeflow runs causal decoders only"
            );
        }
        for (field, cap) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if cap.is_some_and(|c| !c.is_finite() || c <= 0.0) {
                bail!("{what}: `{field}` must be a positive number or null");
            }
        }
        Ok(())
    }

    /// The sliding window of each layer (`None` = global attention): local layers first, alternating,
    /// where `layer_types` is absent.
    fn windows(&self, path: &Path) -> anyhow::Result<Vec<Option<usize>>> {
        super::hf::layer_windows(
            path,
            self.num_hidden_layers,
            self.layer_types.as_deref(),
            |i| i % 2 == 0,
            self.sliding_window,
        )
    }
}

/// Loads a Hugging Face Gemma 2 directory whose `config.json` reads `text`; see
/// [`super::hf::load_dir`].
pub fn load_hf_dir(dir: &Path, text: &str, device: &Device) -> anyhow::Result<(Config, Weights)> {
    let cfg_path = dir.join("config.json");
    let g: GemmaConfig = parse_config(dir, text, "Gemma 2")?;
    g.check(&cfg_path)?;
    let windows = g.windows(&cfg_path)?;
    let (theta, scaling) = super::hf::rope(&g.rope, g.max_position_embeddings, &cfg_path)?;
    let mut shards = Shards::load(dir, device)?;
    let (d, m) = (g.hidden_size, g.intermediate_size);
    let (q_out, kv_out) = (
        g.num_attention_heads * g.head_dim,
        g.num_key_value_heads * g.head_dim,
    );
    // Gemma's norms multiply by `1 + w`; folded here so the model runs one RMSNorm kind.
    let mut norm = |name: String| -> anyhow::Result<Tensor> {
        Ok(shards.take_shaped(&name, &[d])?.affine(1.0, 1.0)?)
    };
    let mut norms = Vec::new();
    for i in 0..g.num_hidden_layers {
        let n = |s: &str| format!("model.layers.{i}.{s}.weight");
        norms.push([
            norm(n("input_layernorm"))?,
            norm(n("post_attention_layernorm"))?,
            norm(n("pre_feedforward_layernorm"))?,
            norm(n("post_feedforward_layernorm"))?,
        ]);
    }
    let final_norm = norm("model.norm.weight".into())?;
    let embed = shards.take_shaped("model.embed_tokens.weight", &[g.vocab_size, d])?;
    let mut blocks = Vec::new();
    for (i, [attn_norm, post_attn, mlp_norm, post_mlp]) in norms.into_iter().enumerate() {
        let mut w = |s: &str, shape: [usize; 2]| -> anyhow::Result<Matrix> {
            Ok(shards
                .take_shaped(&format!("model.layers.{i}.{s}.weight"), &shape)?
                .into())
        };
        let attention = (
            w("self_attn.q_proj", [q_out, d])?,
            w("self_attn.k_proj", [kv_out, d])?,
            w("self_attn.v_proj", [kv_out, d])?,
            w("self_attn.o_proj", [d, q_out])?,
        );
        let (gate, up, down) = (
            w("mlp.gate_proj", [m, d])?,
            w("mlp.up_proj", [m, d])?,
            w("mlp.down_proj", [d, m])?,
        );
        let mut block = BlockWeights::new(
            Some(attn_norm),
            attention,
            Some(mlp_norm),
            Some(gate),
            up,
            down,
        );
        block.post_norms = Some((post_attn, post_mlp));
        blocks.push(block);
    }
    let lm_head = match shards.take_opt("lm_head.weight")? {
        Some(head) => head,
        None => embed.clone(),
    };
    shards.drop_buffers(|name| name.ends_with("rotary_emb.inv_freq"));
    shards.finish("Gemma 2")?;
    let config = Config {
        family: "gemma2".into(),
        vocab_size: g.vocab_size,
        d_model: d,
        n_layer: g.num_hidden_layers,
        n_head: g.num_attention_heads,
        n_kv_head: g.num_key_value_heads,
        head_dim: g.head_dim,
        d_mlp: m,
        norm: Norm::Rms,
        norm_eps: g.rms_norm_eps,
        rope_theta: theta,
        rope: Some(Rope::HalfSplit),
        rope_scaling: scaling,
        rope_tables_bf16: false,
        rope_negative: false,
        qk_norm: false,
        embed_norm: false,
        mlp: Mlp::GeGlu,
        embed_scale: Some((d as f64).sqrt()),
        attn_scale: Some(1.0 / (g.query_pre_attn_scalar as f64).sqrt()),
        attn_softcap: g.attn_logit_softcapping,
        attn_windows: windows,
        softcap: g.final_logit_softcapping,
        max_seq_len: g.max_position_embeddings,
    };
    Ok((
        config,
        Weights {
            embed,
            blocks,
            final_norm: Some(final_norm),
            final_norm_bias: None,
            lm_head: Matrix::Dense(lm_head),
            positions: None,
        },
    ))
}
