//! `capture`: runs a model over a dataset's rows and stores hook activations as a sharded Parquet
//! activation store (`data::activations`, documented in `schemas/capture.md`).
//!
//! Work is cut into fixed batches of sequences, and shards close on batch boundaries, so a shard's bytes
//! depend only on the batches in it. Each finished shard is published into the partial directory with the
//! index of the next batch; a rerun after a crash skips the batches already stored (re-tokenizing, not
//! re-running the model) and produces the same files as an uninterrupted run.
//!
//! Here: the parameters and the run; `sequences` turns rows into token sequences, `forward` runs them
//! through the model, `shards` stores the result resumably.

mod forward;
mod sequences;
mod shards;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::shared::Template;
use forward::Forward;
use saeflow_core::cancel::Cancelled;
use saeflow_core::data::activations::{
    ActDtype, BeforeAfter, CaptureInfo, SinkReport, TokenRow, FORMAT_VERSION,
};
use saeflow_core::data::rows::{self, Row};
use saeflow_core::models::{self, Hook, Hooks, LoadedModel};
use saeflow_runner::stage::{
    key_path, KeySeg, ParamError, Reference, References, Stage, StageContext,
};
use sequences::Sequences;
use shards::{assemble, finished_shards, ShardBuffer, ShardWriter};

/// Which token positions of each document are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Every token (BOS only with `exclude_bos = false`).
    #[default]
    All,
    /// Tokens of the completion (answer) only.
    Completion,
    /// The document's last token (within the context window).
    Last,
    /// The last token before the completion (with `template = "chat"`: the assistant header).
    LastPrompt,
}

/// Parameters of a `capture` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptureParams {
    /// The `dataset` stage whose rows are captured.
    pub input: String,
    /// The model (a `[models.NAME]` entry).
    pub model: String,
    /// Hook points to store, all from one forward pass (e.g. `blocks.10.hook_resid_post`).
    pub hooks: Vec<String>,
    /// Tokens per forward sequence; longer documents are cut (unpacked) or split across sequences (packed).
    #[serde(default = "default_context")]
    pub context: usize,
    /// Stop after storing this many tokens (default: the whole dataset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Which positions of each document are stored.
    #[serde(default)]
    pub positions: Positions,
    /// Plain text or the model's chat format.
    #[serde(default)]
    pub template: Template,
    /// Prepend the model's BOS token to each document (when the model has one).
    #[serde(default = "yes")]
    pub bos: bool,
    /// Leave BOS positions out of the store (their activations are outliers that skew SAE training).
    #[serde(default = "yes")]
    pub exclude_bos: bool,
    /// Pack documents back to back into full sequences instead of one document per sequence.
    #[serde(default)]
    pub pack: bool,
    /// Sequences per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Element type of stored activations.
    #[serde(default)]
    pub dtype: ActDtype,
    /// Only rows of these splits (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splits: Option<Vec<String>>,
    /// Tokens per shard (shards close on batch boundaries, so they hold at least this many but the last).
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: u64,
    /// Visit documents in a seeded random order (so a token budget samples every source).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// First positions of every forward sequence left out of the store. A sequence's first token that is
    /// not BOS becomes an attention sink (SmolLM2, which has no BOS: norm ~25,000 against a median of
    /// ~170) that dominates means, probes and SAE training. Default: the first position of every sequence
    /// that does not start with BOS (a BOS is left out by `exclude_bos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_first: Option<u32>,
    /// Also leave out tokens whose norm at any hook exceeds this multiple of the median norm of their
    /// batch's stored tokens (default: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_cut: Option<f64>,
}

fn default_context() -> usize {
    128
}
fn default_batch_size() -> usize {
    8
}
fn default_shard_tokens() -> u64 {
    1 << 16
}
fn yes() -> bool {
    true
}

/// The `capture` stage kind.
pub struct Capture;

impl Stage for Capture {
    type Params = CaptureParams;
    const KIND: &'static str = "capture";
    // 2: the CPU forward runs on hand-written kernels (same values to float rounding, other bits).
    // 3: store format 2 (sources, pairs, sequence positions), attention sinks left out by default.
    // 4: `template = "chat"` renders the model's own Jinja template (SmolLM2's adds its system turn).
    // 5: the model's linear layers on kernels::gemm (same values to float rounding, other bits).
    const VERSION: u32 = 5;
    const ABOUT: &'static str =
        "Run a model over a dataset and store hook activations as sharded Parquet, resumably";

