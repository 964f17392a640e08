//! Hugging Face model directories: `config.json` beside `*.safetensors` shards. The config's `model_type`
//! picks the family (Llama and Qwen2 in [`super::llama`], Gemma 2 in [`super::gemma2`], GPT-2 in
//! [`super::gpt2`]); what they share — reading the shards, refusing tensors no loader read, rotary settings,
//! dimension checks — lives here.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use super::transformer::{Config, RopeScaling, Weights};

/// Loads the model in a Hugging Face directory (weights converted to f32), by its `model_type`.
pub fn load_dir(dir: &Path, device: &Device) -> anyhow::Result<(Config, Weights)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    #[derive(serde::Deserialize)]
    struct ModelType {
        #[serde(default)]
        model_type: Option<String>,
    }
    let kind: ModelType = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a model config", cfg_path.display()))?;
    match kind.model_type.as_deref() {
        None | Some("llama") | Some("qwen2") => super::llama::load_hf_dir(dir, &text, device),
        Some("gemma2") => super::gemma2::load_hf_dir(dir, &text, device),
        Some("gpt2") => super::gpt2::load_hf_dir(dir, &text, device),
        Some(other) => bail!(
            "{}: `model_type` is \"{other}\"; saeflow loads \"llama\", \"qwen2\", \"gemma2\" and \"gpt2\" \
             Hugging Face directories (and nanochat checkpoints)",
            cfg_path.display()
        ),
    }
}

/// Parses `config.json`'s text as the family's config struct, naming the file on error.
pub(super) fn parse_config<T: serde::de::DeserializeOwned>(
    dir: &Path,
    text: &str,
    family: &str,
) -> anyhow::Result<T> {
    serde_json::from_str(text).with_context(|| {
        format!(
            "{}: not a {family} config",
            dir.join("config.json").display()
        )
    })
}

/// The tensors of every `*.safetensors` shard in a directory, taken one by one by a loader; what is left
/// when it is done is an error ([`Shards::finish`]).
pub(super) struct Shards {
    dir: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Shards {
    /// Reads every shard (any dtype candle reads) onto `device`.
    pub(super) fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let mut shards: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        shards.sort();
        if shards.is_empty() {
            bail!("{}: no *.safetensors files", dir.display());
        }
        let mut tensors = HashMap::new();
        for shard in &shards {
            let t = candle_core::safetensors::load(shard, device).map_err(|e| {
                anyhow::anyhow!("{}: not a readable safetensors file: {e}", shard.display())
            })?;
            tensors.extend(t);
        }
        Ok(Shards {
            dir: dir.to_path_buf(),
            tensors,
        })
    }

    /// Whether a tensor is (still) there.
    pub(super) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes a tensor, as f32; an error naming it when absent.
    pub(super) fn take(&mut self, name: &str) -> anyhow::Result<Tensor> {
        self.take_opt(name)?
            .with_context(|| format!("{}: missing tensor `{name}`", self.dir.display()))
    }

    /// Removes a tensor if present, as f32.
    pub(super) fn take_opt(&mut self, name: &str) -> anyhow::Result<Option<Tensor>> {
        self.tensors
            .remove(name)
            .map(|t| t.to_dtype(DType::F32))
            .transpose()
            .map_err(Into::into)
    }

    /// Removes a tensor of the given shape, as f32.
    pub(super) fn take_shaped(&mut self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        let t = self.take(name)?;
        if t.dims() != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                self.dir.display(),
                t.dims()
            );
        }
        Ok(t)
    }

    /// Drops tensors that are recomputed, not learned (rotary and causal-mask buffers old checkpoints saved).
    pub(super) fn drop_buffers(&mut self, is_buffer: impl Fn(&str) -> bool) {
        self.tensors.retain(|name, _| !is_buffer(name));
    }

    /// Ends loading: a tensor nothing read means an architecture variant the loader does not know (a bias,
    /// an extra norm) — refused rather than computed without it.
    pub(super) fn finish(self, family: &str) -> anyhow::Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        let shown: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
        bail!(
            "{}: {} tensors that a {family} model does not have, e.g. {}; refusing rather than computing \
             without them",
            self.dir.display(),
            names.len(),
            shown.join(", ")
        )
    }
}

/// Refuses dimensions no model has before anything is sized by them: zeros (a division by zero when a
/// width is derived) and sizes far beyond any published model (only ever a corrupt or hostile file).
/// Entries: (field, value if given, largest plausible).
pub(super) fn check_dims(path: &Path, dims: &[(&str, Option<usize>, usize)]) -> anyhow::Result<()> {
    for &(field, value, limit) in dims {
        match value {
            Some(0) => bail!("{}: `{field}` is 0; it must be at least 1", path.display()),
            Some(v) if v > limit => bail!(
                "{}: `{field}` is {v}, implausibly large (at most {limit})",
                path.display()
            ),
            _ => {}
        }
    }
    Ok(())
}

