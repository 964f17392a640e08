//! SAEs on disk and at inference: the SAELens layout saeflow exports (`cfg.json`, `sae_weights.safetensors`,
//! `sparsity.safetensors`), and loading SAELens or sparsify directories into one [`Sae`] that encodes and
//! decodes on any device.
//!
//! SAELens conventions (6.x): `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_enc [d_sae]`, `b_dec [d_in]`,
//! `threshold [d_sae]` for JumpReLU; encode = act((x − b_dec·apply_b_dec_to_input) W_enc + b_enc), decode =
//! a W_dec + b_dec. `cfg.json` carries `metadata.sae_lens_version` ≥ 6 so SAELens' loader takes its current
//! path. sparsify stores `encoder.weight [d_sae, d_in]`, `encoder.bias`, `W_dec [d_sae, d_in]`, `b_dec`,
//! always subtracts b_dec and applies ReLU before top-k.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, D};
use serde_json::{json, Value as Json};

/// Activation function of a loaded SAE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// ReLU (SAELens `standard`).
    Relu,
    /// Top-k of the pre-activations, then ReLU (SAELens / OpenAI).
    TopK(usize),
    /// ReLU, then top-k (sparsify).
    ReluTopK(usize),
    /// Pre-activations above a per-latent threshold pass unchanged (SAELens `jumprelu`, BatchTopK at
    /// inference).
    JumpRelu,
}

/// How an SAE normalises each input before encoding (undone on the reconstruction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputNorm {
    /// Inputs as they are.
    None,
    /// `(x − mean) / (std + 1e-5)` with the unbiased std, as OpenAI's `LN` and SAELens `layer_norm`.
    LayerNorm,
    /// `x · √d_in / ‖x‖` (SAELens `constant_norm_rescale`).
    ConstantNorm,
}

/// An SAE ready to encode and decode on a device.
#[derive(Debug, Clone)]
pub struct Sae {
    /// Activation.
    pub activation: Activation,
    /// `[d_in, d_sae]`.
    pub w_enc: Tensor,
    /// `[d_sae]`.
    pub b_enc: Tensor,
    /// `[d_sae, d_in]`.
    pub w_dec: Tensor,
    /// `[d_in]`.
    pub b_dec: Tensor,
    /// `[d_sae]` for JumpReLU.
    pub threshold: Option<Tensor>,
    /// Subtract b_dec from the input before encoding.
    pub apply_b_dec_to_input: bool,
    /// Normalisation of each input before encoding, undone on the reconstruction in [`Sae::reconstruct`]
    /// (OpenAI's TopK SAEs and SAELens `layer_norm`; SAELens `constant_norm_rescale`).
    pub input_norm: InputNorm,
    /// The `cfg.json` it came from (or was exported with).
    pub cfg: Json,
}

/// What an export records about where the SAE came from.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    /// Model name in the pipeline.
    pub model_name: String,
    /// Hook the SAE reads.
    pub hook_name: String,
    /// Capture context length.
    pub context_size: usize,
    /// Whether BOS was prepended.
    pub prepend_bos: bool,
    /// Where the activations came from (the capture's key).
    pub dataset_path: String,
}

impl Sae {
    /// Width of the input.
    pub fn d_in(&self) -> usize {
        self.w_enc.dims()[0]
    }

    /// Number of latents.
    pub fn d_sae(&self) -> usize {
        self.w_enc.dims()[1]
    }

    /// The hook the SAE was trained on, as its `cfg.json` records it (SAELens 6 keeps it under `metadata`).
    pub fn hook_name(&self) -> Option<&str> {
        self.cfg["hook_name"]
            .as_str()
            .or_else(|| self.cfg["metadata"]["hook_name"].as_str())
            .filter(|h| !h.is_empty())
    }

