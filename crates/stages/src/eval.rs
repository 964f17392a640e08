//! `eval`: how well an SAE reconstructs held-out activations and how sparse it is, and, given the model,
//! what splicing its reconstruction into the forward pass costs the next-token loss. The metrics are SAELens'
//! `run_evals` ones (SAEBench's core eval shares them), computed by `sae::metrics`; every formula and
//! where this stage departs from SAELens is in `schemas/eval.md`.
//!
//! Reconstruction metrics read the capture's stored vectors of one split. The downstream metrics rebuild
//! that split's documents from `tokens.parquet` (so the capture must store every position) and run each
//! three times: clean, with the SAE's reconstruction replacing the hook's activation, and with zeros there.

use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::shared::SaeOnCapture;
use saeflow_core::cancel::Cancelled;
use saeflow_core::data::activations::{CaptureInfo, ReadOptions, TokenTable};
use saeflow_core::models::transformer::{kl_per_position, next_token_nll};
use saeflow_core::models::{Hook, Hooks, Intervention, LoadedModel};
use saeflow_core::sae::format::{Activation, Sae};
use saeflow_core::sae::metrics::{
    Downstream, DownstreamSummary, FeatureStats, Reconstruction, Summary, DENSITY_LOG10_EDGES,
};
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};

/// Parameters of an `eval` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// The stage whose output is the SAE (a `train` stage).
    pub sae: String,
    /// The `capture` stage whose held-out activations are reconstructed.
    pub input: String,
    /// Hook to read (default: the SAE's `hook_name` when the capture has it, else the capture's only hook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Split evaluated (held out from training).
    #[serde(default = "default_split")]
    pub split: String,
    /// Evaluate at most this many tokens of the split, in store order (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// The model the capture ran (a `[models.NAME]` entry): with it, next-token loss and KL with the SAE
    /// spliced in are measured too. The capture must store every position (`positions = "all"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Next-token predictions the downstream metrics average over (whole documents of the split, in store
    /// order, until this many).
    #[serde(default = "default_ce_tokens")]
    pub ce_tokens: u64,
    /// Vectors encoded at once.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Documents per forward pass of the model.
    #[serde(default = "default_model_batch")]
    pub model_batch: usize,
}

fn default_split() -> String {
    "test".into()
}
fn default_ce_tokens() -> u64 {
    16_384
}
fn default_batch() -> usize {
    4096
}
fn default_model_batch() -> usize {
    8
}

/// The `eval` stage kind.
pub struct Eval;

impl Stage for Eval {
    type Params = EvalParams;
    const KIND: &'static str = "eval";
    // 2: the CPU forward runs on hand-written kernels (same values to float rounding, other bits).
    // 3: the model's linear layers on kernels::gemm (likewise).
    const VERSION: u32 = 3;
    const ABOUT: &'static str = "Evaluate an SAE on held-out activations (FVU, L0, density, …) and, with the model, CE loss recovered and KL";

    fn references(p: &EvalParams) -> References {
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
            models: p
                .model
                .iter()
                .map(|m| Reference {
                    role: String::new(),
                    target: m.clone(),
                    at: key_path(&["model"]),
                })
                .collect(),
            files: Vec::new(),
        }
    }

    fn validate(p: &EvalParams) -> Result<(), ParamError> {
        let positive = [
            ("batch_size", p.batch_size as u64),
            ("model_batch", p.model_batch as u64),
            ("ce_tokens", p.ce_tokens),
            ("tokens", p.tokens.unwrap_or(1)),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(ParamError {
                    at: key_path(&[name]),
                    message: format!("`{name}` must be at least 1"),
                });
            }
        }
        if let Some(h) = &p.hook {
            if let Err(message) = h.parse::<Hook>() {
                return Err(ParamError {
                    at: key_path(&["hook"]),
                    message,
                });
            }
        }
        Ok(())
    }

    fn run(p: &EvalParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        run(p, ctx)
    }
}

