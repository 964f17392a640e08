//! `label`: which SAE features (and linear readouts) detect which class of a labelled capture, with real
//! statistics.
//!
//! Every method is measured on one unit of analysis: each labelled document's pooled positions
//! (`positions`: by default its completion tokens, or all of a standalone statement) become one unit per
//! document (`pool = "mean" | "max" | "last"`) or one per position (`"token"`). One pass over the capture
//! pools the raw activations per unit and, with an SAE, encodes every token (kept sparse, feature by
//! feature). On the fit split every feature is tested against every class (one-vs-rest): a Mann–Whitney
//! rank test on the units, Benjamini–Hochberg over all features × classes, and a feature is labelled with a
//! class only when q < `alpha` and |AUROC − 0.5| > `min_effect`. Everything chosen (the best feature, C,
//! the sparse probes' latents) is chosen on fit and validation units, and every method — the best feature,
//! k-sparse probes, DiffMean, a logistic probe — is reported on test units with 95% intervals beside the
//! baselines (source-only, lexical, shuffled labels). Without `sae` the stage is a probe-only readout.
//! Outputs are documented in `schemas/label.md`.
//!
//! Here: the parameters and the run; `classes` picks and checks what is compared, `positions` which
//! stored positions are pooled, `documents` the units and every method on them, `tables` the feature
//! tables. The statistics are in `saeflow_core::stats`.

mod classes;
mod documents;
mod positions;
mod tables;

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::shared::{CaptureHook, SaeOnCapture};
use classes::{check_splits, choose_classes, source_selection, split_of, versus_labels};
use documents::{evaluate, evaluation_batch, transfer_matrix, Evaluated, Setting, Units};
use positions::{check_pooled, pooled_rows, shuffle_document_labels};
pub use positions::{Over, Statements};
use saeflow_core::cancel::Cancelled;
use saeflow_core::data::activations::{ReadOptions, TokenTable};
use saeflow_core::stats::benjamini_hochberg;
use saeflow_core::stats::features::{feature_classes, Codes, FeatureClass, TokenInfo};
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};
use tables::{contexts_batch, features_batch};

/// How a document's pooled positions become units of analysis — the same unit for every method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// One unit per document: the mean over its pooled positions (labels belong to documents, and a
    /// document's tokens are not independent samples).
    #[default]
    Mean,
    /// One unit per document: the element-wise maximum over its pooled positions (more sensitive to
    /// one firing token; grows with length).
    Max,
    /// One unit per document: its last pooled position (a statement's last token, Marks & Tegmark).
    Last,
    /// One unit per pooled position. Intervals still resample whole documents (and pairs); a rank test
    /// over tokens treats them as independent and overstates significance.
    Token,
}

impl Pool {
    /// The feature statistics of `s` in this unit.
    pub fn of(self, s: &FeatureClass) -> saeflow_core::stats::TwoSample {
        match self {
            Pool::Mean => s.doc_mean,
            Pool::Max => s.doc_max,
            Pool::Last => s.doc_last,
            Pool::Token => s.token,
        }
    }

    /// The suffix of this unit's columns in `features.parquet` (`""` for tokens).
    pub fn column_suffix(self) -> &'static str {
        match self {
            Pool::Mean => "_doc_mean",
            Pool::Max => "_doc_max",
            Pool::Last => "_doc_last",
            Pool::Token => "",
        }
    }
}

/// The feature reported as `class`'s best: among those labelled with it and detecting it (validation
/// AUROC above 0.5), the one with the highest *validation* AUROC in `pool` (ties: the lower feature).
/// Chosen on validation so that its test AUROC is an unbiased estimate, like the baselines' (choosing by
/// test AUROC would pick the luckiest of many features). Returns an index into the stats.
fn best_on_val(
    fit: &[FeatureClass],
    val: &[FeatureClass],
    labelled: &[bool],
    class: u16,
    pool: Pool,
) -> Option<usize> {
    (0..fit.len())
        .filter(|&i| labelled[i] && fit[i].class == class && pool.of(&val[i]).auroc > 0.5)
        .max_by(|&a, &b| {
            pool.of(&val[a])
                .auroc
                .total_cmp(&pool.of(&val[b]).auroc)
                .then(val[b].feature.cmp(&val[a].feature))
        })
}