    /// Per-input (shift, scale) of the input normalisation: the encoder sees `(x − shift) / scale` and the
    /// reconstruction is `y · scale + shift`. `None` when the SAE does not normalise.
    pub fn norm_stats(&self, x: &Tensor) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let d = x.dim(D::Minus1)?;
        match self.input_norm {
            InputNorm::None => Ok(None),
            InputNorm::LayerNorm => {
                // torch's `std` (OpenAI's LN, SAELens): unbiased, with ε added to it.
                let mu = x.mean_keepdim(D::Minus1)?;
                let centered = x.broadcast_sub(&mu)?;
                let var = (centered.sqr()?.sum_keepdim(D::Minus1)? / (d.max(2) - 1) as f64)?;
                Ok(Some((mu, (var.sqrt()? + 1e-5)?)))
            }
            InputNorm::ConstantNorm => {
                let norm = (x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? / (d as f64).sqrt())?;
                Ok(Some((norm.zeros_like()?, norm)))
            }
        }
    }

    /// Pre-activations `[n, d_sae]` of inputs `[n, d_in]`.
    pub fn pre_activations(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = match self.norm_stats(x)? {
            Some((shift, scale)) => x.broadcast_sub(&shift)?.broadcast_div(&scale)?,
            None => x.clone(),
        };
        let x = if self.apply_b_dec_to_input {
            x.broadcast_sub(&self.b_dec)?
        } else {
            x.clone()
        };
        x.matmul(&self.w_enc)?.broadcast_add(&self.b_enc)
    }

    /// Latent activations `[n, d_sae]`.
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let pre = self.pre_activations(x)?;
        match self.activation {
            Activation::Relu => pre.relu(),
            Activation::TopK(k) => keep_top_k(&pre, k)?.relu(),
            Activation::ReluTopK(k) => keep_top_k(&pre.relu()?, k),
            Activation::JumpRelu => {
                let threshold = self.threshold.as_ref().expect("JumpReLU has a threshold");
                let mask = pre.broadcast_gt(threshold)?.to_dtype(pre.dtype())?;
                pre.relu()? * mask
            }
        }
    }

    /// Reconstructions `[n, d_in]` of latent activations (in the normalised space for layer-norm SAEs).
    pub fn decode(&self, a: &Tensor) -> candle_core::Result<Tensor> {
        a.matmul(&self.w_dec)?.broadcast_add(&self.b_dec)
    }

    /// Encode then decode, undoing the input normalisation: the SAE's reconstruction of `x`.
    pub fn reconstruct(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.encode_and_reconstruct(x)?.1)
    }

    /// The latents of `x` and the reconstruction made from them.
    pub fn encode_and_reconstruct(&self, x: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let codes = self.encode(x)?;
        let y = self.decode(&codes)?;
        let y = match self.norm_stats(x)? {
            Some((shift, scale)) => y.broadcast_mul(&scale)?.broadcast_add(&shift)?,
            None => y,
        };
        Ok((codes, y))
    }

    /// Writes the SAELens layout into `dir`: `cfg.json` and `sae_weights.safetensors`.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut tensors: HashMap<String, Tensor> = HashMap::from([
            ("W_enc".to_string(), self.w_enc.to_device(&Device::Cpu)?),
            ("b_enc".to_string(), self.b_enc.to_device(&Device::Cpu)?),
            ("W_dec".to_string(), self.w_dec.to_device(&Device::Cpu)?),
            ("b_dec".to_string(), self.b_dec.to_device(&Device::Cpu)?),
        ]);
        if let Some(t) = &self.threshold {
            tensors.insert("threshold".into(), t.to_device(&Device::Cpu)?);
        }
        candle_core::safetensors::save(&tensors, dir.join("sae_weights.safetensors"))?;
        std::fs::write(
            dir.join("cfg.json"),
            serde_json::to_string_pretty(&self.cfg)? + "\n",
        )?;
        Ok(())
    }

    /// The SAELens `cfg.json` of a TopK SAE.
    pub fn topk_cfg(d_in: usize, d_sae: usize, k: usize, from: &Provenance) -> Json {
        json!({
            "architecture": "topk",
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": true,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "k": k,
            "rescale_acts_by_decoder_norm": false,
            "metadata": {
                // SAELens reads configs without a version ≥ 6 through its legacy path and drops this table.
                "sae_lens_version": "6.0.0",
                "sae_lens_training_version": "6.0.0",
                "trained_with": format!("saeflow {}", env!("CARGO_PKG_VERSION")),
                "model_name": from.model_name,
                "hook_name": from.hook_name,
                "hook_head_index": null,
                "context_size": from.context_size,
                "prepend_bos": from.prepend_bos,
                "dataset_path": from.dataset_path,
                "exclude_special_tokens": false,
            },
        })
    }

    /// The SAELens `cfg.json` of a JumpReLU SAE (how SAELens exports BatchTopK too); `trained_as` names the
    /// training architecture.
    pub fn jumprelu_cfg(d_in: usize, d_sae: usize, trained_as: &str, from: &Provenance) -> Json {
        Self::plain_cfg("jumprelu", d_in, d_sae, trained_as, from)
    }

    /// The SAELens `cfg.json` of a ReLU (`standard`) SAE.
    pub fn standard_cfg(d_in: usize, d_sae: usize, from: &Provenance) -> Json {
        Self::plain_cfg("standard", d_in, d_sae, "standard", from)
    }

    fn plain_cfg(
        arch: &str,
        d_in: usize,
        d_sae: usize,
        trained_as: &str,
        from: &Provenance,
    ) -> Json {
        let mut cfg = Self::topk_cfg(d_in, d_sae, 0, from);
        let obj = cfg.as_object_mut().expect("an object");
        obj.remove("k");
        obj.remove("rescale_acts_by_decoder_norm");
        obj.insert("architecture".into(), json!(arch));
        obj["metadata"]["training_architecture"] = json!(trained_as);
        cfg
    }

    /// Loads a SAELens (`cfg.json` + `sae_weights.safetensors`) or sparsify (`cfg.json` + `sae.safetensors`)
    /// directory, or an OpenAI checkpoint (a `.pt` file, or a directory holding one), checking every shape.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let cfg_path = dir.join("cfg.json");
        if !cfg_path.exists() {
            if let Some(pt) = openai_checkpoint(dir) {
                return Self::load_openai(&pt, device);
            }
        }
        let cfg: Json = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("cannot read {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
        let tensors = |file: &str| -> anyhow::Result<HashMap<String, Tensor>> {
            let path = dir.join(file);
            candle_core::safetensors::load(&path, device)
                .with_context(|| format!("{}: not a readable safetensors file", path.display()))
        };
        if !cfg.is_object() {
            bail!(
                "{}: expected a JSON object, found {}",
                cfg_path.display(),
                crate::data::records::type_name(&cfg)
            );
        }
        let get = |ts: &HashMap<String, Tensor>, name: &str, shape: &[usize], file: &str| {
            let path = dir.join(file);
            let t = ts
                .get(name)
                .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
            checked_weight(t, name, shape, &path)
        };
        let usize_of = |key: &str| match &cfg[key] {
            Json::Null => bail!("{}: `{key}` is missing", cfg_path.display()),
            v => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => bail!(
                    "{}: `{key}` must be a positive integer, found {v}",
                    cfg_path.display()
                ),
            },
        };
        // Optional fields: absent (or null) takes the default, any other type is an error.
        let str_or = |key: &str, default: &'static str| -> anyhow::Result<String> {
            match &cfg[key] {
                Json::Null => Ok(default.to_string()),
                Json::String(s) => Ok(s.clone()),
                v => bail!(
                    "{}: `{key}` must be a string, found {v}",
                    cfg_path.display()
                ),
            }
        };
        let bool_or = |key: &str, default: bool| -> anyhow::Result<bool> {
            match &cfg[key] {
                Json::Null => Ok(default),
                Json::Bool(b) => Ok(*b),
                v => bail!(
                    "{}: `{key}` must be true or false, found {v}",
                    cfg_path.display()
                ),
            }
        };
        if dir.join("sae_weights.safetensors").exists() {
            let (d_in, d_sae) = (usize_of("d_in")?, usize_of("d_sae")?);
            let arch = str_or("architecture", "standard")?;
            let arch = arch.as_str();
            let file = "sae_weights.safetensors";
            let ts = tensors(file)?;
            let activation = match arch {
                "standard" => Activation::Relu,
                "topk" => Activation::TopK(usize_of("k")?),
                "jumprelu" => Activation::JumpRelu,
                other => bail!(
                    "{}: architecture `{other}` is not supported (standard, topk, jumprelu)",
                    cfg_path.display()
                ),
            };
            if let Activation::TopK(k) = activation {
                if k > d_sae {
                    bail!("{}: k = {k} exceeds d_sae = {d_sae}", cfg_path.display());
                }
            }
            let input_norm = match str_or("normalize_activations", "none")?.as_str() {
                "none" => InputNorm::None,
                "layer_norm" => InputNorm::LayerNorm,
                "constant_norm_rescale" => InputNorm::ConstantNorm,
                "expected_average_only_in" => bail!(
                    "{}: `normalize_activations` = \"expected_average_only_in\" needs a scaling factor the \
                     folder does not carry; fold it into the weights (SAELens \
                     `fold_activation_norm_scaling_factor`) and set it to \"none\"",
                    cfg_path.display()
                ),
                other => bail!(
                    "{}: `normalize_activations` = \"{other}\" is not supported (none, layer_norm, \
                     constant_norm_rescale)",
                    cfg_path.display()
                ),
            };
            let reshape = str_or("reshape_activations", "none")?;
            if reshape != "none" {
                bail!(
                    "{}: `reshape_activations` = \"{reshape}\" is not supported (attention-head SAEs read \
                     hook_z, which saeflow's models do not expose)",
                    cfg_path.display()
                );
            }
            for at in [&cfg["hook_head_index"], &cfg["metadata"]["hook_head_index"]] {
                if !at.is_null() {
                    bail!(
                        "{}: `hook_head_index` = {at}: SAEs of one attention head are not supported",
                        cfg_path.display()
                    );
                }
            }
            let rescaled = bool_or("rescale_acts_by_decoder_norm", false)?;
            let apply_b_dec_to_input = bool_or("apply_b_dec_to_input", true)?;
            let mut sae = Sae {
                activation,
                w_enc: get(&ts, "W_enc", &[d_in, d_sae], file)?,
                b_enc: get(&ts, "b_enc", &[d_sae], file)?,
                w_dec: get(&ts, "W_dec", &[d_sae, d_in], file)?,
                b_dec: get(&ts, "b_dec", &[d_in], file)?,
                threshold: match activation {
                    Activation::JumpRelu => Some(get(&ts, "threshold", &[d_sae], file)?),
                    _ => None,
                },
                apply_b_dec_to_input,
                input_norm,
                cfg,
            };
            if rescaled {
                sae.fold_decoder_norms()
                    .with_context(|| cfg_path.display().to_string())?;
            }
            Ok(sae)
        } else if dir.join("sae.safetensors").exists() {
            let d_in = usize_of("d_in")?;
            let d_sae = match cfg["num_latents"].as_u64() {
                Some(n) if n > 0 => n as usize,
                _ => d_in * usize_of("expansion_factor")?,
            };
            let k = usize_of("k")?;
            if k > d_sae {
                bail!("{}: k = {k} exceeds d_sae = {d_sae}", cfg_path.display());
            }
            let file = "sae.safetensors";
            let ts = tensors(file)?;
            Ok(Sae {
                activation: Activation::ReluTopK(k),
                w_enc: get(&ts, "encoder.weight", &[d_sae, d_in], file)?
                    .t()?
                    .contiguous()?,
                b_enc: get(&ts, "encoder.bias", &[d_sae], file)?,
                w_dec: get(&ts, "W_dec", &[d_sae, d_in], file)?,
                b_dec: get(&ts, "b_dec", &[d_in], file)?,
                threshold: None,
                apply_b_dec_to_input: true,
                input_norm: InputNorm::None,
                cfg,
            })
        } else {
            bail!(
                "{}: no sae_weights.safetensors (SAELens) or sae.safetensors (sparsify) beside cfg.json",
                dir.display()
            )
        }
    }
}

