//! `explain`: natural-language explanations of labelled features from an OpenAI-compatible chat endpoint,
//! each scored by detection (as EleutherAI's delphi does): given only the explanation, the LLM judges which
//! of a shuffled set of excerpts make the feature fire; half of them do (random active contexts), half do
//! not (tokens the feature is silent on). Opt-in: a pipeline without an `explain` stage never calls a
//! network service, and nothing else depends on it.
//!
//! The API key is read from an environment variable at run time and never enters the cache key, the
//! outputs or the logs. Replies are recorded in `transcript.jsonl`; an LLM's answers are not reproducible
//! bit for bit, so the stage's cache entry is what makes a rerun stable.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};
use arrow_array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt32Array};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use saeflow_core::cancel::Cancelled;
use saeflow_core::models::Tokenizer;
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};

/// Parameters of an `explain` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExplainParams {
    /// The `label` stage whose labelled features are explained.
    pub labels: String,
    /// The model the capture ran (a `[models.NAME]` entry), for its tokenizer: contexts are token ids.
    pub model: String,
    /// Base URL of an OpenAI-compatible API (`…/v1`); `/chat/completions` is appended.
    pub base_url: String,
    /// Chat model name sent to the endpoint.
    pub llm: String,
    /// Environment variable holding the API key (sent as a bearer token; none is sent when it is unset,
    /// as local servers need none).
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    /// Labelled (feature, class) pairs explained, the largest held-out effects first.
    #[serde(default = "default_features")]
    pub features: usize,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: f64,
    /// Reply length limit, in tokens.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
}

fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_features() -> usize {
    10
}
fn default_max_tokens() -> u32 {
    200
}

/// The `explain` stage kind.
pub struct Explain;

impl Stage for Explain {
    type Params = ExplainParams;
    const KIND: &'static str = "explain";
    // 2: pairs to explain are ranked by validation AUROC (was: test).
    const VERSION: u32 = 2;
    const ABOUT: &'static str =
        "Explain labelled features with an OpenAI-compatible LLM and score the explanations by detection";

    fn references(p: &ExplainParams) -> References {
        References {
            inputs: vec![Reference {
                role: "labels".into(),
                target: p.labels.clone(),
                at: key_path(&["labels"]),
            }],
            models: vec![Reference {
                role: String::new(),
                target: p.model.clone(),
                at: key_path(&["model"]),
            }],
            files: Vec::new(),
        }
    }

    fn validate(p: &ExplainParams) -> Result<(), ParamError> {
        if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
            return Err(ParamError {
                at: key_path(&["base_url"]),
                message: format!("`base_url` must be an http(s) URL, not `{}`", p.base_url),
            });
        }
        if p.features == 0 {
            return Err(ParamError {
                at: key_path(&["features"]),
                message: "`features` must be at least 1".into(),
            });
        }
        if !(0.0..=2.0).contains(&p.temperature) {
            return Err(ParamError {
                at: key_path(&["temperature"]),
                message: "`temperature` must be in [0, 2]".into(),
            });
        }
        Ok(())
    }

    fn run(p: &ExplainParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        run(p, ctx)
    }
}

/// One excerpt of a feature's contexts.
#[derive(Debug, Clone)]
struct Excerpt {
    kind: String,
    activation: f64,
    tokens: Vec<u32>,
    marked: usize,
}

/// A labelled pair to explain.
#[derive(Debug, Clone)]
struct Pair {
    feature: u32,
    class: String,
    /// What pairs are ranked by (never the test split they are reported on).
    val_auroc: f64,
    test_auroc: f64,
}

const EXPLAIN_SYSTEM: &str = "You are a meticulous AI researcher studying one feature of a sparse \
autoencoder trained on a language model's activations. You will see text excerpts on which the feature \
fires; in each, the token where it fires is marked <<like this>>, and its activation is given. Describe \
in one short phrase what the feature detects: the pattern shared by the marked tokens and their contexts. \
Reply with the phrase only.";

const DETECT_SYSTEM: &str = "You are an AI researcher checking an explanation of one feature of a sparse \
autoencoder trained on a language model's activations. You will see the explanation and numbered text \
excerpts. For each excerpt, decide whether the feature, as explained, fires on some token of it. Reply \
with a JSON array with one entry per excerpt, in order: 1 if it fires, 0 if not. Nothing else.";

