//! Trains a TopK SAE on a Parquet activation capture with saeflow-core alone (no pipeline file, cache or
//! runner) and saves it in SAELens' layout.
//!
//! ```sh
//! cargo run --release -p saeflow-core --example train_topk -- CAPTURE_DIR OUT_DIR [K] [EXPANSION] [STEPS]
//! ```
//! CAPTURE_DIR is a capture's directory (`capture.json` + Parquet shards), e.g. a `capture` stage's cache
//! object `cache/objects/<key>` (`saeflow status PIPELINE` lists the keys); its first hook is read.

use std::path::PathBuf;

use anyhow::Context;
use saeflow_core::data::activations::{ActivationStore, CaptureInfo};
use saeflow_core::kernels::gemm::Precision;
use saeflow_core::sae::adam::AdamConfig;
use saeflow_core::sae::format::{Provenance, Sae};
use saeflow_core::sae::step::Sparsity;
use saeflow_core::sae::trainer::{self, Callbacks, Engine, TrainConfig};

/// Prints a line every few hundred steps.
struct Print;

impl Callbacks for Print {
    fn log(&self, msg: &str) {
        eprintln!("{msg}");
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [capture, out, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: train_topk CAPTURE_DIR OUT_DIR [K] [EXPANSION] [STEPS]");
    };
    let number = |i: usize, default: u64| -> anyhow::Result<u64> {
        rest.get(i).map_or(Ok(default), |s| {
            s.parse().with_context(|| format!("`{s}` is not a number"))
        })
    };
    let (k, expansion) = (number(0, 32)? as usize, number(1, 8)? as usize);
    let (capture, out) = (PathBuf::from(capture), PathBuf::from(out));

    let info = CaptureInfo::read(&capture)?;
    let hook = info
        .hooks
        .first()
        .context("the capture has no hooks")?
        .clone();
    let store = ActivationStore::open(&capture, &hook)?;
    let (d_in, batch_size) = (store.d_model(), 1024);
    let steps = number(2, (store.rows() / batch_size as u64).max(1))?;
    let mean_norm = *info
        .mean_norm
        .get(&hook)
        .context("capture.json has no mean norm")?;

    let cfg = TrainConfig {
        d_sae: expansion * d_in,
        sparsity: Sparsity::TopK(k),
        penalty_warmup_steps: 0,
        engine: Engine::Sparse(Precision::F32),
        lr: 2e-4 / ((expansion * d_in) as f32 / 16384.0).sqrt(),
        warmup_steps: (steps / 10).min(1000),
        decay_fraction: 0.2,
        batch_size,
        steps,
        aux_coef: 1.0 / 32.0,
        dead_tokens: 10_000_000,
        grad_clip: 0.0,
        seed: 0,
        adam: AdamConfig::default(),
        log_every: (steps / 10).max(1),
        checkpoint_every: steps,
        train_splits: None,
        validation: None,
        // OpenAI's input scaling: E‖x‖ = √d_in during training, folded back into the weights at export.
        scale: ((d_in as f64).sqrt() / mean_norm) as f32,
        buffer_rows: 65_536,
    };
    eprintln!("training a TopK SAE (d_in {d_in}, d_sae {}, k {k}) on {hook}: {steps} steps of {batch_size} rows", cfg.d_sae);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let checkpoints = out.join("checkpoints");
    let state = trainer::train(&store, &cfg, &checkpoints, &Print)?;
    let from = Provenance {
        model_name: info.model.clone(),
        hook_name: hook.clone(),
        context_size: info.context,
        prepend_bos: info.tokenizer["bos"].is_number(),
        dataset_path: capture.display().to_string(),
    };
    let sae: Sae = state.to_sae(&cfg, &from)?;
    sae.save(&out)?;
    if checkpoints.exists() {
        std::fs::remove_dir_all(&checkpoints)?;
    }
    let last = state.log.last().context("no steps were logged")?;
    println!(
        "saved {} (SAELens layout): FVU {:.4}, L0 {:.1} after {} steps",
        out.display(),
        last.fvu,
        last.l0,
        last.step
    );
    Ok(())
}
