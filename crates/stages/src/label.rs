//! `label`: which SAE features detect which class of a labelled capture, with real statistics.
//!
//! One pass over the capture encodes every token with the SAE (kept sparse, feature by feature) and sums
//! the raw activations per class. On the fit split every feature is tested against every class
//! (one-vs-rest): a Mann–Whitney rank test on documents (mean-pooled by default: labels belong to
//! documents, and a document's tokens are not independent samples), Benjamini–Hochberg over all features ×
//! classes, and a feature is labelled with a class only when q < `alpha` and |AUROC − 0.5| > `min_effect`.
//! Token-level and max-pooled AUROCs and p-values are reported beside it. Every feature
//! is then re-measured on the held-out split, which is what reports show. The baseline is AxBench's
//! DiffMean: the difference of class means of the raw activations on the fit split, scored on the held-out
//! split by projection. Outputs are documented in `schemas/label.md`.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::builder::{
    BooleanBuilder, Float64Builder, ListBuilder, StringBuilder, UInt32Builder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use candle_core::{DType, Tensor};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::shared::SaeOnCapture;
use saeflow_core::cancel::Cancelled;
use saeflow_core::data::activations::{ActivationStore, ReadOptions, TokenTable};
use saeflow_core::stats::features::{feature_classes, Codes, FeatureClass, TokenInfo};
use saeflow_core::stats::{benjamini_hochberg, TwoSample};
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};

/// The unit a label's rank test compares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Documents, by the mean activation over their tokens: labels belong to documents and a document's
    /// tokens are not independent, so this is the test whose p-values mean what they say.
    #[default]
    DocMean,
    /// Documents, by their maximum activation (more sensitive to one firing token; grows with length).
    DocMax,
    /// Tokens: treats the tokens of a document as independent, which inflates significance unless each
    /// document contributes one token (`positions = "last"` captures).
    Token,
}

/// Parameters of a `label` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelParams {
    /// The stage whose output is the SAE (a `train` stage).
    pub sae: String,
    /// The `capture` stage whose tokens carry labels.
    pub input: String,
    /// Hook to read (default: the SAE's `hook_name` when the capture has it, else the capture's only hook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Split the tests run on.
    #[serde(default = "default_fit")]
    pub fit_split: String,
    /// Held-out split every feature is re-measured on.
    #[serde(default = "default_test")]
    pub test_split: String,
    /// Split the probes' regularisation is chosen on.
    #[serde(default = "default_val")]
    pub val_split: String,
    /// Tokens (seeded sample) the logistic probes fit on, and choose their regularisation on.
    #[serde(default = "default_probe_tokens")]
    pub probe_tokens: usize,
    /// False discovery rate (Benjamini–Hochberg) of the labels.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// What the rank test and the effect size compare.
    #[serde(default)]
    pub unit: Unit,
    /// Smallest |AUROC − 0.5| (of `unit`, fit split) a labelled feature must show.
    #[serde(default = "default_min_effect")]
    pub min_effect: f64,
    /// Classes to test, one against the rest (default: every label in the capture).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    /// Labels the classes are compared with (default: every other label). With `versus`, tokens whose
    /// label is neither in `classes` nor here take no part: `classes = ["deceptive"]`,
    /// `versus = ["honest"]` compares the two within a mixed capture.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub versus: Vec<String>,
    /// Top activating contexts kept per labelled feature.
    #[serde(default = "default_top")]
    pub top_contexts: usize,
    /// Random active contexts kept per labelled feature, and as many random tokens where it is silent.
    #[serde(default = "default_random")]
    pub random_contexts: usize,
    /// Tokens of the same document kept on each side of a context's token.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Tokens encoded at once.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_fit() -> String {
    "train".into()
}
fn default_test() -> String {
    "test".into()
}
fn default_val() -> String {
    "val".into()
}
fn default_probe_tokens() -> usize {
    100_000
}
fn default_alpha() -> f64 {
    0.01
}
fn default_min_effect() -> f64 {
    0.1
}
fn default_top() -> usize {
    10
}
fn default_random() -> usize {
    5
}
fn default_window() -> usize {
    8
}
fn default_batch() -> usize {
    4096
}

/// The `label` stage kind.
pub struct Label;

impl Stage for Label {
    type Params = LabelParams;
    const KIND: &'static str = "label";
    const VERSION: u32 = 3;
    const ABOUT: &'static str =
        "Label SAE features with the classes they detect (rank tests, FDR control, held-out AUROC, DiffMean baseline)";

