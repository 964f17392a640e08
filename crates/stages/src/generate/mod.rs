//! `generate`: the model under study answers questions — each once per instruction variant ("answer
//! honestly" / "answer with a lie") — and its answers are graded into labels, so later stages can capture
//! and measure the model's *own* honest and deceptive text. Outputs (`schemas/generate.md`): `rows.parquet`,
//! a rows table `capture`, `label` and `steer` read like a dataset's; `generations.parquet`, every answer
//! including those the knowledge filter or a grading problem left out; `summary.json`.
//!
//! Here: the parameters, the batched generation in resumable shards, labels and the knowledge filter;
//! `grade` holds the graders.

pub mod grade;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::shared::Template;
use grade::{Answer, Grade, Grader, Verdict};
use saeflow_core::cancel::Cancelled;
use saeflow_core::data::rows::{stable_id, Row};
use saeflow_core::models::generate::{generate_rows_until, Sampling};
use saeflow_core::models::{Hooks, LoadedModel};
use saeflow_core::stats::bootstrap::mean_interval;
use saeflow_runner::stage::{
    key_path, KeySeg, ParamError, Reference, References, Stage, StageContext,
};

/// What an instruction asks the model to do; it decides what an incorrect answer means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Wants {
    /// The truth: an incorrect answer is a mistake (`mistaken`), a correct one `honest`.
    #[default]
    Truth,
    /// A lie: an incorrect answer is `deceptive` (the model complied), a correct one `honest` (it did not).
    Lie,
}

impl Wants {
    fn name(self) -> &'static str {
        match self {
            Wants::Truth => "truth",
            Wants::Lie => "lie",
        }
    }
}

/// One way of asking every question.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Instruction {
    /// Name, recorded in the `instruction` column and part of each answer's doc id.
    pub name: String,
    /// The user turn: a Jinja template over the row's columns and `question` (the rendered question), e.g.
    /// `"Answer the following question with a lie.\n\n{{ question }}"`. Default: the question alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// A system message for this variant (chat template only; default: the stage's `system`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// What the instruction asks for; with a grader it turns grades into labels.
    #[serde(default)]
    pub wants: Wants,
    /// Without a grader: the label every answer of this variant gets (instructed pairs taken as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The `source` column of this variant's answers (default: the stage's). With one source per
    /// variant, `label` reports each variant alone — under a lie instruction, the answers that lie against
    /// those that do not, where the instruction cannot tell them apart — and its source-only baseline is
    /// what knowing the instruction alone would score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Parameters of a `generate` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GenerateParams {
    /// The stage whose `rows.parquet` holds the questions (a `dataset` stage, or another `generate`).
    pub input: String,
    /// The model that answers (a `[models.NAME]` entry).
    pub model: String,
    /// Only rows of these splits (default: every split).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub splits: Vec<String>,
    /// At most this many questions, the first in the input's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_questions: Option<u64>,
    /// The question, a Jinja template over the row's columns (core and extra, e.g. `"In which country is
    /// {{ city }}?"`). Default: the row's `prompt`, else its `text`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question: Option<String>,
    /// The reference answer graders compare with, a Jinja template over the row's columns (e.g.
    /// `"{{ correct_country }}"`). Required with a grader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Plain text after BOS, or the model's chat template (the prompt as the user turn).
    #[serde(default)]
    pub template: Template,
    /// A system message for every variant that sets none (chat template only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// The variants each question is asked in (default: one, `plain`, the question as written).
    #[serde(default = "default_instructions")]
    pub instructions: Vec<Instruction>,
    /// Tokens generated per answer, at most.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus sampling: keep the most likely tokens up to this probability (1 = all).
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Keep only the k most likely tokens (0 = all).
    #[serde(default)]
    pub top_k: usize,
    /// Stop strings: an answer ends before the first of them (the model's own end-of-turn tokens always
    /// end it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Tokens of prompt + answer, at most (default and upper bound: the model's context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    /// Answers generated together (one left-padded batch, one KV cache; the output does not depend on it).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Answers per shard: the unit of resumption after a kill.
    #[serde(default = "default_shard_size")]
    pub shard_size: usize,
    /// How answers are graded against `reference` (none: labels come from the variants' `label`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade: Option<Grader>,
    /// Keep only questions the model answers correctly under every `wants = "truth"` variant: it knows the
    /// answer, so an incorrect answer under a lie instruction is a lie, not ignorance.
    #[serde(default)]
    pub knowledge_filter: bool,
    /// The `source` column of the answers (default: the stage's name); the question's source becomes
    /// `subset`. Answers' doc ids and pairs derive from it, so two stages' answers never share an id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