impl Sae {
    /// SAELens' `rescale_acts_by_decoder_norm` (TopK SAEs trained as if their decoder rows had unit norm:
    /// pre-activations × ‖W_dec row‖, latents ÷ ‖W_dec row‖ before decoding), folded into the weights: the
    /// encoder's columns and bias times the norms, the decoder's rows divided by them. Same latents, same
    /// reconstructions; the saved `cfg.json` then says `false`.
    fn fold_decoder_norms(&mut self) -> anyhow::Result<()> {
        let norms = self.w_dec.sqr()?.sum(D::Minus1)?.sqrt()?;
        if norms.min(0)?.to_scalar::<f32>()? <= 0.0 {
            bail!("`rescale_acts_by_decoder_norm` with a zero decoder row: cannot rescale by its norm");
        }
        self.w_enc = self.w_enc.broadcast_mul(&norms.unsqueeze(0)?)?;
        self.b_enc = (&self.b_enc * &norms)?;
        self.w_dec = self.w_dec.broadcast_div(&norms.unsqueeze(1)?)?;
        if let Some(cfg) = self.cfg.as_object_mut() {
            cfg.insert("rescale_acts_by_decoder_norm".into(), json!(false));
            cfg.insert("decoder_norms_folded_by".into(), json!("saeflow"));
        }
        Ok(())
    }