    fn references(p: &LabelParams) -> References {
        References {
            inputs: vec![
                Reference {
                    role: "sae".into(),
                    target: p.sae.clone(),
                    at: key_path(&["sae"]),
                },
                Reference {
                    role: "input".into(),
                    target: p.input.clone(),
                    at: key_path(&["input"]),
                },
            ],
            ..References::default()
        }
    }

    fn validate(p: &LabelParams) -> Result<(), ParamError> {
        if !(p.alpha > 0.0 && p.alpha < 1.0) {
            return Err(ParamError {
                at: key_path(&["alpha"]),
                message: "`alpha` must be between 0 and 1".into(),
            });
        }
        if !(0.0..0.5).contains(&p.min_effect) {
            return Err(ParamError {
                at: key_path(&["min_effect"]),
                message: "`min_effect` must be in [0, 0.5): a bound on |AUROC − 0.5|".into(),
            });
        }
        if p.fit_split == p.test_split {
            return Err(ParamError {
                at: key_path(&["test_split"]),
                message: format!(
                    "`test_split` must differ from `fit_split` (both `{}`)",
                    p.fit_split
                ),
            });
        }
        if p.val_split == p.fit_split || p.val_split == p.test_split {
            return Err(ParamError {
                at: key_path(&["val_split"]),
                message: "`val_split` must differ from `fit_split` and `test_split`".into(),
            });
        }
        if p.probe_tokens < 2 {
            return Err(ParamError {
                at: key_path(&["probe_tokens"]),
                message: "`probe_tokens` must be at least 2".into(),
            });
        }
        if p.batch_size == 0 {
            return Err(ParamError {
                at: key_path(&["batch_size"]),
                message: "`batch_size` must be at least 1".into(),
            });
        }
        Ok(())
    }

    fn run(p: &LabelParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let SaeOnCapture {
            sae,
            hook,
            store,
            device,
            ..
        } = SaeOnCapture::open(ctx, &p.sae, &p.input, p.hook.as_deref())?;
        let table = TokenTable::read(&ctx.inputs["input"])?;
        let classes = choose_classes(p, &table)?;
        let (fit, val, test) = (
            split_of(p, &table, &p.fit_split)?,
            split_of(p, &table, &p.val_split)?,
            split_of(p, &table, &p.test_split)?,
        );
        // Every label takes part (the rest of a one-vs-rest comparison is all other labelled tokens) unless
        // `versus` narrows it; only the chosen classes are tested.
        let taking_part = versus_labels(p, &table, &classes)?;
        let tokens = TokenInfo {
            class: table
                .label
                .iter()
                .map(|l| l.filter(|l| taking_part.as_ref().is_none_or(|t| t.contains(l))))
                .collect(),
            doc: table.doc_id.clone(),
            split: table.split.clone(),
        };
        let names: Vec<&str> = table.labels.iter().map(String::as_str).collect();
        check_splits(
            p,
            &tokens,
            &names,
            &classes,
            [
                (&p.fit_split, fit),
                (&p.val_split, val),
                (&p.test_split, test),
            ],
        )?;
        ctx.log(&format!(
            "labelling {} features of `{}` against {} on {hook} of `{}` ({} tokens)",
            sae.d_sae(),
            p.sae,
            classes
                .iter()
                .map(|&c| names[c as usize])
                .collect::<Vec<_>>()
                .join(", "),
            p.input,
            store.rows()
        ));

        // The probes' fit and validation tokens: seeded samples of the labelled tokens of each split.
        let d = store.d_model();
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.seed);
        let mut samples = [Sample::default(), Sample::default()];
        for (sample, split) in samples.iter_mut().zip([fit, val]) {
            let rows: Vec<usize> = (0..tokens.class.len())
                .filter(|&r| tokens.class[r].is_some() && tokens.split[r] == split)
                .collect();
            let mut picked = sample_rows(&mut rng, &rows, p.probe_tokens);
            picked.sort_unstable();
            sample.class = picked
                .iter()
                .map(|&r| tokens.class[r].expect("labelled"))
                .collect();
            sample.x = vec![0f32; picked.len() * d];
            sample.rows = picked;
        }

