//! `train`: trains an SAE on one hook of a capture and exports it in SAELens layout (`cfg.json`,
//! `sae_weights.safetensors`, `sparsity.safetensors`) with `train_log.parquet` and `train.json`.
//! Checkpoints in the partial directory make an interrupted run resume bit-identically.

use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::builder::{Float64Builder, UInt64Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{Field, Schema};
use candle_core::Tensor;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use saeflow_core::cancel::Cancelled;
use saeflow_core::data::activations::{ActivationStore, CaptureInfo};
use saeflow_core::kernels::gemm::{Kernel, Precision};
use saeflow_core::sae::adam::AdamConfig;
use saeflow_core::sae::format::Provenance;
use saeflow_core::sae::trainer::{self, Engine, LogRow, Stop, TrainConfig};
use saeflow_runner::stage::{key_path, ParamError, Reference, References, Stage, StageContext};

/// SAE architectures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// TopK with AuxK (OpenAI / sparsify).
    #[default]
    Topk,
    /// BatchTopK (k·batch largest activations per batch, learned threshold; exported as JumpReLU).
    Batchtopk,
    /// JumpReLU: learned per-latent thresholds, L0 penalty, straight-through estimator (SAELens).
    Jumprelu,
    /// ReLU with an L1 penalty weighted by decoder-row norms (SAELens `standard`).
    Relu,
}

/// JumpReLU sparsity penalties.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum L0ModeChoice {
    /// λ × active latents, threshold gradient through the step's straight-through estimate.
    #[default]
    Step,
    /// λ × Σ tanh(c·a·‖W_dec‖).
    Tanh,
}

/// Which training step implementation runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// Sparse on the CPU, dense (device-resident) elsewhere.
    #[default]
    Auto,
    /// The sparse CPU path.
    Sparse,
    /// The device-resident engine: the whole state on the pipeline's device, dense tensor operations.
    Dense,
}

/// Precision of the encoder product that ranks TopK latents (sparse engine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PrecisionChoice {
    /// Where it applies (TopK on the sparse engine): `bf16` where bf16 products outrun f32 ones (AMX, or
    /// AVX512-BF16 on AMD), else `int16` where those do (AVX2 without AVX-512: AMD Zen 1–3); `f32`
    /// otherwise.
    #[default]
    Auto,
    /// f32 throughout.
    F32,
    /// Latents ranked by a bf16 product (AMX tiles, else AVX512-BF16), the chosen activations computed in
    /// f32; on a CPU with neither, the f32 product.
    Bf16,
    /// Latents ranked by a product of per-row scaled 16-bit integers (AVX2 `vpmaddwd`, exact i32 sums),
    /// the chosen activations computed in f32; on a CPU without AVX2, the f32 product.
    Int16,
}

impl PrecisionChoice {
    /// The product the sparse engine runs for `arch` on this CPU.
    fn resolve(self, arch: Arch) -> Precision {
        match self {
            Self::F32 => Precision::F32,
            Self::Bf16 => Precision::Bf16,
            Self::Int16 => Precision::Int16,
            Self::Auto if arch != Arch::Topk => Precision::F32,
            Self::Auto if Precision::bf16_faster() => Precision::Bf16,
            Self::Auto if Precision::int16_faster() => Precision::Int16,
            Self::Auto => Precision::F32,
        }
    }

    /// How `encoder_precision` spells a rounded ranking, for messages (`None` for `auto` and `f32`).
    fn rounded(self) -> Option<&'static str> {
        match self {
            Self::Bf16 | Self::Int16 => Some(self.resolve(Arch::Topk).name()),
            Self::Auto | Self::F32 => None,
        }
    }
}