    /// Loads the raw arrays Gemma Scope publishes (`params.npz`: `W_enc [d_in, d_sae]`, `W_dec`, `b_enc`,
    /// `b_dec`, `threshold`) as the JumpReLU SAE SAELens' Gemma Scope loader makes of them (no b_dec
    /// subtracted from the input). The file names no hook: the caller records it in `cfg`. Read by
    /// [`super::npz`], which refuses pickled (object) arrays: an untrusted file never runs code.
    pub fn load_npz(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let arrays: HashMap<String, Tensor> = super::npz::read(path, device)?.into_iter().collect();
        const NAMES: [&str; 5] = ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"];
        if let Some(extra) = arrays.keys().find(|k| !NAMES.contains(&k.as_str())) {
            bail!(
                "{}: array `{extra}` is not one of Gemma Scope's ({}); refusing rather than ignoring it",
                path.display(),
                NAMES.join(", ")
            );
        }
        let w_enc = arrays.get("W_enc").with_context(|| {
            format!(
                "{}: no array `W_enc` (Gemma Scope's encoder)",
                path.display()
            )
        })?;
        let (d_in, d_sae) = w_enc.dims2().map_err(|_| {
            anyhow::anyhow!(
                "{}: `W_enc` has shape {:?}, expected [d_in, d_sae]",
                path.display(),
                w_enc.dims()
            )
        })?;
        let get = |name: &str, shape: &[usize]| -> anyhow::Result<Tensor> {
            let t = arrays
                .get(name)
                .with_context(|| format!("{}: no array `{name}`", path.display()))?;
            checked_weight(t, name, shape, path)
        };
        Ok(Sae {
            activation: Activation::JumpRelu,
            w_enc: get("W_enc", &[d_in, d_sae])?,
            b_enc: get("b_enc", &[d_sae])?,
            w_dec: get("W_dec", &[d_sae, d_in])?,
            b_dec: get("b_dec", &[d_in])?,
            threshold: Some(get("threshold", &[d_sae])?),
            apply_b_dec_to_input: false,
            input_norm: InputNorm::None,
            cfg: Self::jumprelu_cfg(d_in, d_sae, "gemma_scope", &Provenance::default()),
        }
        .with_b_dec_on_input(false))
    }