        // One pass: sparse codes of every token, per-class sums of the raw activations (fit split), and the
        // probes' samples.
        let mut codes = Codes::new(sae.d_sae());
        let mut class_sums = vec![vec![0f64; d]; names.len()];
        let options = ReadOptions {
            batch_size: p.batch_size,
            ..ReadOptions::default()
        };
        ctx.progress.set_total(store.rows());
        for batch in store.batches(&options, &device)? {
            if ctx.cancel.is_cancelled() {
                return Err(Cancelled.into());
            }
            let batch = batch?;
            let encoded = sae
                .encode(&batch.acts)?
                .to_dtype(DType::F32)?
                .flatten_all()?;
            codes.push(&encoded.to_vec1::<f32>()?)?;
            let acts = batch.acts.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (row, x) in batch.rows.iter().zip(&acts) {
                let r = *row as usize;
                if let (Some(c), true) = (tokens.class[r], tokens.split[r] == fit) {
                    for (s, v) in class_sums[c as usize].iter_mut().zip(x) {
                        *s += *v as f64;
                    }
                }
                for sample in &mut samples {
                    if let Ok(i) = sample.rows.binary_search(&r) {
                        sample.x[i * d..(i + 1) * d].copy_from_slice(x);
                    }
                }
            }
            ctx.progress.inc(batch.rows.len() as u64);
        }

        let chosen = |s: &FeatureClass| classes.contains(&s.class);
        let fit_stats: Vec<FeatureClass> = feature_classes(&codes, &tokens, fit, names.len())
            .into_iter()
            .filter(chosen)
            .collect();
        let test_stats: Vec<FeatureClass> = feature_classes(&codes, &tokens, test, names.len())
            .into_iter()
            .filter(chosen)
            .collect();
        let tested = |s: &FeatureClass| match p.unit {
            Unit::DocMean => s.doc_mean,
            Unit::DocMax => s.doc_max,
            Unit::Token => s.token,
        };
        let q = benjamini_hochberg(&fit_stats.iter().map(|s| tested(s).p).collect::<Vec<_>>());
        let labelled: Vec<bool> = fit_stats
            .iter()
            .zip(&q)
            .map(|(s, &q)| q < p.alpha && (tested(s).auroc - 0.5).abs() > p.min_effect)
            .collect();

        // DiffMean per class: mean of the class minus mean of the rest, scored on the test split.
        let (fit_counts, _) = tokens.counts(fit, names.len());
        let directions = diffmean_directions(&class_sums, &fit_counts, &classes);
        ctx.log("fitting probes (logistic regression on raw activations, k-sparse on SAE latents)");
        let [fit_sample, val_sample] = &samples;
        let logistic: Vec<Probe> = classes
            .iter()
            .map(|&c| fit_dense_probe(fit_sample, val_sample, c, d))
            .collect();
        // One more pass over the test split: every DiffMean and logistic direction scored on each token.
        let mut scorers: Vec<(Vec<f32>, f64)> =
            directions.iter().map(|dir| (dir.clone(), 0.0)).collect();
        scorers.extend(logistic.iter().map(|pr| (pr.direction.clone(), pr.bias)));
        let scored = score_test(
            &store,
            &device,
            &tokens,
            (test, &p.test_split),
            &classes,
            &scorers,
            p.batch_size,
        )?;
        let (diffmean, logistic_test) = scored.split_at(classes.len());
        let sparse = sparse_probes(
            &codes, &tokens, &fit_stats, fit_sample, val_sample, test, &classes,
        );

        let out = &ctx.out_dir;
        saeflow_core::data::parquet::write_batches(
            &out.join("features.parquet"),
            &[features_batch(
                &names,
                &fit_stats,
                &test_stats,
                &q,
                &labelled,
            )?],
        )?;
        let chosen: Vec<(u32, u16)> = fit_stats
            .iter()
            .zip(&labelled)
            .filter(|(_, &l)| l)
            .map(|(s, _)| (s.feature, s.class))
            .collect();
        saeflow_core::data::parquet::write_batches(
            &out.join("contexts.parquet"),
            &[contexts_batch(
                p, ctx.seed, &names, &codes, &table, &chosen,
            )?],
        )?;
        let tested_names: Vec<&str> = classes.iter().map(|&c| names[c as usize]).collect();
        saeflow_core::data::parquet::write_batches(
            &out.join("probes.parquet"),
            &[probes_batch(
                &tested_names,
                diffmean,
                &logistic,
                logistic_test,
                &sparse,
            )?],
        )?;
        let cpu = candle_core::Device::Cpu;
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for ((name, dir), probe) in tested_names.iter().zip(&directions).zip(&logistic) {
            tensors.insert(
                format!("diffmean.{name}"),
                Tensor::new(dir.as_slice(), &cpu)?,
            );
            tensors.insert(
                format!("logistic.{name}"),
                Tensor::new(probe.direction.as_slice(), &cpu)?,
            );
            tensors.insert(
                format!("logistic_bias.{name}"),
                Tensor::new(&[probe.bias as f32], &cpu)?,
            );
        }
        candle_core::safetensors::save(
            &tensors.into_iter().collect(),
            out.join("directions.safetensors"),
        )?;

