//! Language models: loading (nanochat checkpoints, Llama GGUF files, Hugging Face directories of Llama,
//! Qwen2, Gemma 2 and GPT-2), tokenizers, one hookable transformer, and generation. Independent of the runner; stages use it through [`load`].

pub mod chat;
mod cpu_ops;
pub mod gemma2;
pub mod generate;
pub mod gguf_check;
pub mod gpt2;
pub mod hf;
pub mod llama;
pub mod nanochat;
pub mod pickle;
pub mod spec;
pub mod tokenizer;
pub mod torch_pt;
pub mod transformer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};

use crate::models::spec::{DeviceSpec, ModelKind};
pub use tokenizer::Tokenizer;
pub use transformer::{Hook, HookPoint, Hooks, Intervention, Transformer};

/// How a model wants chats rendered.
#[derive(Debug)]
pub enum ChatFormat {
    /// nanochat's own special tokens:
    /// `<|bos|><|user_start|>…<|user_end|><|assistant_start|>…<|assistant_end|>`.
    Nanochat,
    /// The model's own Jinja chat template (`tokenizer_config.json` or GGUF metadata).
    Template(Box<chat::ChatTemplate>),
    /// No chat template known.
    None,
}

/// A model ready to run: weights, tokenizer and the conventions around them.
pub struct LoadedModel {
    /// The network.
    pub transformer: Transformer,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Prepended to every document, when the model expects it.
    pub bos: Option<u32>,
    /// Tokens that end a generation.
    pub stop: Vec<u32>,
    /// Chat rendering.
    pub chat: ChatFormat,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// The candle device for a pipeline's device setting (`auto` = CUDA when built with it and present).
pub fn device(spec: DeviceSpec) -> anyhow::Result<Device> {
    Ok(match spec {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Auto => Device::cuda_if_available(0)?,
        DeviceSpec::Cuda(n) => Device::new_cuda(n).with_context(|| {
            format!("cannot use cuda:{n} (is saeflow built with `--features cuda` and is a GPU visible?)")
        })?,
    })
}

/// Files worth fetching from a model repository (weights, configs, tokenizers; not READMEs or images).
pub const HUB_MODEL_FILES: &[&str] = &[
    "*.pt",
    "*.json",
    "*.pkl",
    "*.safetensors",
    "*.gguf",
    "**/*.pt",
    "**/*.json",
    "**/*.pkl",
];

/// Local path of a model spec: its `path` (relative to `workdir`), or its hub repository at the pinned
/// revision, downloaded (resumably, checksum-verified) into `downloads`.
pub fn resolve(
    spec: &crate::models::spec::ModelSpec,
    workdir: &Path,
    downloads: &Path,
    progress: &crate::progress::Progress,
    cancel: &crate::cancel::Cancel,
) -> anyhow::Result<PathBuf> {
    if let Some(p) = &spec.path {
        return Ok(crate::fs::resolve_path(workdir, p));
    }
    let repo = spec
        .hub
        .as_deref()
        .context("a model needs `path` or `hub`")?;
    let revision = spec.revision.as_deref().unwrap_or("main");
    use crate::data::download::{fetch_repo, RepoKind};
    fetch_repo(
        RepoKind::Model,
        repo,
        revision,
        HUB_MODEL_FILES,
        downloads,
        progress,
        cancel,
    )
}

/// Guesses the family of a model path.
pub fn detect(path: &Path) -> anyhow::Result<ModelKind> {
    if path.extension().is_some_and(|e| e == "gguf") {
        return Ok(ModelKind::Llama);
    }
    if path.join("config.json").is_file() {
        return Ok(ModelKind::HuggingFace);
    }
    if path.extension().is_some_and(|e| e == "pt") || nanochat::locate(path).is_ok() {
        return Ok(ModelKind::Nanochat);
    }
    if !path.exists() {
        bail!("{} does not exist", path.display());
    }
    bail!("{}: cannot tell the model family (expected a nanochat checkpoint, a .gguf file or a Hugging Face directory)", path.display())
}

/// How weights are held in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// Dense f32 (GGUF dequantized at load): exact, and the fastest on CPU.
    #[default]
    F32,
    /// GGUF blocks kept quantized, multiplied by candle's `QMatMul` (8-bit activations): less memory, less exact.
    Quantized,
    /// The forward's matrix products in bf16 (norms, softmax and outputs f32). On GPUs the weights and
    /// activations are bf16 tensors; on the CPU only the linear layers' inputs and weights are rounded to
    /// bf16 (AMX / AVX512-BF16 products with f32 sums), everything else stays f32.
    Bf16,
    /// As `Bf16`, in f16.
    F16,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "quantized" => Ok(Self::Quantized),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(format!(
                "unsupported model dtype `{other}` (f32, bf16, f16 or quantized)"
            )),
        }
    }
}