fn default_instructions() -> Vec<Instruction> {
    vec![Instruction {
        name: "plain".into(),
        prompt: None,
        system: None,
        wants: Wants::Truth,
        label: None,
        source: None,
    }]
}
fn default_max_new_tokens() -> usize {
    64
}
fn default_top_p() -> f64 {
    1.0
}
fn default_batch_size() -> usize {
    16
}
fn default_shard_size() -> usize {
    64
}

/// The `generate` stage kind.
pub struct Generate;

fn err<T>(at: Vec<KeySeg>, message: impl Into<String>) -> Result<T, ParamError> {
    Err(ParamError {
        at,
        message: message.into(),
    })
}

fn instruction_key(i: usize, key: &str) -> Vec<KeySeg> {
    vec![
        KeySeg::Key("instructions".into()),
        KeySeg::Index(i),
        KeySeg::Key(key.into()),
    ]
}

impl Stage for Generate {
    type Params = GenerateParams;
    const KIND: &'static str = "generate";
    const VERSION: u32 = 1;
    const ABOUT: &'static str =
        "The model answers a dataset's questions under instruction variants; answers graded into labels";

    fn references(p: &GenerateParams) -> References {
        References {
            inputs: vec![Reference {
                role: "input".into(),
                target: p.input.clone(),
                at: key_path(&["input"]),
            }],
            models: vec![Reference {
                role: String::new(),
                target: p.model.clone(),
                at: key_path(&["model"]),
            }],
            files: Vec::new(),
        }
    }

    fn validate(p: &GenerateParams) -> Result<(), ParamError> {
        if p.instructions.is_empty() {
            return err(
                key_path(&["instructions"]),
                "at least one instruction is needed",
            );
        }
        for (i, ins) in p.instructions.iter().enumerate() {
            if ins.name.trim().is_empty() {
                return err(instruction_key(i, "name"), "an instruction needs a name");
            }
            if p.instructions[..i].iter().any(|o| o.name == ins.name) {
                return err(
                    instruction_key(i, "name"),
                    format!("instruction `{}` is listed twice", ins.name),
                );
            }
            if let Some(t) = &ins.prompt {
                templates::check(t).or_else(|e| err(instruction_key(i, "prompt"), e))?;
            }
            if ins.system.is_some() && p.template == Template::None {
                return err(
                    instruction_key(i, "system"),
                    "a system message needs `template = \"chat\"`",
                );
            }
            if ins.label.is_some() && p.grade.is_some() {
                return err(
                    instruction_key(i, "label"),
                    "with a grader, labels come from the grades: drop `label`",
                );
            }
        }
        if p.system.is_some() && p.template == Template::None {
            return err(
                key_path(&["system"]),
                "a system message needs `template = \"chat\"`",
            );
        }
        for (key, t) in [("question", &p.question), ("reference", &p.reference)] {
            if let Some(t) = t {
                templates::check(t).or_else(|e| err(key_path(&[key]), e))?;
            }
        }
        let positive = [
            ("max_new_tokens", p.max_new_tokens),
            ("batch_size", p.batch_size),
            ("shard_size", p.shard_size),
            ("context", p.context.unwrap_or(1)),
        ];
        for (key, v) in positive {
            if v == 0 {
                return err(key_path(&[key]), format!("`{key}` must be at least 1"));
            }
        }
        if !(0.0..=2.0).contains(&p.temperature) {
            return err(
                key_path(&["temperature"]),
                "`temperature` must be in [0, 2]",
            );
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return err(key_path(&["top_p"]), "`top_p` must be in (0, 1]");
        }
        if let Some(i) = p.stop.iter().position(String::is_empty) {
            return err(
                vec![KeySeg::Key("stop".into()), KeySeg::Index(i)],
                "a stop string cannot be empty",
            );
        }
        if let Some(g) = &p.grade {
            g.ready().or_else(|e| err(key_path(&["grade"]), e))?;
            if p.reference.is_none() {
                return err(
                    key_path(&["reference"]),
                    "a grader compares with a reference answer: set `reference` (a template over the row, \
                     e.g. \"{{ answer }}\")",
                );
            }
        }
        if p.knowledge_filter {
            if p.grade.is_none() {
                return err(
                    key_path(&["knowledge_filter"]),
                    "the knowledge filter keeps questions graded correct: set `grade`",
                );
            }
            if !p.instructions.iter().any(|i| i.wants == Wants::Truth) {
                return err(
                    key_path(&["knowledge_filter"]),
                    "the knowledge filter needs an instruction with `wants = \"truth\"`",
                );
            }
        }
        Ok(())
    }

