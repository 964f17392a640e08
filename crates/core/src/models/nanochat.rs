//! nanochat checkpoints: `model_<step>.pt` + `meta_<step>.json` (+ `tokenizer.pkl`), vintage architecture.
//!
//! Vintage = every published checkpoint: parameter-free RMSNorm after the embedding and before each sublayer,
//! rotary base 10000 (half-split pairs, cos/sin rounded to bf16), QK-norm after rotary, ReLU² MLP, untied
//! lm_head, logits = 15·tanh(logits/15). The 2026 architecture is recognised by its extra parameters and
//! refused with the list of what is unsupported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use super::torch_pt::read_state_dict;
use super::transformer::{BlockWeights, Config, Mlp, Norm, Rope, RopeScaling, Weights};

/// Parameter-name fragments of the newer (2026) nanochat architecture.
const NEWER_ARCH_MARKERS: &[(&str, &str)] = &[
    ("value_embeds", "value embeddings"),
    ("ve_gate", "value-embedding gates"),
    ("resid_lambdas", "residual lambdas"),
    ("x0_lambdas", "x0 residual lambdas"),
    ("smear", "token smearing"),
    ("backout", "backout"),
    ("window", "sliding-window attention"),
];

/// `model_config` of `meta_<step>.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct NanochatConfig {
    /// Context length used in training.
    pub sequence_len: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// Residual width.
    pub n_embd: usize,
}

/// The files of one checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    /// `model_<step>.pt`.
    pub model: PathBuf,
    /// `meta_<step>.json`.
    pub meta: PathBuf,
    /// `tokenizer.pkl`, if found.
    pub tokenizer: Option<PathBuf>,
    /// Training step.
    pub step: u64,
}

fn step_of(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?
        .strip_suffix(suffix)?
        .parse()
        .ok()
}

/// Finds a checkpoint from a `.pt` file, a checkpoint directory (latest step), or a nanochat base directory
/// (`chatrl|chatsft|mid|base_checkpoints/<tag>/`, preferring the most trained phase).
pub fn locate(path: &Path) -> anyhow::Result<CheckpointFiles> {
    if path.is_file() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let step = step_of(name, "model_", ".pt")
            .with_context(|| format!("{}: expected model_<step>.pt", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        return finish(dir, step);
    }
    if !path.is_dir() {
        bail!("{} does not exist", path.display());
    }
    let steps: Vec<u64> = std::fs::read_dir(path)?
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()
                .and_then(|n| step_of(n, "model_", ".pt"))
        })
        .collect();
    if let Some(step) = steps.iter().max() {
        return finish(path, *step);
    }
    for phase in [
        "chatrl_checkpoints",
        "chatsft_checkpoints",
        "mid_checkpoints",
        "base_checkpoints",
    ] {
        let dir = path.join(phase);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut tags: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            tags.sort();
            if let Some(tag) = tags.last() {
                return locate(tag);
            }
        }
    }
    bail!(
        "{}: no model_<step>.pt here or under *_checkpoints/<tag>/",
        path.display()
    )
}

fn finish(dir: &Path, step: u64) -> anyhow::Result<CheckpointFiles> {
    let model = dir.join(format!("model_{step:06}.pt"));
    let model = if model.is_file() {
        model
    } else {
        dir.join(format!("model_{step}.pt"))
    };
    let meta = dir.join(format!("meta_{step:06}.json"));
    let meta = if meta.is_file() {
        meta
    } else {
        dir.join(format!("meta_{step}.json"))
    };
    if !meta.is_file() {
        bail!(
            "{}: meta_{step:06}.json is missing beside the checkpoint",
            dir.display()
        );
    }
    // nanochat keeps the tokenizer in <base>/tokenizer/; look beside and a few levels up.
    let tokenizer = dir
        .ancestors()
        .take(4)
        .flat_map(|d| {
            [
                d.join("tokenizer.pkl"),
                d.join("tokenizer").join("tokenizer.pkl"),
            ]
        })
        .find(|p| p.is_file());
    Ok(CheckpointFiles {
        model,
        meta,
        tokenizer,
        step,
    })
}

/// Largest `sequence_len`, `vocab_size`, `n_layer` or `n_embd` a `meta_<step>.json` may state (2^24: far above
/// any nanochat, far below sizes whose products overflow or whose tables cannot be allocated).
pub const MAX_CONFIG_VALUE: usize = 1 << 24;

