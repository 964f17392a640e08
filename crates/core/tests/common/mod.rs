//! What the core crate's integration tests share: a fixed pseudo-random stream, activations that are
//! sparse sums of a hidden dictionary, and a capture directory the activation store opens.

#![allow(dead_code)] // each test binary uses its own part

use std::path::Path;

use saeflow_core::data::activations::{
    act_file_name, write_act_shard, ActDtype, CaptureInfo, ShardInfo, FORMAT_VERSION,
};
use saeflow_core::sae::adam::AdamConfig;
use saeflow_core::sae::step::{L0Mode, Sparsity};
use saeflow_core::sae::trainer::{Engine, TrainConfig};

/// xorshift in [-0.5, 0.5): a fixed, dependency-free stream.
pub fn uniform(state: &mut u64) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// `rows` rows of width `d`, each a sum of `active` of the `atoms` (`[count, d]`) with positive
/// coefficients.
pub fn sparse_rows(
    atoms: &[f32],
    d: usize,
    active: usize,
    rows: usize,
    state: &mut u64,
) -> Vec<f32> {
    let count = atoms.len() / d;
    let mut out = vec![0f32; rows * d];
    for row in out.chunks_exact_mut(d) {
        for _ in 0..active {
            let atom = ((uniform(state) + 0.5) * count as f32) as usize % count;
            let coef = 1.0 + 2.0 * (uniform(state) + 0.5);
            for (x, a) in row.iter_mut().zip(&atoms[atom * d..(atom + 1) * d]) {
                *x += coef * a;
            }
        }
    }
    out
}

/// Writes a capture of `hook` holding `rows` (row-major, width `d`) into `dir`, as the `capture` stage
/// would (one f32 shard and `capture.json`).
pub fn write_capture(dir: &Path, hook: &str, d: usize, rows: &[f32]) {
    std::fs::create_dir_all(dir).unwrap();
    let n = rows.len() / d;
    write_act_shard(
        &dir.join(act_file_name(hook, 0)),
        bytemuck::cast_slice(rows).to_vec(),
        d,
        ActDtype::F32,
    )
    .unwrap();
    let mean_norm = rows
        .chunks_exact(d)
        .map(|r| r.iter().map(|v| (v * v) as f64).sum::<f64>().sqrt())
        .filter(|norm| norm.is_finite()) // a test's deliberately bad row must not spoil the JSON
        .sum::<f64>()
        / n as f64;
    let info = CaptureInfo {
        format: FORMAT_VERSION,
        model: "synthetic".into(),
        model_key: String::new(),
        model_source: String::new(),
        hooks: vec![hook.into()],
        d_model: d,
        dtype: ActDtype::F32,
        tokenizer: serde_json::Value::Null,
        context: 0,
        settings: serde_json::Value::Null,
        tokens: n as u64,
        documents: 0,
        truncated_documents: 0,
        sequences: 0,
        splits: Default::default(),
        labels: Default::default(),
        mean_norm: [(hook.to_string(), mean_norm)].into(),
        shards: vec![ShardInfo {
            first_row: 0,
            rows: n as u64,
        }],
        sinks: Default::default(),
    };
    std::fs::write(
        dir.join("capture.json"),
        serde_json::to_string(&info).unwrap(),
    )
    .unwrap();
}

/// Tokens per step of [`train_config`].
pub const TRAIN_BATCH: usize = 64;

/// A small training configuration for the engine tests: 64 latents, batches of 64, penalties ramped over 10
/// steps, a warm-up of 5 and a final decay, AuxK, clipping, no checkpoints.
pub fn train_config(sparsity: Sparsity, engine: Engine, steps: u64) -> TrainConfig {
    TrainConfig {
        d_sae: 64,
        sparsity,
        penalty_warmup_steps: 10,
        engine,
        lr: 2e-3,
        warmup_steps: 5,
        decay_fraction: 0.2,
        batch_size: TRAIN_BATCH,
        steps,
        aux_coef: 1.0 / 32.0,
        dead_tokens: 256,
        grad_clip: 1.0,
        seed: 7,
        adam: AdamConfig::default(),
        log_every: 10,
        checkpoint_every: 1_000_000,
        train_splits: None,
        validation: None,
        scale: 1.0,
        buffer_rows: 512,
    }
}

/// Every architecture the trainer trains, named: TopK and BatchTopK with `k`, JumpReLU with either L0
/// penalty, ReLU.
pub fn architectures(k: usize) -> Vec<(&'static str, Sparsity)> {
    let jump = |mode, pre_act| Sparsity::JumpRelu {
        l0: 0.05,
        bandwidth: 0.1,
        mode,
        pre_act,
    };
    vec![
        ("topk", Sparsity::TopK(k)),
        ("batchtopk", Sparsity::BatchTopK(k)),
        ("jumprelu (tanh)", jump(L0Mode::Tanh(4.0), 0.01)),
        ("jumprelu (step)", jump(L0Mode::Step, 0.0)),
        ("relu", Sparsity::Relu { l1: 0.05 }),
    ]
}

/// ‖a − b‖∞ / ‖a‖∞.
pub fn relative(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = a
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    a.iter().zip(b).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}
