//! `steer`: turn SAE features (or a DiffMean direction) up or down at the hook while the model generates,
//! and measure what changes. Edits (`saeflow_core::sae::edit`) are interventions, so they act in prefill and in every
//! decode step. For each target and strength: the generations, and how the unsteered model reads them (the
//! target feature's activation, the label stage's DiffMean and logistic-probe scores); and what the edit
//! costs elsewhere (KL of next-token distributions from the unsteered model, and perplexity, on neutral
//! text). Outputs are documented in `schemas/steer.md`.
//!
//! Here: the parameters and the run; `targets` decides what is steered, `readings` measures it, `outputs`
//! writes it.

mod outputs;
mod readings;
mod targets;

use anyhow::{bail, Context};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::shared::Template;
use outputs::{write_outputs, Effect, Generation};
use readings::{side_effects, Probe, Reader, Reading};
use saeflow_core::cancel::Cancelled;
use saeflow_core::models::generate::{generate_rows, Sampling};
use saeflow_core::models::{Hook, Hooks, LoadedModel};
use saeflow_core::sae::format::Sae;
use saeflow_core::stats::bootstrap::mean_interval;
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};
use targets::{read_labels, targets, Scale, Target};

/// How a feature is steered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// x + s·a·W_dec[i], a = the feature's typical active value.
    #[default]
    Add,
    /// Set the feature to s·a, keeping the SAE's error: x + (s·a − f_i(x))·W_dec[i].
    Clamp,
    /// Set the feature to 0 (strengths are ignored).
    Ablate,
}

/// What a strength is a multiple of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StrengthUnit {
    /// The typical residual norm at the hook (the median norm of the prompts' tokens, sequence starts
    /// left out), along each target's unit direction: at one strength a feature's decoder row, a DiffMean
    /// direction and a random direction are edits of the same size (`mode = "add"` only).
    #[default]
    Residual,
    /// Each target's own scale: a feature's typical activation along its decoder row (set, for clamp), the
    /// DiffMean vector itself. Edits of different targets then differ in size.
    Native,
}

/// Parameters of a `steer` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SteerParams {
    /// The stage whose output is the SAE.
    pub sae: String,
    /// The model to generate with (the one the SAE was trained on).
    pub model: String,
    /// A `label` stage: features by `select`, their typical activations, DiffMean and probe directions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// Hook to steer at (default: the SAE's `hook_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Features to steer, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<u32>,
    /// Features chosen from `labels`: `top:<class>` = the `count` labelled features of the class with the
    /// highest held-out AUROC (of the label stage's unit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<String>,
    /// How many features `select` takes.
    #[serde(default = "one")]
    pub count: usize,
    /// How features are steered.
    #[serde(default)]
    pub mode: Mode,
    /// Strengths s, in `unit`s.
    #[serde(default = "default_strengths")]
    pub strengths: Vec<f64>,
    /// What a strength is a multiple of.
    #[serde(default)]
    pub unit: StrengthUnit,
    /// Random directions (seeded, unit norm) steered at the same strengths: the control an effect must beat.
    #[serde(default = "default_random_directions")]
    pub random_directions: usize,
    /// Also steer along this class's DiffMean direction from `labels` (x + s·(mean_class − mean_rest)): the
    /// non-SAE baseline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diffmean: Option<String>,
    /// Class whose DiffMean and logistic probes score the generations (default: `select`'s or `diffmean`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    /// Prompts, as text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompts: Vec<String>,
    /// Or the prompts (else texts) of a `dataset` stage's rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// The split `input`'s prompts come from.
    #[serde(default = "default_split")]
    pub split: String,
    /// How many of `input`'s rows: a seeded choice from the split, taken from each source in turn (so every
    /// source is represented).
    #[serde(default = "default_prompt_count")]
    pub prompt_count: usize,
    /// Plain prompts or the model's chat format (the prompt as the user turn, generation as the answer).
    #[serde(default)]
    pub template: Template,
    /// Tokens generated per prompt.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// Sampling temperature (0: greedy); sampling is seeded by the pipeline seed and the prompt.
    #[serde(default)]
    pub temperature: f64,
    /// Neutral texts the edit's side effects are measured on (default: a few built-in sentences).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neutral: Vec<String>,
}