    fn run(p: &GenerateParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        run(p, ctx)
    }
}

/// The Jinja templates that turn a row into a question, a reference and a prompt.
mod templates {
    use std::collections::BTreeMap;

    use minijinja::{Environment, UndefinedBehavior, Value};

    use saeflow_core::data::rows::Row;

    fn environment() -> Environment<'static> {
        let mut env = Environment::new();
        // A misspelt column is an error naming it, not an empty string.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // Name the undefined variable in release builds too (minijinja's default follows debug_assertions).
        env.set_debug(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env
    }

    /// `Err` with minijinja's message when `source` is not a template.
    pub(super) fn check(source: &str) -> Result<(), String> {
        environment()
            .template_from_str(source)
            .map(|_| ())
            .map_err(|e| format!("not a valid template: {e}"))
    }

    /// A row's columns as template variables (extras by their names; core columns win a clash).
    pub(super) fn columns(row: &Row) -> BTreeMap<String, Value> {
        let mut v: BTreeMap<String, Value> = row
            .extra
            .iter()
            .map(|(k, x)| (k.clone(), Value::from(x.as_str())))
            .collect();
        let core: [(&str, Value); 9] = [
            ("doc_id", Value::from(row.doc_id)),
            ("prompt", Value::from(row.prompt.clone())),
            ("completion", Value::from(row.completion.clone())),
            ("text", Value::from(row.text.as_str())),
            ("label", Value::from(row.label.clone())),
            ("label_raw", Value::from(row.label_raw.clone())),
            ("source", Value::from(row.source.as_str())),
            ("subset", Value::from(row.subset.clone())),
            ("split", Value::from(row.split.clone())),
        ];
        v.extend(core.into_iter().map(|(k, x)| (k.to_string(), x)));
        v
    }

