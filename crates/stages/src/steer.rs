//! `steer`: turn SAE features (or a DiffMean direction) up or down at the hook while the model generates,
//! and measure what changes. Edits (`sae::steer`) are interventions, so they act in prefill and in every
//! decode step. For each target and strength: the generations, and how the unsteered model reads them (the
//! target feature's activation, the label stage's DiffMean and logistic-probe scores); and what the edit
//! costs elsewhere (KL of next-token distributions from the unsteered model, and perplexity, on neutral
//! text). Outputs are documented in `schemas/steer.md`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type, UInt64Type};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::shared::Template;
use saeflow_core::cancel::Cancelled;
use saeflow_core::models::generate::{generate, Sampling};
use saeflow_core::models::transformer::{kl_per_position, next_token_nll};
use saeflow_core::models::{Hook, Hooks, LoadedModel};
use saeflow_core::sae::format::Sae;
use saeflow_core::sae::steer::Edit;
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};

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
    /// Strengths s (multiples of a typical activation; for `diffmean`, of the DiffMean vector).
    #[serde(default = "default_strengths")]
    pub strengths: Vec<f64>,
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
    /// How many of `input`'s rows (the first of the split).
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
    vec![-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
}
fn default_split() -> String {
    "test".into()
}
fn default_prompt_count() -> usize {
    8
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
    const VERSION: u32 = 2;
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
        Ok(())
    }

    fn run(p: &SteerParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        run(p, ctx)
    }
}

/// What the label stage provides.
struct Labels {
    hook: String,
    /// Per feature: typical active value over all labelled tokens of the fit split.
    typical: BTreeMap<u32, f64>,
    /// Labelled features per class, best held-out AUROC first.
    ranked: BTreeMap<String, Vec<u32>>,
    directions: std::collections::HashMap<String, Tensor>,
}