fn run(p: &ExplainParams, ctx: &mut StageContext) -> anyhow::Result<()> {
    let dir = ctx.inputs["labels"].clone();
    let pairs = chosen_pairs(p, &dir)?;
    let contexts = read_contexts(&dir)?;
    let (model, _) = crate::shared::load_model(ctx, &p.model)?;
    let tokenizer = &model.tokenizer;
    let endpoint = crate::shared::ChatEndpoint::new(
        &p.base_url,
        &p.llm,
        &p.api_key_env,
        p.temperature,
        p.max_tokens,
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(note) = endpoint.key_note() {
        ctx.log(&note);
    }
    let url = &endpoint.url;
    ctx.log(&format!(
        "explaining {} labelled features of `{}` with `{}` at {url}",
        pairs.len(),
        p.labels,
        p.llm
    ));
    ctx.progress.set_total(pairs.len() as u64);
    let mut transcript = String::new();
    let mut rows = Vec::new();
    for pair in &pairs {
        if ctx.cancel.is_cancelled() {
            return Err(Cancelled.into());
        }
        let mine: Vec<&Excerpt> = contexts
            .iter()
            .filter(|(f, c, _)| *f == pair.feature && *c == pair.class)
            .map(|(_, _, x)| x)
            .collect();
        let of_kind = |kind: &str| {
            mine.iter()
                .filter(|x| x.kind == kind)
                .copied()
                .collect::<Vec<_>>()
        };
        let (top, positives, negatives) = (of_kind("top"), of_kind("random"), of_kind("negative"));
        if top.is_empty() || positives.is_empty() || negatives.is_empty() {
            bail!(
                "feature {} ({}) of `{}` lacks top, random or negative contexts: set top_contexts and \
                 random_contexts above 0 in the label stage",
                pair.feature,
                pair.class,
                p.labels
            );
        }
        let mut chat = |system: &str, user: String| -> anyhow::Result<String> {
            let reply = endpoint.complete(system, &user)?;
            transcript += &(json!({
                "feature": pair.feature, "class": pair.class, "system": system, "user": user, "reply": reply
            })
            .to_string()
                + "\n");
            Ok(reply)
        };

        let mut examples = String::from("Excerpts:\n");
        for (i, c) in top.iter().enumerate() {
            examples += &format!(
                "{}. (activation {:.3}) {}\n",
                i + 1,
                c.activation,
                render(tokenizer, c, true)?
            );
        }
        let explanation = chat(EXPLAIN_SYSTEM, examples)?
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string();

        // Positives and negatives, shuffled with a seed of the pair (so the prompt is the same on a rerun).
        let mut excerpts: Vec<(bool, &Excerpt)> = positives
            .iter()
            .map(|c| (true, *c))
            .chain(negatives.iter().map(|c| (false, *c)))
            .collect();
        let class_hash = blake3::hash(pair.class.as_bytes()).as_bytes()[..8]
            .iter()
            .fold(0u64, |h, &b| h << 8 | b as u64);
        excerpts.shuffle(&mut ChaCha8Rng::seed_from_u64(
            ctx.seed ^ class_hash ^ pair.feature as u64,
        ));
        let mut user = format!("Explanation: {explanation}\n\nExcerpts:\n");
        for (i, (_, c)) in excerpts.iter().enumerate() {
            user += &format!("{}. {}\n", i + 1, render(tokenizer, c, false)?);
        }
        let reply = chat(DETECT_SYSTEM, user)?;
        let truth: Vec<bool> = excerpts.iter().map(|e| e.0).collect();
        let (score, error) = match parse_judgements(&reply, truth.len()) {
            Ok(said) => (Some(Detection::score(&truth, &said)), None),
            Err(e) => {
                ctx.log(&format!(
                    "feature {} ({}): detection reply unusable: {e}",
                    pair.feature, pair.class
                ));
                (None, Some(e))
            }
        };
        rows.push((
            pair.clone(),
            explanation,
            score,
            error,
            positives.len(),
            negatives.len(),
        ));
        ctx.progress.inc(1);
    }

    let mean = write_outputs(p, ctx, &rows, &transcript)?;
    if let Some(mean) = mean {
        ctx.metrics
            .insert("mean_balanced_accuracy".into(), json!(mean));
        ctx.log(&format!(
            "{} explanations, mean detection balanced accuracy {mean:.3} ({} scored)",
            rows.len(),
            rows.iter().filter(|r| r.2.is_some()).count()
        ));
    }
    Ok(())
}

/// Labelled pairs of the label stage, largest |validation AUROC − 0.5| first (the AUROC of its `unit`).
fn chosen_pairs(p: &ExplainParams, dir: &Path) -> anyhow::Result<Vec<Pair>> {
    let summary = crate::artifacts::LabelSummary::read(dir, &p.labels)?;
    let mut pairs = Vec::new();
    for batch in saeflow_core::data::parquet::read_batches(&dir.join("features.parquet"))? {
        let feature = batch_column(&batch, "feature")?.as_primitive::<UInt32Type>();
        let class = batch_column(&batch, "class")?.as_string::<i32>();
        let labelled = batch_column(&batch, "labelled")?.as_boolean();
        let auroc = batch_column(&batch, &summary.test_auroc_column)?.as_primitive::<Float64Type>();
        let val = batch_column(&batch, &summary.val_auroc_column)?.as_primitive::<Float64Type>();
        for i in 0..batch.num_rows() {
            if labelled.value(i) {
                pairs.push(Pair {
                    feature: feature.value(i),
                    class: class.value(i).to_string(),
                    val_auroc: val.value(i),
                    test_auroc: auroc.value(i),
                });
            }
        }
    }
    pairs.sort_by(|a, b| {
        (b.val_auroc - 0.5)
            .abs()
            .total_cmp(&(a.val_auroc - 0.5).abs())
            .then(a.feature.cmp(&b.feature))
            .then(a.class.cmp(&b.class))
    });
    pairs.truncate(p.features);
    Ok(pairs)
}

fn batch_column<'a>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .with_context(|| format!("no `{name}` column"))
}