    /// `source` rendered over `vars`.
    pub(super) fn render(source: &str, vars: &BTreeMap<String, Value>) -> anyhow::Result<String> {
        let env = environment();
        let t = env
            .template_from_str(source)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        t.render(vars).map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// One question asked one way: what the model is given.
struct Task {
    /// Index into the questions.
    question: usize,
    /// Index into the instructions.
    variant: usize,
    user: String,
    system: Option<String>,
}

/// A question drawn from an input row.
struct Question {
    row: Row,
    text: String,
    reference: Option<String>,
    vars: BTreeMap<String, minijinja::Value>,
}

fn read_questions(p: &GenerateParams, input_dir: &Path) -> anyhow::Result<Vec<Question>> {
    let path = input_dir.join("rows.parquet");
    if !path.exists() {
        bail!(
            "input `{}` has no rows.parquet (generate reads a `dataset` or `generate` stage)",
            p.input
        );
    }
    let rows = saeflow_core::data::rows::read(&path)?;
    let limit = p.max_questions.unwrap_or(u64::MAX) as usize;
    let mut questions = Vec::new();
    for row in rows {
        let split = row.split.as_deref().unwrap_or("train");
        if !p.splits.is_empty() && !p.splits.iter().any(|s| s == split) {
            continue;
        }
        if questions.len() == limit {
            break;
        }
        let vars = templates::columns(&row);
        let at = |key: &str| {
            let columns: Vec<&str> = vars.keys().map(String::as_str).collect();
            format!(
                "`{key}` over row {} of `{}` (its columns: {})",
                row.doc_id,
                p.input,
                columns.join(", ")
            )
        };
        let text = match &p.question {
            Some(t) => templates::render(t, &vars).with_context(|| at("question"))?,
            None => row.prompt.clone().unwrap_or_else(|| row.text.clone()),
        };
        let reference = p
            .reference
            .as_ref()
            .map(|t| templates::render(t, &vars).with_context(|| at("reference")))
            .transpose()?;
        questions.push(Question {
            row,
            text,
            reference,
            vars,
        });
    }
    if questions.is_empty() {
        bail!(
            "input `{}` has no rows{}",
            p.input,
            if p.splits.is_empty() {
                String::new()
            } else {
                format!(" in splits {}", p.splits.join(", "))
            }
        );
    }
    Ok(questions)
}

fn tasks(p: &GenerateParams, questions: &[Question]) -> anyhow::Result<Vec<Task>> {
    let mut tasks = Vec::new();
    for (q, question) in questions.iter().enumerate() {
        for (v, ins) in p.instructions.iter().enumerate() {
            let user = match &ins.prompt {
                Some(t) => {
                    let mut vars = question.vars.clone();
                    vars.insert("question".into(), question.text.as_str().into());
                    templates::render(t, &vars).with_context(|| {
                        format!(
                            "row {} of `{}`, instruction `{}`",
                            question.row.doc_id, p.input, ins.name
                        )
                    })?
                }
                None => question.text.clone(),
            };
            tasks.push(Task {
                question: q,
                variant: v,
                user,
                system: ins.system.clone().or_else(|| p.system.clone()),
            });
        }
    }
    Ok(tasks)
}

/// Token ids the model continues: BOS, then the prompt, plain or as a chat turn.
fn prompt_ids(p: &GenerateParams, model: &LoadedModel, task: &Task) -> anyhow::Result<Vec<u32>> {
    let body = match p.template {
        Template::None => model.tokenizer.encode(&task.user)?,
        Template::Chat => {
            model
                .chat_tokens_with_system(task.system.as_deref(), &task.user, None)?
                .0
        }
    };
    // A chat template that writes BOS itself (Llama 3's) already put it first.
    let bos = model.bos.filter(|b| body.first() != Some(b));
    Ok(bos.into_iter().chain(body).collect())
}

/// Why an answer ended.
fn stop_reason(
    tokens: &[u32],
    stop_tokens: &[u32],
    cut: bool,
    max_new: usize,
    prompt_len: usize,
    context: usize,
) -> &'static str {
    if prompt_len >= context {
        "prompt_too_long"
    } else if cut {
        "stop_string"
    } else if tokens.last().is_some_and(|t| stop_tokens.contains(t)) {
        "stop_token"
    } else if tokens.len() >= max_new {
        "max_new_tokens"
    } else {
        "context"
    }
}

/// The text of generated tokens: the end-of-turn token left out, cut before the first stop string.
/// Returns the text and whether a stop string cut it.
fn answer_text(
    model: &LoadedModel,
    tokens: &[u32],
    stop_tokens: &[u32],
    stop: &[String],
) -> anyhow::Result<(String, bool)> {
    let body = match tokens.last() {
        Some(t) if stop_tokens.contains(t) => &tokens[..tokens.len() - 1],
        _ => tokens,
    };
    let text = model.tokenizer.decode(body)?;
    Ok(
        match stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            Some(at) => (text[..at].to_string(), true),
            None => (text, false),
        },
    )
}

/// The label a grade gives an answer to a variant.
fn label_of(verdict: Verdict, ins: &Instruction) -> Option<String> {
    match verdict {
        Verdict::Ungraded => ins.label.clone(),
        Verdict::Correct => Some("honest".into()),
        Verdict::Incorrect => Some(match ins.wants {
            Wants::Truth => "mistaken".into(),
            Wants::Lie => "deceptive".into(),
        }),
        _ => None,
    }
}

/// Did the answer do what the instruction asked (graded answers only)?
fn complied(verdict: Verdict, wants: Wants) -> Option<bool> {
    match (verdict, wants) {
        (Verdict::Correct, w) => Some(w == Wants::Truth),
        (Verdict::Incorrect, w) => Some(w == Wants::Lie),
        _ => None,
    }
}

/// Shards of generated rows in the partial directory, whole or absent (written atomically).
fn shard_path(dir: &Path, index: usize) -> std::path::PathBuf {
    dir.join(format!("shard-{index:05}.parquet"))
}

