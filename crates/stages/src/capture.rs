//! `capture`: runs a model over a dataset's rows and stores hook activations as a sharded Parquet
//! activation store (`data::activations`, documented in `schemas/capture.md`).
//!
//! Work is cut into fixed batches of sequences, and shards close on batch boundaries, so a shard's bytes
//! depend only on the batches in it. Each finished shard is published into the partial directory with the
//! index of the next batch; a rerun after a crash skips the batches already stored (re-tokenizing, not
//! re-running the model) and produces the same files as an uninterrupted run.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::shared::Template;
use saeflow_core::cancel::Cancelled;
use saeflow_core::data::activations::{
    act_file_name, concat_tokens, tokens_batch, write_act_shard, ActDtype, CaptureInfo, ShardInfo,
    TokenRow, FORMAT_VERSION,
};
use saeflow_core::data::rows::{self, Row};
use saeflow_core::models::{self, Hook, Hooks, LoadedModel};
use saeflow_runner::stage::{
    key_path, KeySeg, ParamError, Reference, References, Stage, StageContext,
};

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
    const VERSION: u32 = 2;
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
        Ok(())
    }

    fn run(p: &CaptureParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        run(p, ctx)
    }
}

/// One token of a document on its way through the model.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Index into the rows.
    row: u32,
    pos: u32,
    token: u32,
    completion: bool,
    store: bool,
}

/// Turns rows into the sequences the model runs over, in a fixed order, honouring the token budget.
struct Sequences<'a> {
    p: &'a CaptureParams,
    model: &'a LoadedModel,
    rows: &'a [Row],
    order: std::iter::Copied<std::slice::Iter<'a, usize>>,
    pending: VecDeque<Entry>,
    budget: u64,
    stored: u64,
    documents: u64,
    last_document: u32,
    truncated: u64,
}

impl<'a> Sequences<'a> {
    fn new(
        p: &'a CaptureParams,
        model: &'a LoadedModel,
        rows: &'a [Row],
        order: &'a [usize],
    ) -> Self {
        Self {
            p,
            model,
            rows,
            order: order.iter().copied(),
            pending: VecDeque::new(),
            budget: p.tokens.unwrap_or(u64::MAX),
            stored: 0,
            documents: 0,
            last_document: u32::MAX,
            truncated: 0,
        }
    }

    /// The tokens of one row, with the positions to store marked.
    fn document(&mut self, index: usize) -> anyhow::Result<Vec<Entry>> {
        let row = &self.rows[index];
        let tok = &self.model.tokenizer;
        let (prompt, completion) = match self.p.template {
            Template::None => match &row.completion {
                Some(c) => (
                    tok.encode(row.prompt.as_deref().unwrap_or(""))?,
                    tok.encode(c)?,
                ),
                None => (tok.encode(&row.text)?, Vec::new()),
            },
            Template::Chat => match &row.completion {
                Some(c) => self
                    .model
                    .chat_tokens(row.prompt.as_deref().unwrap_or(""), Some(c))?,
                None => self.model.chat_tokens(&row.text, None)?,
            },
        };
        let bos = self.model.bos.filter(|_| self.p.bos);
        let prompt_end = bos.iter().len() + prompt.len();
        let mut ids: Vec<u32> = bos.into_iter().chain(prompt).chain(completion).collect();
        if !self.p.pack && ids.len() > self.p.context {
            ids.truncate(self.p.context);
            self.truncated += 1;
        }
        let n = ids.len();
        let keep = |i: usize| match self.p.positions {
            Positions::All => !(i == 0 && bos.is_some() && self.p.exclude_bos),
            Positions::Completion => i >= prompt_end,
            Positions::Last => i + 1 == n,
            Positions::LastPrompt => i + 1 == prompt_end,
        };
        Ok(ids
            .iter()
            .enumerate()
            .map(|(i, &token)| Entry {
                row: index as u32,
                pos: i as u32,
                token,
                completion: i >= prompt_end,
                store: keep(i),
            })
            .collect())
    }

    /// The next sequence with at least one token to store, cut after its last stored token (attention is
    /// causal, so later tokens cannot change it); `None` when the rows or the budget are used up.
    fn next_sequence(&mut self) -> anyhow::Result<Option<Vec<Entry>>> {
        loop {
            if self.stored >= self.budget {
                return Ok(None);
            }
            while self.pending.len() < self.p.context || !self.p.pack {
                let Some(index) = self.order.next() else {
                    break;
                };
                let doc = self.document(index)?;
                self.pending.extend(doc);
                if !self.p.pack {
                    break;
                }
            }
            if self.pending.is_empty() {
                return Ok(None);
            }
            let take = self.p.context.min(self.pending.len());
            let mut seq: Vec<Entry> = self.pending.drain(..take).collect();
            for e in seq.iter_mut() {
                if e.store {
                    if self.stored < self.budget {
                        self.stored += 1;
                    } else {
                        e.store = false;
                    }
                }
            }
            if let Some(last) = seq.iter().rposition(|e| e.store) {
                seq.truncate(last + 1);
                for e in seq.iter().filter(|e| e.store) {
                    // A document's tokens are contiguous in the stream, so each change of row is a new one.
                    if e.row != self.last_document {
                        self.last_document = e.row;
                        self.documents += 1;
                    }
                }
                return Ok(Some(seq));
            }
        }
    }