/// Reads the model configuration from `meta_<step>.json`.
pub fn read_config(meta: &Path) -> anyhow::Result<NanochatConfig> {
    let text =
        std::fs::read_to_string(meta).with_context(|| format!("cannot read {}", meta.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", meta.display()))?;
    let cfg = v
        .get("model_config")
        .with_context(|| format!("{}: no `model_config`", meta.display()))?;
    let c: NanochatConfig = serde_json::from_value(cfg.clone())
        .with_context(|| format!("{}: bad `model_config`", meta.display()))?;
    for (name, value) in [
        ("sequence_len", c.sequence_len),
        ("vocab_size", c.vocab_size),
        ("n_layer", c.n_layer),
        ("n_embd", c.n_embd),
    ] {
        if value == 0 || value > MAX_CONFIG_VALUE {
            bail!(
                "{}: `model_config.{name}` = {value} is out of range (1 to {MAX_CONFIG_VALUE})",
                meta.display()
            );
        }
    }
    if c.n_head == 0
        || c.n_kv_head == 0
        || !c.n_embd.is_multiple_of(c.n_head)
        || !c.n_head.is_multiple_of(c.n_kv_head)
    {
        bail!(
            "{}: inconsistent heads (n_embd {}, n_head {}, n_kv_head {})",
            meta.display(),
            c.n_embd,
            c.n_head,
            c.n_kv_head
        );
    }
    Ok(c)
}

/// Loads weights and configuration (f32 on `device`).
pub fn load(files: &CheckpointFiles, device: &Device) -> anyhow::Result<(Config, Weights)> {
    let nc = read_config(&files.meta)?;
    let raw = read_state_dict(&files.model, device)?;
    let mut sd: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, v) in raw {
        sd.insert(k.strip_prefix("_orig_mod.").unwrap_or(&k).to_string(), v);
    }
    let newer: Vec<&str> = NEWER_ARCH_MARKERS
        .iter()
        .filter(|(marker, _)| sd.keys().any(|k| k.contains(marker)))
        .map(|(_, what)| *what)
        .collect();
    if !newer.is_empty() {
        bail!(
            "{}: this is a newer (2026) nanochat architecture, which saeflow does not support yet (found: {})",
            files.model.display(),
            newer.join(", ")
        );
    }
    let head_dim = nc.n_embd / nc.n_head;
    let config = Config {
        family: "nanochat".into(),
        vocab_size: nc.vocab_size,
        d_model: nc.n_embd,
        n_layer: nc.n_layer,
        n_head: nc.n_head,
        n_kv_head: nc.n_kv_head,
        head_dim,
        d_mlp: 4 * nc.n_embd,
        norm: Norm::Rms,
        norm_eps: f32::EPSILON as f64, // F.rms_norm without eps uses torch.finfo(float32).eps
        rope_theta: 10000.0,
        rope: Some(Rope::HalfSplit),
        rope_scaling: RopeScaling::None,
        rope_tables_bf16: true,
        rope_negative: true,
        qk_norm: true,
        embed_norm: true,
        mlp: Mlp::ReluSquared,
        embed_scale: None,
        attn_scale: None,
        attn_softcap: None,
        attn_windows: Vec::new(),
        softcap: Some(15.0),
        // Positions the rotary tables cover: ten times the training context, within what the tables can hold.
        max_seq_len: nc
            .sequence_len
            .saturating_mul(10)
            .min(super::MAX_POSITIONS)
            .max(nc.sequence_len),
    };
    let meta_name = files
        .meta
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let mut take = |name: String, shape: [usize; 2]| -> anyhow::Result<Tensor> {
        let t = sd
            .remove(&name)
            .with_context(|| format!("{}: missing parameter `{name}`", files.model.display()))?;
        if t.dims() != shape {
            bail!(
                "{}: `{name}` has shape {:?}, {meta_name} implies {shape:?}",
                files.model.display(),
                t.dims()
            );
        }
        Ok(t.to_dtype(DType::F32)?)
    };
    let (d, v) = (nc.n_embd, nc.vocab_size);
    let (q_out, kv_out) = (nc.n_head * head_dim, nc.n_kv_head * head_dim);
    let embed = take("transformer.wte.weight".into(), [v, d])?;
    let mut blocks = Vec::new();
    for i in 0..nc.n_layer {
        let p = |s: &str| format!("transformer.h.{i}.{s}");
        let attention = (
            take(p("attn.c_q.weight"), [q_out, d])?.into(),
            take(p("attn.c_k.weight"), [kv_out, d])?.into(),
            take(p("attn.c_v.weight"), [kv_out, d])?.into(),
            take(p("attn.c_proj.weight"), [d, q_out])?.into(),
        );
        blocks.push(BlockWeights::new(
            None,
            attention,
            None,
            None,
            take(p("mlp.c_fc.weight"), [4 * d, d])?.into(),
            take(p("mlp.c_proj.weight"), [d, 4 * d])?.into(),
        ));
    }
    let lm_head = take("lm_head.weight".into(), [v, d])?;
    if let Some(extra) = sd.keys().next() {
        bail!(
            "{}: unexpected parameter `{extra}` for a vintage nanochat model",
            files.model.display()
        );
    }
    Ok((
        config,
        Weights {
            embed,
            blocks,
            final_norm: None,
            final_norm_bias: None,
            lm_head: lm_head.into(),
            positions: None,
        },
    ))
}