/// Parameters of a `label` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelParams {
    /// The stage whose output is the SAE (a `train` stage). Without it, the stage measures the linear
    /// readouts and baselines alone (a probe-only path: no features are tested).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sae: Option<String>,
    /// The `capture` stage whose tokens carry labels.
    pub input: String,
    /// Hook to read (default: the SAE's `hook_name` when the capture has it, else the capture's only hook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Split everything is fitted on.
    #[serde(default = "default_fit")]
    pub fit_split: String,
    /// Held-out split every method is reported on.
    #[serde(default = "default_test")]
    pub test_split: String,
    /// Split what is chosen (the best feature, the probes' regularisation) is chosen on.
    #[serde(default = "default_val")]
    pub val_split: String,
    /// Which stored positions of each document are pooled.
    #[serde(default)]
    pub positions: Over,
    /// Leave out the first this many completion tokens of each document (Apollo-style detectors skip the
    /// opening of a response, which echoes the prompt).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skip_completion: u32,
    /// With `positions = "auto"`: which positions of a standalone statement (a document without a
    /// completion) are pooled, so one capture can hold QA sources (their completions) and statement sources
    /// (their last token).
    #[serde(default, skip_serializing_if = "Statements::is_all")]
    pub statements: Statements,
    /// The unit of analysis, the same for every method.
    #[serde(default)]
    pub pool: Pool,
    /// False discovery rate (Benjamini–Hochberg) of the labels.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Smallest |AUROC − 0.5| (of `pool`, fit split) a labelled feature must show.
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
    /// A neutral control source: its test units set each method's threshold at 1% false positives, and
    /// `recall_at_1pct_fpr` is the share of the class's test units above it (Goldowsky-Dill et al. 2025).
    /// Its documents need a label that takes part (all `honest`, say); leave it out of `train_sources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_source: Option<String>,
    /// A negative control: every document's label shuffled among the documents of its (source, split)
    /// before anything is measured. Labels should then be at most `alpha` × tests and AUROCs near 0.5.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shuffle_labels: bool,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
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
    // 5: one unit for every method (`pool`, `positions`, `skip_completion`); k-sparse probes and the
    // directions fitted on units (probes.parquet and per-token probes gone); `sae` optional;
    // `control_source`, `shuffle_labels`; doc_last columns.
    const VERSION: u32 = 5;
    const ABOUT: &'static str =
        "Label SAE features with the classes they detect, beside linear probes and baselines, on one unit with 95% intervals";

    fn references(p: &LabelParams) -> References {
        let mut inputs = vec![Reference {
            role: "input".into(),
            target: p.input.clone(),
            at: key_path(&["input"]),
        }];
        if let Some(sae) = &p.sae {
            inputs.insert(
                0,
                Reference {
                    role: "sae".into(),
                    target: sae.clone(),
                    at: key_path(&["sae"]),
                },
            );
        }
        References {
            inputs,
            ..References::default()
        }
    }

    fn validate(p: &LabelParams) -> Result<(), ParamError> {
        let error = |key: &str, message: String| {
            Err(ParamError {
                at: key_path(&[key]),
                message,
            })
        };
        if !(p.alpha > 0.0 && p.alpha < 1.0) {
            return error("alpha", "`alpha` must be between 0 and 1".into());
        }
        if !(0.0..0.5).contains(&p.min_effect) {
            return error(
                "min_effect",
                "`min_effect` must be in [0, 0.5): a bound on |AUROC − 0.5|".into(),
            );
        }
        if p.fit_split == p.test_split {
            return error(
                "test_split",
                format!(
                    "`test_split` must differ from `fit_split` (both `{}`)",
                    p.fit_split
                ),
            );
        }
        if p.val_split == p.fit_split || p.val_split == p.test_split {
            return error(
                "val_split",
                "`val_split` must differ from `fit_split` and `test_split`".into(),
            );
        }
        if p.resamples < 100 {
            return error(
                "resamples",
                "`resamples` must be at least 100 for a 95% interval to mean anything".into(),
            );
        }
        if p.batch_size == 0 {
            return error("batch_size", "`batch_size` must be at least 1".into());
        }
        if p.skip_completion > 0 && p.positions == Over::All {
            return error(
                "skip_completion",
                "`skip_completion` needs `positions = \"auto\"` or `\"completion\"`: with \"all\" \
                 every stored token is pooled"
                    .into(),
            );
        }
        if p.statements != Statements::All && p.positions != Over::Auto {
            return error(
                "statements",
                "`statements` applies to `positions = \"auto\"` (the rule for documents without a completion)"
                    .into(),
            );
        }
        if let (Some(c), false) = (&p.control_source, p.train_sources.is_empty()) {
            if p.train_sources.contains(c) {
                return error(
                    "control_source",
                    format!("the control source `{c}` is also in `train_sources`: a neutral control set \
                             must not be fitted on"),
                );
            }
        }
        Ok(())
    }

    fn run(p: &LabelParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        let (
            sae,
            CaptureHook {
                info,
                hook,
                store,
                device,
            },
        ) = match &p.sae {
            Some(sae_stage) => {
                let o = SaeOnCapture::open(ctx, sae_stage, &p.input, p.hook.as_deref())?;
                let capture = CaptureHook {
                    info: o.info,
                    hook: o.hook,
                    store: o.store,
                    device: o.device,
                };
                (Some(o.sae), capture)
            }
            None => (
                None,
                CaptureHook::open(ctx, &p.input, p.hook.as_deref(), None)?,
            ),
        };
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
        let control = match &p.control_source {
            Some(name) => Some(
                table
                    .sources
                    .iter()
                    .position(|s| s == name)
                    .map(|i| i as u16)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "`control_source`: `{name}` is not a source of capture `{}` (its sources: {})",
                            p.input,
                            table.sources.join(", ")
                        )
                    })?,
            ),
            None => None,
        };
        let source_takes_part = |r: usize| {
            let chosen = if table.split[r] == test {
                &test_sources
            } else {
                &train_sources
            };
            chosen.as_ref().is_none_or(|c| c.contains(&table.source[r]))
        };
        let mut class: Vec<Option<u16>> = table
            .label
            .iter()
            .enumerate()
            .map(|(r, l)| {
                l.filter(|l| taking_part.as_ref().is_none_or(|t| t.contains(l)))
                    .filter(|_| source_takes_part(r))
            })
            .collect();
        if p.shuffle_labels {
            shuffle_document_labels(&table, &mut class, ctx.seed);
        }
        // Only the pooled positions carry a class into the statistics.
        let pooled = pooled_rows(&table, p.positions, p.skip_completion, p.statements);
        check_pooled(&table, &class, &pooled, (p.positions, p.skip_completion))
            .map_err(|e| anyhow::anyhow!("capture `{}`: {e}", p.input))?;
        let tokens = TokenInfo {
            class: class
                .iter()
                .zip(&pooled)
                .map(|(c, &on)| c.filter(|_| on))
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
        let d = store.d_model();
        let mut units = Units::new(&table, &tokens, d, p.pool);
        if p.test_sources.is_empty() {
            units.check_sources(&table.sources, (fit, &p.fit_split), (test, &p.test_split))?;
        }
        let class_names = classes
            .iter()
            .map(|&c| names[c as usize])
            .collect::<Vec<_>>()
            .join(", ");
        ctx.log(&format!(
            "{} {class_names} on {hook} of `{}`: {} units (pool = {}, positions = {}), {} tokens stored{}",
            match &sae {
                Some(s) => format!("labelling {} features of `{}` against", s.d_sae(), p.sae.as_deref().unwrap_or("")),
                None => "probing (no SAE)".to_string(),
            },
            p.input,
            units.len(),
            json!(p.pool),
            json!(p.positions),
            store.rows(),
            if p.shuffle_labels { " — labels shuffled within source and split (a null)" } else { "" }
        ));

        // One pass: the units' pooled activations, and the sparse codes of every token.
        let mut codes = sae.as_ref().map(|s| Codes::new(s.d_sae()));
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
            if let (Some(sae), Some(codes)) = (&sae, &mut codes) {
                let encoded = sae
                    .encode(&batch.acts)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?;
                codes.push(&encoded.to_vec1::<f32>()?)?;
            }
            let acts = batch.acts.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            for (row, x) in batch.rows.iter().zip(&acts) {
                units.add(*row as usize, x);
            }
            ctx.progress.inc(batch.rows.len() as u64);
        }
        units.finish();

        let out = ctx.out_dir.clone();
        let features = codes
            .as_ref()
            .map(|codes| {
                let splits = (fit, val, test);
                test_features(
                    p, ctx.seed, codes, &tokens, &table, &names, &classes, splits, &out,
                )
            })
            .transpose()?;

        // Every method on one unit, with intervals and baselines.
        ctx.log("scoring every method on the test units, with baselines and 95% intervals");
        let bests: Vec<(u16, Option<u32>)> = classes
            .iter()
            .map(|&c| {
                (
                    c,
                    features
                        .as_ref()
                        .and_then(|f| f.best(c, p.pool))
                        .map(|b| b.0.feature),
                )
            })
            .collect();
        let setting = Setting {
            names: &names,
            sources: &table.sources,
            splits: (fit, val, test),
            resamples: p.resamples,
            seed: ctx.seed,
            control,
        };
        let (mut evaluated, fitted) = evaluate(&units, codes.as_ref(), &bests, &setting);
        if p.source_matrix {
            ctx.log("fitting DiffMean and the logistic probe on each source alone (source_matrix)");
            evaluated.extend(transfer_matrix(&units, &classes, &setting));
        }
        saeflow_core::data::parquet::write_batches(
            &out.join("evaluation.parquet"),
            &[evaluation_batch(&evaluated)?],
        )?;
        let cpu = candle_core::Device::Cpu;
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for f in &fitted {
            let name = names[f.class as usize];
            tensors.insert(
                format!("diffmean.{name}"),
                Tensor::new(f.diffmean.as_slice(), &cpu)?,
            );
            tensors.insert(
                format!("logistic.{name}"),
                Tensor::new(f.logistic.direction.as_slice(), &cpu)?,
            );
            tensors.insert(
                format!("logistic_bias.{name}"),
                Tensor::new(&[f.logistic.bias as f32], &cpu)?,
            );
        }
        candle_core::safetensors::save(
            &tensors.into_iter().collect(),
            out.join("directions.safetensors"),
        )?;

        // Summary: per class, the labelled features, the best of them, and every method's pooled row.
        let mut summary = serde_json::Map::new();
        for f in &fitted {
            let name = names[f.class as usize];
            let pooled_rows: Vec<&Evaluated> = evaluated
                .iter()
                .filter(|e| e.class == name && e.scope == "pooled")
                .collect();
            let mut entry = json!({
                "logistic_c": f.logistic.c,
                "sparse_probes": f.sparse.iter().map(|(k, latents, c)| json!({"k": k, "latents": latents, "c": c})).collect::<Vec<_>>(),
                "test_units": pooled_rows.first().map(|e| e.n_pos + e.n_neg),
                "documents": pooled_rows
                    .iter()
                    .map(|e| (e.method.clone(), json!({
                        "auroc": e.interval.map(|i| i.estimate),
                        "low": e.interval.map(|i| i.low),
                        "high": e.interval.map(|i| i.high),
                        "within_pair": e.within_pair,
                        "recall_at_1pct_fpr": e.recall_at_1pct_fpr,
                        "n_pos": e.n_pos,
                        "n_neg": e.n_neg,
                    })))
                    .collect::<serde_json::Map<_, _>>(),
            });
            if let Some(features) = &features {
                let best = features.best(f.class, p.pool);
                let count = features.labelled_count(f.class);
                entry["labelled_features"] = json!(count);
                entry["best_feature"] = json!(best.map(|(s, _, _)| s.feature));
                entry["best_feature_chosen_on"] = json!(&p.val_split);
                entry["best_feature_val_auroc"] = json!(best.map(|(_, v, _)| p.pool.of(v).auroc));
                entry["best_feature_test_auroc"] = json!(best.map(|(_, _, t)| p.pool.of(t).auroc));
            }
            summary.insert(name.to_string(), entry);
            let line: Vec<String> = pooled_rows
                .iter()
                .map(|e| match e.interval {
                    Some(i) => format!(
                        "{} {:.3} [{:.3}, {:.3}]",
                        e.method, i.estimate, i.low, i.high
                    ),
                    None => format!("{} –", e.method),
                })
                .collect();
            ctx.log(&format!(
                "{name}, per {} (test split, 95% intervals): {}",
                unit_word(p.pool),
                line.join("; ")
            ));
        }
        let labelled_total = features
            .as_ref()
            .map_or(0, |f| f.labelled.iter().filter(|&&l| l).count());
        std::fs::write(
            out.join("label.json"),
            serde_json::to_string_pretty(&json!({
                "sae": p.sae,
                "capture": p.input,
                "hook": hook,
                "d_sae": sae.as_ref().map(|s| s.d_sae()),
                "classes": classes.iter().map(|&c| names[c as usize]).collect::<Vec<_>>(),
                "versus": p.versus,
                "fit_split": p.fit_split,
                "val_split": p.val_split,
                "test_split": p.test_split,
                "alpha": p.alpha,
                "pool": p.pool,
                "positions": p.positions,
                "statements": p.statements,
                "skip_completion": p.skip_completion,
                "unit": unit_name(p.pool),
                "units": units.len(),
                "min_effect": p.min_effect,
                "shuffle_labels": p.shuffle_labels,
                "control_source": p.control_source,
                "tests": features.as_ref().map_or(0, |f| f.fit.len()),
                "labelled": labelled_total,
                "per_class": summary,
            }))?,
        )?;
        ctx.metrics.insert("labelled".into(), json!(labelled_total));
        Ok(())
    }
}