    /// The next batch of up to `batch_size` sequences.
    fn next_batch(&mut self) -> anyhow::Result<Vec<Vec<Entry>>> {
        let mut batch = Vec::new();
        while batch.len() < self.p.batch_size {
            match self.next_sequence()? {
                Some(s) => batch.push(s),
                None => break,
            }
        }
        Ok(batch)
    }
}

/// A shard as kept in the partial directory.
#[derive(Debug, Serialize, Deserialize)]
struct ShardState {
    /// Batch the next shard starts at.
    next_batch: u64,
    rows: u64,
    /// Sum of vector norms per hook (for the mean in `capture.json`).
    norm_sums: BTreeMap<String, f64>,
}

fn shard_dir(partial: &Path, shard: usize) -> PathBuf {
    partial.join(format!("shard-{shard:05}"))
}

/// Complete shards left by an interrupted run (a contiguous prefix); anything else there is removed.
fn finished_shards(partial: &Path) -> anyhow::Result<Vec<ShardState>> {
    let mut shards = Vec::new();
    loop {
        let state = shard_dir(partial, shards.len()).join("state.json");
        match std::fs::read(&state) {
            Ok(bytes) => match serde_json::from_slice::<ShardState>(&bytes) {
                Ok(s) => shards.push(s),
                Err(_) => break,
            },
            Err(_) => break,
        }
    }
    if let Ok(entries) = std::fs::read_dir(partial) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let keep = name
                .strip_prefix("shard-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n < shards.len());
            if !keep {
                let _ = std::fs::remove_dir_all(entry.path());
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(shards)
}

/// Activations and token rows of the shard being filled.
struct ShardBuffer {
    acts: Vec<Vec<u8>>,
    tokens: Vec<TokenRow>,
    norm_sums: Vec<f64>,
}

impl ShardBuffer {
    fn new(hooks: usize) -> Self {
        Self {
            acts: vec![Vec::new(); hooks],
            tokens: Vec::new(),
            norm_sums: vec![0.0; hooks],
        }
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

    let mut shard_count = done.len();
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
    };
    let mut forward_time = std::time::Duration::ZERO;
    let d = config.d_model;
    let started = Instant::now();
    let mut computed = 0u64;
    let mut batch_index = 0u64;
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
        shard.tokens.extend(stored.iter().map(|e| TokenRow {
            doc_id: rows[e.row as usize].doc_id,
            pos: e.pos,
            token_id: e.token,
            label: labels[e.row as usize].clone(),
            split: splits[e.row as usize].clone(),
            is_completion: e.completion,
        }));
        computed += stored.len() as u64;
        ctx.progress.inc(stored.len() as u64);
        if shard.tokens.len() as u64 >= p.shard_tokens {
            shard_count = write_shard(
                partial,
                shard_count,
                &hooks,
                d,
                p.dtype,
                &mut shard,
                batch_index,
            )?;
            let rate = computed as f64 / started.elapsed().as_secs_f64().max(1e-9);
            ctx.progress
                .set_message(&format!("{shard_count} shards, {rate:.0} tok/s"));
        }
    }
    // The last shard holds what is left (a rerun reaching this point writes it again, identically).
    if !shard.tokens.is_empty() {
        shard_count = write_shard(
            partial,
            shard_count,
            &hooks,
            d,
            p.dtype,
            &mut shard,
            batch_index,
        )?;
    }
    if shard_count == 0 {
        bail!(
            "no tokens to store: no row in the chosen splits has a token at positions = {:?}",
            p.positions
        );
    }

    let (info_shards, norm_sums) = assemble(partial, shard_count, &p.hooks, &ctx.out_dir)?;
    let first_row: u64 = info_shards.iter().map(|s| s.rows).sum();
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
            .zip(&norm_sums)
            .map(|(h, s)| (h.clone(), s / first_row as f64))
            .collect(),
        shards: info_shards,
    };
    std::fs::write(
        ctx.out_dir.join("capture.json"),
        serde_json::to_string_pretty(&info)? + "\n",
    )?;
    let secs = started.elapsed().as_secs_f64();
    ctx.metrics.insert("tokens".into(), json!(first_row));
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

/// Puts the finished shards into the output directory: act files hard-linked (the partial copies stay valid
/// until publish), token tables concatenated. Returns the shard list and the norm sums per hook.
fn assemble(
    partial: &Path,
    shard_count: usize,
    hooks: &[String],
    out_dir: &Path,
) -> anyhow::Result<(Vec<ShardInfo>, Vec<f64>)> {
    let mut info_shards = Vec::new();
    let mut norm_sums = vec![0.0f64; hooks.len()];
    let mut first_row = 0u64;
    let mut token_parts = Vec::new();
    for s in 0..shard_count {
        let dir = shard_dir(partial, s);
        let state: ShardState = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        for (i, h) in hooks.iter().enumerate() {
            norm_sums[i] += state.norm_sums[h];
            saeflow_core::fs::link_or_copy(
                &dir.join(format!("acts-{h}.parquet")),
                &out_dir.join(act_file_name(h, s)),
            )?;
        }
        token_parts.push(dir.join("tokens.parquet"));
        info_shards.push(ShardInfo {
            first_row,
            rows: state.rows,
        });
        first_row += state.rows;
    }
    concat_tokens(&token_parts, &out_dir.join("tokens.parquet"))?;
    Ok((info_shards, norm_sums))
}

/// Runs batches through the model and stores what they capture.
struct Forward<'a> {
    model: &'a LoadedModel,
    capture: Hooks,
    hooks: &'a [Hook],
    dtype: ActDtype,
    device: &'a Device,
}