/// Every context of `contexts.parquet`, with its (feature, class).
fn read_contexts(dir: &Path) -> anyhow::Result<Vec<(u32, String, Excerpt)>> {
    let mut out = Vec::new();
    for batch in saeflow_core::data::parquet::read_batches(&dir.join("contexts.parquet"))? {
        let feature = batch_column(&batch, "feature")?.as_primitive::<UInt32Type>();
        let class = batch_column(&batch, "class")?.as_string::<i32>();
        let kind = batch_column(&batch, "kind")?.as_string::<i32>();
        let activation = batch_column(&batch, "activation")?.as_primitive::<Float64Type>();
        let tokens = batch_column(&batch, "token_ids")?.as_list::<i32>();
        let marked = batch_column(&batch, "marked")?.as_primitive::<UInt32Type>();
        for i in 0..batch.num_rows() {
            out.push((
                feature.value(i),
                class.value(i).to_string(),
                Excerpt {
                    kind: kind.value(i).to_string(),
                    activation: activation.value(i),
                    tokens: tokens
                        .value(i)
                        .as_primitive::<UInt32Type>()
                        .values()
                        .to_vec(),
                    marked: marked.value(i) as usize,
                },
            ));
        }
    }
    Ok(out)
}

/// An excerpt as text on one line, the marked token in `<<…>>` when `mark`.
fn render(tokenizer: &Tokenizer, c: &Excerpt, mark: bool) -> anyhow::Result<String> {
    let m = c.marked.min(c.tokens.len().saturating_sub(1));
    let text = if mark {
        format!(
            "{}<<{}>>{}",
            tokenizer.decode(&c.tokens[..m])?,
            tokenizer.decode(&c.tokens[m..m + 1])?,
            tokenizer.decode(&c.tokens[m + 1..])?
        )
    } else {
        tokenizer.decode(&c.tokens)?
    };
    Ok(text.replace(['\n', '\r'], " "))
}

/// The first JSON array in a reply, as `n` yes/no judgements (1/0, true/false).
fn parse_judgements(reply: &str, n: usize) -> Result<Vec<bool>, String> {
    let start = reply.find('[').ok_or("no JSON array in the reply")?;
    let end = reply[start..]
        .find(']')
        .map(|e| start + e + 1)
        .ok_or("unterminated JSON array")?;
    let values: Vec<serde_json::Value> =
        serde_json::from_str(&reply[start..end]).map_err(|e| format!("not a JSON array: {e}"))?;
    if values.len() != n {
        return Err(format!("{} judgements for {n} excerpts", values.len()));
    }
    values
        .iter()
        .map(|v| match v {
            serde_json::Value::Bool(b) => Ok(*b),
            v if v.as_f64() == Some(1.0) => Ok(true),
            v if v.as_f64() == Some(0.0) => Ok(false),
            v => Err(format!("judgement `{v}` is not 0 or 1")),
        })
        .collect()
}

/// Detection scores of one explanation.
#[derive(Debug, Clone, PartialEq)]
struct Detection {
    accuracy: f64,
    balanced_accuracy: f64,
    precision: Option<f64>,
    recall: f64,
    f1: Option<f64>,
}