/// `label.json`'s `unit`: the suffix naming this pool's columns in `features.parquet`.
fn unit_name(pool: Pool) -> &'static str {
    match pool {
        Pool::Token => "token",
        other => other.column_suffix().trim_start_matches('_'),
    }
}

fn unit_word(pool: Pool) -> &'static str {
    if pool == Pool::Token {
        "token"
    } else {
        "document"
    }
}

/// The SAE features tested against the classes: statistics on each split, BH q-values and labels.
struct TestedFeatures {
    fit: Vec<FeatureClass>,
    val: Vec<FeatureClass>,
    test: Vec<FeatureClass>,
    labelled: Vec<bool>,
}

impl TestedFeatures {
    /// `class`'s best feature (chosen on validation): its fit, val and test statistics.
    fn best(
        &self,
        class: u16,
        pool: Pool,
    ) -> Option<(&FeatureClass, &FeatureClass, &FeatureClass)> {
        best_on_val(&self.fit, &self.val, &self.labelled, class, pool)
            .map(|b| (&self.fit[b], &self.val[b], &self.test[b]))
    }

    fn labelled_count(&self, class: u16) -> usize {
        self.fit
            .iter()
            .zip(&self.labelled)
            .filter(|(s, &l)| l && s.class == class)
            .count()
    }
}

