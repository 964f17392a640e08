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
//!
//! Here: the parameters and the run; `classes` picks and checks what is compared, `directions` holds
//! the DiffMean baseline and held-out scoring, `tables` builds the Parquet tables. The probes are
//! statistics, in `saeflow_core::stats::probe`.

mod classes;
mod directions;
mod documents;
mod tables;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::shared::SaeOnCapture;
use classes::{check_splits, choose_classes, source_selection, split_of, versus_labels};
use directions::{diffmean_directions, score_test};
use documents::{evaluate, evaluation_batch, transfer_matrix, Docs, Setting};
use saeflow_core::cancel::Cancelled;
use saeflow_core::data::activations::{ReadOptions, TokenTable};
use saeflow_core::stats::benjamini_hochberg;
use saeflow_core::stats::features::{feature_classes, Codes, FeatureClass, TokenInfo};
use saeflow_core::stats::probe::{fit_dense_probe, sample_rows, sparse_probes, Probe, Sample};
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};
use tables::{contexts_batch, features_batch, probes_batch};

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

impl Unit {
    /// The statistics of `s` in this unit.
    pub fn of(self, s: &FeatureClass) -> saeflow_core::stats::TwoSample {
        match self {
            Unit::DocMean => s.doc_mean,
            Unit::DocMax => s.doc_max,
            Unit::Token => s.token,
        }
    }
}

