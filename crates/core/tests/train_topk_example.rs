//! `examples/train_topk.rs`, run for real: on activations that are sparse sums of a hidden dictionary, the
//! SAE it saves (SAELens layout) loads back and reconstructs held-out rows it never saw. Uses saeflow-core
//! only, as the example does.

mod common;

use std::path::PathBuf;

use common::{sparse_rows, uniform, write_capture};

use candle_core::{Device, Tensor};
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

#[test]
fn the_example_trains_an_sae_that_reconstructs_held_out_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, out) = (dir.path().join("capture"), dir.path().join("sae"));
    std::fs::create_dir_all(&capture).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let atoms: Vec<f32> = (0..ATOMS * D).map(|_| uniform(&mut state)).collect();
    write_capture(
        &capture,
        HOOK,
        D,
        &sparse_rows(&atoms, D, ACTIVE, 16_384, &mut state),
    );

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
    let held_out = sparse_rows(&atoms, D, ACTIVE, 2048, &mut state);
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