        // Summary: per class, how many features were labelled and the best of them on held-out data.
        let unit_name = serde_json::to_value(p.unit)?;
        let unit_name = unit_name.as_str().unwrap_or("unit");
        let mut summary = serde_json::Map::new();
        for (i, (&c, name)) in classes.iter().zip(&tested_names).enumerate() {
            let c = c as usize;
            let best = fit_stats
                .iter()
                .zip(&test_stats)
                .zip(&labelled)
                .filter(|((s, _), &l)| l && s.class as usize == c && tested(s).auroc > 0.5)
                .max_by(|a, b| tested(a.0 .1).auroc.total_cmp(&tested(b.0 .1).auroc));
            let count = fit_stats
                .iter()
                .zip(&labelled)
                .filter(|(s, &l)| l && s.class as usize == c)
                .count();
            summary.insert(
                name.to_string(),
                json!({
                    "labelled_features": count,
                    "best_feature": best.map(|((s, _), _)| s.feature),
                    "best_feature_test_auroc": best.map(|((_, t), _)| t.token.auroc),
                    "best_feature_test_auroc_doc_max": best.map(|((_, t), _)| t.doc_max.auroc),
                    "best_feature_test_auroc_doc_mean": best.map(|((_, t), _)| t.doc_mean.auroc),
                    "diffmean_test_auroc": diffmean[i].auroc,
                    "logistic_test_auroc": logistic_test[i].auroc,
                    "logistic_c": logistic[i].c,
                    "sparse_probe_test_auroc": sparse
                        .iter()
                        .filter(|sp| sp.class as usize == c)
                        .map(|sp| (sp.k.to_string(), sp.test.auroc))
                        .collect::<BTreeMap<_, _>>(),
                    "fit_tokens": fit_counts[c],
                }),
            );
            ctx.log(&format!(
                "{name}: {count} features labelled; best held-out AUROC {}; per token: DiffMean {:.3}, \
                 logistic {:.3}",
                best.map_or("-".to_string(), |((_, t), _)| format!(
                    "{:.3} by {} (feature {}, {:.3} per token)",
                    tested(t).auroc,
                    unit_name,
                    t.feature,
                    t.token.auroc
                )),
                diffmean[i].auroc,
                logistic_test[i].auroc
            ));
        }
        let labelled_total = labelled.iter().filter(|&&l| l).count();
        std::fs::write(
            out.join("label.json"),
            serde_json::to_string_pretty(&json!({
                "sae": p.sae,
                "capture": p.input,
                "hook": hook,
                "d_sae": sae.d_sae(),
                "classes": tested_names,
                "versus": p.versus,
                "fit_split": p.fit_split,
                "test_split": p.test_split,
                "alpha": p.alpha,
                "unit": p.unit,
                "min_effect": p.min_effect,
                "tests": fit_stats.len(),
                "labelled": labelled_total,
                "per_class": summary,
            }))?,
        )?;
        ctx.metrics.insert("labelled".into(), json!(labelled_total));
        Ok(())
    }
}

/// The label indices to test: `classes` as named, or every label of the capture.
fn choose_classes(p: &LabelParams, table: &TokenTable) -> anyhow::Result<Vec<u16>> {
    if table.labels.is_empty() {
        bail!(
            "capture `{}` has no labelled tokens: label the rows in its dataset stage (a preset with labels, \
             or `label = \"FIELD\"` on a source) and capture again",
            p.input
        );
    }
    if p.classes.is_empty() {
        if table.labels.len() < 2 {
            bail!(
                "capture `{}` has one label (`{}`): a class needs others to be compared with",
                p.input,
                table.labels[0]
            );
        }
        return Ok((0..table.labels.len() as u16).collect());
    }
    p.classes
        .iter()
        .map(|c| {
            table
                .labels
                .iter()
                .position(|l| l == c)
                .map(|i| i as u16)
                .with_context(|| {
                    format!(
                        "class `{c}` is not a label of capture `{}` (its labels: {})",
                        p.input,
                        table.labels.join(", ")
                    )
                })
        })
        .collect()
}

/// Each tested class needs tokens in every split, and each split more than one class.
fn check_splits(
    p: &LabelParams,
    tokens: &TokenInfo,
    names: &[&str],
    classes: &[u16],
    splits: [(&String, u8); 3],
) -> anyhow::Result<()> {
    for (split, index) in splits {
        let (counts, _) = tokens.counts(index, names.len());
        for &c in classes {
            if counts[c as usize] == 0 {
                bail!(
                    "split `{split}` of capture `{}` has no `{}` tokens: each class needs tokens on both \
                     sides of the comparison in the fit, val and test splits",
                    p.input,
                    names[c as usize]
                );
            }
        }
        if counts.iter().sum::<u64>() == *counts.iter().max().unwrap_or(&0) {
            bail!(
                "split `{split}` of capture `{}` holds a single class",
                p.input
            );
        }
    }
    Ok(())
}