    fn references(p: &CaptureParams) -> References {
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

    fn validate(p: &CaptureParams) -> Result<(), ParamError> {
        let err = |at: Vec<KeySeg>, message: String| Err(ParamError { at, message });
        if p.hooks.is_empty() {
            return err(key_path(&["hooks"]), "at least one hook is needed".into());
        }
        for (i, h) in p.hooks.iter().enumerate() {
            let at = vec![KeySeg::Key("hooks".into()), KeySeg::Index(i)];
            if let Err(e) = h.parse::<Hook>() {
                return err(at, e);
            }
            if p.hooks[..i].contains(h) {
                return err(at, format!("hook `{h}` is listed twice"));
            }
        }
        let positive = [
            ("context", p.context as u64),
            ("batch_size", p.batch_size as u64),
            ("shard_tokens", p.shard_tokens),
            ("tokens", p.tokens.unwrap_or(1)),
        ];
        for (name, value) in positive {
            if value == 0 {
                return err(key_path(&[name]), format!("`{name}` must be at least 1"));
            }
        }
        if p.splits.as_ref().is_some_and(|s| s.is_empty()) {
            return err(key_path(&["splits"]), "`splits` is empty".into());
        }
        if p.drop_first.is_some_and(|n| n as usize >= p.context) {
            return err(
                key_path(&["drop_first"]),
                format!(
                    "`drop_first` must be less than `context` ({}): nothing would be stored",
                    p.context
                ),
            );
        }
        if let Some(cut) = p.norm_cut {
            if !(cut.is_finite() && cut > 1.0) {
                return err(
                    key_path(&["norm_cut"]),
                    format!("`norm_cut` is a multiple of the median norm above 1, got {cut}"),
                );
            }
        }
        Ok(())
    }

    fn run(p: &CaptureParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        run(p, ctx)
    }
}

/// The dataset rows of the chosen splits; an error listing the splits there are when none is left.
fn read_rows(p: &CaptureParams, input_dir: &Path) -> anyhow::Result<Vec<Row>> {
    let rows_path = input_dir.join("rows.parquet");
    if !rows_path.is_file() {
        bail!(
            "input `{}` has no rows.parquet (capture reads a `dataset` stage)",
            p.input
        );
    }
    let mut rows = rows::read(&rows_path)?;
    let mut available: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        *available
            .entry(r.split.clone().unwrap_or_default())
            .or_default() += 1;
    }
    if let Some(splits) = &p.splits {
        rows.retain(|r| splits.contains(r.split.as_ref().unwrap_or(&String::new())));
    }
    if rows.is_empty() {
        let have: Vec<String> = available.iter().map(|(s, n)| format!("{s} {n}")).collect();
        bail!(
            "no rows to capture: input `{}` has no rows in splits {:?} (it has: {})",
            p.input,
            p.splits.clone().unwrap_or_default(),
            if have.is_empty() {
                "no rows".into()
            } else {
                have.join(", ")
            }
        );
    }
    Ok(rows)
}

/// Loads the stage's model on the pipeline's device and checks the hooks against it.
fn load_model(
    p: &CaptureParams,
    ctx: &StageContext,
) -> anyhow::Result<(LoadedModel, Device, Vec<Hook>)> {
    let (model, device) = crate::shared::load_model(ctx, &p.model)?;
    let hooks: Vec<Hook> = p
        .hooks
        .iter()
        .map(|h| h.parse().map_err(|e: String| anyhow::anyhow!(e)))
        .collect::<anyhow::Result<_>>()?;
    for h in &hooks {
        model
            .transformer
            .check_hook(h)
            .with_context(|| format!("model `{}`", p.model))?;
    }
    Ok((model, device, hooks))
}