/// Most positions a model's rotary tables may cover (2^20; Llama 3.1 uses 131072). A file declaring more is
/// refused before the tables are allocated.
pub const MAX_POSITIONS: usize = 1 << 20;

/// Checks what a model file declared before anything is built from it: a context within
/// [`MAX_POSITIONS`], a finite positive norm epsilon and rotary base, a tokenizer whose ids the embedding
/// covers, and finite dense weights (a NaN or infinity would poison every activation silently, or only in
/// the layers after the hook).
fn check_model(
    source: &Path,
    config: &transformer::Config,
    weights: &transformer::Weights,
    tokenizer: &Tokenizer,
) -> anyhow::Result<()> {
    if config.max_seq_len > MAX_POSITIONS {
        bail!(
            "{}: context length {} is implausibly large (at most {MAX_POSITIONS} positions)",
            source.display(),
            config.max_seq_len
        );
    }
    let norm = match config.norm {
        transformer::Norm::Rms => "RMSNorm epsilon",
        transformer::Norm::Layer => "LayerNorm epsilon",
    };
    for (what, v) in [
        (norm, config.norm_eps),
        ("rotary base (rope theta)", config.rope_theta),
    ] {
        if !v.is_finite() || v <= 0.0 {
            bail!(
                "{}: {what} is {v}; it must be a finite positive number",
                source.display()
            );
        }
    }
    let mut named: Vec<(String, &candle_core::Tensor)> = vec![("embedding".into(), &weights.embed)];
    for (what, t) in [
        ("final norm", &weights.final_norm),
        ("final norm bias", &weights.final_norm_bias),
        ("position embedding", &weights.positions),
    ] {
        if let Some(t) = t {
            named.push((what.into(), t));
        }
    }
    if let transformer::Matrix::Dense(t) = &weights.lm_head {
        named.push(("lm_head".into(), t));
    }
    for (i, b) in weights.blocks.iter().enumerate() {
        let (nb, pn, ob) = (&b.norm_biases, &b.post_norms, &b.out_biases);
        for (what, t) in [
            ("attn_norm", b.attn_norm.as_ref()),
            ("mlp_norm", b.mlp_norm.as_ref()),
            ("q/k/v bias", b.qkv_bias.as_ref()),
            ("attn_norm bias", nb.as_ref().map(|p| &p.0)),
            ("mlp_norm bias", nb.as_ref().map(|p| &p.1)),
            ("post-attention norm", pn.as_ref().map(|p| &p.0)),
            ("post-MLP norm", pn.as_ref().map(|p| &p.1)),
            ("o bias", ob.as_ref().map(|p| &p.0)),
            ("MLP-in bias", ob.as_ref().map(|p| &p.1)),
            ("down bias", ob.as_ref().map(|p| &p.2)),
        ] {
            if let Some(t) = t {
                named.push((format!("block {i} {what}"), t));
            }
        }
        for (what, m) in [
            ("q", Some(&b.q)),
            ("k", Some(&b.k)),
            ("v", Some(&b.v)),
            ("o", Some(&b.o)),
            ("gate", b.gate.as_ref()),
            ("up", Some(&b.up)),
            ("down", Some(&b.down)),
        ] {
            if let Some(transformer::Matrix::Dense(t)) = m {
                named.push((format!("block {i} {what}"), t));
            }
        }
    }
    for (name, t) in named {
        // A sum is finite exactly when every entry is (weights never come near f32's overflow).
        let sum = t
            .to_dtype(candle_core::DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        if !sum.is_finite() {
            bail!(
                "{}: weight `{name}` holds NaN or infinite values",
                source.display()
            );
        }
    }
    let max_id = match tokenizer {
        Tokenizer::HuggingFace(t) => t.get_vocab(true).values().max().map(|&m| m as usize),
        Tokenizer::Tiktoken { vocab_size, .. } => vocab_size.checked_sub(1),
    };
    let rows = weights.embed.dims().first().copied().unwrap_or(0);
    if let Some(max_id) = max_id.filter(|&m| m >= rows) {
        bail!(
            "{}: the tokenizer has ids up to {max_id}, the model's embedding only {rows} rows",
            source.display()
        );
    }
    Ok(())
}

/// Loads a model from a local path with f32 weights.
pub fn load(path: &Path, kind: Option<ModelKind>, device: &Device) -> anyhow::Result<LoadedModel> {
    load_with(path, kind, WeightFormat::F32, device)
}

/// Loads a model from a local path.
pub fn load_with(
    path: &Path,
    kind: Option<ModelKind>,
    format: WeightFormat,
    device: &Device,
) -> anyhow::Result<LoadedModel> {
    let compute = match format {
        WeightFormat::Bf16 => DType::BF16,
        WeightFormat::F16 => DType::F16,
        WeightFormat::F32 | WeightFormat::Quantized => return load_f32(path, kind, format, device),
    };
    // Built in f32, then converted (peak memory: the f32 weights plus their copy).
    let mut model = load_f32(path, kind, WeightFormat::F32, device)?;
    model.transformer = model.transformer.to_dtype(compute)?;
    Ok(model)
}

/// [`load_with`] for f32 and quantized weights.
fn load_f32(
    path: &Path,
    kind: Option<ModelKind>,
    format: WeightFormat,
    device: &Device,
) -> anyhow::Result<LoadedModel> {
    let kind = match kind {
        Some(k) => k,
        None => detect(path)?,
    };
    match kind {
        ModelKind::Nanochat => {
            if format == WeightFormat::Quantized {
                bail!(
                    "{}: quantized weights apply to GGUF files only",
                    path.display()
                );
            }
            let files = nanochat::locate(path)?;
            let (config, weights) = nanochat::load(&files, device)?;
            let tokenizer = load_tokenizer(path, kind)?;
            check_model(&files.model, &config, &weights, &tokenizer)?;
            if tokenizer.vocab_size() > config.vocab_size {
                bail!(
                    "{}: tokenizer has {} ids, the model only {}",
                    path.display(),
                    tokenizer.vocab_size(),
                    config.vocab_size
                );
            }
            let bos = tokenizer.special("<|bos|>");
            // nanochat's own generate() runs through <|bos|>; only the end of an assistant turn stops.
            let stop = tokenizer.special("<|assistant_end|>").into_iter().collect();
            Ok(LoadedModel {
                transformer: Transformer::new(config, weights, device)
                    .with_context(|| files.model.display().to_string())?,
                tokenizer,
                bos,
                stop,
                chat: ChatFormat::Nanochat,
                source: files.model,
            })
        }
        ModelKind::Llama | ModelKind::HuggingFace => {
            let dir = if path.is_dir() {
                path.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new(".")).to_path_buf()
            };
            let tokenizer = load_tokenizer(path, kind)?;
            // `bos` is prepended to documents (when the model asks for it); `bos_token` is the tokenizer's
            // BOS either way, which chat templates may write themselves.
            let (config, weights, bos, bos_token, stop, template) =
                if path.extension().is_some_and(|e| e == "gguf") {
                    let (c, w, info) =
                        llama::load_gguf(path, device, format == WeightFormat::Quantized)?;
                    let bos = if info.add_bos { info.bos } else { None };
                    (
                        c,
                        w,
                        bos,
                        info.bos,
                        info.eos.into_iter().collect::<Vec<_>>(),
                        info.chat_template,
                    )
                } else {
                    let (c, w) = hf::load_dir(path, device)?;
                    let tc: serde_json::Value =
                        std::fs::read_to_string(dir.join("tokenizer_config.json"))
                            .ok()
                            .and_then(|t| serde_json::from_str(&t).ok())
                            .unwrap_or_default();
                    let id = |k: &str| tc[k].as_str().and_then(|t| tokenizer.special(t));
                    let bos = if tc["add_bos_token"].as_bool().unwrap_or(false) {
                        id("bos_token")
                    } else {
                        None
                    };
                    // generation_config.json may name more ends than the tokenizer's EOS (Gemma's
                    // `<end_of_turn>`, Llama 3's `<|eot_id|>`): generation stops at any of them.
                    let gc: serde_json::Value =
                        std::fs::read_to_string(dir.join("generation_config.json"))
                            .ok()
                            .and_then(|t| serde_json::from_str(&t).ok())
                            .unwrap_or_default();
                    let mut stop: Vec<u32> = id("eos_token").into_iter().collect();
                    let ends = match &gc["eos_token_id"] {
                        serde_json::Value::Array(a) => a.clone(),
                        one => vec![one.clone()],
                    };
                    for end in ends.iter().filter_map(serde_json::Value::as_u64) {
                        if end < c.vocab_size as u64 && !stop.contains(&(end as u32)) {
                            stop.push(end as u32);
                        }
                    }
                    (
                        c,
                        w,
                        bos,
                        id("bos_token"),
                        stop,
                        tc["chat_template"].as_str().map(str::to_string),
                    )
                };
            check_model(path, &config, &weights, &tokenizer)?;
            let chat = match template {
                Some(t) => {
                    // The strings the template's `bos_token`/`eos_token` hold: the tokenizer's own.
                    let text = |id: Option<u32>| -> String {
                        id.and_then(|i| tokenizer.decode(&[i]).ok())
                            .unwrap_or_default()
                    };
                    let bos_text = text(bos_token);
                    ChatFormat::Template(Box::new(
                        chat::ChatTemplate::new(&t, &bos_text, &text(stop.first().copied()))
                            .with_context(|| path.display().to_string())?,
                    ))
                }
                None => ChatFormat::None,
            };
            Ok(LoadedModel {
                transformer: Transformer::new(config, weights, device)
                    .with_context(|| path.display().to_string())?,
                tokenizer,
                bos,
                stop,
                chat,
                source: path.to_path_buf(),
            })
        }
    }
}