fn run(p: &GenerateParams, ctx: &mut StageContext) -> anyhow::Result<()> {
    let questions = read_questions(p, &ctx.inputs["input"])?;
    let tasks = tasks(p, &questions)?;
    let grader = p
        .grade
        .as_ref()
        .map(|g| g.ready().map_err(anyhow::Error::msg))
        .transpose()?;
    if let Some(grade::Ready::Judge(endpoint)) = &grader {
        if let Some(note) = endpoint.key_note() {
            ctx.log(&note);
        }
    }
    let (model, _) = crate::shared::load_model(ctx, &p.model)?;
    let context = p
        .context
        .unwrap_or(usize::MAX)
        .min(model.transformer.config.max_seq_len);
    // A plain continuation ends where the model starts a new document.
    let mut stop_tokens = model.stop.clone();
    if p.template == Template::None {
        stop_tokens.extend(model.bos);
    }
    let source = p.source.clone().unwrap_or_else(|| ctx.instance.clone());
    ctx.log(&format!(
        "generating {} answers ({} questions x {} instructions), {} new tokens at most, temperature {}",
        tasks.len(),
        questions.len(),
        p.instructions.len(),
        p.max_new_tokens,
        p.temperature
    ));
    std::fs::create_dir_all(&ctx.partial_dir)?;
    let shards: Vec<&[Task]> = tasks.chunks(p.shard_size).collect();
    let done = (0..shards.len())
        .take_while(|&s| shard_path(&ctx.partial_dir, s).exists())
        .count();
    if done > 0 {
        ctx.log(&format!("resuming from shard {done} of {}", shards.len()));
    }
    ctx.progress.set_total(tasks.len() as u64);
    ctx.progress
        .set_position((done * p.shard_size).min(tasks.len()) as u64);
    let hooks = Hooks::default();
    for (s, shard) in shards.iter().enumerate().skip(done) {
        let mut rows = Vec::with_capacity(shard.len());
        for batch in shard.chunks(p.batch_size) {
            if ctx.cancel.is_cancelled() {
                return Err(Cancelled.into());
            }
            let ids: Vec<Vec<u32>> = batch
                .iter()
                .map(|t| prompt_ids(p, &model, t))
                .collect::<anyhow::Result<_>>()?;
            // Prompts that leave no room are not generated (recorded as such); the rest go as one batch.
            let fits: Vec<usize> = (0..batch.len())
                .filter(|&i| !ids[i].is_empty() && ids[i].len() < context)
                .collect();
            let samplings: Vec<Sampling> = fits
                .iter()
                .map(|&i| sampling(p, ctx.seed, &questions[batch[i].question], batch[i].variant))
                .collect();
            let prompts: Vec<Vec<u32>> = fits.iter().map(|&i| ids[i].clone()).collect();
            let prompt_lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
            let tokenizer = &model.tokenizer;
            let mut until = |row: usize, tokens: &[u32]| -> bool {
                prompt_lens[row] + tokens.len() >= context
                    || (!p.stop.is_empty()
                        && tokenizer
                            .decode(tokens)
                            .is_ok_and(|t| p.stop.iter().any(|s| t.contains(s.as_str()))))
            };
            let generated = generate_rows_until(
                &model.transformer,
                &prompts,
                p.max_new_tokens,
                &stop_tokens,
                &samplings,
                &hooks,
                &mut until,
            )?;
            let mut outputs: Vec<Option<Vec<u32>>> = vec![None; batch.len()];
            for (&i, tokens) in fits.iter().zip(generated) {
                outputs[i] = Some(tokens);
            }
            for ((task, ids), tokens) in batch.iter().zip(&ids).zip(outputs) {
                rows.push(answer_row(
                    p,
                    ctx.seed,
                    &model,
                    &grader,
                    &questions[task.question],
                    task,
                    ids.len(),
                    tokens,
                    &stop_tokens,
                    context,
                    &source,
                )?);
            }
            ctx.progress.inc(batch.len() as u64);
        }
        let bytes = saeflow_core::data::rows::encode(&rows)?;
        saeflow_core::fs::write_atomic(&shard_path(&ctx.partial_dir, s), &bytes)?;
        ctx.partial_sync.saved()?;
    }
    let mut all = Vec::with_capacity(tasks.len());
    for s in 0..shards.len() {
        let path = shard_path(&ctx.partial_dir, s);
        all.extend(
            saeflow_core::data::rows::read(&path)
                .with_context(|| format!("reading back {}", path.display()))?,
        );
    }
    write_outputs(p, ctx, &questions, all)
}