fn one() -> usize {
    1
}
fn default_strengths() -> Vec<f64> {
    vec![-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
}
fn default_random_directions() -> usize {
    2
}
fn default_split() -> String {
    "test".into()
}
fn default_prompt_count() -> usize {
    50
}
fn default_max_new() -> usize {
    32
}

/// Plain encyclopedic sentences with nothing to do with deception, for side-effect measurements.
const NEUTRAL: &[&str] = &[
    "The river flows north through a wide valley before it reaches the sea.",
    "Photosynthesis converts light, water and carbon dioxide into sugar and oxygen.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "A triangle has three sides, and the sum of its angles is one hundred and eighty degrees.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Trains leave the central station every fifteen minutes during the day.",
    "The museum's collection includes paintings, sculptures and old maps of the city.",
    "Water boils at one hundred degrees Celsius at sea level.",
];

/// The `steer` stage kind.
pub struct Steer;

impl Stage for Steer {
    type Params = SteerParams;
    const KIND: &'static str = "steer";
    // 2: the CPU forward runs on hand-written kernels (same values to float rounding, other bits).
    // 3: `top:<class>` ranks labelled features by validation AUROC (was: test).
    // 4: strengths in residual-norm units by default, random-direction controls, prompts stratified by
    // source, intervals over prompts and neutral texts. 5: prompts generated in one left-padded batch (same
    // tokens greedily; sampled ones may differ where logits differ in the last bit), and the model's linear
    // layers on kernels::gemm.
    const VERSION: u32 = 5;
    const ABOUT: &'static str = "Steer SAE features (add / clamp / ablate) or a DiffMean direction while generating, and measure the effects";

    fn references(p: &SteerParams) -> References {
        let mut inputs = vec![Reference {
            role: "sae".into(),
            target: p.sae.clone(),
            at: key_path(&["sae"]),
        }];
        if let Some(l) = &p.labels {
            inputs.push(Reference {
                role: "labels".into(),
                target: l.clone(),
                at: key_path(&["labels"]),
            });
        }
        if let Some(i) = &p.input {
            inputs.push(Reference {
                role: "input".into(),
                target: i.clone(),
                at: key_path(&["input"]),
            });
        }
        References {
            inputs,
            models: vec![Reference {
                role: String::new(),
                target: p.model.clone(),
                at: key_path(&["model"]),
            }],
            files: Vec::new(),
        }
    }

    fn validate(p: &SteerParams) -> Result<(), ParamError> {
        let err = |key: &str, message: String| {
            Err(ParamError {
                at: key_path(&[key]),
                message,
            })
        };
        if p.features.is_empty() && p.select.is_none() && p.diffmean.is_none() {
            return err(
                "features",
                "nothing to steer: give `features`, `select = \"top:<class>\"` or `diffmean`"
                    .into(),
            );
        }
        if let Some(s) = &p.select {
            if !s.starts_with("top:") || s.len() == 4 {
                return err(
                    "select",
                    format!("`select` must be `top:<class>`, not `{s}`"),
                );
            }
        }
        for (key, needs) in [
            ("select", p.select.is_some()),
            ("diffmean", p.diffmean.is_some()),
            ("probe", p.probe.is_some()),
        ] {
            if needs && p.labels.is_none() {
                return err(key, format!("`{key}` needs `labels` (a label stage)"));
            }
        }
        if p.prompts.is_empty() == p.input.is_none() {
            return err(
                "prompts",
                "give either `prompts` (a list) or `input` (a dataset stage)".into(),
            );
        }
        if p.strengths.is_empty() {
            return err("strengths", "`strengths` is empty".into());
        }
        for (key, v) in [
            ("count", p.count),
            ("prompt_count", p.prompt_count),
            ("max_new_tokens", p.max_new_tokens),
        ] {
            if v == 0 {
                return err(key, format!("`{key}` must be at least 1"));
            }
        }
        if let Some(h) = &p.hook {
            if let Err(e) = h.parse::<Hook>() {
                return err("hook", e);
            }
        }
        if p.unit == StrengthUnit::Residual && p.mode != Mode::Add {
            return err(
                "unit",
                format!(
                    "mode = \"{}\" sets a latent's value, which has no residual-norm size: use unit = \"native\"",
                    if p.mode == Mode::Clamp { "clamp" } else { "ablate" }
                ),
            );
        }
        if p.unit == StrengthUnit::Native && p.random_directions > 0 {
            return err(
                "random_directions",
                "random directions have no native scale: use unit = \"residual\" or random_directions = 0"
                    .into(),
            );
        }
        Ok(())
    }

    fn run(p: &SteerParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        run(p, ctx)
    }
}

fn run(p: &SteerParams, ctx: &mut StageContext) -> anyhow::Result<()> {
    let device = saeflow_core::models::device(ctx.device)?;
    let sae = Sae::load(&ctx.inputs["sae"], &device)
        .with_context(|| format!("stage `{}`: loading the SAE", p.sae))?;
    let hook_name = match (&p.hook, sae.hook_name()) {
        (Some(h), _) => h.clone(),
        (None, Some(h)) => h.to_string(),
        (None, None) => bail!("the SAE of `{}` names no hook: set `hook`", p.sae),
    };
    let hook: Hook = hook_name.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let labels = match &p.labels {
        Some(name) => Some(read_labels(name, &ctx.inputs["labels"], &device)?),
        None => None,
    };
    if let Some(l) = &labels {
        if l.hook != hook_name {
            bail!(
                "label stage `{}` read {}, but the steering hook is {hook_name}",
                p.labels.as_deref().unwrap_or(""),
                l.hook
            );
        }
    }
    let (model, _) = crate::shared::load_model(ctx, &p.model)?;
    model
        .transformer
        .check_hook(&hook)
        .with_context(|| format!("model `{}`", p.model))?;
    if model.transformer.config.d_model != sae.d_in() {
        bail!(
            "the SAE of `{}` takes d_in {} but model `{}` has width {}",
            p.sae,
            sae.d_in(),
            p.model,
            model.transformer.config.d_model
        );
    }
    let prompts = prompts(p, ctx)?;
    let neutral: Vec<Vec<u32>> = if p.neutral.is_empty() {
        NEUTRAL
            .iter()
            .map(|t| model.encode_document(t))
            .collect::<anyhow::Result<_>>()?
    } else {
        p.neutral
            .iter()
            .map(|t| model.encode_document(t))
            .collect::<anyhow::Result<_>>()?
    };
    let prompt_ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(text, _)| prompt_tokens(p, &model, text))
        .collect::<anyhow::Result<_>>()?;
    let scale = match p.unit {
        StrengthUnit::Native => Scale::Native,
        StrengthUnit::Residual => Scale::Residual(residual_norm(&model, &hook, &prompt_ids)?),
    };

    let targets = targets(p, &sae, labels.as_ref(), &model, &hook, &neutral, ctx.seed)?;
    let probe_class = p
        .probe
        .clone()
        .or_else(|| p.select.as_ref().map(|s| s[4..].to_string()))
        .or_else(|| p.diffmean.clone());
    let probe = match (&labels, &probe_class) {
        (Some(l), Some(c)) => Some(Probe::from_labels(l, c, p.labels.as_deref().unwrap_or(""))?),
        _ => None,
    };
    if let Scale::Residual(r) = scale {
        ctx.log(&format!(
            "strength 1 = an added vector of norm {r:.2} (the median residual norm of the prompts' tokens at {hook_name})"
        ));
    }
    ctx.log(&format!(
        "steering {} at {hook_name} ({:?}) over {} strengths, {} prompts × {} tokens",
        targets
            .iter()
            .skip(1)
            .map(Target::name)
            .collect::<Vec<_>>()
            .join(", "),
        p.mode,
        p.strengths.len(),
        prompts.len(),
        p.max_new_tokens
    ));

    // A plain continuation ends where the model starts a new document.
    let mut stop = model.stop.clone();
    if p.template == Template::None {
        stop.extend(model.bos);
    }
    let reader = Reader {
        model: &model,
        sae: &sae,
        hook,
        probe: probe.as_ref(),
    };
    let clean_neutral = reader.logits(&neutral, &Hooks::logits())?;
    let mut generations = Vec::new();
    let mut effects = Vec::new();
    let runs: Vec<(usize, f64)> = targets
        .iter()
        .enumerate()
        .flat_map(|(i, t)| match (t, p.mode) {
            (Target::None, _) | (Target::Feature { .. }, Mode::Ablate) => vec![(i, 0.0)],
            _ => p.strengths.iter().map(|&s| (i, s)).collect(),
        })
        .collect();
    ctx.progress.set_total(runs.len() as u64);
    for (t, s) in runs {
        if ctx.cancel.is_cancelled() {
            return Err(Cancelled.into());
        }
        let target = &targets[t];
        let mut hooks = Hooks::logits();
        if let Some(edit) = target.edit(&sae, p.mode, scale, s)? {
            hooks.interventions.insert(hook, edit.intervention());
        }
        let feature = match target {
            Target::Feature { id, .. } => Some(*id as usize),
            _ => None,
        };
        // Every prompt in one batch (left-padded, one KV cache), each with the seed it would have alone.
        let samplings: Vec<Sampling> = (0..prompt_ids.len())
            .map(|i| Sampling {
                temperature: p.temperature,
                seed: ctx.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                ..Sampling::default()
            })
            .collect();
        let generated = generate_rows(
            &model.transformer,
            &prompt_ids,
            p.max_new_tokens,
            &stop,
            &samplings,
            &hooks,
        )?;
        let mut rows = Vec::new();
        for (i, (ids, new)) in prompt_ids.iter().zip(generated).enumerate() {
            let reading = reader.read(ids, &new, feature)?;
            rows.push(Generation {
                target: target.name(),
                strength: s,
                prompt_index: i as u32,
                prompt: prompts[i].0.clone(),
                source: prompts[i].1.clone(),
                text: model.tokenizer.decode(&new)?,
                new_tokens: new.len() as u32,
                reading,
            });
        }
        let steered = reader.logits(&neutral, &hooks)?;
        let (kl, nll) = side_effects(&clean_neutral, &steered, &neutral)?;
        // Each prompt (each neutral text) is one value; intervals resample them.
        let seed = ctx.seed ^ 0x57ee;
        let over_prompts = |f: &dyn Fn(&Reading) -> Option<f64>| {
            let v: Vec<f64> = rows.iter().filter_map(|r| f(&r.reading)).collect();
            mean_interval(&v, INTERVAL_RESAMPLES, seed)
        };
        effects.push(Effect {
            target: target.name(),
            strength: s,
            feature_activation: over_prompts(&|r| r.feature_activation),
            diffmean_score: over_prompts(&|r| r.diffmean_score),
            probe_probability: over_prompts(&|r| r.probe_probability),
            kl_neutral: mean_interval(&kl, INTERVAL_RESAMPLES, seed).context("no neutral texts")?,
            perplexity_neutral: nll.exp(),
        });
        generations.extend(rows);
        ctx.progress.inc(1);
    }
    write_outputs(
        p,
        ctx,
        &hook_name,
        &generations,
        &effects,
        probe_class.as_deref(),
        match scale {
            Scale::Residual(r) => Some(r),
            Scale::Native => None,
        },
    )
}