    /// The same SAE with `apply_b_dec_to_input` set, in the struct and in `cfg`.
    fn with_b_dec_on_input(mut self, on: bool) -> Self {
        self.apply_b_dec_to_input = on;
        if let Some(cfg) = self.cfg.as_object_mut() {
            cfg.insert("apply_b_dec_to_input".into(), json!(on));
        }
        self
    }
}

/// A weight read from `file` as f32, refused unless it has `shape`, a floating-point dtype and only finite
/// values (a NaN or infinity in an SAE poisons every latent and metric downstream, silently).
fn checked_weight(t: &Tensor, name: &str, shape: &[usize], file: &Path) -> anyhow::Result<Tensor> {
    if t.dims() != shape {
        bail!(
            "{}: `{name}` has shape {:?}, cfg.json implies {shape:?}",
            file.display(),
            t.dims()
        );
    }
    if !t.dtype().is_float() {
        bail!(
            "{}: `{name}` has dtype {:?}, expected a floating-point type (f32, f16, bf16, f64)",
            file.display(),
            t.dtype()
        );
    }
    let t = t.to_dtype(DType::F32)?;
    let bad = non_finite_count(&t)?;
    if bad > 0 {
        bail!(
            "{}: `{name}` holds {bad} NaN or infinite value{}",
            file.display(),
            if bad == 1 { "" } else { "s" }
        );
    }
    Ok(t)
}