/// Tests every feature against every chosen class on the fit split (rank test in the `pool` unit, BH,
/// `min_effect`), re-measures them on validation and test, and writes `features.parquet` and
/// `contexts.parquet`.
#[allow(clippy::too_many_arguments)]
fn test_features(
    p: &LabelParams,
    seed: u64,
    codes: &Codes,
    tokens: &TokenInfo,
    table: &TokenTable,
    names: &[&str],
    classes: &[u16],
    (fit, val, test): (u8, u8, u8),
    out: &std::path::Path,
) -> anyhow::Result<TestedFeatures> {
    let on = |split: u8| -> Vec<FeatureClass> {
        feature_classes(codes, tokens, split, names.len())
            .into_iter()
            .filter(|s| classes.contains(&s.class))
            .collect()
    };
    let (fit_stats, val_stats, test_stats) = (on(fit), on(val), on(test));
    let q = benjamini_hochberg(&fit_stats.iter().map(|s| p.pool.of(s).p).collect::<Vec<_>>());
    let labelled: Vec<bool> = fit_stats
        .iter()
        .zip(&q)
        .map(|(s, &q)| q < p.alpha && (p.pool.of(s).auroc - 0.5).abs() > p.min_effect)
        .collect();
    saeflow_core::data::parquet::write_batches(
        &out.join("features.parquet"),
        &[features_batch(
            names,
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
        &[contexts_batch(p, seed, names, codes, table, &chosen)?],
    )?;
    Ok(TestedFeatures {
        fit: fit_stats,
        val: val_stats,
        test: test_stats,
        labelled,
    })
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
            doc_last: t,
        }
    }

    #[test]
    fn a_feature_best_on_test_but_not_on_val_is_not_chosen() {
        let fit = [stat(0, 0.9), stat(1, 0.9), stat(2, 0.9), stat(3, 0.99)];
        let val = [stat(0, 0.80), stat(1, 0.70), stat(2, 0.40), stat(3, 0.95)];
        // Test AUROCs are not even an input. Feature 3 is the best on val but not labelled.
        let labelled = [true, true, true, false];
        assert_eq!(best_on_val(&fit, &val, &labelled, 0, Pool::Mean), Some(0));
        // Ties on val go to the lower feature; nothing above 0.5 on val means no best feature.
        let tied = [stat(0, 0.8), stat(1, 0.8), stat(2, 0.4), stat(3, 0.95)];
        assert_eq!(best_on_val(&fit, &tied, &labelled, 0, Pool::Mean), Some(0));
        let below = [stat(0, 0.5), stat(1, 0.3), stat(2, 0.4), stat(3, 0.95)];
        assert_eq!(best_on_val(&fit, &below, &labelled, 0, Pool::Mean), None);
        assert_eq!(best_on_val(&fit, &val, &labelled, 1, Pool::Mean), None);
    }
}
