//! What a `steer` stage writes: `generations.parquet`, `effects.parquet` and the `steer.json` summary
//! (documented in `schemas/steer.md`).

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use serde_json::json;

use super::readings::Reading;
use super::SteerParams;
use saeflow_core::stats::bootstrap::Interval;
use saeflow_runner::stage::StageContext;

/// One generation: a row of `generations.parquet`.
pub(super) struct Generation {
    pub(super) target: String,
    pub(super) strength: f64,
    pub(super) prompt_index: u32,
    pub(super) prompt: String,
    pub(super) source: String,
    pub(super) text: String,
    pub(super) new_tokens: u32,
    pub(super) reading: Reading,
}

/// One (target, strength) setting, its readings averaged over the prompts (and its KL over the neutral
/// texts), each with a 95% bootstrap interval: a row of `effects.parquet`.
pub(super) struct Effect {
    pub(super) target: String,
    pub(super) strength: f64,
    pub(super) feature_activation: Option<Interval>,
    pub(super) diffmean_score: Option<Interval>,
    pub(super) probe_probability: Option<Interval>,
    pub(super) kl_neutral: Interval,
    pub(super) perplexity_neutral: f64,
}

/// Reads one interval of an effect.
type Reads = dyn Fn(&Effect) -> Option<Interval>;

/// Writes the two tables and `steer.json`, whose per-target summary is how the DiffMean score follows the
/// strength (Spearman) and what the strongest setting costs on neutral text.
pub(super) fn write_outputs(
    p: &SteerParams,
    ctx: &mut StageContext,
    hook: &str,
    generations: &[Generation],
    effects: &[Effect],
    probe_class: Option<&str>,
    residual_norm: Option<f64>,
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
            "source",
            strings(generations.iter().map(|g| g.source.as_str()).collect()),
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
    let mut columns: Vec<(String, ArrayRef)> = vec![
        (
            "target".into(),
            strings(effects.iter().map(|e| e.target.as_str()).collect()),
        ),
        (
            "strength".into(),
            floats(effects.iter().map(|e| Some(e.strength)).collect()),
        ),
    ];
    let readings: [(&str, &Reads); 4] = [
        ("feature_activation", &|e| e.feature_activation),
        ("diffmean_score", &|e| e.diffmean_score),
        ("probe_probability", &|e| e.probe_probability),
        ("kl_neutral", &|e| Some(e.kl_neutral)),
    ];
    for (name, get) in readings {
        for (suffix, part) in [
            ("", (|i: Interval| i.estimate) as fn(Interval) -> f64),
            ("_low", |i| i.low),
            ("_high", |i| i.high),
        ] {
            columns.push((
                format!("{name}{suffix}"),
                floats(effects.iter().map(|e| get(e).map(part)).collect()),
            ));
        }
    }
    columns.push((
        "perplexity_neutral".into(),
        floats(effects.iter().map(|e| Some(e.perplexity_neutral)).collect()),
    ));
    let e = RecordBatch::try_from_iter(columns)?;
    saeflow_core::data::parquet::write_batches(&ctx.out_dir.join("effects.parquet"), &[e])?;

    // Per target: how the probe score follows the strength, and the cost at the strongest setting.
    let mut per_target = serde_json::Map::new();
    let mut names: Vec<&str> = effects.iter().map(|e| e.target.as_str()).collect();
    names.dedup();
    for name in names {
        let rows: Vec<&Effect> = effects.iter().filter(|e| e.target == name).collect();
        let strengths: Vec<f64> = rows.iter().map(|e| e.strength).collect();
        let scores: Vec<f64> = rows
            .iter()
            .filter_map(|e| e.diffmean_score.map(|i| i.estimate))
            .collect();
        let strongest = rows
            .iter()
            .max_by(|a, b| a.strength.abs().total_cmp(&b.strength.abs()))
            .expect("a target has rows");
        per_target.insert(
            name.to_string(),
            json!({
                "spearman_strength_diffmean_score": (scores.len() == strengths.len())
                    .then(|| saeflow_core::stats::spearman(&strengths, &scores))
                    .flatten(),
                "strongest": strongest.strength,
                "kl_neutral_at_strongest": strongest.kl_neutral.estimate,
                "probe_probability_at_strongest": strongest.probe_probability.map(|i| json!([i.estimate, i.low, i.high])),
                "perplexity_neutral_at_strongest": strongest.perplexity_neutral,
            }),
        );
    }
    let summary = json!({
        "sae": p.sae,
        "model": p.model,
        "hook": hook,
        "mode": p.mode,
        "unit": p.unit,
        "residual_norm": residual_norm,
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