/// Resamples behind every interval of `effects.parquet`.
const INTERVAL_RESAMPLES: usize = 1000;

/// The median norm of the prompts' tokens at the hook, unsteered, leaving out each sequence's first
/// position (a BOS or an attention sink, whose norm is hundreds of times the rest).
fn residual_norm(model: &LoadedModel, hook: &Hook, prompts: &[Vec<u32>]) -> anyhow::Result<f64> {
    let mut norms = Vec::new();
    for ids in prompts {
        let x = readings::hook_activations(model, hook, ids, &Hooks::capture([*hook]))?;
        let n = x
            .to_dtype(candle_core::DType::F32)?
            .sqr()?
            .sum(1)?
            .sqrt()?
            .to_vec1::<f32>()?;
        norms.extend(n.into_iter().skip(1).map(f64::from));
    }
    norms.sort_unstable_by(f64::total_cmp);
    saeflow_core::stats::bootstrap::percentile(&norms, 50.0)
        .filter(|r| *r > 0.0)
        .context("the prompts have no tokens after the first to measure the residual norm on: use longer prompts or unit = \"native\"")
}

/// The prompts and their sources: the list (source `prompts`), or `prompt_count` rows of `input`'s split
/// (their prompt, else text), chosen by seed from each source in turn.
fn prompts(p: &SteerParams, ctx: &StageContext) -> anyhow::Result<Vec<(String, String)>> {
    if !p.prompts.is_empty() {
        return Ok(p
            .prompts
            .iter()
            .map(|t| (t.clone(), "prompts".to_string()))
            .collect());
    }
    let input = p.input.as_deref().unwrap_or_default();
    let path = ctx.inputs["input"].join("rows.parquet");
    if !path.is_file() {
        bail!("input `{input}` has no rows.parquet (steer reads prompts from a `dataset` stage)");
    }
    let rows = saeflow_core::data::rows::read(&path)?;
    let mut by_source: std::collections::BTreeMap<String, Vec<saeflow_core::data::rows::Row>> =
        Default::default();
    for r in rows
        .into_iter()
        .filter(|r| r.split.as_deref() == Some(p.split.as_str()))
    {
        by_source.entry(r.source.clone()).or_default().push(r);
    }
    let seed = ctx.seed.to_string();
    let mut queues: Vec<std::vec::IntoIter<saeflow_core::data::rows::Row>> = by_source
        .into_values()
        .map(|mut rows| {
            rows.sort_by_key(|r| {
                saeflow_core::data::rows::stable_id(&[&seed, "steer", &r.doc_id.to_string()])
            });
            rows.into_iter()
        })
        .collect();
    let mut chosen = Vec::new();
    while chosen.len() < p.prompt_count {
        let before = chosen.len();
        for queue in &mut queues {
            if chosen.len() == p.prompt_count {
                break;
            }
            if let Some(r) = queue.next() {
                chosen.push((r.prompt.unwrap_or(r.text), r.source));
            }
        }
        if chosen.len() == before {
            break;
        }
    }
    if chosen.is_empty() {
        bail!("input `{input}` has no rows in split `{}`", p.split);
    }
    Ok(chosen)
}

/// Token ids a generation starts from: BOS, then the prompt, plain or as a chat user turn.
fn prompt_tokens(p: &SteerParams, model: &LoadedModel, text: &str) -> anyhow::Result<Vec<u32>> {
    let body = match p.template {
        Template::None => model.tokenizer.encode(text)?,
        Template::Chat => model.chat_tokens(text, None)?.0,
    };
    // A chat template that writes BOS itself (Llama 3's) already put it first.
    let bos = model.bos.filter(|b| body.first() != Some(b));
    let ids: Vec<u32> = bos.into_iter().chain(body).collect();
    if ids.is_empty() {
        bail!("an empty prompt (and no BOS token) cannot be continued");
    }
    Ok(ids)
}