/// How many entries of an f32 tensor are NaN or infinite.
fn non_finite_count(t: &Tensor) -> anyhow::Result<usize> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.iter().filter(|x| !x.is_finite()).count())
}

/// The single `.pt` file of a directory (or the path itself when it is one).
fn openai_checkpoint(path: &Path) -> Option<std::path::PathBuf> {
    if path.extension().is_some_and(|e| e == "pt") {
        return Some(path.to_path_buf());
    }
    let mut pts: Vec<_> = std::fs::read_dir(path)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pt"))
        .collect();
    (pts.len() == 1).then(|| pts.remove(0))
}

impl Sae {
    /// Loads an OpenAI `sparse_autoencoder` checkpoint (`torch.save` of `Autoencoder.state_dict()`):
    /// `encoder.weight [d_sae, d_in]`, `latent_bias`, `decoder.weight [d_in, d_sae]`, `pre_bias`, and
    /// `activation` / `activation_state_dict` (`TopK` with `k`, or `ReLU`). TopK checkpoints normalise
    /// their inputs (layer norm), as OpenAI's loader does. Read with saeflow's non-executing pickle reader.
    pub fn load_openai(path: &Path, device: &Device) -> anyhow::Result<Self> {
        let (tensors, extras) = crate::models::torch_pt::read_checkpoint(path, device)?;
        let get = |name: &str| {
            let t = tensors
                .get(name)
                .with_context(|| format!("{}: no `{name}` (not an OpenAI SAE?)", path.display()))?;
            checked_weight(t, name, t.dims(), path)
        };
        let w_enc_t = get("encoder.weight")?;
        let (d_sae, d_in) = w_enc_t.dims2()?;
        let shape = |name: &str, t: &Tensor, want: &[usize]| {
            if t.dims() != want {
                bail!(
                    "{}: `{name}` has shape {:?}, encoder.weight implies {want:?}",
                    path.display(),
                    t.dims()
                );
            }
            Ok(())
        };
        let w_dec_t = get("decoder.weight")?;
        shape("decoder.weight", &w_dec_t, &[d_in, d_sae])?;
        let b_enc = get("latent_bias")?;
        shape("latent_bias", &b_enc, &[d_sae])?;
        let b_dec = get("pre_bias")?;
        shape("pre_bias", &b_dec, &[d_in])?;
        let kind = extras
            .get("activation")
            .and_then(|v| v.as_str())
            .unwrap_or("ReLU")
            .to_string();
        let activation = match kind.as_str() {
            "TopK" => {
                let k = extras
                    .get("activation_state_dict")
                    .and_then(|v| v.get("k"))
                    .and_then(|v| v.as_int())
                    .with_context(|| format!("{}: TopK checkpoint without k", path.display()))?;
                if k <= 0 || k as usize > d_sae {
                    bail!("{}: k = {k} outside 1..={d_sae}", path.display());
                }
                Activation::TopK(k as usize)
            }
            "ReLU" => Activation::Relu,
            other => bail!(
                "{}: activation `{other}` is not supported (TopK, ReLU)",
                path.display()
            ),
        };
        Ok(Sae {
            activation,
            w_enc: w_enc_t.t()?.contiguous()?,
            b_enc,
            w_dec: w_dec_t.t()?.contiguous()?,
            b_dec,
            threshold: None,
            apply_b_dec_to_input: true,
            input_norm: if kind == "TopK" {
                InputNorm::LayerNorm
            } else {
                InputNorm::None
            },
            cfg: json!({"architecture": kind, "d_in": d_in, "d_sae": d_sae, "source": "openai"}),
        })
    }
}