/// Per layer, the sliding window of local attention (`None` = global), from transformers' `layer_types`
/// (`sliding_attention` / `full_attention`), or where a config predates it, `default_sliding(layer)`.
/// A sliding layer needs `window`.
pub(super) fn layer_windows(
    path: &Path,
    n_layer: usize,
    layer_types: Option<&[String]>,
    default_sliding: impl Fn(usize) -> bool,
    window: Option<usize>,
) -> anyhow::Result<Vec<Option<usize>>> {
    let what = path.display();
    let sliding: Vec<bool> = match layer_types {
        Some(types) => {
            if types.len() != n_layer {
                bail!(
                    "{what}: `layer_types` lists {} layers, `num_hidden_layers` is {n_layer}",
                    types.len()
                );
            }
            types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    other => bail!(
                        "{what}: `layer_types[{i}]` is \"{other}\" (expected \"sliding_attention\" or \
                         \"full_attention\")"
                    ),
                })
                .collect::<anyhow::Result<_>>()?
        }
        None => (0..n_layer).map(default_sliding).collect(),
    };
    sliding
        .iter()
        .enumerate()
        .map(|(i, &local)| match (local, window) {
            (false, _) => Ok(None),
            (true, Some(w)) => Ok(Some(w)),
            (true, None) => bail!(
                "{what}: layer {i} uses sliding-window attention but `sliding_window` is not set"
            ),
        })
        .collect()
}

/// The rotary fields of a Hugging Face config.
#[derive(Debug, serde::Deserialize)]
pub(super) struct RopeFields {
    #[serde(default = "default_theta")]
    rope_theta: f64,
    /// transformers 4's rotary scaling (with `rope_theta` beside it).
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5's rotary settings, `rope_theta` included.
    #[serde(default)]
    rope_parameters: Option<serde_json::Value>,
}

fn default_theta() -> f64 {
    10000.0
}

/// The rotary base and scaling of a Hugging Face config: `rope_parameters` (transformers 5) or `rope_theta`
/// with `rope_scaling` (transformers 4). A scaling it does not compute is an error naming the field.
/// `max_positions` is the config's `max_position_embeddings`, where dynamic NTK scaling starts.
pub(super) fn rope(
    hf: &RopeFields,
    max_positions: usize,
    path: &Path,
) -> anyhow::Result<(f64, RopeScaling)> {
    let what = path.display();
    let (table, field) = match (&hf.rope_parameters, &hf.rope_scaling) {
        (Some(p), _) if !p.is_null() => (p, "rope_parameters"),
        (_, Some(s)) if !s.is_null() => (s, "rope_scaling"),
        _ => return Ok((hf.rope_theta, RopeScaling::None)),
    };
    let table = table
        .as_object()
        .with_context(|| format!("{what}: `{field}` is not a table"))?;
    let number = |key: &str| -> anyhow::Result<f64> {
        table
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .filter(|v| v.is_finite() && *v > 0.0)
            .with_context(|| format!("{what}: `{field}.{key}` is missing or not a positive number"))
    };
    let theta = if table.contains_key("rope_theta") {
        number("rope_theta")?
    } else {
        hf.rope_theta
    };
    if let Some(partial) = table.get("partial_rotary_factor") {
        if partial.as_f64() != Some(1.0) {
            bail!("{what}: `{field}.partial_rotary_factor` = {partial}: partial rotary is not supported");
        }
    }
    // transformers 4.40 and earlier wrote `type`.
    let kind = table
        .get("rope_type")
        .or_else(|| table.get("type"))
        .map(|v| {
            v.as_str()
                .with_context(|| format!("{what}: `{field}.rope_type` is not a string"))
        })
        .transpose()?
        .unwrap_or("default");
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: number("factor")?,
        },
        "llama3" => {
            let (low, high) = (number("low_freq_factor")?, number("high_freq_factor")?);
            if high <= low {
                bail!(
                    "{what}: `{field}.high_freq_factor` ({high}) must exceed `low_freq_factor` ({low})"
                );
            }
            RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_context: number("original_max_position_embeddings")?,
            }
        }
        "dynamic" => RopeScaling::Dynamic {
            factor: number("factor")?,
            original_context: max_positions,
        },
        other => bail!(
            "{what}: `{field}.rope_type` is \"{other}\", which saeflow does not compute (default, linear, \
             llama3, dynamic); refusing rather than computing the wrong rotary frequencies"
        ),
    };
    Ok((theta, scaling))
}