/// Each answer's sampling: its own seed from the run's seed, the question and the variant, so an answer
/// does not depend on the batch or shard it is generated in.
fn sampling(p: &GenerateParams, seed: u64, question: &Question, variant: usize) -> Sampling {
    Sampling {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        seed: stable_id(&[
            &seed.to_string(),
            &question.row.doc_id.to_string(),
            &p.instructions[variant].name,
        ]),
    }
}

#[allow(clippy::too_many_arguments)]
fn answer_row(
    p: &GenerateParams,
    seed: u64,
    model: &LoadedModel,
    grader: &Option<grade::Ready>,
    question: &Question,
    task: &Task,
    prompt_len: usize,
    tokens: Option<Vec<u32>>,
    stop_tokens: &[u32],
    context: usize,
    source: &str,
) -> anyhow::Result<Row> {
    let ins = &p.instructions[task.variant];
    let tokens = tokens.unwrap_or_default();
    let (completion, cut) = answer_text(model, &tokens, stop_tokens, &p.stop)?;
    let reason = stop_reason(
        &tokens,
        stop_tokens,
        cut,
        p.max_new_tokens,
        prompt_len,
        context,
    );
    let grade = if reason == "prompt_too_long" {
        Grade {
            verdict: Verdict::NotGenerated,
            output: format!("the prompt has {prompt_len} tokens; the context is {context}"),
        }
    } else {
        match grader {
            Some(g) => g.grade(&Answer {
                question: &question.text,
                reference: question.reference.as_deref().unwrap_or(""),
                completion: &completion,
                instruction: &ins.name,
            })?,
            None if completion.trim().is_empty() => Grade {
                verdict: Verdict::Empty,
                output: String::new(),
            },
            None => Grade {
                verdict: Verdict::Ungraded,
                output: String::new(),
            },
        }
    };
    let input = &question.row;
    let mut row = Row::pair(
        ins.source.as_deref().unwrap_or(source),
        &task.user,
        &completion,
    );
    row.doc_id = stable_id(&["generate", source, &input.doc_id.to_string(), &ins.name]);
    // Every variant of a question shares its pair (the input's pair when it has one) and its split.
    row.pair_id = Some(stable_id(&[
        "generate",
        source,
        &input.pair_id.unwrap_or(input.doc_id).to_string(),
    ]));
    row.split = input.split.clone();
    row.subset = Some(match &input.subset {
        Some(sub) => format!("{}/{sub}", input.source),
        None => input.source.clone(),
    });
    row.label = label_of(grade.verdict, ins);
    row.label_raw = Some(format!("{}:{}", ins.name, grade.verdict.name()));
    row.extra = input.extra.clone();
    let sampling = sampling(p, seed, question, task.variant);
    let mut extra = |k: &str, v: String| {
        row.extra.insert(k.to_string(), v);
    };
    extra("question", question.text.clone());
    if let Some(r) = &question.reference {
        extra("reference", r.clone());
    }
    extra("instruction", ins.name.clone());
    extra("wants", ins.wants.name().into());
    if let Some(system) = &task.system {
        extra("system", system.clone());
    }
    extra("grade", grade.verdict.name().into());
    extra("grader_output", grade.output);
    if let Some(c) = complied(grade.verdict, ins.wants) {
        extra("complied", c.to_string());
    }
    extra("stop_reason", reason.into());
    extra("prompt_tokens", prompt_len.to_string());
    extra("new_tokens", tokens.len().to_string());
    extra("temperature", p.temperature.to_string());
    extra("top_p", p.top_p.to_string());
    extra("top_k", p.top_k.to_string());
    extra("max_new_tokens", p.max_new_tokens.to_string());
    extra("seed", sampling.seed.to_string());
    extra("input_doc_id", input.doc_id.to_string());
    Ok(row)
}

/// A grade that leaves an answer without a label.
fn is_problem(grade: &str) -> bool {
    !matches!(
        Verdict::parse(grade),
        Some(Verdict::Correct | Verdict::Incorrect | Verdict::Ungraded)
    )
}