/// DiffMean directions: per tested class, the mean raw activation of its fit tokens minus the mean of the
/// other labelled fit tokens (from per-label sums and counts).
fn diffmean_directions(class_sums: &[Vec<f64>], counts: &[u64], classes: &[u16]) -> Vec<Vec<f32>> {
    let d = class_sums.first().map_or(0, Vec::len);
    let total: Vec<f64> = (0..d)
        .map(|i| class_sums.iter().map(|s| s[i]).sum())
        .collect();
    let n: u64 = counts.iter().sum();
    classes
        .iter()
        .map(|&c| {
            let c = c as usize;
            let (n_pos, n_neg) = (counts[c] as f64, (n - counts[c]) as f64);
            (0..d)
                .map(|i| (class_sums[c][i] / n_pos - (total[i] - class_sums[c][i]) / n_neg) as f32)
                .collect()
        })
        .collect()
}

/// With `versus`: the labels that take part (the classes and `versus`); `None` for all of them.
fn versus_labels(
    p: &LabelParams,
    table: &TokenTable,
    classes: &[u16],
) -> anyhow::Result<Option<Vec<u16>>> {
    if p.versus.is_empty() {
        return Ok(None);
    }
    if p.classes.is_empty() {
        bail!("`versus` needs `classes`: the labels compared with the `versus` ones");
    }
    let mut labels = classes.to_vec();
    for v in &p.versus {
        let i = table.labels.iter().position(|l| l == v).with_context(|| {
            format!(
                "`versus` label `{v}` is not a label of capture `{}` (its labels: {})",
                p.input,
                table.labels.join(", ")
            )
        })? as u16;
        if classes.contains(&i) {
            bail!("`{v}` is in both `classes` and `versus`");
        }
        labels.push(i);
    }
    Ok(Some(labels))
}

fn split_of(p: &LabelParams, table: &TokenTable, name: &str) -> anyhow::Result<u8> {
    table.split_index(name).with_context(|| {
        format!(
            "capture `{}` has no split `{name}` (its splits: {})",
            p.input,
            table.splits.join(", ")
        )
    })
}

/// Held-out AUROC of linear scorers (direction, bias), one per tested class in order and then again
/// (the DiffMean directions, then the logistic probes): every labelled token of the test split is scored.
fn score_test(
    store: &ActivationStore,
    device: &candle_core::Device,
    tokens: &TokenInfo,
    (split, split_name): (u8, &str),
    classes: &[u16],
    scorers: &[(Vec<f32>, f64)],
    batch_size: usize,
) -> anyhow::Result<Vec<TwoSample>> {
    let mut scores: Vec<Vec<f32>> = vec![Vec::new(); scorers.len()];
    let mut class = Vec::new();
    let options = ReadOptions {
        batch_size,
        splits: Some(vec![split_name.to_string()]),
        ..ReadOptions::default()
    };
    for batch in store.batches(&options, device)? {
        let batch = batch?;
        let acts = batch.acts.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        for (row, x) in batch.rows.iter().zip(&acts) {
            let r = *row as usize;
            let Some(c) = tokens.class[r] else { continue };
            if tokens.split[r] != split {
                continue;
            }
            class.push(c);
            for (s, (dir, bias)) in scores.iter_mut().zip(scorers) {
                s.push((saeflow_core::sae::step::dot(x, dir) as f64 + bias) as f32);
            }
        }
    }
    Ok(scores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let c = classes[i % classes.len()];
            let positive: Vec<bool> = class.iter().map(|&k| k == c).collect();
            TwoSample::dense(s, &positive)
        })
        .collect())
}

/// Raw activations of a sample of token rows (sorted) and their classes.
#[derive(Debug, Default)]
struct Sample {
    rows: Vec<usize>,
    class: Vec<u16>,
    /// `rows.len() × d`.
    x: Vec<f32>,
}

/// Up to `n` of `rows`, chosen uniformly with the seeded generator.
fn sample_rows(rng: &mut ChaCha8Rng, rows: &[usize], n: usize) -> Vec<usize> {
    sample(rng, rows.len(), n.min(rows.len()))
        .into_iter()
        .map(|i| rows[i])
        .collect()
}

/// The regularisation strengths (sklearn's C) tried; the one with the best validation AUROC is kept.
const C_GRID: [f64; 7] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0];