/// The tokenizer of the model at `path` alone (reports decode tokens without loading weights): nanochat's
/// `tokenizer.pkl`, else a `tokenizer.json` beside the weights, else the GGUF's own vocabulary.
pub fn load_tokenizer(path: &Path, kind: ModelKind) -> anyhow::Result<Tokenizer> {
    match kind {
        ModelKind::Nanochat => {
            let files = nanochat::locate(path)?;
            let tok_path = files.tokenizer.clone().with_context(|| {
                format!(
                    "{}: no tokenizer.pkl beside the checkpoint or in a tokenizer/ folder above it",
                    files.model.display()
                )
            })?;
            Tokenizer::from_tiktoken_pickle(&tok_path)
        }
        ModelKind::Llama | ModelKind::HuggingFace => {
            let dir = if path.is_dir() {
                path.to_path_buf()
            } else {
                path.parent().unwrap_or(Path::new(".")).to_path_buf()
            };
            let tok_path = dir.join("tokenizer.json");
            if !tok_path.exists() && path.extension().is_some_and(|e| e == "gguf") {
                Ok(Tokenizer::HuggingFace(Box::new(llama::gguf_tokenizer(
                    path,
                )?)))
            } else if !tok_path.exists() {
                bail!(
                    "{}: a tokenizer.json is needed beside the model",
                    dir.display()
                )
            } else {
                let tokenizer = Tokenizer::from_hf_file(&tok_path)?;
                // Some broken files parse but cannot encode (a WordLevel model whose unknown token is not
                // in its vocabulary): find out now, naming the file, not in the middle of a stage.
                tokenizer
                    .encode("The quick brown fox, 42 times.")
                    .with_context(|| {
                        format!("{}: the tokenizer cannot encode text", tok_path.display())
                    })?;
                Ok(tokenizer)
            }
        }
    }
}