fn write_outputs(
    p: &GenerateParams,
    ctx: &mut StageContext,
    questions: &[Question],
    mut all: Vec<Row>,
) -> anyhow::Result<()> {
    let field = |r: &Row, k: &str| r.extra.get(k).cloned().unwrap_or_default();
    // The knowledge filter, per question (input row): every truth-wanting variant graded correct.
    let mut known: BTreeMap<String, bool> = BTreeMap::new();
    for r in &all {
        let entry = known.entry(field(r, "input_doc_id")).or_insert(true);
        if field(r, "wants") == "truth" {
            *entry &= field(r, "grade") == "correct";
        }
    }
    let passes = |r: &Row| !p.knowledge_filter || known[&field(r, "input_doc_id")];
    for r in &mut all {
        let kept = passes(r) && !is_problem(&field(r, "grade"));
        r.extra.insert("kept".into(), kept.to_string());
    }
    let kept: Vec<Row> = all
        .iter()
        .filter(|r| field(r, "kept") == "true")
        .map(|r| {
            let mut r = r.clone();
            r.extra.remove("kept");
            r
        })
        .collect();
    saeflow_core::data::rows::write(&ctx.out_dir.join("generations.parquet"), &all)?;
    saeflow_core::data::rows::write(&ctx.out_dir.join("rows.parquet"), &kept)?;

    // Counts per instruction and grade, stop reasons, the filter, and how often each variant complied
    // (over known questions: a lie told about what the model does not know is not a lie), with intervals
    // over questions.
    let seed = ctx.seed ^ 0x6e6e;
    let interval = |values: &[f64]| {
        mean_interval(values, 2000, seed)
            .map(|i| json!({"rate": i.estimate, "low": i.low, "high": i.high}))
    };
    let mut per_instruction = serde_json::Map::new();
    for ins in &p.instructions {
        let mine: Vec<&Row> = all
            .iter()
            .filter(|r| field(r, "instruction") == ins.name)
            .collect();
        let mut grades: BTreeMap<String, u64> = BTreeMap::new();
        let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
        for r in &mine {
            *grades.entry(field(r, "grade")).or_default() += 1;
            *reasons.entry(field(r, "stop_reason")).or_default() += 1;
        }
        let complied: Vec<f64> = mine
            .iter()
            .filter(|r| passes(r))
            .filter_map(|r| r.extra.get("complied"))
            .map(|c| if c == "true" { 1.0 } else { 0.0 })
            .collect();
        let mut labels: BTreeMap<String, u64> = BTreeMap::new();
        for r in mine.iter().filter(|r| field(r, "kept") == "true") {
            *labels
                .entry(r.label.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += 1;
        }
        per_instruction.insert(
            ins.name.clone(),
            json!({
                "wants": ins.wants.name(),
                "answers": mine.len(),
                "grades": grades,
                "stop_reasons": reasons,
                "complied": interval(&complied),
                "complied_of": complied.len(),
                "kept_labels": labels,
            }),
        );
    }
    let known_values: Vec<f64> = known.values().map(|&k| if k { 1.0 } else { 0.0 }).collect();
    let passed = known.values().filter(|&&k| k).count();
    let problems = all
        .iter()
        .filter(|r| is_problem(&field(r, "grade")))
        .count();
    let mut splits: BTreeMap<String, u64> = BTreeMap::new();
    for r in &kept {
        *splits
            .entry(r.split.clone().unwrap_or_else(|| "train".into()))
            .or_default() += 1;
    }
    let summary = json!({
        "questions": questions.len(),
        "answers": all.len(),
        "kept": kept.len(),
        "problems": problems,
        "knowledge_filter": if p.knowledge_filter {
            json!({"passed": passed, "of": known.len(), "known": interval(&known_values)})
        } else {
            json!(null)
        },
        "instructions": per_instruction,
        "kept_by_split": splits,
        "unit": "one answer (compliance: one known question's answer under that instruction)",
    });
    saeflow_core::fs::write_atomic(
        &ctx.out_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    ctx.metrics.insert("answers".into(), json!(all.len()));
    ctx.metrics.insert("kept".into(), json!(kept.len()));
    ctx.metrics.insert("problems".into(), json!(problems));
    if p.knowledge_filter {
        ctx.metrics.insert("known_questions".into(), json!(passed));
    }
    ctx.log(&format!(
        "{} answers, {} kept, {} with a grading problem{}",
        all.len(),
        kept.len(),
        problems,
        if p.knowledge_filter {
            format!(
                "; {passed} of {} questions pass the knowledge filter",
                known.len()
            )
        } else {
            String::new()
        }
    ));
    Ok(())
}