/// A logistic probe on raw activations, as a direction and bias in activation space.
#[derive(Debug, Clone)]
struct Probe {
    direction: Vec<f32>,
    bias: f64,
    c: f64,
    val_auroc: f64,
}

/// Fits class `c` against the rest on standardised activations (per-dimension mean and deviation of the
/// fit sample, as a StandardScaler pipeline would), choosing C on the validation sample; returns it mapped
/// back to raw activations.
fn fit_dense_probe(fit: &Sample, val: &Sample, c: u16, d: usize) -> Probe {
    let n = fit.rows.len().max(1) as f64;
    let mean: Vec<f64> = (0..d)
        .map(|j| fit.x.chunks(d).map(|x| x[j] as f64).sum::<f64>() / n)
        .collect();
    let scale: Vec<f64> = (0..d)
        .map(|j| {
            let var = fit
                .x
                .chunks(d)
                .map(|x| (x[j] as f64 - mean[j]).powi(2))
                .sum::<f64>()
                / n;
            if var > 0.0 {
                var.sqrt()
            } else {
                1.0
            }
        })
        .collect();
    let standard = |x: &[f32]| -> Vec<f32> {
        x.chunks(d)
            .flat_map(|row| (0..d).map(|j| ((row[j] as f64 - mean[j]) / scale[j]) as f32))
            .collect()
    };
    let (xf, xv) = (standard(&fit.x), standard(&val.x));
    let yf: Vec<bool> = fit.class.iter().map(|&k| k == c).collect();
    let yv: Vec<bool> = val.class.iter().map(|&k| k == c).collect();
    let (model, c_best, val_auroc) = best_over_c(&xf, &yf, &xv, &yv, d);
    let direction: Vec<f32> = (0..d)
        .map(|j| (model.weights[j] / scale[j]) as f32)
        .collect();
    let bias = model.bias
        - (0..d)
            .map(|j| model.weights[j] * mean[j] / scale[j])
            .sum::<f64>();
    Probe {
        direction,
        bias,
        c: c_best,
        val_auroc,
    }
}

/// Fits every C of the grid; keeps the best validation AUROC (ties: the smaller C).
fn best_over_c(
    xf: &[f32],
    yf: &[bool],
    xv: &[f32],
    yv: &[bool],
    d: usize,
) -> (saeflow_core::stats::logistic::Logistic, f64, f64) {
    let mut best: Option<(saeflow_core::stats::logistic::Logistic, f64, f64)> = None;
    for c in C_GRID {
        let model = saeflow_core::stats::logistic::fit(xf, yf, d, c);
        let scores: Vec<f32> = xv.chunks(d).map(|x| model.score(x) as f32).collect();
        let auroc = TwoSample::dense(&scores, yv).auroc;
        if best.as_ref().is_none_or(|b| auroc > b.2) {
            best = Some((model, c, auroc));
        }
    }
    best.expect("a non-empty grid")
}

/// A logistic probe on k SAE latents (SAEBench's sparse probing): the k latents with the largest
/// |mean activation difference| between the class and the rest on the fit split.
#[derive(Debug, Clone)]
struct SparseProbe {
    class: u16,
    /// Index of the class among the tested ones.
    position: usize,
    k: usize,
    features: Vec<u32>,
    c: f64,
    test: TwoSample,
}

/// Sparse probes for k = 1, 2, 5, 10, 20 and every tested class, scored on the test split from the codes.
fn sparse_probes(
    codes: &Codes,
    tokens: &TokenInfo,
    fit_stats: &[FeatureClass],
    fit: &Sample,
    val: &Sample,
    test: u8,
    classes: &[u16],
) -> Vec<SparseProbe> {
    let test_rows: Vec<usize> = (0..tokens.class.len())
        .filter(|&r| tokens.class[r].is_some() && tokens.split[r] == test)
        .collect();
    // The code of feature f on a row (0 when it did not fire): columns are sorted by row.
    let code = |f: u32, r: usize| {
        let column = &codes.columns[f as usize];
        column
            .binary_search_by_key(&(r as u32), |e| e.0)
            .map_or(0.0, |i| column[i].1)
    };
    let dense = |features: &[u32], rows: &[usize]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&r| features.iter().map(move |&f| code(f, r)))
            .collect()
    };
    let mut out = Vec::new();
    for (position, &c) in classes.iter().enumerate() {
        let mut ranked: Vec<&FeatureClass> = fit_stats.iter().filter(|s| s.class == c).collect();
        ranked.sort_by(|a, b| {
            (b.mean_pos - b.mean_neg)
                .abs()
                .total_cmp(&(a.mean_pos - a.mean_neg).abs())
                .then(a.feature.cmp(&b.feature))
        });
        for k in [1usize, 2, 5, 10, 20] {
            if k > ranked.len() {
                break;
            }
            let features: Vec<u32> = ranked[..k].iter().map(|s| s.feature).collect();
            let y = |sample: &Sample| sample.class.iter().map(|&x| x == c).collect::<Vec<_>>();
            let (model, c_best, _) = best_over_c(
                &dense(&features, &fit.rows),
                &y(fit),
                &dense(&features, &val.rows),
                &y(val),
                k,
            );
            let xt = dense(&features, &test_rows);
            let scores: Vec<f32> = xt.chunks(k).map(|x| model.score(x) as f32).collect();
            let positive: Vec<bool> = test_rows
                .iter()
                .map(|&r| tokens.class[r] == Some(c))
                .collect();
            out.push(SparseProbe {
                class: c,
                position,
                k,
                features,
                c: c_best,
                test: TwoSample::dense(&scores, &positive),
            });
        }
    }
    out
}