impl Detection {
    /// Scores judgements `said` against `truth` (true: the feature fires on the excerpt).
    fn score(truth: &[bool], said: &[bool]) -> Self {
        let count = |t: bool, s: bool| {
            truth
                .iter()
                .zip(said)
                .filter(|&(&a, &b)| a == t && b == s)
                .count() as f64
        };
        let (tp, fp, tn, fneg) = (
            count(true, true),
            count(false, true),
            count(false, false),
            count(true, false),
        );
        let recall = tp / (tp + fneg).max(1.0);
        let specificity = tn / (tn + fp).max(1.0);
        let precision = (tp + fp > 0.0).then(|| tp / (tp + fp));
        let f1 =
            precision.and_then(|p| (p + recall > 0.0).then(|| 2.0 * p * recall / (p + recall)));
        Detection {
            accuracy: (tp + tn) / truth.len().max(1) as f64,
            balanced_accuracy: (recall + specificity) / 2.0,
            precision,
            recall,
            f1,
        }
    }
}

type Row = (
    Pair,
    String,
    Option<Detection>,
    Option<String>,
    usize,
    usize,
);

/// Writes `explanations.parquet`, `transcript.jsonl` and `explain.json`; returns the mean balanced accuracy
/// of the scored explanations.
fn write_outputs(
    p: &ExplainParams,
    ctx: &StageContext,
    rows: &[Row],
    transcript: &str,
) -> anyhow::Result<Option<f64>> {
    let score = |f: &dyn Fn(&Detection) -> Option<f64>| {
        Arc::new(Float64Array::from(
            rows.iter()
                .map(|r| r.2.as_ref().and_then(f))
                .collect::<Vec<_>>(),
        )) as ArrayRef
    };
    let batch = RecordBatch::try_from_iter([
        (
            "feature",
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|r| r.0.feature),
            )) as ArrayRef,
        ),
        (
            "class",
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.0.class.as_str()),
            )),
        ),
        (
            "val_auroc",
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.0.val_auroc),
            )),
        ),
        (
            "test_auroc",
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.0.test_auroc),
            )),
        ),
        (
            "explanation",
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.1.as_str()),
            )),
        ),
        ("accuracy", score(&|d| Some(d.accuracy))),
        ("balanced_accuracy", score(&|d| Some(d.balanced_accuracy))),
        ("precision", score(&|d| d.precision)),
        ("recall", score(&|d| Some(d.recall))),
        ("f1", score(&|d| d.f1)),
        (
            "positives",
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|r| r.4 as u32),
            )),
        ),
        (
            "negatives",
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|r| r.5 as u32),
            )),
        ),
        (
            "scored",
            Arc::new(BooleanArray::from(
                rows.iter().map(|r| r.2.is_some()).collect::<Vec<_>>(),
            )),
        ),
        (
            "error",
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.3.clone()).collect::<Vec<_>>(),
            )),
        ),
    ])?;
    saeflow_core::data::parquet::write_batches(
        &ctx.out_dir.join("explanations.parquet"),
        &[batch],
    )?;
    std::fs::write(ctx.out_dir.join("transcript.jsonl"), transcript)?;
    let balanced: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.2.as_ref().map(|d| d.balanced_accuracy))
        .collect();
    let mean_balanced =
        (!balanced.is_empty()).then(|| balanced.iter().sum::<f64>() / balanced.len() as f64);
    let summary = json!({
        "labels": p.labels,
        "base_url": p.base_url,
        "llm": p.llm,
        "temperature": p.temperature,
        "explained": rows.len(),
        "scored": rows.iter().filter(|r| r.2.is_some()).count(),
        "mean_balanced_accuracy": mean_balanced,
    });
    std::fs::write(
        ctx.out_dir.join("explain.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    Ok(mean_balanced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_scores_by_hand() {
        // truth: 3 positives, 3 negatives; said: 2 of the positives and 1 negative.
        let truth = [true, true, true, false, false, false];
        let said = [true, true, false, true, false, false];
        let d = Detection::score(&truth, &said);
        // tp 2, fn 1, fp 1, tn 2: accuracy 4/6, recall 2/3, specificity 2/3, precision 2/3, f1 2/3.
        assert!((d.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert!((d.balanced_accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert!((d.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((d.precision.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((d.f1.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // Saying "no" to everything: precision undefined, balanced accuracy ½.
        let d = Detection::score(&truth, &[false; 6]);
        assert_eq!(d.precision, None);
        assert_eq!(d.f1, None);
        assert_eq!(d.balanced_accuracy, 0.5);
    }

    #[test]
    fn judgements_are_parsed_strictly() {
        assert_eq!(
            parse_judgements("Sure: [1, 0, true]\n", 3),
            Ok(vec![true, false, true])
        );
        assert!(parse_judgements("[1, 0]", 3)
            .unwrap_err()
            .contains("2 judgements for 3"));
        assert!(parse_judgements("yes, all of them", 2).is_err());
        assert!(parse_judgements("[1, 2]", 2)
            .unwrap_err()
            .contains("not 0 or 1"));
    }
}
