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

/// An OpenAI-compatible chat endpoint (`explain`'s explainer, `generate`'s judge): one system + user turn
/// in, the reply's text out.
#[derive(Debug, Clone)]
pub struct ChatEndpoint {
    /// `…/chat/completions`.
    pub url: String,
    llm: String,
    api_key_env: String,
    headers: Vec<(String, String)>,
    temperature: f64,
    max_tokens: u32,
}

impl ChatEndpoint {
    /// An endpoint at `base_url` (`…/v1`), with the key from `$api_key_env` sent as a bearer token when it
    /// is set (local servers need none). `Err` says what is wrong with the URL.
    pub fn new(
        base_url: &str,
        llm: &str,
        api_key_env: &str,
        temperature: f64,
        max_tokens: u32,
    ) -> Result<Self, String> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(format!(
                "`base_url` must be an http(s) URL, not `{base_url}`"
            ));
        }
        let headers = match std::env::var(api_key_env) {
            Ok(key) if !key.is_empty() => {
                vec![("Authorization".to_string(), format!("Bearer {key}"))]
            }
            _ => Vec::new(),
        };
        Ok(Self {
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            llm: llm.to_string(),
            api_key_env: api_key_env.to_string(),
            headers,
            temperature,
            max_tokens,
        })
    }

    /// A line for the stage log when no API key is sent.
    pub fn key_note(&self) -> Option<String> {
        self.headers.is_empty().then(|| {
            format!(
                "${} is not set: calling {} without an API key",
                self.api_key_env, self.url
            )
        })
    }

    /// One chat completion: the reply's text.
    pub fn complete(&self, system: &str, user: &str) -> anyhow::Result<String> {
        use anyhow::Context;
        let body = serde_json::json!({
            "model": self.llm,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        });
        let url = &self.url;
        let response =
            saeflow_core::data::download::post_json(url, &self.headers, &body).map_err(|e| {
                let hint = if e.to_string().contains("HTTP 401") {
                    format!(" (is ${} set to a valid key?)", self.api_key_env)
                } else {
                    String::new()
                };
                anyhow::anyhow!("{e}{hint}")
            })?;
        response["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "{url}: the response has no choices[0].message.content: {}",
                    response.to_string().chars().take(300).collect::<String>()
                )
            })
    }
}