/// The feature reported as `class`'s best: among those labelled with it and detecting it (validation
/// AUROC above 0.5), the one with the highest *validation* AUROC in `unit` (ties: the lower feature). Chosen
/// on validation so that its test AUROC is an unbiased estimate, like the baselines' (choosing by test
/// AUROC would pick the luckiest of many features). Returns an index into the stats.
fn best_on_val(
    fit: &[FeatureClass],
    val: &[FeatureClass],
    labelled: &[bool],
    class: u16,
    unit: Unit,
) -> Option<usize> {
    (0..fit.len())
        .filter(|&i| labelled[i] && fit[i].class == class && unit.of(&val[i]).auroc > 0.5)
        .max_by(|&a, &b| {
            unit.of(&val[a])
                .auroc
                .total_cmp(&unit.of(&val[b]).auroc)
                .then(val[b].feature.cmp(&val[a].feature))
        })
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
    /// Bootstrap resamples behind every 95% interval of `evaluation.parquet`.
    #[serde(default = "default_resamples")]
    pub resamples: usize,
    /// Sources whose documents everything is fitted and chosen on (fit and val splits; default: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub train_sources: Vec<String>,
    /// Sources whose documents everything is reported on (test split; default: all). With
    /// `train_sources`, this measures transfer to sources never seen in fitting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_sources: Vec<String>,
    /// Also fit DiffMean and the logistic probe on each source alone and score them on every source's test
    /// documents: a train-on-A/test-on-B matrix (`evaluation.parquet` scope `train:A/source:B`) over the
    /// sources taking part (all, unless `train_sources`/`test_sources` narrow them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_matrix: bool,
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
fn default_resamples() -> usize {
    1000
}

/// The `label` stage kind.
pub struct Label;

impl Stage for Label {
    type Params = LabelParams;
    const KIND: &'static str = "label";
    // 4: the best feature is chosen on the validation split (was: test); val AUROCs in features.parquet;
    // evaluation.parquet: every method per document, with intervals and baselines.
    const VERSION: u32 = 4;
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
        if p.resamples < 100 {
            return Err(ParamError {
                at: key_path(&["resamples"]),
                message: "`resamples` must be at least 100 for a 95% interval to mean anything"
                    .into(),
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
            info,
            hook,
            store,
            device,
        } = SaeOnCapture::open(ctx, &p.sae, &p.input, p.hook.as_deref())?;
        if info.settings["pack"] == json!(true) {
            anyhow::bail!(
                "capture `{}` packs documents (pack = true): each attends into the one before it, often of \
                 another label, so its tokens carry their neighbours' context and labels measured on them are \
                 confounded; label a capture with pack = false",
                p.input
            );
        }
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
        // With `train_sources`/`test_sources`, tokens of other sources take no part in their splits.
        let (train_sources, test_sources) = source_selection(p, &table)?;
        let source_takes_part = |r: usize| {
            let chosen = if table.split[r] == test {
                &test_sources
            } else {
                &train_sources
            };
            chosen.as_ref().is_none_or(|c| c.contains(&table.source[r]))
        };
        let tokens = TokenInfo {
            class: table
                .label
                .iter()
                .enumerate()
                .map(|(r, l)| {
                    l.filter(|l| taking_part.as_ref().is_none_or(|t| t.contains(l)))
                        .filter(|_| source_takes_part(r))
                })
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
        let mut docs = Docs::new(&table, &tokens, d);
        if p.test_sources.is_empty() {
            docs.check_sources(&table.sources, (fit, &p.fit_split), (test, &p.test_split))?;
        }
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
                docs.add(r, x);
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
        docs.finish();

        let chosen = |s: &FeatureClass| classes.contains(&s.class);
        let fit_stats: Vec<FeatureClass> = feature_classes(&codes, &tokens, fit, names.len())
            .into_iter()
            .filter(chosen)
            .collect();
        let val_stats: Vec<FeatureClass> = feature_classes(&codes, &tokens, val, names.len())
            .into_iter()
            .filter(chosen)
            .collect();
        let test_stats: Vec<FeatureClass> = feature_classes(&codes, &tokens, test, names.len())
            .into_iter()
            .filter(chosen)
            .collect();
        let tested = |s: &FeatureClass| p.unit.of(s);
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
                &val_stats,
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

        // Every method on one unit (documents), with intervals and baselines.
        ctx.log("scoring every method per document, with baselines and 95% intervals");
        let bests: Vec<(u16, Option<u32>)> = classes
            .iter()
            .map(|&c| {
                let best = best_on_val(&fit_stats, &val_stats, &labelled, c, p.unit);
                (c, best.map(|b| fit_stats[b].feature))
            })
            .collect();
        let setting = Setting {
            names: &names,
            sources: &table.sources,
            splits: (fit, val, test),
            resamples: p.resamples,
            seed: ctx.seed,
        };
        let mut evaluated = evaluate(&docs, &codes, &bests, &setting);
        if p.source_matrix {
            ctx.log("fitting DiffMean and the logistic probe on each source alone (source_matrix)");
            evaluated.extend(transfer_matrix(&docs, &classes, &setting));
        }
        saeflow_core::data::parquet::write_batches(
            &out.join("evaluation.parquet"),
            &[evaluation_batch(&evaluated)?],
        )?;

        // Summary: per class, how many features were labelled and the best of them on held-out data.
        let unit_name = serde_json::to_value(p.unit)?;
        let unit_name = unit_name.as_str().unwrap_or("unit");
        let mut summary = serde_json::Map::new();
        for (i, (&c, name)) in classes.iter().zip(&tested_names).enumerate() {
            let best = best_on_val(&fit_stats, &val_stats, &labelled, c, p.unit)
                .map(|b| ((&fit_stats[b], &test_stats[b]), &val_stats[b]));
            let c = c as usize;
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
                    "best_feature_chosen_on": &p.val_split,
                    "best_feature_val_auroc": best.map(|(_, v)| tested(v).auroc),
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
                    "documents": evaluated
                        .iter()
                        .filter(|e| e.class == *name && e.scope == "pooled")
                        .map(|e| (e.method.clone(), json!({
                            "auroc": e.interval.map(|i| i.estimate),
                            "low": e.interval.map(|i| i.low),
                            "high": e.interval.map(|i| i.high),
                            "within_pair": e.within_pair,
                            "n_pos": e.n_pos,
                            "n_neg": e.n_neg,
                        })))
                        .collect::<serde_json::Map<_, _>>(),
                }),
            );
            let pooled: Vec<String> = evaluated
                .iter()
                .filter(|e| e.class == *name && e.scope == "pooled")
                .map(|e| match e.interval {
                    Some(i) => format!(
                        "{} {:.3} [{:.3}, {:.3}]",
                        e.method, i.estimate, i.low, i.high
                    ),
                    None => format!("{} –", e.method),
                })
                .collect();
            ctx.log(&format!(
                "{name}, per document (test split, 95% intervals): {}",
                pooled.join("; ")
            ));
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
                "val_split": p.val_split,
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

#[cfg(test)]
mod tests {
    use super::*;
    use saeflow_core::stats::TwoSample;

    /// A (feature, class 0) row whose doc-mean AUROC is `auroc`.
    fn stat(feature: u32, auroc: f64) -> FeatureClass {
        let t = TwoSample {
            n_pos: 10,
            n_neg: 10,
            u: auroc * 100.0,
            auroc,
            p: 0.001,
        };
        FeatureClass {
            feature,
            class: 0,
            fire_pos: 0.0,
            fire_neg: 0.0,
            mean_pos: 0.0,
            mean_neg: 0.0,
            active_mean_pos: 0.0,
            active_mean_neg: 0.0,
            token: t,
            doc_max: t,
            doc_mean: t,
        }
    }

    #[test]
    fn a_feature_best_on_test_but_not_on_val_is_not_chosen() {
        let fit = [stat(0, 0.9), stat(1, 0.9), stat(2, 0.9), stat(3, 0.99)];
        let val = [stat(0, 0.80), stat(1, 0.70), stat(2, 0.40), stat(3, 0.95)];
        // Test AUROCs are not even an input. Feature 3 is the best on val but not labelled.
        let labelled = [true, true, true, false];
        assert_eq!(
            best_on_val(&fit, &val, &labelled, 0, Unit::DocMean),
            Some(0)
        );
        // Ties on val go to the lower feature; nothing above 0.5 on val means no best feature.
        let tied = [stat(0, 0.8), stat(1, 0.8), stat(2, 0.4), stat(3, 0.95)];
        assert_eq!(
            best_on_val(&fit, &tied, &labelled, 0, Unit::DocMean),
            Some(0)
        );
        let below = [stat(0, 0.5), stat(1, 0.3), stat(2, 0.4), stat(3, 0.95)];
        assert_eq!(best_on_val(&fit, &below, &labelled, 0, Unit::DocMean), None);
        assert_eq!(best_on_val(&fit, &val, &labelled, 1, Unit::DocMean), None);
    }
}