fn features_batch(
    names: &[&str],
    fit: &[FeatureClass],
    test: &[FeatureClass],
    q: &[f64],
    labelled: &[bool],
) -> anyhow::Result<RecordBatch> {
    let mut feature = UInt32Builder::new();
    let mut class = StringBuilder::new();
    let mut flag = BooleanBuilder::new();
    let mut counts: [UInt64Builder; 4] = Default::default();
    let mut floats: Vec<Float64Builder> = (0..FLOAT_COLUMNS.len())
        .map(|_| Float64Builder::new())
        .collect();
    for (i, (s, t)) in fit.iter().zip(test).enumerate() {
        feature.append_value(s.feature);
        class.append_value(names[s.class as usize]);
        flag.append_value(labelled[i]);
        for (b, v) in
            counts
                .iter_mut()
                .zip([s.token.n_pos, s.token.n_neg, t.token.n_pos, t.token.n_neg])
        {
            b.append_value(v);
        }
        let values = [
            s.fire_pos,
            s.fire_neg,
            s.mean_pos,
            s.mean_neg,
            s.active_mean_pos,
            s.active_mean_neg,
            s.token.auroc,
            s.doc_max.auroc,
            s.doc_mean.auroc,
            s.token.p,
            s.doc_max.p,
            s.doc_mean.p,
            q[i],
            t.token.auroc,
            t.doc_max.auroc,
            t.doc_mean.auroc,
            t.token.p,
        ];
        for (b, v) in floats.iter_mut().zip(values) {
            b.append_value(v);
        }
    }
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("feature", Arc::new(feature.finish())),
        ("class", Arc::new(class.finish())),
        ("labelled", Arc::new(flag.finish())),
    ];
    for (name, mut b) in ["n_pos", "n_neg", "test_n_pos", "test_n_neg"]
        .into_iter()
        .zip(counts)
    {
        columns.push((name, Arc::new(b.finish())));
    }
    for (name, mut b) in FLOAT_COLUMNS.iter().zip(floats) {
        columns.push((name, Arc::new(b.finish())));
    }
    Ok(RecordBatch::try_from_iter(columns)?)
}

/// The f64 columns of `features.parquet`, in order (`schemas/label.md`).
const FLOAT_COLUMNS: [&str; 17] = [
    "fire_rate",
    "fire_rate_rest",
    "mean",
    "mean_rest",
    "mean_active",
    "mean_active_rest",
    "auroc",
    "auroc_doc_max",
    "auroc_doc_mean",
    "p",
    "p_doc_max",
    "p_doc_mean",
    "q",
    "test_auroc",
    "test_auroc_doc_max",
    "test_auroc_doc_mean",
    "test_p",
];

