//! `examples/train_topk.rs`, run for real: on activations that are sparse sums of a hidden dictionary, the
//! SAE it saves (SAELens layout) loads back and reconstructs held-out rows it never saw. Uses saeflow-core
//! only, as the example does.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use saeflow_core::data::activations::{
    act_file_name, write_act_shard, ActDtype, CaptureInfo, ShardInfo, FORMAT_VERSION,
};
use saeflow_core::sae::format::Sae;

const D: usize = 32;
const ATOMS: usize = 64;
const ACTIVE: usize = 3;
const HOOK: &str = "blocks.0.hook_resid_post";

/// The example's binary, which `cargo test` builds beside the test binaries.
fn example() -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/train_topk");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test -p saeflow-core` (it builds the examples), not only this test",
        path.display()
    );
    path
}

/// xorshift in [-0.5, 0.5): a fixed, dependency-free stream.
fn uniform(state: &mut u64) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    (*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
}

/// `rows` rows, each a sum of ACTIVE dictionary atoms with positive coefficients.
fn sparse_rows(atoms: &[f32], rows: usize, state: &mut u64) -> Vec<f32> {
    let mut out = vec![0f32; rows * D];
    for row in out.chunks_exact_mut(D) {
        for _ in 0..ACTIVE {
            let atom = ((uniform(state) + 0.5) * ATOMS as f32) as usize % ATOMS;
            let coef = 1.0 + 2.0 * (uniform(state) + 0.5);
            for (x, a) in row.iter_mut().zip(&atoms[atom * D..(atom + 1) * D]) {
                *x += coef * a;
            }
        }
    }
    out
}

fn write_capture(dir: &Path, rows: &[f32]) {
    let n = rows.len() / D;
    write_act_shard(
        &dir.join(act_file_name(HOOK, 0)),
        bytemuck::cast_slice(rows).to_vec(),
        D,
        ActDtype::F32,
    )
    .unwrap();
    let mean_norm = rows
        .chunks_exact(D)
        .map(|r| r.iter().map(|v| (v * v) as f64).sum::<f64>().sqrt())
        .sum::<f64>()
        / n as f64;
    let info = CaptureInfo {
        format: FORMAT_VERSION,
        model: "synthetic".into(),
        model_key: String::new(),
        model_source: String::new(),
        hooks: vec![HOOK.into()],
        d_model: D,
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
        mean_norm: [(HOOK.to_string(), mean_norm)].into(),
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

#[test]
fn the_example_trains_an_sae_that_reconstructs_held_out_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, out) = (dir.path().join("capture"), dir.path().join("sae"));
    std::fs::create_dir_all(&capture).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let atoms: Vec<f32> = (0..ATOMS * D).map(|_| uniform(&mut state)).collect();
    write_capture(&capture, &sparse_rows(&atoms, 16_384, &mut state));

    let run = std::process::Command::new(example())
        .args([
            capture.to_str().unwrap(),
            out.to_str().unwrap(),
            "8",
            "4",
            "300",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("SAELens layout"), "{stdout}");

    let sae = Sae::load(&out, &Device::Cpu).unwrap();
    assert_eq!((sae.d_in(), sae.d_sae()), (D, 4 * D));
    let held_out = sparse_rows(&atoms, 2048, &mut state);
    let x = Tensor::from_vec(held_out.clone(), (2048, D), &Device::Cpu).unwrap();
    let recon: Vec<f32> = sae
        .reconstruct(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // Fraction of variance unexplained on rows the SAE never saw; predicting the mean scores 1.
    let mean: Vec<f64> = (0..D)
        .map(|j| {
            held_out
                .iter()
                .skip(j)
                .step_by(D)
                .map(|&v| v as f64)
                .sum::<f64>()
                / 2048.0
        })
        .collect();
    let (mut err, mut var) = (0f64, 0f64);
    for (i, (&x, &r)) in held_out.iter().zip(&recon).enumerate() {
        err += ((x - r) as f64).powi(2);
        var += (x as f64 - mean[i % D]).powi(2);
    }
    let fvu = err / var;
    assert!(fvu < 0.2, "held-out FVU {fvu:.3}");
}

#[test]
fn the_example_names_what_is_wrong_with_its_arguments() {
    let run = std::process::Command::new(example())
        .arg("/nonexistent/capture")
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("usage: train_topk"));
    let dir = tempfile::tempdir().unwrap();
    let run = std::process::Command::new(example())
        .args(["/nonexistent/capture", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("/nonexistent/capture"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