fn run(p: &EvalParams, ctx: &mut StageContext) -> anyhow::Result<()> {
    let SaeOnCapture {
        sae,
        info,
        hook,
        store,
        device,
    } = SaeOnCapture::open(ctx, &p.sae, &p.input, p.hook.as_deref())?;
    let available = info.splits.get(&p.split).copied().unwrap_or(0);
    if available == 0 {
        bail!(
            "capture `{}` has no tokens in split `{}` (its splits: {}); set `split`",
            p.input,
            p.split,
            info.splits
                .iter()
                .map(|(s, n)| format!("{s} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let limit = p.tokens.unwrap_or(u64::MAX).min(available);
    ctx.log(&format!(
        "evaluating the SAE of `{}` ({} latents) on {limit} `{}` tokens of {hook} of `{}`",
        p.sae,
        sae.d_sae(),
        p.split,
        p.input
    ));
    let started = std::time::Instant::now();
    let (summary, features) = reconstruction(p, ctx, &sae, &store, &device, limit)?;
    ctx.log(&format!(
        "reconstruction metrics in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let downstream = match &p.model {
        Some(model) => {
            let started = std::time::Instant::now();
            let d = downstream(p, ctx, &sae, &info, &hook, model)?;
            ctx.log(&format!(
                "downstream metrics in {:.1}s",
                started.elapsed().as_secs_f64()
            ));
            Some(d)
        }
        None => None,
    };

    let out = &ctx.out_dir;
    saeflow_core::data::parquet::write_batches(
        &out.join("features.parquet"),
        &[features_batch(&sae, &features)?],
    )?;
    saeflow_core::data::parquet::write_batches(
        &out.join("metrics.parquet"),
        &[metrics_batch(
            p,
            &sae,
            &hook,
            &summary,
            downstream.as_ref(),
        )?],
    )?;
    let report = eval_json(p, &sae, &hook, &summary, downstream.as_ref());
    std::fs::write(
        out.join("eval.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    ctx.metrics.insert("fvu".into(), json!(summary.fvu));
    ctx.metrics.insert("l0".into(), json!(summary.l0));
    let mut line = format!(
        "FVU {:.4}, L0 {:.1}, dead {:.1}%",
        summary.fvu,
        summary.l0,
        100.0 * summary.dead_fraction
    );
    if let Some(d) = &downstream {
        ctx.metrics
            .insert("ce_loss_score".into(), json!(d.ce_loss_score));
        line += &format!(
            ", CE {:.4} clean / {:.4} with SAE / {:.4} ablated (recovered {:.4}), KL {:.4}",
            d.ce_loss_without_sae,
            d.ce_loss_with_sae,
            d.ce_loss_with_ablation,
            d.ce_loss_score,
            d.kl_div_with_sae
        );
    }
    ctx.log(&line);
    Ok(())
}

/// One pass over the split's stored vectors.
fn reconstruction(
    p: &EvalParams,
    ctx: &StageContext,
    sae: &Sae,
    store: &saeflow_core::data::activations::ActivationStore,
    device: &Device,
    limit: u64,
) -> anyhow::Result<(Summary, FeatureStats)> {
    let options = ReadOptions {
        batch_size: p.batch_size,
        splits: Some(vec![p.split.clone()]),
        ..ReadOptions::default()
    };
    let mut sums = Reconstruction::new(sae.d_in(), sae.d_sae());
    ctx.progress.set_total(limit);
    for batch in store.batches(&options, device)? {
        if ctx.cancel.is_cancelled() {
            return Err(Cancelled.into());
        }
        let left = (limit - sums.tokens()) as usize;
        let x = batch?.acts;
        let x = x.narrow(0, 0, x.dim(0)?.min(left))?;
        let (codes, recon) = sae.encode_and_reconstruct(&x)?;
        sums.add(&x, &codes, &recon)?;
        ctx.progress.set_position(sums.tokens());
        if sums.tokens() >= limit {
            break;
        }
    }
    let (summary, features) = sums.summary();
    if !(summary.mse.is_finite() && summary.l1.is_finite()) {
        bail!(
            "the SAE of `{}` gives non-finite reconstructions or latents on `{}` (mse {}, l1 {}): are its \
             weights finite?",
            p.sae,
            p.input,
            summary.mse,
            summary.l1
        );
    }
    Ok((summary, features))
}

/// The split's documents as token sequences, whole (up to the capture's context) and in store order, until
/// `ce_tokens` next-token predictions are counted; and how many leading positions are BOS (never replaced
/// nor counted, as SAELens leaves special tokens alone).
fn documents(
    p: &EvalParams,
    ctx: &StageContext,
    info: &CaptureInfo,
) -> anyhow::Result<(Vec<Vec<u32>>, usize)> {
    let positions = info.settings["positions"].as_str().unwrap_or("unknown");
    if positions != "all" {
        bail!(
            "the downstream metrics rerun the model on whole documents, but capture `{}` stored positions = \
             \"{positions}\": capture with positions = \"all\", or leave `model` out of `eval`",
            p.input
        );
    }
    let bos = info.tokenizer["bos"].as_u64().map(|b| b as u32);
    let skip = usize::from(bos.is_some());
    let table = TokenTable::read(&ctx.inputs["input"])?;
    let split = table
        .split_index(&p.split)
        .context("split present in capture.json but not in tokens.parquet")?;
    let mut docs = Vec::new();
    let mut counted = 0u64;
    let mut row = 0;
    while row < table.doc_id.len() && counted < p.ce_tokens {
        let doc = table.doc_id[row];
        let end = row
            + table.doc_id[row..]
                .iter()
                .take_while(|&&d| d == doc)
                .count();
        if table.split[row] == split {
            let first = table.pos[row];
            let whole = || {
                anyhow::anyhow!(
                    "capture `{}`: doc_id {doc} does not store every position from its start (first pos \
                     {first}); the downstream metrics need whole documents",
                    p.input
                )
            };
            let contiguous = table.pos[row..end]
                .iter()
                .enumerate()
                .all(|(i, &pos)| pos == first + i as u32);
            if !contiguous {
                return Err(whole());
            }
            let mut ids = match (first, bos) {
                (0, _) => Vec::new(),
                (1, Some(b)) => vec![b],
                _ => return Err(whole()),
            };
            ids.extend_from_slice(&table.token_id[row..end]);
            ids.truncate(info.context.max(2));
            if ids.len() >= skip + 2 {
                counted += (ids.len() - skip - 1) as u64;
                docs.push(ids);
            }
        }
        row = end;
    }
    Ok((docs, skip))
}

/// Replaces the hook's activation after the first `skip` positions by the SAE's reconstruction, or by zeros.
fn splice(sae: &Sae, skip: usize, zeros: bool) -> Intervention {
    let sae = sae.clone();
    Arc::new(move |x: &Tensor| {
        let (b, t, d) = x.dims3()?;
        if t <= skip {
            return Ok(x.clone());
        }
        let tail = x.narrow(1, skip, t - skip)?;
        let new = if zeros {
            tail.zeros_like()?
        } else {
            let flat = tail.reshape((b * (t - skip), d))?.to_dtype(DType::F32)?;
            sae.reconstruct(&flat)?
                .reshape((b, t - skip, d))?
                .to_dtype(x.dtype())?
        };
        if skip == 0 {
            Ok(new)
        } else {
            Tensor::cat(&[&x.narrow(1, 0, skip)?, &new], 1)
        }
    })
}

/// Next-token loss and KL, clean / spliced / ablated, over the split's documents.
fn downstream(
    p: &EvalParams,
    ctx: &StageContext,
    sae: &Sae,
    info: &CaptureInfo,
    hook: &str,
    model_name: &str,
) -> anyhow::Result<DownstreamSummary> {
    let key = ctx.model_keys.get(model_name).cloned().unwrap_or_default();
    if !info.model_key.is_empty() && info.model_key != key {
        bail!(
            "capture `{}` ran model `{}`, not `{model_name}` (their keys differ): the SAE must be spliced \
             into the model whose activations it was trained on",
            p.input,
            info.model
        );
    }
    let (mut docs, skip) = documents(p, ctx, info)?;
    // Batches of similar lengths waste little on padding (mixed datasets range from 10 to 128 tokens).
    // The sort is stable, so the batches are the same on every run.
    docs.sort_by_key(|d| std::cmp::Reverse(d.len()));
    if docs.is_empty() {
        bail!(
            "capture `{}` has no document in split `{}` long enough for a next-token loss",
            p.input,
            p.split
        );
    }
    let (model, device) = crate::shared::load_model(ctx, model_name)?;
    let hook: Hook = hook.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    model
        .transformer
        .check_hook(&hook)
        .with_context(|| format!("model `{model_name}`"))?;
    let variants: [Hooks; 3] = [
        Hooks::logits(),
        with_intervention(hook, splice(sae, skip, false)),
        with_intervention(hook, splice(sae, skip, true)),
    ];
    let mut sums = Downstream::default();
    let total: u64 = docs.iter().map(|d| (d.len() - skip - 1) as u64).sum();
    ctx.log(&format!(
        "next-token loss on {} documents ({total} predictions) of `{}`, clean / SAE at {hook} / zeros",
        docs.len(),
        p.split
    ));
    ctx.progress.set_total(total);
    ctx.progress.set_position(0);
    for batch in docs.chunks(p.model_batch) {
        if ctx.cancel.is_cancelled() {
            return Err(Cancelled.into());
        }
        downstream_batch(&model, &device, batch, skip, &variants, &mut sums)?;
        ctx.progress.set_position(sums.ce_positions());
    }
    let summary = sums.summary();
    if !summary.ce_loss_with_sae.is_finite() || !summary.kl_div_with_sae.is_finite() {
        bail!(
            "non-finite loss with the SAE of `{}` spliced in at {hook} (CE {}, KL {})",
            p.sae,
            summary.ce_loss_with_sae,
            summary.kl_div_with_sae
        );
    }
    Ok(summary)
}

fn with_intervention(hook: Hook, f: Intervention) -> Hooks {
    let mut h = Hooks::logits();
    h.interventions.insert(hook, f);
    h
}

/// Runs one batch of documents (right-padded: attention is causal) under each variant and adds the losses
/// of their real positions.
fn downstream_batch(
    model: &LoadedModel,
    device: &Device,
    batch: &[Vec<u32>],
    skip: usize,
    variants: &[Hooks; 3],
    sums: &mut Downstream,
) -> anyhow::Result<()> {
    let t = batch.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0u32; batch.len() * t];
    for (b, doc) in batch.iter().enumerate() {
        ids[b * t..b * t + doc.len()].copy_from_slice(doc);
    }
    let tokens = Tensor::from_vec(ids, (batch.len(), t), device)?;
    let mut logits = Vec::with_capacity(3);
    for hooks in variants {
        let out = model.transformer.forward(&tokens, hooks, None)?;
        logits.push(
            out.logits
                .context("forward returned no logits")?
                .to_dtype(DType::F32)?,
        );
    }
    let nll: Vec<Vec<Vec<f32>>> = logits
        .iter()
        .map(|l| next_token_nll(l, &tokens)?.to_vec2::<f32>())
        .collect::<candle_core::Result<_>>()?;
    let kl: Vec<Vec<Vec<f32>>> = logits[1..]
        .iter()
        .map(|l| kl_per_position(&logits[0], l)?.to_vec2::<f32>())
        .collect::<candle_core::Result<_>>()?;
    for (b, doc) in batch.iter().enumerate() {
        // Position i predicts token i + 1: the last real position predicts nothing.
        let (ce, kl_range) = (skip..doc.len() - 1, skip..doc.len());
        sums.add(
            [
                &nll[0][b][ce.clone()],
                &nll[1][b][ce.clone()],
                &nll[2][b][ce],
            ],
            [&kl[0][b][kl_range.clone()], &kl[1][b][kl_range]],
        );
    }
    Ok(())
}

/// Architecture name and k of a loaded SAE.
fn architecture(sae: &Sae) -> (&'static str, Option<u64>) {
    match sae.activation {
        Activation::Relu => ("relu", None),
        Activation::TopK(k) => ("topk", Some(k as u64)),
        Activation::ReluTopK(k) => ("relu_topk", Some(k as u64)),
        Activation::JumpRelu => ("jumprelu", None),
    }
}

/// Per feature: density statistics and SAELens' weight-based metrics.
fn features_batch(sae: &Sae, f: &FeatureStats) -> anyhow::Result<RecordBatch> {
    let cpu = Device::Cpu;
    let w_enc = sae.w_enc.to_device(&cpu)?.to_dtype(DType::F64)?;
    let w_dec = sae.w_dec.to_device(&cpu)?.to_dtype(DType::F64)?;
    let enc_norm = w_enc.sqr()?.sum(0)?.sqrt()?.to_vec1::<f64>()?;
    let dec_norm = w_dec.sqr()?.sum(1)?.sqrt()?.to_vec1::<f64>()?;
    let dot = (w_enc.t()? * &w_dec)?.sum(1)?.to_vec1::<f64>()?;
    let cos: Vec<f64> = (0..dot.len())
        .map(|j| {
            let norms = enc_norm[j] * dec_norm[j];
            if norms > 0.0 {
                dot[j] / norms
            } else {
                0.0
            }
        })
        .collect();
    let bias = sae
        .b_enc
        .to_device(&cpu)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    let f64s = |v: Vec<f64>| Arc::new(Float64Array::from(v)) as ArrayRef;
    Ok(RecordBatch::try_from_iter([
        (
            "feature",
            Arc::new(UInt32Array::from_iter_values(0..sae.d_sae() as u32)) as ArrayRef,
        ),
        (
            "fires",
            Arc::new(UInt64Array::from(f.fires.clone())) as ArrayRef,
        ),
        ("density", f64s(f.density.clone())),
        ("mean_when_active", f64s(f.mean_when_active.clone())),
        ("max", f64s(f.max.iter().map(|&m| m as f64).collect())),
        ("encoder_norm", f64s(enc_norm)),
        ("decoder_norm", f64s(dec_norm)),
        ("encoder_decoder_cosine_sim", f64s(cos)),
        ("encoder_bias", f64s(bias)),
    ])?)
}

/// The flat numbers of one evaluation: one row, so the rows of a sweep's evals stack into an L0 frontier.
fn metric_columns(s: &Summary, d: Option<&DownstreamSummary>) -> Vec<(&'static str, Option<f64>)> {
    let mut columns = vec![
        ("mse", Some(s.mse)),
        ("fvu", Some(s.fvu)),
        ("explained_variance", Some(s.explained_variance)),
        ("cossim", Some(s.cossim)),
        ("l2_norm_in", Some(s.l2_norm_in)),
        ("l2_norm_out", Some(s.l2_norm_out)),
        ("l2_ratio", Some(s.l2_ratio)),
        (
            "relative_reconstruction_bias",
            Some(s.relative_reconstruction_bias),
        ),
        ("l0", Some(s.l0)),
        ("l1", Some(s.l1)),
        ("dead_fraction", Some(s.dead_fraction)),
        ("dense_1pct_fraction", Some(s.dense_1pct_fraction)),
        ("dense_10pct_fraction", Some(s.dense_10pct_fraction)),
    ];
    let downstream = [
        ("ce_loss_without_sae", d.map(|d| d.ce_loss_without_sae)),
        ("ce_loss_with_sae", d.map(|d| d.ce_loss_with_sae)),
        ("ce_loss_with_ablation", d.map(|d| d.ce_loss_with_ablation)),
        ("ce_loss_score", d.map(|d| d.ce_loss_score)),
        ("kl_div_with_sae", d.map(|d| d.kl_div_with_sae)),
        ("kl_div_with_ablation", d.map(|d| d.kl_div_with_ablation)),
        ("kl_div_score", d.map(|d| d.kl_div_score)),
    ];
    columns.extend(downstream);
    columns
}

fn metrics_batch(
    p: &EvalParams,
    sae: &Sae,
    hook: &str,
    s: &Summary,
    d: Option<&DownstreamSummary>,
) -> anyhow::Result<RecordBatch> {
    let (arch, k) = architecture(sae);
    let text = |v: &str| Arc::new(StringArray::from(vec![v.to_string()])) as ArrayRef;
    let count = |v: Option<u64>| Arc::new(UInt64Array::from(vec![v])) as ArrayRef;
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("sae", text(&p.sae)),
        ("architecture", text(arch)),
        ("d_in", count(Some(sae.d_in() as u64))),
        ("d_sae", count(Some(sae.d_sae() as u64))),
        ("k", count(k)),
        ("hook", text(hook)),
        ("split", text(&p.split)),
        ("tokens", count(Some(s.tokens))),
        ("ce_positions", count(d.map(|d| d.ce_positions))),
    ];
    for (name, value) in metric_columns(s, d) {
        columns.push((name, Arc::new(Float64Array::from(vec![value])) as ArrayRef));
    }
    Ok(RecordBatch::try_from_iter(columns)?)
}

/// `eval.json`: the metrics grouped as SAELens' `run_evals` groups them, plus the density histogram.
fn eval_json(
    p: &EvalParams,
    sae: &Sae,
    hook: &str,
    s: &Summary,
    d: Option<&DownstreamSummary>,
) -> serde_json::Value {
    let (arch, k) = architecture(sae);
    let mut report = json!({
        "sae": p.sae,
        "input": p.input,
        "hook": hook,
        "split": p.split,
        "architecture": arch,
        "k": k,
        "d_in": sae.d_in(),
        "d_sae": sae.d_sae(),
        "reconstruction_quality": {
            "mse": s.mse,
            "fvu": s.fvu,
            "explained_variance": s.explained_variance,
            "cossim": s.cossim,
        },
        "shrinkage": {
            "l2_norm_in": s.l2_norm_in,
            "l2_norm_out": s.l2_norm_out,
            "l2_ratio": s.l2_ratio,
            "relative_reconstruction_bias": s.relative_reconstruction_bias,
        },
        "sparsity": {
            "l0": s.l0,
            "l1": s.l1,
            "dead_fraction": s.dead_fraction,
            "dense_1pct_fraction": s.dense_1pct_fraction,
            "dense_10pct_fraction": s.dense_10pct_fraction,
        },
        "density_histogram": {
            "log10_edges": DENSITY_LOG10_EDGES,
            "counts": s.density_histogram,
            "dead": (s.dead_fraction * sae.d_sae() as f64).round() as u64,
        },
        "token_stats": {
            "tokens_eval_sparsity_variance": s.tokens,
        },
    });
    if let Some(d) = d {
        report["model_performance_preservation"] = json!({
            "ce_loss_score": d.ce_loss_score,
            "ce_loss_with_ablation": d.ce_loss_with_ablation,
            "ce_loss_with_sae": d.ce_loss_with_sae,
            "ce_loss_without_sae": d.ce_loss_without_sae,
        });
        report["model_behavior_preservation"] = json!({
            "kl_div_score": d.kl_div_score,
            "kl_div_with_ablation": d.kl_div_with_ablation,
            "kl_div_with_sae": d.kl_div_with_sae,
        });
        report["token_stats"]["ce_positions"] = json!(d.ce_positions);
        report["token_stats"]["kl_positions"] = json!(d.kl_positions);
        report["model"] = json!(p.model);
    }
    report
}