/// Parameters of a `train` stage.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    /// The `capture` stage to train on.
    pub input: String,
    /// Hook to train on (default: the capture's only hook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// Architecture.
    #[serde(default)]
    pub arch: Arch,
    /// Latents per input dimension (d_sae = expansion × d_in).
    #[serde(default = "default_expansion")]
    pub expansion: usize,
    /// Active latents per token (topk; batchtopk: on average).
    #[serde(default = "default_k")]
    pub k: usize,
    /// JumpReLU's L0 coefficient.
    #[serde(default = "default_l0")]
    pub l0_coef: f64,
    /// JumpReLU's kernel width for the threshold gradient.
    #[serde(default = "default_bandwidth")]
    pub bandwidth: f64,
    /// JumpReLU's sparsity penalty: `step` (L0, Google DeepMind) or `tanh` (Σ tanh(c·a·‖W_dec‖), Anthropic).
    #[serde(default)]
    pub l0_mode: L0ModeChoice,
    /// Scale c of the `tanh` penalty.
    #[serde(default = "default_tanh_scale")]
    pub tanh_scale: f64,
    /// JumpReLU's pre-activation loss on dead latents, Σ relu(θ − pre)·‖W_dec‖ (0: off; Anthropic: 3e-6).
    #[serde(default)]
    pub pre_act_coef: f64,
    /// ReLU's L1 coefficient.
    #[serde(default = "default_l1")]
    pub l1_coef: f64,
    /// Steps over which the L0/L1 coefficient ramps up from 0.
    #[serde(default)]
    pub penalty_warmup_steps: u64,
    /// Training step implementation: `auto` (sparse on the CPU, dense on a GPU), `sparse` (CPU), `dense`
    /// (the whole training state on the pipeline's device, tensor operations; per step only the batch goes
    /// in and a few scalars come out). Results agree to float rounding, not bit for bit.
    #[serde(default)]
    pub engine: EngineChoice,
    /// Encoder product that ranks TopK latents on the sparse engine: `auto` (`bf16` where the CPU
    /// has AMX, or AVX512-BF16 on AMD; `int16` where it has AVX2 but not AVX-512; else `f32`), `f32`,
    /// `bf16` or `int16` (faster: candidates within a proven error bound of the k-th rounded value are
    /// recomputed in f32, so the chosen latents are f32 TopK's up to f32 rounding order, and the kept
    /// activations and every gradient stay f32).
    #[serde(default)]
    pub encoder_precision: PrecisionChoice,
    /// Peak learning rate (default 2e-4 / √(d_sae / 2¹⁴), sparsify's rule for Adam).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Training tokens (default: one pass over the training rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Tokens per step.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Linear warm-up steps (default: min(1000, steps / 10)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Fraction of the steps at the end with a linear decay of the rate to 0.
    #[serde(default = "default_decay")]
    pub decay: f64,
    /// AuxK loss coefficient (0 disables it).
    #[serde(default = "default_aux")]
    pub aux_coef: f64,
    /// Tokens without firing after which a latent is dead (AuxK's pool and the dead fraction).
    #[serde(default = "default_dead_tokens")]
    pub dead_tokens: u64,
    /// Global gradient-norm clip (0 disables it).
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    /// Capture splits to train on.
    #[serde(default = "default_splits")]
    pub splits: Vec<String>,
    /// Split held out for validation FVU / L0 (skipped when the capture has none).
    #[serde(default = "default_val_split")]
    pub val_split: String,
    /// Validation rows.
    #[serde(default = "default_val_tokens")]
    pub val_tokens: usize,
    /// Steps between log rows.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Steps between checkpoints.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Rows in the shuffle buffer.
    #[serde(default = "default_buffer")]
    pub buffer_rows: usize,
}

fn default_expansion() -> usize {
    8
}
fn default_k() -> usize {
    32
}
fn default_l0() -> f64 {
    1.0
}
fn default_tanh_scale() -> f64 {
    4.0
}
fn default_bandwidth() -> f64 {
    0.05
}
fn default_l1() -> f64 {
    1.0
}
fn default_batch_size() -> usize {
    4096
}
fn default_decay() -> f64 {
    0.2
}
fn default_aux() -> f64 {
    1.0 / 32.0
}
fn default_dead_tokens() -> u64 {
    10_000_000
}
fn default_clip() -> f64 {
    1.0
}
fn default_splits() -> Vec<String> {
    vec!["train".into()]
}
fn default_val_split() -> String {
    "val".into()
}
fn default_val_tokens() -> usize {
    8192
}
fn default_log_every() -> u64 {
    50
}
fn default_checkpoint_every() -> u64 {
    200
}
fn default_buffer() -> usize {
    1 << 16
}

/// The `train` stage kind.
pub struct Train;

impl Stage for Train {
    type Params = TrainParams;
    const KIND: &'static str = "train";
    // 2: the batch error and variance are summed in parallel blocks (train_log's MSE/FVU: other last bits).
    const VERSION: u32 = 3;
    const ABOUT: &'static str =
        "Train a sparse autoencoder on captured activations and export it in SAELens layout";