impl LoadedModel {
    /// Token ids of a document: BOS (when the model uses one) + the text.
    pub fn encode_document(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.tokenizer.encode(text)?);
        Ok(ids)
    }

    /// Token ids of a single-turn chat in the model's format, split where the answer starts: (everything up
    /// to and including the assistant header, the answer with its end marker). BOS is included only when
    /// the chat template writes it. The texts are encoded as ordinary text, never parsed by the template.
    pub fn chat_tokens(
        &self,
        user: &str,
        assistant: Option<&str>,
    ) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
        self.chat_tokens_with_system(None, user, assistant)
    }

    /// [`chat_tokens`](Self::chat_tokens) with a system message first. A template without a system role
    /// decides itself what to do with it (most render it as their first turn; SmolLM2's replaces its default
    /// system prompt with it); nanochat has no system turn and, as its own `render_conversation` does, the
    /// system text is put before the user's, separated by a blank line.
    pub fn chat_tokens_with_system(
        &self,
        system: Option<&str>,
        user: &str,
        assistant: Option<&str>,
    ) -> anyhow::Result<(Vec<u32>, Vec<u32>)> {
        let special = |name: &str| {
            self.tokenizer.special(name).with_context(|| {
                format!("{}: tokenizer has no {name} token", self.source.display())
            })
        };
        let tok = &self.tokenizer;
        let mut prompt = Vec::new();
        let mut answer = Vec::new();
        match &self.chat {
            ChatFormat::Nanochat => {
                prompt.push(special("<|user_start|>")?);
                match system {
                    Some(system) => prompt.extend(tok.encode(&format!("{system}\n\n{user}"))?),
                    None => prompt.extend(tok.encode(user)?),
                }
                prompt.extend([special("<|user_end|>")?, special("<|assistant_start|>")?]);
                if let Some(a) = assistant {
                    answer.extend(tok.encode(a)?);
                    answer.push(special("<|assistant_end|>")?);
                }
            }
            ChatFormat::Template(template) => {
                let encode = |pieces: &[(String, bool)], out: &mut Vec<u32>| -> anyhow::Result<()> {
                    for (text, data) in pieces {
                        out.extend(if *data {
                            tok.encode(text)?
                        } else {
                            tok.encode_with_specials(text)?
                        });
                    }
                    Ok(())
                };
                let mut turns: Vec<(&str, &str)> = system.map(|s| ("system", s)).into_iter().collect();
                turns.push(("user", user));
                let head = template.pieces(&turns, true)?;
                encode(&head, &mut prompt)?;
                if let Some(a) = assistant {
                    turns.push(("assistant", a));
                    let whole = template.pieces(&turns, false)?;
                    // The answer is what the whole chat adds to the prompt: the template must render the
                    // prompt as a prefix of the chat (every Hugging Face template does).
                    let (last, _) = head.last().expect("a header after the user turn");
                    let at = whole
                        .iter()
                        .position(|(t, data)| !data && t.starts_with(last.as_str()))
                        .filter(|&i| whole[..i] == head[..head.len() - 1])
                        .with_context(|| {
                            format!(
                                "{}: the chat template does not render the prompt as the start of the chat",
                                self.source.display()
                            )
                        })?;
                    let mut rest = whole[at..].to_vec();
                    rest[0].0 = rest[0].0[last.len()..].to_string();
                    encode(&rest, &mut answer)?;
                }
            }
            ChatFormat::None => bail!(
                "{}: no chat template (neither tokenizer_config.json nor the GGUF has one); use template = \"none\"",
                self.source.display()
            ),
        }
        Ok((prompt, answer))
    }

    /// Renders a single-turn chat (user message, optional assistant answer) in the model's format, exactly
    /// as its template says; without an answer the text ends where the assistant would start.
    pub fn render_chat(&self, user: &str, assistant: Option<&str>) -> anyhow::Result<String> {
        Ok(match &self.chat {
            ChatFormat::Nanochat => {
                let mut s = format!("<|bos|><|user_start|>{user}<|user_end|><|assistant_start|>");
                if let Some(a) = assistant {
                    s.push_str(&format!("{a}<|assistant_end|>"));
                }
                s
            }
            ChatFormat::Template(t) => match assistant {
                Some(a) => t.render(&[("user", user), ("assistant", a)], false)?,
                None => t.render(&[("user", user)], true)?,
            },
            ChatFormat::None => bail!(
                "{}: no chat template (neither tokenizer_config.json nor the GGUF has one); use template = \"none\"",
                self.source.display()
            ),
        })
    }
}
