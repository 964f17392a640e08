//! GPT-2 from Hugging Face directories (`model_type = "gpt2"`), as `transformers`' `GPT2LMHeadModel`
//! computes it: learned absolute positions, LayerNorms with biases, one fused `c_attn` projection, biases on
//! every projection, a `gelu_new` (tanh GELU) MLP and the output tied to the token embedding. Its `Conv1D`
//! layers store weights `[in, out]`; they are transposed here to the `[out, in]` every other loader gives.

use std::path::Path;

use anyhow::bail;
use candle_core::{Device, Tensor};

use super::hf::{check_dims, parse_config, Shards};
use super::transformer::{BlockWeights, Config, Matrix, Mlp, Norm, RopeScaling, Weights};

/// `config.json` of a GPT-2 model (the fields used; defaults are `GPT2Config`'s).
#[derive(Debug, serde::Deserialize)]
struct Gpt2Config {
    vocab_size: usize,
    n_embd: usize,
    n_layer: usize,
    n_head: usize,
    n_positions: usize,
    #[serde(default)]
    n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_activation")]
    activation_function: String,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    add_cross_attention: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_activation() -> String {
    "gelu_new".into()
}
fn yes() -> bool {
    true
}

impl Gpt2Config {
    /// Everything that changes the maths and is not computed here is refused by field.
    fn check(&self, path: &Path) -> anyhow::Result<()> {
        const LIMIT: usize = 1 << 20;
        check_dims(
            path,
            &[
                ("vocab_size", Some(self.vocab_size), 1 << 24),
                ("n_embd", Some(self.n_embd), LIMIT),
                ("n_layer", Some(self.n_layer), 4096),
                ("n_head", Some(self.n_head), 4096),
                ("n_positions", Some(self.n_positions), super::MAX_POSITIONS),
                ("n_inner", self.n_inner, LIMIT),
            ],
        )?;
        let what = path.display();
        if !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "{what}: `n_embd` ({}) is not a multiple of `n_head` ({})",
                self.n_embd,
                self.n_head
            );
        }
        if !matches!(
            self.activation_function.as_str(),
            "gelu_new" | "gelu_pytorch_tanh"
        ) {
            bail!(
                "{what}: `activation_function` is \"{}\"; saeflow computes GPT-2's \"gelu_new\" only",
                self.activation_function
            );
        }
        for (field, set, want) in [
            ("scale_attn_weights", self.scale_attn_weights, true),
            (
                "scale_attn_by_inverse_layer_idx",
                self.scale_attn_by_inverse_layer_idx,
                false,
            ),
            ("add_cross_attention", self.add_cross_attention, false),
        ] {
            if set != want {
                bail!("{what}: `{field}` = {set} is not supported (GPT-2 uses {want})");
            }
        }
        Ok(())
    }
}

/// Loads a Hugging Face GPT-2 directory whose `config.json` reads `text`; see [`super::hf::load_dir`].
/// Both layouts on the hub load: `GPT2LMHeadModel`'s (`transformer.h.0…`) and the bare `GPT2Model`'s
/// (`h.0…`, as `openai-community/gpt2` ships).
pub fn load_hf_dir(dir: &Path, text: &str, device: &Device) -> anyhow::Result<(Config, Weights)> {
    let cfg_path = dir.join("config.json");
    let g: Gpt2Config = parse_config(dir, text, "GPT-2")?;
    g.check(&cfg_path)?;
    let mut shards = Shards::load(dir, device)?;
    let prefix = if shards.has("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let (d, m) = (g.n_embd, g.n_inner.unwrap_or(4 * g.n_embd));
    let mut take =
        |name: &str, shape: &[usize]| shards.take_shaped(&format!("{prefix}{name}"), shape);
    let embed = take("wte.weight", &[g.vocab_size, d])?;
    let positions = take("wpe.weight", &[g.n_positions, d])?;
    let mut blocks = Vec::new();
    for i in 0..g.n_layer {
        let mut t = |s: &str, shape: &[usize]| take(&format!("h.{i}.{s}"), shape);
        // Conv1D: y = x·W + b with W [in, out].
        let mut conv = |s: &str, inp: usize, out: usize| -> anyhow::Result<(Tensor, Tensor)> {
            let w = t(&format!("{s}.weight"), &[inp, out])?.t()?.contiguous()?;
            Ok((w, t(&format!("{s}.bias"), &[out])?))
        };
        let (qkv, qkv_bias) = conv("attn.c_attn", d, 3 * d)?;
        let (o, o_bias) = conv("attn.c_proj", d, d)?;
        let (up, up_bias) = conv("mlp.c_fc", d, m)?;
        let (down, down_bias) = conv("mlp.c_proj", m, d)?;
        let (ln1, ln1_bias) = (t("ln_1.weight", &[d])?, t("ln_1.bias", &[d])?);
        let (ln2, ln2_bias) = (t("ln_2.weight", &[d])?, t("ln_2.bias", &[d])?);
        let part = |k: usize| -> anyhow::Result<Matrix> { Ok(qkv.narrow(0, k * d, d)?.into()) };
        let mut block = BlockWeights::new(
            Some(ln1),
            (part(0)?, part(1)?, part(2)?, o.into()),
            Some(ln2),
            None,
            up.into(),
            down.into(),
        );
        block.qkv_bias = Some(qkv_bias);
        block.norm_biases = Some((ln1_bias, ln2_bias));
        block.out_biases = Some((o_bias, up_bias, down_bias));
        blocks.push(block);
    }
    let (final_norm, final_bias) = (take("ln_f.weight", &[d])?, take("ln_f.bias", &[d])?);
    let lm_head = match shards.take_opt("lm_head.weight")? {
        Some(head) => head,
        None => embed.clone(),
    };
    // The causal-mask buffers older checkpoints saved.
    shards.drop_buffers(|name| name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias"));
    shards.finish("GPT-2")?;
    let config = Config {
        family: "gpt2".into(),
        vocab_size: g.vocab_size,
        d_model: d,
        n_layer: g.n_layer,
        n_head: g.n_head,
        n_kv_head: g.n_head,
        head_dim: d / g.n_head,
        d_mlp: m,
        norm: Norm::Layer,
        norm_eps: g.layer_norm_epsilon,
        rope_theta: 10000.0,
        rope: None,
        rope_scaling: RopeScaling::None,
        rope_tables_bf16: false,
        rope_negative: false,
        qk_norm: false,
        embed_norm: false,
        mlp: Mlp::Gelu,
        embed_scale: None,
        attn_scale: None,
        attn_softcap: None,
        attn_windows: Vec::new(),
        softcap: None,
        max_seq_len: g.n_positions,
    };
    Ok((
        config,
        Weights {
            embed,
            blocks,
            final_norm: Some(final_norm),
            final_norm_bias: Some(final_bias),
            lm_head: Matrix::Dense(lm_head),
            positions: Some(positions),
        },
    ))
}