/// Top and random active contexts of every labelled (feature, class): the token, its document, its
/// activation, and up to `window` tokens of the same document on each side (all splits).
fn contexts_batch(
    p: &LabelParams,
    seed: u64,
    names: &[&str],
    codes: &Codes,
    table: &TokenTable,
    chosen: &[(u32, u16)],
) -> anyhow::Result<RecordBatch> {
    let mut feature = UInt32Builder::new();
    let mut class = StringBuilder::new();
    let mut kind = StringBuilder::new();
    let mut rank = UInt32Builder::new();
    let mut row_b = UInt64Builder::new();
    let mut doc = UInt64Builder::new();
    let mut activation = Float64Builder::new();
    let mut window = ListBuilder::new(UInt32Builder::new());
    let mut marked = UInt32Builder::new();
    for &(f, c) in chosen {
        let column = &codes.columns[f as usize];
        let mut order: Vec<usize> = (0..column.len()).collect();
        order.sort_by(|&a, &b| column[b].1.total_cmp(&column[a].1).then(a.cmp(&b)));
        let top = order.iter().take(p.top_contexts).copied();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((f as u64) << 16 | c as u64));
        let random = sample(&mut rng, column.len(), p.random_contexts.min(column.len())).into_vec();
        // Tokens the feature is silent on, for judging explanations by detection (delphi-style). The
        // column is in row order; a few rejected draws at most, as features fire on a small share of rows.
        let rows = table.doc_id.len();
        let mut negatives: Vec<(u32, f32)> = Vec::new();
        for _ in 0..100 * p.random_contexts.max(1) {
            if negatives.len() >= p.random_contexts.min(rows - column.len()) {
                break;
            }
            let r = rng.random_range(0..rows) as u32;
            if column.binary_search_by_key(&r, |e| e.0).is_err()
                && !negatives.iter().any(|e| e.0 == r)
            {
                negatives.push((r, 0.0));
            }
        }
        let at = |picks: Vec<usize>| picks.into_iter().map(|e| column[e]).collect::<Vec<_>>();
        for (label, picks) in [
            ("top", at(top.collect())),
            ("random", at(random)),
            ("negative", negatives),
        ] {
            for (r, (row, v)) in picks.into_iter().enumerate() {
                let row = row as usize;
                let same_doc = |i: usize| table.doc_id[i] == table.doc_id[row];
                let mut start = row;
                while start > 0 && row - start < p.window && same_doc(start - 1) {
                    start -= 1;
                }
                let mut end = row + 1;
                while end < table.doc_id.len() && end - row <= p.window && same_doc(end) {
                    end += 1;
                }
                feature.append_value(f);
                class.append_value(names[c as usize]);
                kind.append_value(label);
                rank.append_value(r as u32);
                row_b.append_value(row as u64);
                doc.append_value(table.doc_id[row]);
                activation.append_value(v as f64);
                window.values().append_slice(&table.token_id[start..end]);
                window.append(true);
                marked.append_value((row - start) as u32);
            }
        }
    }
    Ok(RecordBatch::try_from_iter([
        ("feature", Arc::new(feature.finish()) as ArrayRef),
        ("class", Arc::new(class.finish())),
        ("kind", Arc::new(kind.finish())),
        ("rank", Arc::new(rank.finish())),
        ("row", Arc::new(row_b.finish())),
        ("doc_id", Arc::new(doc.finish())),
        ("activation", Arc::new(activation.finish())),
        ("token_ids", Arc::new(window.finish())),
        ("marked", Arc::new(marked.finish())),
    ])?)
}

fn probes_batch(
    names: &[&str],
    diffmean: &[TwoSample],
    logistic: &[Probe],
    logistic_test: &[TwoSample],
    sparse: &[SparseProbe],
) -> anyhow::Result<RecordBatch> {
    let mut class = StringBuilder::new();
    let mut method = StringBuilder::new();
    let mut k = UInt32Builder::new();
    let mut c = Float64Builder::new();
    let mut features = ListBuilder::new(UInt32Builder::new());
    let mut val_auroc = Float64Builder::new();
    let mut auroc = Float64Builder::new();
    let mut p = Float64Builder::new();
    for (i, name) in names.iter().enumerate() {
        for (m, t, probe) in [
            ("diffmean", &diffmean[i], None),
            ("logistic", &logistic_test[i], Some(&logistic[i])),
        ] {
            class.append_value(name);
            method.append_value(m);
            k.append_null();
            c.append_option(probe.map(|pr| pr.c));
            features.append_null();
            val_auroc.append_option(probe.map(|pr| pr.val_auroc));
            auroc.append_value(t.auroc);
            p.append_value(t.p);
        }
    }
    for s in sparse {
        class.append_value(names[s.position]);
        method.append_value("sparse_logistic");
        k.append_value(s.k as u32);
        c.append_value(s.c);
        features.values().append_slice(&s.features);
        features.append(true);
        val_auroc.append_null();
        auroc.append_value(s.test.auroc);
        p.append_value(s.test.p);
    }
    Ok(RecordBatch::try_from_iter([
        ("class", Arc::new(class.finish()) as ArrayRef),
        ("method", Arc::new(method.finish())),
        ("k", Arc::new(k.finish())),
        ("c", Arc::new(c.finish())),
        ("features", Arc::new(features.finish())),
        ("val_auroc", Arc::new(val_auroc.finish())),
        ("test_auroc", Arc::new(auroc.finish())),
        ("test_p", Arc::new(p.finish())),
    ])?)
}
