//! What several stage kinds share: how rows become text ([`Template`]), a `[models.NAME]` entry loaded on
//! the pipeline's device, a capture's hook opened, and an SAE opened against the capture it reads.

use saeflow_runner::stage::StageContext;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How rows become text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// Prompt followed by completion, as plain text.
    #[default]
    None,
    /// The model's own chat template (the Jinja `chat_template` of its tokenizer config or GGUF, rendered as
    /// Hugging Face renders it; nanochat's special tokens for nanochat): the prompt as the user turn, the
    /// completion as the assistant's answer.
    Chat,
}

/// One hook of a capture, opened (the `label` and `eval` stages' common first step).
pub struct CaptureHook {
    /// The capture's `capture.json`.
    pub info: saeflow_core::data::activations::CaptureInfo,
    /// The hook read.
    pub hook: String,
    /// Its activations.
    pub store: saeflow_core::data::activations::ActivationStore,
    /// The pipeline's device.
    pub device: candle_core::Device,
}

impl CaptureHook {
    /// Opens the capture of input role `input` (stage `input_stage`, for messages) at `hook`, else at
    /// `preferred` when the capture has it, else at its only hook.
    pub fn open(
        ctx: &StageContext,
        input_stage: &str,
        hook: Option<&str>,
        preferred: Option<&str>,
    ) -> anyhow::Result<Self> {
        let device = saeflow_core::models::device(ctx.device)?;
        let capture_dir = &ctx.inputs["input"];
        let info = saeflow_core::data::activations::CaptureInfo::read(capture_dir)?;
        let hook = match hook {
            Some(h) => h.to_string(),
            None => match preferred {
                Some(h) if info.hooks.iter().any(|x| x == h) => h.to_string(),
                _ if info.hooks.len() == 1 => info.hooks[0].clone(),
                _ => anyhow::bail!(
                    "capture `{input_stage}` has hooks {}{}: set `hook`",
                    info.hooks.join(", "),
                    if preferred.is_some() {
                        " and the SAE names none of them"
                    } else {
                        ""
                    }
                ),
            },
        };
        let store = saeflow_core::data::activations::ActivationStore::open(capture_dir, &hook)?;
        Ok(Self {
            info,
            hook,
            store,
            device,
        })
    }
}

/// An SAE and the capture hook it reads, opened and checked against each other.
pub struct SaeOnCapture {
    /// The SAE, on `device`.
    pub sae: saeflow_core::sae::format::Sae,
    /// The capture's `capture.json`.
    pub info: saeflow_core::data::activations::CaptureInfo,
    /// The hook read.
    pub hook: String,
    /// Its activations.
    pub store: saeflow_core::data::activations::ActivationStore,
    /// The pipeline's device.
    pub device: candle_core::Device,
}

impl SaeOnCapture {
    /// Opens the SAE of input role `sae` and the capture of role `input` (stage names `sae_stage` and
    /// `input_stage`, for messages). The hook is `hook`, else the SAE's `hook_name` when the capture has it,
    /// else the capture's only hook; its width must be the SAE's `d_in`.
    pub fn open(
        ctx: &StageContext,
        sae_stage: &str,
        input_stage: &str,
        hook: Option<&str>,
    ) -> anyhow::Result<Self> {
        use anyhow::{bail, Context};
        let device = saeflow_core::models::device(ctx.device)?;
        let sae = saeflow_core::sae::format::Sae::load(&ctx.inputs["sae"], &device)
            .with_context(|| format!("stage `{sae_stage}`: loading the SAE"))?;
        let CaptureHook {
            info,
            hook,
            store,
            device,
        } = CaptureHook::open(ctx, input_stage, hook, sae.hook_name())?;
        if store.d_model() != sae.d_in() {
            bail!(
                "the SAE of `{sae_stage}` takes d_in {} but {hook} of capture `{input_stage}` has width {}",
                sae.d_in(),
                store.d_model()
            );
        }
        Ok(Self {
            sae,
            info,
            hook,
            store,
            device,
        })
    }
}

/// Loads model `name` (a `[models.NAME]` entry, downloaded if it is a hub repo) on the pipeline's device.
pub fn load_model(
    ctx: &StageContext,
    name: &str,
) -> anyhow::Result<(saeflow_core::models::LoadedModel, candle_core::Device)> {
    use anyhow::Context;
    let spec = ctx
        .models
        .get(name)
        .with_context(|| format!("model `{name}` is not defined"))?
        .clone();
    let path = saeflow_core::models::resolve(
        &spec,
        &ctx.workdir,
        &ctx.downloads_dir,
        &ctx.progress,
        &ctx.cancel,
    )?;
    let device = saeflow_core::models::device(ctx.device)?;
    let format: saeflow_core::models::WeightFormat = match &spec.dtype {
        Some(d) => d.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        None => saeflow_core::models::WeightFormat::F32,
    };
    let model = saeflow_core::models::load_with(&path, Some(spec.kind), format, &device)
        .with_context(|| format!("loading model `{name}`"))?;
    Ok((model, device))
}