/// One thing steered: a feature or the DiffMean direction (or nothing, the unsteered baseline).
#[derive(Debug, Clone)]
enum Target {
    None,
    Feature { id: u32, typical: f64 },
    DiffMean { class: String, direction: Tensor },
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::None => "none".into(),
            Target::Feature { id, .. } => format!("feature:{id}"),
            Target::DiffMean { class, .. } => format!("diffmean:{class}"),
        }
    }

    fn edit(&self, sae: &Sae, mode: Mode, s: f64) -> anyhow::Result<Option<Edit>> {
        Ok(match self {
            Target::None => None,
            Target::DiffMean { direction, .. } => Some(Edit::Add {
                direction: direction.clone(),
                amount: s,
            }),
            Target::Feature { id, typical } => {
                let feature = *id as usize;
                Some(match mode {
                    Mode::Add => Edit::Add {
                        direction: sae.w_dec.get(feature)?,
                        amount: s * typical,
                    },
                    Mode::Clamp => Edit::Clamp {
                        sae: sae.clone(),
                        feature,
                        target: s * typical,
                    },
                    Mode::Ablate => Edit::Clamp {
                        sae: sae.clone(),
                        feature,
                        target: 0.0,
                    },
                })
            }
        })
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
        .map(|text| prompt_tokens(p, &model, text))
        .collect::<anyhow::Result<_>>()?;

    let targets = targets(p, &sae, labels.as_ref(), &model, &hook, &neutral)?;
    let probe_class = p
        .probe
        .clone()
        .or_else(|| p.select.as_ref().map(|s| s[4..].to_string()))
        .or_else(|| p.diffmean.clone());
    let probe = match (&labels, &probe_class) {
        (Some(l), Some(c)) => Some(Probe::from_labels(l, c, p.labels.as_deref().unwrap_or(""))?),
        _ => None,
    };
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
        if let Some(edit) = target.edit(&sae, p.mode, s)? {
            hooks.interventions.insert(hook, edit.intervention());
        }
        let feature = match target {
            Target::Feature { id, .. } => Some(*id as usize),
            _ => None,
        };
        let mut rows = Vec::new();
        for (i, ids) in prompt_ids.iter().enumerate() {
            let sampling = Sampling {
                temperature: p.temperature,
                seed: ctx.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                ..Sampling::default()
            };
            let new = generate(
                &model.transformer,
                ids,
                p.max_new_tokens,
                &stop,
                &sampling,
                &hooks,
            )?;
            let reading = reader.read(ids, &new, feature)?;
            rows.push(Generation {
                target: target.name(),
                strength: s,
                prompt_index: i as u32,
                prompt: prompts[i].clone(),
                text: model.tokenizer.decode(&new)?,
                new_tokens: new.len() as u32,
                reading,
            });
        }
        let steered = reader.logits(&neutral, &hooks)?;
        let (kl, nll) = side_effects(&clean_neutral, &steered, &neutral)?;
        let mean = |f: &dyn Fn(&Reading) -> Option<f64>| {
            let v: Vec<f64> = rows.iter().filter_map(|r| f(&r.reading)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        effects.push(Effect {
            target: target.name(),
            strength: s,
            feature_activation: mean(&|r| r.feature_activation),
            diffmean_score: mean(&|r| r.diffmean_score),
            probe_probability: mean(&|r| r.probe_probability),
            kl_neutral: kl,
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
    )
}

/// Per feature, its typical active value; per class, its labelled features ranked; the directions.
fn read_labels(name: &str, dir: &Path, device: &Device) -> anyhow::Result<Labels> {
    let summary = crate::artifacts::LabelSummary::read(dir, name)?;
    let hook = summary.json["hook"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let unit_column = summary.test_auroc_column;
    let path = dir.join("features.parquet");
    let file =
        std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut typical = BTreeMap::new();
    let mut ranked: BTreeMap<String, Vec<(f64, u32)>> = BTreeMap::new();
    for batch in reader {
        let batch = batch?;
        let col = |n: &str| {
            batch
                .column_by_name(n)
                .with_context(|| format!("{}: no `{n}` column", path.display()))
        };
        let feature = col("feature")?.as_primitive::<UInt32Type>().clone();
        let class = col("class")?.as_string::<i32>().clone();
        let labelled = col("labelled")?.as_boolean().clone();
        let f64s = |n: &str| -> anyhow::Result<Vec<f64>> {
            Ok(col(n)?.as_primitive::<Float64Type>().values().to_vec())
        };
        let counts = |n: &str| -> anyhow::Result<Vec<u64>> {
            Ok(col(n)?.as_primitive::<UInt64Type>().values().to_vec())
        };
        let (rate, rate_rest) = (f64s("fire_rate")?, f64s("fire_rate_rest")?);
        let (active, active_rest) = (f64s("mean_active")?, f64s("mean_active_rest")?);
        let (n_pos, n_neg) = (counts("n_pos")?, counts("n_neg")?);
        let test_auroc = f64s(&unit_column)?;
        for i in 0..batch.num_rows() {
            let (fires, fires_rest) = (rate[i] * n_pos[i] as f64, rate_rest[i] * n_neg[i] as f64);
            if fires + fires_rest > 0.0 {
                typical.entry(feature.value(i)).or_insert(
                    (fires * active[i] + fires_rest * active_rest[i]) / (fires + fires_rest),
                );
            }
            if labelled.value(i) {
                ranked
                    .entry(class.value(i).to_string())
                    .or_default()
                    .push((test_auroc[i], feature.value(i)));
            }
        }
    }
    let ranked = ranked
        .into_iter()
        .map(|(c, mut v)| {
            v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            (c, v.into_iter().map(|(_, f)| f).collect())
        })
        .collect();
    let directions = candle_core::safetensors::load(dir.join("directions.safetensors"), device)
        .with_context(|| format!("`{name}`: reading directions.safetensors"))?;
    Ok(Labels {
        hook,
        typical,
        ranked,
        directions,
    })
}

/// The features and directions to steer, after the unsteered baseline (always first).
fn targets(
    p: &SteerParams,
    sae: &Sae,
    labels: Option<&Labels>,
    model: &LoadedModel,
    hook: &Hook,
    neutral: &[Vec<u32>],
) -> anyhow::Result<Vec<Target>> {
    let mut ids: Vec<u32> = p.features.clone();
    if let (Some(select), Some(l)) = (&p.select, labels) {
        let class = &select[4..];
        let ranked = l.ranked.get(class).with_context(|| {
            format!(
                "label stage `{}` labelled no feature with `{class}` (classes with labelled features: {})",
                p.labels.as_deref().unwrap_or(""),
                l.ranked.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?;
        ids.extend(ranked.iter().take(p.count));
    }
    let mut targets = vec![Target::None];
    for id in ids {
        if id as usize >= sae.d_sae() {
            bail!(
                "feature {id} does not exist: the SAE of `{}` has {} latents",
                p.sae,
                sae.d_sae()
            );
        }
        let typical = match labels.and_then(|l| l.typical.get(&id)) {
            Some(&a) => a,
            None => typical_on(sae, model, hook, neutral, id as usize)?.with_context(|| {
                format!(
                    "feature {id} never fires on the neutral texts, so its typical activation is unknown: \
                     give `labels`"
                )
            })?,
        };
        targets.push(Target::Feature { id, typical });
    }
    if let (Some(class), Some(l)) = (&p.diffmean, labels) {
        let direction = l
            .directions
            .get(&format!("diffmean.{class}"))
            .with_context(|| {
                format!(
                    "label stage `{}` has no DiffMean direction for `{class}`",
                    p.labels.as_deref().unwrap_or("")
                )
            })?
            .clone();
        targets.push(Target::DiffMean {
            class: class.clone(),
            direction,
        });
    }
    Ok(targets)
}

/// A feature's mean activation where active, over the given texts (unsteered).
fn typical_on(
    sae: &Sae,
    model: &LoadedModel,
    hook: &Hook,
    texts: &[Vec<u32>],
    feature: usize,
) -> anyhow::Result<Option<f64>> {
    let (mut sum, mut count) = (0.0, 0usize);
    for ids in texts {
        let x = hook_activations(model, hook, ids, &Hooks::capture([*hook]))?;
        for v in sae
            .encode(&x)?
            .narrow(1, feature, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?
        {
            if v != 0.0 {
                sum += v as f64;
                count += 1;
            }
        }
    }
    Ok((count > 0).then(|| sum / count as f64))
}

/// `[t, d]` activations at `hook` for one sequence.
fn hook_activations(
    model: &LoadedModel,
    hook: &Hook,
    ids: &[u32],
    hooks: &Hooks,
) -> anyhow::Result<Tensor> {
    let input = Tensor::from_vec(ids.to_vec(), (1, ids.len()), model.transformer.device())?;
    let out = model.transformer.forward(&input, hooks, None)?;
    Ok(out.activations[hook].squeeze(0)?.to_dtype(DType::F32)?)
}

/// The label stage's probes for one class.
struct Probe {
    diffmean_unit: Tensor,
    logistic: Tensor,
    bias: f64,
}

impl Probe {
    fn from_labels(l: &Labels, class: &str, stage: &str) -> anyhow::Result<Self> {
        let get = |name: String| {
            l.directions.get(&name).cloned().with_context(|| {
                format!("label stage `{stage}` has no `{name}` in directions.safetensors")
            })
        };
        let diffmean = get(format!("diffmean.{class}"))?;
        let norm = diffmean.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        Ok(Probe {
            diffmean_unit: (diffmean / norm.max(1e-12))?,
            logistic: get(format!("logistic.{class}"))?,
            bias: get(format!("logistic_bias.{class}"))?
                .flatten_all()?
                .to_vec1::<f32>()?[0] as f64,
        })
    }
}

/// How the unsteered model reads a generation.
#[derive(Debug, Clone, Default)]
struct Reading {
    feature_activation: Option<f64>,
    diffmean_score: Option<f64>,
    probe_probability: Option<f64>,
}

struct Reader<'a> {
    model: &'a LoadedModel,
    sae: &'a Sae,
    hook: Hook,
    probe: Option<&'a Probe>,
}

impl Reader<'_> {
    /// Means over the generated tokens of the unsteered model's reading of prompt + generation.
    fn read(&self, prompt: &[u32], new: &[u32], feature: Option<usize>) -> anyhow::Result<Reading> {
        if new.is_empty() {
            return Ok(Reading::default());
        }
        let ids: Vec<u32> = prompt.iter().chain(new).copied().collect();
        let x = hook_activations(self.model, &self.hook, &ids, &Hooks::capture([self.hook]))?
            .narrow(0, prompt.len(), new.len())?;
        let mean =
            |t: Tensor| -> anyhow::Result<f64> { Ok(t.mean_all()?.to_scalar::<f32>()? as f64) };
        let feature_activation = match feature {
            Some(f) => Some(mean(self.sae.encode(&x)?.narrow(1, f, 1)?)?),
            None => None,
        };
        let (diffmean_score, probe_probability) = match self.probe {
            Some(probe) => {
                let projection = x.matmul(&probe.diffmean_unit.unsqueeze(1)?)?;
                let logit = (x.matmul(&probe.logistic.unsqueeze(1)?)? + probe.bias)?;
                let probability = candle_nn::ops::sigmoid(&logit)?;
                (Some(mean(projection)?), Some(mean(probability)?))
            }
            None => (None, None),
        };
        Ok(Reading {
            feature_activation,
            diffmean_score,
            probe_probability,
        })
    }

    /// Logits `[t, vocab]` of each text under `hooks`.
    fn logits(&self, texts: &[Vec<u32>], hooks: &Hooks) -> anyhow::Result<Vec<Tensor>> {
        texts
            .iter()
            .map(|ids| {
                let input =
                    Tensor::from_vec(ids.clone(), (1, ids.len()), self.model.transformer.device())?;
                let out = self.model.transformer.forward(&input, hooks, None)?;
                Ok(out.logits.context("no logits")?.to_dtype(DType::F32)?)
            })
            .collect()
    }
}

/// Mean KL(unsteered ‖ steered) over the neutral texts' positions, and the steered mean next-token loss.
fn side_effects(
    clean: &[Tensor],
    steered: &[Tensor],
    texts: &[Vec<u32>],
) -> anyhow::Result<(f64, f64)> {
    let (mut kl, mut kl_n, mut nll, mut nll_n) = (0.0, 0usize, 0.0, 0usize);
    for ((c, s), ids) in clean.iter().zip(steered).zip(texts) {
        let k = kl_per_position(c, s)?.flatten_all()?.to_vec1::<f32>()?;
        kl += k.iter().map(|&v| v as f64).sum::<f64>();
        kl_n += k.len();
        if ids.len() >= 2 {
            let tokens = Tensor::from_vec(ids.clone(), (1, ids.len()), s.device())?;
            let l = next_token_nll(s, &tokens)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            nll += l.iter().map(|&v| v as f64).sum::<f64>();
            nll_n += l.len();
        }
    }
    Ok((kl / kl_n.max(1) as f64, nll / nll_n.max(1) as f64))
}

/// The prompts: the list, or the first `prompt_count` rows of `input`'s split (their prompt, else text).
fn prompts(p: &SteerParams, ctx: &StageContext) -> anyhow::Result<Vec<String>> {
    if !p.prompts.is_empty() {
        return Ok(p.prompts.clone());
    }
    let input = p.input.as_deref().unwrap_or_default();
    let path = ctx.inputs["input"].join("rows.parquet");
    if !path.is_file() {
        bail!("input `{input}` has no rows.parquet (steer reads prompts from a `dataset` stage)");
    }
    let rows = saeflow_core::data::rows::read(&path)?;
    let chosen: Vec<String> = rows
        .into_iter()
        .filter(|r| r.split.as_deref() == Some(p.split.as_str()))
        .take(p.prompt_count)
        .map(|r| r.prompt.unwrap_or(r.text))
        .collect();
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
    let ids: Vec<u32> = model.bos.into_iter().chain(body).collect();
    if ids.is_empty() {
        bail!("an empty prompt (and no BOS token) cannot be continued");
    }
    Ok(ids)
}

struct Generation {
    target: String,
    strength: f64,
    prompt_index: u32,
    prompt: String,
    text: String,
    new_tokens: u32,
    reading: Reading,
}

struct Effect {
    target: String,
    strength: f64,
    feature_activation: Option<f64>,
    diffmean_score: Option<f64>,
    probe_probability: Option<f64>,
    kl_neutral: f64,
    perplexity_neutral: f64,
}

/// Spearman's rank correlation (average ranks for ties); `None` with fewer than 3 points or no spread.
fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            for &k in &order[i..=j] {
                r[k] = (i + j) as f64 / 2.0 + 1.0;
            }
            i = j + 1;
        }
        r
    }
    if x.len() < 3 {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

fn write_outputs(
    p: &SteerParams,
    ctx: &mut StageContext,
    hook: &str,
    generations: &[Generation],
    effects: &[Effect],
    probe_class: Option<&str>,
) -> anyhow::Result<()> {
    let strings = |v: Vec<&str>| Arc::new(StringArray::from(v)) as ArrayRef;
    let floats = |v: Vec<Option<f64>>| Arc::new(Float64Array::from(v)) as ArrayRef;
    let g = RecordBatch::try_from_iter([
        (
            "target",
            strings(generations.iter().map(|g| g.target.as_str()).collect()),
        ),
        (
            "strength",
            floats(generations.iter().map(|g| Some(g.strength)).collect()),
        ),
        (
            "prompt_index",
            Arc::new(UInt32Array::from_iter_values(
                generations.iter().map(|g| g.prompt_index),
            )) as ArrayRef,
        ),
        (
            "prompt",
            strings(generations.iter().map(|g| g.prompt.as_str()).collect()),
        ),
        (
            "text",
            strings(generations.iter().map(|g| g.text.as_str()).collect()),
        ),
        (
            "new_tokens",
            Arc::new(UInt32Array::from_iter_values(
                generations.iter().map(|g| g.new_tokens),
            )) as ArrayRef,
        ),
        (
            "feature_activation",
            floats(
                generations
                    .iter()
                    .map(|g| g.reading.feature_activation)
                    .collect(),
            ),
        ),
        (
            "diffmean_score",
            floats(
                generations
                    .iter()
                    .map(|g| g.reading.diffmean_score)
                    .collect(),
            ),
        ),
        (
            "probe_probability",
            floats(
                generations
                    .iter()
                    .map(|g| g.reading.probe_probability)
                    .collect(),
            ),
        ),
    ])?;
    saeflow_core::data::parquet::write_batches(&ctx.out_dir.join("generations.parquet"), &[g])?;
    let e = RecordBatch::try_from_iter([
        (
            "target",
            strings(effects.iter().map(|e| e.target.as_str()).collect()),
        ),
        (
            "strength",
            floats(effects.iter().map(|e| Some(e.strength)).collect()),
        ),
        (
            "feature_activation",
            floats(effects.iter().map(|e| e.feature_activation).collect()),
        ),
        (
            "diffmean_score",
            floats(effects.iter().map(|e| e.diffmean_score).collect()),
        ),
        (
            "probe_probability",
            floats(effects.iter().map(|e| e.probe_probability).collect()),
        ),
        (
            "kl_neutral",
            floats(effects.iter().map(|e| Some(e.kl_neutral)).collect()),
        ),
        (
            "perplexity_neutral",
            floats(effects.iter().map(|e| Some(e.perplexity_neutral)).collect()),
        ),
    ])?;
    saeflow_core::data::parquet::write_batches(&ctx.out_dir.join("effects.parquet"), &[e])?;

    // Per target: how the probe score follows the strength, and the cost at the strongest setting.
    let mut per_target = serde_json::Map::new();
    let mut names: Vec<&str> = effects.iter().map(|e| e.target.as_str()).collect();
    names.dedup();
    for name in names {
        let rows: Vec<&Effect> = effects.iter().filter(|e| e.target == name).collect();
        let strengths: Vec<f64> = rows.iter().map(|e| e.strength).collect();
        let scores: Vec<f64> = rows.iter().filter_map(|e| e.diffmean_score).collect();
        let strongest = rows
            .iter()
            .max_by(|a, b| a.strength.abs().total_cmp(&b.strength.abs()))
            .expect("a target has rows");
        per_target.insert(
            name.to_string(),
            json!({
                "spearman_strength_diffmean_score": (scores.len() == strengths.len())
                    .then(|| spearman(&strengths, &scores))
                    .flatten(),
                "strongest": strongest.strength,
                "kl_neutral_at_strongest": strongest.kl_neutral,
                "perplexity_neutral_at_strongest": strongest.perplexity_neutral,
            }),
        );
    }
    let summary = json!({
        "sae": p.sae,
        "model": p.model,
        "hook": hook,
        "mode": p.mode,
        "strengths": p.strengths,
        "probe_class": probe_class,
        "prompts": generations.iter().map(|g| g.prompt_index).max().map_or(0, |m| m + 1),
        "targets": per_target,
    });
    std::fs::write(
        ctx.out_dir.join("steer.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    ctx.log(&format!(
        "{} generations over {} settings",
        generations.len(),
        effects.len()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::spearman;

    #[test]
    fn spearman_matches_hand_values() {
        // Monotone → 1; reversed → −1; scipy.stats.spearmanr([1,2,3,4,5],[2,1,4,3,5]) = 0.8.
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 40.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        let r = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12);
        // Ties get average ranks: spearmanr([1,2,3,4],[1,1,2,2]) = 0.8944271909999159.
        let r = spearman(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0, 2.0, 2.0]).unwrap();
        assert!((r - 0.894_427_190_999_915_9).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 2.0], &[1.0, 2.0]), None);
    }
}