    fn references(p: &TrainParams) -> References {
        References {
            inputs: vec![Reference {
                role: "input".into(),
                target: p.input.clone(),
                at: key_path(&["input"]),
            }],
            ..References::default()
        }
    }

    fn validate(p: &TrainParams) -> Result<(), ParamError> {
        let positive = [
            ("expansion", p.expansion as u64),
            ("k", p.k as u64),
            ("batch_size", p.batch_size as u64),
            ("log_every", p.log_every),
            ("checkpoint_every", p.checkpoint_every),
            ("buffer_rows", p.buffer_rows as u64),
            ("tokens", p.tokens.unwrap_or(1)),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ParamError {
                    at: key_path(&[name]),
                    message: format!("`{name}` must be at least 1"),
                });
            }
        }
        let fraction = [("decay", p.decay)];
        for (name, v) in fraction {
            if !(0.0..=1.0).contains(&v) {
                return Err(ParamError {
                    at: key_path(&[name]),
                    message: format!("`{name}` must be between 0 and 1"),
                });
            }
        }
        if let Some(name) = p.encoder_precision.rounded() {
            let why = if p.arch != Arch::Topk {
                Some("ranks TopK latents only: use it with `arch = \"topk\"`")
            } else if p.engine == EngineChoice::Dense {
                Some("runs on the sparse CPU engine, not `engine = \"dense\"`")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ParamError {
                    at: key_path(&["encoder_precision"]),
                    message: format!("`encoder_precision = \"{name}\"` {why}"),
                });
            }
        }
        if !(p.tanh_scale > 0.0 && p.tanh_scale.is_finite()) {
            return Err(ParamError {
                at: key_path(&["tanh_scale"]),
                message: "`tanh_scale` must be positive".into(),
            });
        }
        if !(p.pre_act_coef >= 0.0 && p.pre_act_coef.is_finite()) {
            return Err(ParamError {
                at: key_path(&["pre_act_coef"]),
                message: "`pre_act_coef` must be 0 (off) or positive".into(),
            });
        }
        if p.bandwidth <= 0.0 {
            return Err(ParamError {
                at: key_path(&["bandwidth"]),
                message: "`bandwidth` must be positive".into(),
            });
        }
        if p.lr.is_some_and(|lr| lr <= 0.0) {
            return Err(ParamError {
                at: key_path(&["lr"]),
                message: "`lr` must be positive".into(),
            });
        }
        Ok(())
    }

    fn run(p: &TrainParams, ctx: &mut StageContext) -> anyhow::Result<()> {
        Self::run_group(std::slice::from_ref(p), std::slice::from_mut(ctx))
            .pop()
            .expect("one result per member")
    }

    /// What the data order does not depend on: a sweep over these trains on one pass over the activations.
    const GROUPABLE: &'static [&'static str] = &[
        "arch",
        "expansion",
        "k",
        "l0_coef",
        "bandwidth",
        "l0_mode",
        "tanh_scale",
        "pre_act_coef",
        "l1_coef",
        "penalty_warmup_steps",
        "engine",
        "encoder_precision",
        "lr",
        "tokens",
        "warmup_steps",
        "decay",
        "aux_coef",
        "dead_tokens",
        "grad_clip",
        "log_every",
        "checkpoint_every",
    ];

    fn run_group(params: &[TrainParams], ctxs: &mut [StageContext]) -> Vec<anyhow::Result<()>> {
        let mut results: Vec<Option<anyhow::Result<()>>> = Vec::new();
        let mut members = Vec::new();
        for (p, ctx) in params.iter().zip(ctxs.iter()) {
            match prepare(p, ctx) {
                Ok(m) => {
                    members.push((results.len(), m));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if let Some((_, first)) = members.first() {
            let reports: Vec<Report> = members
                .iter()
                .map(|(i, m)| Report::new(&ctxs[*i], m.cfg.batch_size as u64))
                .collect();
            let runs: Vec<trainer::Run> = members
                .iter()
                .zip(&reports)
                .map(|((i, m), report)| trainer::Run {
                    cfg: &m.cfg,
                    checkpoints: ctxs[*i].partial_dir.join("checkpoints"),
                    callbacks: report,
                })
                .collect();
            let started = std::time::Instant::now();
            let states = trainer::train_group(&first.store, &runs);
            let secs = started.elapsed().as_secs_f64();
            for (((i, m), report), state) in members.iter().zip(&reports).zip(states) {
                let result = match state {
                    Ok(state) => {
                        let trained = m.cfg.steps - report.first_step.get().unwrap_or(m.cfg.steps);
                        export(&params[*i], &mut ctxs[*i], m, &state, trained, secs)
                    }
                    Err(e) if e.downcast_ref::<Stop>().is_some() => Err(Cancelled.into()),
                    Err(e) => Err(e),
                };
                results[*i] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every member has a result"))
            .collect()
    }
}

/// A member ready to train: its store, resolved hook and configuration.
struct Prepared {
    info: CaptureInfo,
    store: ActivationStore,
    hook: String,
    cfg: TrainConfig,
}

/// Reports a member's steps to its progress bar and its lines to its log.
struct Report {
    progress: saeflow_core::progress::Progress,
    cancel: saeflow_core::cancel::Cancel,
    log_path: std::path::PathBuf,
    partial_sync: saeflow_runner::stage::PartialSync,
    batch: u64,
    first_step: std::cell::Cell<Option<u64>>,
}

impl Report {
    fn new(ctx: &StageContext, batch: u64) -> Self {
        Self {
            progress: ctx.progress.clone(),
            cancel: ctx.cancel.clone(),
            log_path: ctx.log_path.clone(),
            partial_sync: ctx.partial_sync.clone(),
            batch,
            first_step: Default::default(),
        }
    }
}

impl trainer::Callbacks for Report {
    fn progress(&self, step: u64) {
        if self.first_step.get().is_none() {
            self.first_step.set(Some(step - 1));
            self.progress.set_position((step - 1) * self.batch);
        }
        self.progress.inc(self.batch);
    }
    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
    fn log(&self, msg: &str) {
        saeflow_runner::stage::log_line(&self.log_path, &self.progress, msg)
    }
    fn checkpointed(&self) -> anyhow::Result<()> {
        self.partial_sync.saved()
    }
    fn traffic(&self, steps: trainer::Traffic, state_copies: trainer::Traffic) {
        let mb = |b: u64| b as f64 / 1e6;
        self.log(&format!(
            "host↔device: steps moved {:.1} MB in (batches) and {:.1} kB out (scalars); whole-state copies \
             {:.1} MB in, {:.1} MB out (setup, checkpoints, end)",
            mb(steps.to_device),
            steps.to_host as f64 / 1e3,
            mb(state_copies.to_device),
            mb(state_copies.to_host),
        ));
    }
}

/// Reads the capture's metadata and turns the parameters into a training configuration.
fn prepare(p: &TrainParams, ctx: &StageContext) -> anyhow::Result<Prepared> {
    let dir = &ctx.inputs["input"];
    let info = CaptureInfo::read(dir)
        .with_context(|| format!("input `{}` is not a capture stage", p.input))?;
    let hook = match &p.hook {
        Some(h) => h.clone(),
        None if info.hooks.len() == 1 => info.hooks[0].clone(),
        None => bail!(
            "capture `{}` has several hooks ({}); choose one with `hook`",
            p.input,
            info.hooks.join(", ")
        ),
    };
    let store =
        ActivationStore::open(dir, &hook).with_context(|| format!("input `{}`", p.input))?;
    let d_in = store.d_model();
    let d_sae = p.expansion * d_in;
    if matches!(p.arch, Arch::Topk | Arch::Batchtopk) && p.k > d_sae {
        bail!(
            "k = {} exceeds the SAE's {d_sae} latents (expansion {} × d_in {d_in})",
            p.k,
            p.expansion
        );
    }
    let train_rows: u64 = p
        .splits
        .iter()
        .map(|s| info.splits.get(s).copied().unwrap_or(0))
        .sum();
    if train_rows < p.batch_size as u64 {
        bail!(
            "capture `{}` has {train_rows} rows in splits {:?} (it has: {}), fewer than one batch of {}",
            p.input,
            p.splits,
            info.splits.iter().map(|(s, n)| format!("{s} {n}")).collect::<Vec<_>>().join(", "),
            p.batch_size
        );
    }
    let tokens = p.tokens.unwrap_or(train_rows);
    let steps = (tokens / p.batch_size as u64).max(1);
    let mean_norm = info.mean_norm.get(&hook).copied().unwrap_or(0.0);
    if !(mean_norm.is_finite() && mean_norm > 0.0) {
        bail!(
            "capture `{}` records no usable mean norm for {hook}",
            p.input
        );
    }
    use saeflow_core::sae::step::Sparsity;
    let sparsity = match p.arch {
        Arch::Topk => Sparsity::TopK(p.k),
        Arch::Batchtopk => Sparsity::BatchTopK(p.k),
        Arch::Jumprelu => Sparsity::JumpRelu {
            l0: p.l0_coef as f32,
            bandwidth: p.bandwidth as f32,
            mode: match p.l0_mode {
                L0ModeChoice::Step => saeflow_core::sae::step::L0Mode::Step,
                L0ModeChoice::Tanh => saeflow_core::sae::step::L0Mode::Tanh(p.tanh_scale as f32),
            },
            pre_act: p.pre_act_coef as f32,
        },
        Arch::Relu => Sparsity::Relu {
            l1: p.l1_coef as f32,
        },
    };
    let device = saeflow_core::models::device(ctx.device)?;
    let precision = p.encoder_precision.resolve(p.arch);
    let engine = match p.engine {
        EngineChoice::Sparse => Engine::Sparse(precision),
        EngineChoice::Auto if device.is_cpu() => Engine::Sparse(precision),
        _ => Engine::Dense(device),
    };
    if let (Some(name), Engine::Dense(device)) = (p.encoder_precision.rounded(), &engine) {
        bail!(
            "encoder_precision = \"{name}\" runs on the sparse CPU engine, but `engine = \"auto\"` \
             chose the dense engine on {device:?}; set `engine = \"sparse\"` or `encoder_precision = \"f32\"`"
        );
    }
    let cfg = TrainConfig {
        d_sae,
        sparsity,
        penalty_warmup_steps: p.penalty_warmup_steps,
        engine,
        lr: p.lr.unwrap_or(2e-4 / (d_sae as f64 / 16384.0).sqrt()) as f32,
        warmup_steps: p.warmup_steps.unwrap_or((steps / 10).min(1000)),
        decay_fraction: p.decay,
        batch_size: p.batch_size,
        steps,
        aux_coef: p.aux_coef as f32,
        dead_tokens: p.dead_tokens,
        grad_clip: p.grad_clip as f32,
        seed: ctx.seed,
        adam: AdamConfig::default(),
        log_every: p.log_every,
        checkpoint_every: p.checkpoint_every,
        train_splits: Some(p.splits.clone()),
        validation: info
            .splits
            .contains_key(&p.val_split)
            .then(|| (p.val_split.clone(), p.val_tokens)),
        scale: ((d_in as f64).sqrt() / mean_norm) as f32,
        buffer_rows: p.buffer_rows,
    };
    ctx.log(&format!(
        "training a {} SAE (d_in {d_in}, d_sae {d_sae}, k {}) on {hook} of `{}`: {steps} steps of {} tokens, lr {:.2e}, {} engine",
        format!("{:?}", p.arch).to_lowercase(),
        p.k,
        p.input,
        p.batch_size,
        cfg.lr,
        engine_name(&cfg.engine)
    ));
    ctx.progress.set_total(steps * p.batch_size as u64);
    Ok(Prepared {
        info,
        store,
        hook,
        cfg,
    })
}

/// How `engine` trains on this machine, for the log and `train.json`.
fn engine_name(engine: &Engine) -> String {
    match engine {
        Engine::Sparse(precision) => match Kernel::best(*precision) {
            kernel if kernel.rounds() => format!(
                "sparse CPU ({}-ranked TopK, {})",
                kernel.precision().name(),
                kernel.name()
            ),
            _ if *precision != Precision::F32 => format!(
                "sparse CPU ({} ranking asked, but this CPU has no kernel for it: f32)",
                precision.name()
            ),
            _ => "sparse CPU".into(),
        },
        Engine::Dense(d) => format!("dense {d:?}"),
    }
}

/// Writes a trained member's SAE, sparsity, log and summary into its output directory.
fn export(
    p: &TrainParams,
    ctx: &mut StageContext,
    m: &Prepared,
    state: &trainer::State,
    trained_here: u64,
    secs: f64,
) -> anyhow::Result<()> {
    let (info, hook, cfg) = (&m.info, &m.hook, &m.cfg);
    let (d_in, d_sae, steps, batch) = (
        m.store.d_model(),
        cfg.d_sae,
        cfg.steps,
        cfg.batch_size as u64,
    );
    let from = Provenance {
        model_name: info.model.clone(),
        hook_name: hook.clone(),
        context_size: info.context,
        prepend_bos: info.tokenizer["bos"].is_number(),
        dataset_path: format!("saeflow capture {}", info.model_key),
    };
    let sae = state.to_sae(cfg, &from)?;
    sae.save(&ctx.out_dir)?;
    let density = state.log_density(cfg);
    let n = density.len();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "sparsity".to_string(),
            Tensor::from_vec(density, n, &candle_core::Device::Cpu)?,
        )]),
        ctx.out_dir.join("sparsity.safetensors"),
    )?;
    saeflow_core::data::parquet::write_batches(
        &ctx.out_dir.join("train_log.parquet"),
        &[log_batch(&state.log)?],
    )?;
    let last = state.log.last().cloned();
    let dead = state.dead(cfg).iter().filter(|&&d| d).count() as f64 / d_sae as f64;
    let summary = json!({
        "hook": hook,
        "d_in": d_in,
        "d_sae": d_sae,
        "k": p.k,
        "steps": steps,
        "tokens": steps * batch,
        "lr": cfg.lr,
        "input_scale": cfg.scale,
        "engine": engine_name(&cfg.engine),
        "final": last,
        "dead_fraction": dead,
    });
    std::fs::write(
        ctx.out_dir.join("train.json"),
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    if let Some(l) = &last {
        ctx.metrics.insert("fvu".into(), json!(l.fvu));
        ctx.metrics.insert("val_fvu".into(), json!(l.val_fvu));
        ctx.metrics.insert("l0".into(), json!(l.l0));
    }
    ctx.metrics.insert("dead_fraction".into(), json!(dead));
    if trained_here > 0 {
        let rate = (trained_here * batch) as f64 / secs;
        ctx.metrics
            .insert("tokens_per_s".into(), json!(rate.round()));
        ctx.log(&format!(
            "trained {trained_here} steps in {secs:.1}s ({rate:.0} tokens/s); final FVU {:.4}, val FVU {}, L0 {:.1}, dead {:.1}%",
            last.as_ref().map_or(f64::NAN, |l| l.fvu),
            last.as_ref().and_then(|l| l.val_fvu).map_or("-".into(), |v| format!("{v:.4}")),
            last.as_ref().map_or(f64::NAN, |l| l.l0),
            100.0 * dead
        ));
    }
    Ok(())
}

/// `train_log.parquet`: one row per logged step.
fn log_batch(rows: &[LogRow]) -> anyhow::Result<RecordBatch> {
    let u = |f: &dyn Fn(&LogRow) -> u64| -> ArrayRef {
        let mut b = UInt64Builder::new();
        rows.iter().for_each(|r| b.append_value(f(r)));
        Arc::new(b.finish())
    };
    let f = |f: &dyn Fn(&LogRow) -> Option<f64>| -> ArrayRef {
        let mut b = Float64Builder::new();
        rows.iter().for_each(|r| b.append_option(f(r)));
        Arc::new(b.finish())
    };
    let columns: Vec<(&str, ArrayRef, bool)> = vec![
        ("step", u(&|r| r.step), false),
        ("tokens", u(&|r| r.tokens), false),
        ("loss", f(&|r| Some(r.loss)), false),
        ("mse", f(&|r| Some(r.mse)), false),
        ("aux_loss", f(&|r| Some(r.aux)), false),
        ("sparsity_loss", f(&|r| Some(r.penalty)), false),
        ("fvu", f(&|r| Some(r.fvu)), false),
        ("l0", f(&|r| Some(r.l0)), false),
        ("dead_fraction", f(&|r| Some(r.dead_fraction)), false),
        ("lr", f(&|r| Some(r.lr)), false),
        ("val_fvu", f(&|r| r.val_fvu), true),
        ("val_l0", f(&|r| r.val_l0), true),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .map(|(n, a, null)| Field::new(*n, a.data_type().clone(), *null))
            .collect::<Vec<_>>(),
    );
    Ok(RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, a, _)| a).collect(),
    )?)
}