impl Forward<'_> {
    /// Runs one batch and appends the stored activations to the shard; returns the stored entries in
    /// order. A NaN or Inf among them is an error naming the document and position.
    fn run(
        &self,
        batch: &[Vec<Entry>],
        rows: &[Row],
        shard: &mut ShardBuffer,
    ) -> anyhow::Result<Vec<Entry>> {
        let t = batch.iter().map(Vec::len).max().unwrap_or(0);
        // Right padding with token 0: attention is causal, so padding never reaches a real position.
        let mut ids = vec![0u32; batch.len() * t];
        let mut index = Vec::new();
        let mut stored = Vec::new();
        for (b, seq) in batch.iter().enumerate() {
            for (i, e) in seq.iter().enumerate() {
                ids[b * t + i] = e.token;
                if e.store {
                    index.push((b * t + i) as u32);
                    stored.push(*e);
                }
            }
        }
        let input = Tensor::from_vec(ids, (batch.len(), t), self.device)?;
        let out = self
            .model
            .transformer
            .forward(&input, &self.capture, None)?;
        let index = Tensor::from_vec(index, stored.len(), self.device)?;
        let d = self.model.transformer.config.d_model;
        for (i, hook) in self.hooks.iter().enumerate() {
            let acts = out.activations[hook]
                .reshape((batch.len() * t, d))?
                .index_select(&index, 0)?;
            let norms: Vec<f32> = acts.sqr()?.sum(1)?.sqrt()?.to_vec1()?;
            shard.norm_sums[i] += norms.iter().map(|&n| n as f64).sum::<f64>();
            let acts = acts.to_dtype(self.dtype.dtype())?.flatten_all()?;
            let buf = &mut shard.acts[i];
            let start = buf.len();
            match self.dtype {
                ActDtype::F32 => {
                    buf.extend_from_slice(bytemuck::cast_slice(&acts.to_vec1::<f32>()?))
                }
                ActDtype::F16 => {
                    buf.extend_from_slice(bytemuck::cast_slice(&acts.to_vec1::<half::f16>()?))
                }
                ActDtype::Bf16 => {
                    buf.extend_from_slice(bytemuck::cast_slice(&acts.to_vec1::<half::bf16>()?))
                }
            }
            if let Some(at) = self.dtype.first_non_finite(&buf[start..]) {
                let e = stored[at / d];
                bail!(
                    "non-finite activation at {hook} in doc_id {} pos {} (token {}): nothing was published",
                    rows[e.row as usize].doc_id,
                    e.pos,
                    e.token
                );
            }
        }
        Ok(stored)
    }
}

/// Writes the shard into a temporary directory, then renames it into place: a shard exists whole or not.
/// Returns the number of shards now written.
fn write_shard(
    partial: &Path,
    index: usize,
    hooks: &[Hook],
    d: usize,
    dtype: ActDtype,
    shard: &mut ShardBuffer,
    next_batch: u64,
) -> anyhow::Result<usize> {
    let tmp = partial.join(format!("tmp-shard-{index:05}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let mut norm_sums = BTreeMap::new();
    for (i, hook) in hooks.iter().enumerate() {
        let name = hook.to_string();
        write_act_shard(
            &tmp.join(format!("acts-{name}.parquet")),
            std::mem::take(&mut shard.acts[i]),
            d,
            dtype,
        )?;
        norm_sums.insert(name, shard.norm_sums[i]);
    }
    saeflow_core::data::parquet::write_batches(
        &tmp.join("tokens.parquet"),
        &[tokens_batch(&shard.tokens)?],
    )?;
    let state = ShardState {
        next_batch,
        rows: shard.tokens.len() as u64,
        norm_sums,
    };
    saeflow_core::fs::write_atomic(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    let dest = shard_dir(partial, index);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).with_context(|| format!("publishing shard {}", dest.display()))?;
    if let Ok(dir) = std::fs::File::open(partial) {
        let _ = dir.sync_all();
    }
    *shard = ShardBuffer::new(hooks.len());
    Ok(index + 1)
}