/// Zeroes everything but the `k` largest entries of each row (ties: lower index first).
fn keep_top_k(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    let order = x.arg_sort_last_dim(false)?;
    let top = order.narrow(D::Minus1, 0, k)?.contiguous()?;
    let values = x.gather(&top, D::Minus1)?;
    x.zeros_like()?.scatter_add(&top, &values, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    /// d_in 2, d_sae 3, by hand: x = [2, 2], x − b_dec = [1, 1],
    /// pre = [1·1 + 1·0, 1·0 + 1·2, −1 + 1] + b_enc = [1.1, 1.5, 0.0].
    fn sae(activation: Activation) -> Sae {
        Sae {
            activation,
            w_enc: t(&[1.0, 0.0, -1.0, 0.0, 2.0, 1.0], &[2, 3]),
            b_enc: t(&[0.1, -0.5, 0.0], &[3]),
            w_dec: t(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]),
            b_dec: t(&[1.0, 1.0], &[2]),
            threshold: Some(t(&[1.2, 1.0, -1.0], &[3])),
            apply_b_dec_to_input: true,
            input_norm: InputNorm::None,
            cfg: Json::Null,
        }
    }

    fn encode(s: &Sae) -> Vec<f32> {
        s.encode(&t(&[2.0, 2.0], &[1, 2]))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn encodings_follow_the_saelens_formulas() {
        assert_eq!(encode(&sae(Activation::Relu)), [1.1, 1.5, 0.0]);
        assert_eq!(encode(&sae(Activation::TopK(1))), [0.0, 1.5, 0.0]);
        assert_eq!(encode(&sae(Activation::TopK(2))), [1.1, 1.5, 0.0]);
        // JumpReLU keeps pre-activations above their threshold: 1.1 ≤ 1.2 is dropped, 0.0 > −1 stays 0.
        assert_eq!(encode(&sae(Activation::JumpRelu)), [0.0, 1.5, 0.0]);
        let mut no_bias = sae(Activation::Relu);
        no_bias.apply_b_dec_to_input = false;
        // pre = [2, 4, 0] + b_enc
        assert_eq!(encode(&no_bias), [2.1, 3.5, 0.0]);
        let s = sae(Activation::TopK(1));
        let recon: Vec<f32> = s
            .decode(&t(&[0.0, 1.5, 0.0], &[1, 3]))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(recon, [1.0, 2.5]);
    }

    #[test]
    fn saelens_and_sparsify_directories_load_with_shape_checks() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sae(Activation::TopK(1));
        s.threshold = None;
        s.cfg = Sae::topk_cfg(2, 3, 1, &Provenance::default());
        s.save(dir.path()).unwrap();
        let loaded = Sae::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.activation, Activation::TopK(1));
        assert_eq!(encode(&loaded), [0.0, 1.5, 0.0]);

        // sparsify: encoder.weight is W_encᵀ; ReLU before top-k.
        let sp = tempfile::tempdir().unwrap();
        std::fs::write(
            sp.path().join("cfg.json"),
            r#"{"activation": "topk", "expansion_factor": 32, "normalize_decoder": true, "num_latents": 3, "k": 2, "multi_topk": false, "skip_connection": false, "transcode": false, "d_in": 2}"#,
        )
        .unwrap();
        let tensors = HashMap::from([
            (
                "encoder.weight".to_string(),
                s.w_enc.t().unwrap().contiguous().unwrap(),
            ),
            ("encoder.bias".to_string(), s.b_enc.clone()),
            ("W_dec".to_string(), s.w_dec.clone()),
            ("b_dec".to_string(), s.b_dec.clone()),
        ]);
        candle_core::safetensors::save(&tensors, sp.path().join("sae.safetensors")).unwrap();
        let loaded = Sae::load(sp.path(), &Device::Cpu).unwrap();
        assert_eq!(loaded.activation, Activation::ReluTopK(2));
        assert_eq!(encode(&loaded), [1.1, 1.5, 0.0]);

        // A weight of the wrong shape is named, with both shapes.
        let bad = HashMap::from([
            ("W_enc".to_string(), t(&[0.0; 4], &[2, 2])),
            ("b_enc".to_string(), s.b_enc.clone()),
            ("W_dec".to_string(), s.w_dec.clone()),
            ("b_dec".to_string(), s.b_dec.clone()),
        ]);
        candle_core::safetensors::save(&bad, dir.path().join("sae_weights.safetensors")).unwrap();
        let err = Sae::load(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("`W_enc` has shape [2, 2], cfg.json implies [2, 3]"),
            "{err}"
        );
    }
}