fn run(p: &CaptureParams, ctx: &mut StageContext) -> anyhow::Result<()> {
    let rows = read_rows(p, &ctx.inputs["input"])?;
    let (model, device, hooks) = load_model(p, ctx)?;
    let config = &model.transformer.config;
    if p.context > config.max_seq_len {
        bail!(
            "context = {} exceeds model `{}`'s {} positions",
            p.context,
            p.model,
            config.max_seq_len
        );
    }
    if p.template == Template::Chat {
        // Fails early, naming the model, when it has no chat format.
        model.chat_tokens("", None)?;
    }

    let mut order: Vec<usize> = (0..rows.len()).collect();
    if p.shuffle {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(ctx.seed));
    }
    let total = match p.tokens {
        Some(t) => t,
        None => {
            // Count what will be stored, for the progress bar's total and ETA.
            let mut count = Sequences::new(p, &model, &rows, &order);
            while count.next_sequence()?.is_some() {}
            count.stored
        }
    };
    let labels: Vec<Option<Arc<str>>> = rows
        .iter()
        .map(|r| r.label.as_deref().map(Arc::from))
        .collect();
    let splits: Vec<Arc<str>> = rows
        .iter()
        .map(|r| Arc::from(r.split.as_deref().unwrap_or("train")))
        .collect();
    let mut interned: BTreeMap<String, Arc<str>> = BTreeMap::new();
    let mut intern = |s: &str| -> Arc<str> {
        interned
            .entry(s.to_string())
            .or_insert_with(|| Arc::from(s))
            .clone()
    };
    let sources: Vec<Arc<str>> = rows.iter().map(|r| intern(&r.source)).collect();
    let subsets: Vec<Option<Arc<str>>> = rows
        .iter()
        .map(|r| r.subset.as_deref().map(&mut intern))
        .collect();

    let partial = &ctx.partial_dir;
    std::fs::create_dir_all(partial)?;
    let done = finished_shards(partial)?;
    let resume_batch = done.last().map_or(0, |s| s.next_batch);
    let resumed_rows: u64 = done.iter().map(|s| s.rows).sum();
    if done.is_empty() {
        ctx.log(&format!(
            "capturing {} from {} rows of `{}` with model `{}` into shards of {} tokens",
            p.hooks.join(", "),
            rows.len(),
            p.input,
            p.model,
            p.shard_tokens
        ));
    } else {
        ctx.log(&format!(
            "resuming from shard {} ({resumed_rows} tokens already captured)",
            done.len()
        ));
    }
    ctx.progress.set_total(total);
    ctx.progress.set_position(resumed_rows);

    let mut shard = ShardBuffer::new(hooks.len());
    let mut seqs = Sequences::new(p, &model, &rows, &order);
    let mut split_counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut label_counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut sequences = 0u64;
    let forward = Forward {
        model: &model,
        capture: Hooks::capture(hooks.iter().copied()),
        hooks: &hooks,
        dtype: p.dtype,
        device: &device,
        norm_cut: p.norm_cut,
    };
    let mut forward_time = std::time::Duration::ZERO;
    let d = config.d_model;
    let started = Instant::now();
    let mut computed = 0u64;
    let mut batch_index = 0u64;
    let shard_count = std::thread::scope(|scope| -> anyhow::Result<usize> {
        let writer = ShardWriter::spawn(scope, partial, &hooks, d, p.dtype);
        let mut shard_count = done.len();
        loop {
            let batch = seqs.next_batch()?;
            if batch.is_empty() {
                break;
            }
            sequences += batch.len() as u64;
            for e in batch.iter().flatten().filter(|e| e.store) {
                *split_counts
                    .entry(splits[e.row as usize].to_string())
                    .or_default() += 1;
                let label = labels[e.row as usize].as_deref().unwrap_or("null");
                *label_counts.entry(label.to_string()).or_default() += 1;
            }
            batch_index += 1;
            if batch_index <= resume_batch {
                continue;
            }
            if ctx.cancel.is_cancelled() {
                return Err(Cancelled.into());
            }
            let batch_started = Instant::now();
            let stored = forward.run(&batch, &rows, &mut shard)?;
            forward_time += batch_started.elapsed();
            shard.tokens.extend(stored.iter().map(|e| {
                let r = e.row as usize;
                TokenRow {
                    doc_id: rows[r].doc_id,
                    pos: e.pos,
                    seq_pos: e.seq_pos,
                    token_id: e.token,
                    label: labels[r].clone(),
                    split: splits[r].clone(),
                    is_completion: e.completion,
                    source: sources[r].clone(),
                    subset: subsets[r].clone(),
                    pair_id: rows[r].pair_id,
                }
            }));
            computed += stored.len() as u64;
            ctx.progress.inc(stored.len() as u64);
            if shard.tokens.len() as u64 >= p.shard_tokens {
                let full = std::mem::replace(&mut shard, ShardBuffer::new(hooks.len()));
                writer.send(shard_count, full, batch_index)?;
                shard_count += 1;
                for _ in writer.written()? {
                    ctx.partial_sync.saved()?;
                }
                let rate = computed as f64 / started.elapsed().as_secs_f64().max(1e-9);
                ctx.progress
                    .set_message(&format!("{shard_count} shards, {rate:.0} tok/s"));
            }
        }
        // The last shard holds what is left (a rerun reaching this point writes it again, identically).
        let last = (!shard.tokens.is_empty()).then_some(shard_count);
        if last.is_some() {
            writer.send(shard_count, shard, batch_index)?;
            shard_count += 1;
        }
        for index in writer.finish()? {
            if Some(index) != last {
                ctx.partial_sync.saved()?;
            }
        }
        Ok(shard_count)
    })?;
    if shard_count == 0 {
        bail!(
            "no tokens to store: no row in the chosen splits has a token at positions = {:?}",
            p.positions
        );
    }

    let assembled = assemble(partial, shard_count, &p.hooks, &ctx.out_dir)?;
    let first_row: u64 = assembled.shards.iter().map(|s| s.rows).sum();
    let sinks = sink_report(p, &seqs, &assembled);
    ctx.log(&format!(
        "left out {} sequence-start tokens (drop_first = {}) and {} norm outliers; share of the squared \
         norm held by tokens above 10x the median norm: {}",
        sinks.dropped_first,
        sinks
            .drop_first
            .map_or("the first unless BOS".to_string(), |n| n.to_string()),
        sinks.dropped_norm,
        sinks
            .above_10x_median_share
            .iter()
            .map(|(h, s)| format!(
                "{h} {} before, {} after",
                // `+ 0.0` shows a share of -0 (an empty sum) as 0.
                s.before.map_or("–".into(), |v| format!("{:.1}%", 100.0 * v + 0.0)),
                s.after.map_or("–".into(), |v| format!("{:.1}%", 100.0 * v + 0.0))
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    let info = CaptureInfo {
        format: FORMAT_VERSION,
        model: p.model.clone(),
        model_key: ctx.model_keys.get(&p.model).cloned().unwrap_or_default(),
        model_source: format!(
            "{}:{}",
            config.family,
            model
                .source
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default()
        ),
        hooks: p.hooks.clone(),
        d_model: d,
        dtype: p.dtype,
        tokenizer: json!({
            "kind": match model.tokenizer {
                models::Tokenizer::Tiktoken { .. } => "tiktoken",
                models::Tokenizer::HuggingFace(_) => "huggingface",
            },
            "vocab_size": model.tokenizer.vocab_size(),
            "bos": model.bos.filter(|_| p.bos),
        }),
        context: p.context,
        settings: json!({
            "positions": p.positions,
            "template": p.template,
            "bos": p.bos,
            "exclude_bos": p.exclude_bos,
            "pack": p.pack,
            "batch_size": p.batch_size,
            "splits": p.splits,
            "shuffle": p.shuffle,
            "drop_first": p.drop_first,
            "norm_cut": p.norm_cut,
        }),
        tokens: first_row,
        documents: seqs.documents,
        truncated_documents: seqs.truncated,
        sequences,
        splits: split_counts,
        labels: label_counts,
        mean_norm: p
            .hooks
            .iter()
            .zip(&assembled.norm_sums)
            .map(|(h, s)| (h.clone(), s / first_row as f64))
            .collect(),
        shards: assembled.shards,
        sinks: sinks.clone(),
    };
    std::fs::write(
        ctx.out_dir.join("capture.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    let secs = started.elapsed().as_secs_f64();
    ctx.metrics.insert("tokens".into(), json!(first_row));
    ctx.metrics.insert(
        "dropped_tokens".into(),
        json!(sinks.dropped_first + sinks.dropped_norm),
    );
    ctx.metrics.insert("shards".into(), json!(shard_count));
    if computed > 0 {
        ctx.metrics.insert(
            "tokens_per_s".into(),
            json!((computed as f64 / secs).round()),
        );
    }
    ctx.log(&format!(
        "captured {first_row} tokens in {shard_count} shards ({computed} computed in this run in {secs:.1}s, \
         {:.0}% of it in the model)",
        100.0 * forward_time.as_secs_f64() / secs.max(1e-9)
    ));
    Ok(())
}

/// What sink handling left out, and the top 0.5% share of the squared norm before and after it.
fn sink_report(p: &CaptureParams, seqs: &Sequences, all: &shards::Assembled) -> SinkReport {
    let share = |v: &[f64]| saeflow_core::stats::top_share(v, 0.005);
    let above = |v: &[f64]| saeflow_core::stats::share_above_median_multiple(v, 10.0);
    let before: Vec<Vec<f64>> = (0..p.hooks.len())
        .map(|i| {
            all.kept_sq_norms[i]
                .iter()
                .chain(&all.dropped_sq_norms[i])
                .copied()
                .collect()
        })
        .collect();
    let per_hook = |measure: &dyn Fn(&[f64]) -> Option<f64>| -> BTreeMap<String, BeforeAfter> {
        p.hooks
            .iter()
            .enumerate()
            .map(|(i, h)| {
                (
                    h.clone(),
                    BeforeAfter {
                        before: measure(&before[i]),
                        after: measure(&all.kept_sq_norms[i]),
                    },
                )
            })
            .collect()
    };
    SinkReport {
        drop_first: p.drop_first,
        norm_cut: p.norm_cut,
        dropped_first: seqs.dropped_first,
        dropped_norm: all.dropped_norm,
        top_half_percent_share: per_hook(&share),
        above_10x_median_share: per_hook(&above),
    }
}
