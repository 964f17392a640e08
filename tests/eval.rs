//! The `eval` stage: reconstruction metrics equal an independent computation, an identity SAE recovers
//! all of the next-token loss and a zero SAE none, a trained SAE lands in between reproducibly, and bad
//! inputs fail clearly.
mod common;

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt64Type};
use candle_core::{Device, Tensor};
use common::{
    nanochat_d4, object_of, ok, published_capture_and_sae, read_parquet, run, text, write,
    write_capture,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use saeflow_core::data::activations::TokenRow;
use saeflow_core::sae::format::{Activation, Provenance, Sae};
use serde_json::Value;

const HOOK: &str = "blocks.2.hook_resid_post";
/// nanochat-d4's width.
const D_MODEL: usize = 128;

/// A ReLU SAE from row-major `w_enc [d, m]`, `w_dec [m, d]` and biases.
fn relu_sae(
    d: usize,
    m: usize,
    w_enc: Vec<f32>,
    b_enc: Vec<f32>,
    w_dec: Vec<f32>,
    b_dec: Vec<f32>,
) -> Sae {
    let cpu = Device::Cpu;
    Sae {
        activation: Activation::Relu,
        w_enc: Tensor::from_vec(w_enc, (d, m), &cpu).unwrap(),
        b_enc: Tensor::from_vec(b_enc, m, &cpu).unwrap(),
        w_dec: Tensor::from_vec(w_dec, (m, d), &cpu).unwrap(),
        b_dec: Tensor::from_vec(b_dec, d, &cpu).unwrap(),
        threshold: None,
        apply_b_dec_to_input: true,
        input_norm: saeflow_core::sae::format::InputNorm::None,
        cfg: Sae::standard_cfg(
            d,
            m,
            &Provenance {
                hook_name: HOOK.into(),
                ..Provenance::default()
            },
        ),
    }
}

fn eval_json(object: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(object.join("eval.json")).unwrap()).unwrap()
}

fn f64_column(b: &arrow_array::RecordBatch, name: &str) -> Vec<f64> {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_primitive::<Float64Type>()
        .values()
        .to_vec()
}

#[test]
fn reconstruction_metrics_equal_an_independent_computation() {
    // 60 documents × 7 tokens of N(3, 1) noise in 6 dimensions (a common offset, as real residuals have),
    // a random ReLU SAE with 10 latents; the test split is every third document.
    let (d, m) = (6usize, 10usize);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let noise = Normal::new(0.0f32, 1.0).unwrap();
    let (mut rows, mut acts) = (Vec::new(), Vec::new());
    for doc in 0..60u64 {
        for pos in 0..7u32 {
            rows.push(TokenRow {
                doc_id: doc,
                pos,
                token_id: pos,
                label: None,
                split: (if doc % 3 == 0 { "test" } else { "train" }).into(),
                is_completion: false,
                ..Default::default()
            });
            acts.extend((0..d).map(|_| 3.0 + noise.sample(&mut rng)));
        }
    }
    let mut draw = |n: usize, scale: f32| -> Vec<f32> {
        (0..n).map(|_| scale * noise.sample(&mut rng)).collect()
    };
    let (w_enc, b_enc, w_dec, b_dec) = (
        draw(d * m, 0.5),
        draw(m, 0.3),
        draw(m * d, 0.5),
        draw(d, 1.0),
    );
    let sae = relu_sae(
        d,
        m,
        w_enc.clone(),
        b_enc.clone(),
        w_dec.clone(),
        b_dec.clone(),
    );
    let dir = tempfile::tempdir().unwrap();
    write_capture(&dir.path().join("capture"), HOOK, d, &rows, &acts);
    sae.save(&dir.path().join("sae")).unwrap();
    let stages =
        published_capture_and_sae("ev", &dir.path().join("capture"), &dir.path().join("sae"));
    write(
        &dir.path().join("p.toml"),
        &format!(
            "{stages}\n[stages.eval]\nkind = \"eval\"\nsae = \"sae\"\ninput = \"acts\"\nbatch_size = 16\n"
        ),
    );
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "ev", "eval");
    let report = eval_json(&object);

    // The same metrics, in f64 with plain loops over the test tokens.
    let test: Vec<&[f32]> = rows
        .iter()
        .zip(acts.chunks(d))
        .filter(|(r, _)| &*r.split == "test")
        .map(|(_, x)| x)
        .collect();
    let n = test.len() as f64;
    let (mut sq_res, mut cos, mut ratio, mut l0, mut l1, mut sq_out, mut dot) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut mean = vec![0f64; d];
    let mut fires = vec![0u64; m];
    for x in &test {
        let codes: Vec<f64> = (0..m)
            .map(|j| {
                let pre: f64 = (0..d)
                    .map(|i| (x[i] - b_dec[i]) as f64 * w_enc[i * m + j] as f64)
                    .sum::<f64>()
                    + b_enc[j] as f64;
                pre.max(0.0)
            })
            .collect();
        let recon: Vec<f64> = (0..d)
            .map(|i| {
                (0..m)
                    .map(|j| codes[j] * w_dec[j * d + i] as f64)
                    .sum::<f64>()
                    + b_dec[i] as f64
            })
            .collect();
        let norm_in = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let norm_out = recon.iter().map(|v| v * v).sum::<f64>().sqrt();
        let xr: f64 = (0..d).map(|i| x[i] as f64 * recon[i]).sum();
        sq_res += (0..d)
            .map(|i| (x[i] as f64 - recon[i]).powi(2))
            .sum::<f64>();
        cos += xr / (norm_in * norm_out);
        ratio += norm_out / norm_in;
        sq_out += norm_out * norm_out;
        dot += xr;
        l0 += codes.iter().filter(|&&c| c != 0.0).count() as f64;
        l1 += codes.iter().sum::<f64>();
        for (j, &c) in codes.iter().enumerate() {
            fires[j] += u64::from(c != 0.0);
        }
        for i in 0..d {
            mean[i] += x[i] as f64 / n;
        }
    }
    let variance: f64 = test
        .iter()
        .map(|x| (0..d).map(|i| (x[i] as f64 - mean[i]).powi(2)).sum::<f64>())
        .sum::<f64>()
        / n;
    let expected = [
        ("reconstruction_quality", "mse", sq_res / n),
        ("reconstruction_quality", "fvu", sq_res / n / variance),
        (
            "reconstruction_quality",
            "explained_variance",
            1.0 - sq_res / n / variance,
        ),
        ("reconstruction_quality", "cossim", cos / n),
        ("shrinkage", "l2_ratio", ratio / n),
        ("shrinkage", "relative_reconstruction_bias", sq_out / dot),
        ("sparsity", "l0", l0 / n),
        ("sparsity", "l1", l1 / n),
    ];
    for (group, name, want) in expected {
        let got = report[group][name].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{name}: {got} vs {want}"
        );
    }
    assert_eq!(report["token_stats"]["tokens_eval_sparsity_variance"], 140);
    let dead = fires.iter().filter(|&&f| f == 0).count() as f64 / m as f64;
    assert_eq!(report["sparsity"]["dead_fraction"].as_f64().unwrap(), dead);

    // One row per SAE in metrics.parquet, the same numbers; per-feature densities in features.parquet.
    let metrics = read_parquet(&object.join("metrics.parquet"));
    assert_eq!(metrics.num_rows(), 1);
    assert_eq!(
        f64_column(&metrics, "fvu")[0],
        report["reconstruction_quality"]["fvu"].as_f64().unwrap()
    );
    assert!(metrics.column_by_name("ce_loss_score").unwrap().is_null(0));
    let features = read_parquet(&object.join("features.parquet"));
    let got: Vec<u64> = features
        .column_by_name("fires")
        .unwrap()
        .as_primitive::<UInt64Type>()
        .values()
        .to_vec();
    assert_eq!(got, fires);
    let density = f64_column(&features, "density");
    assert_eq!(density[0], fires[0] as f64 / n);
}

/// A nanochat-d4 pipeline over the quickstart's persona statements: capture every position of block 2, the
/// SAEs in `saes` (name → directory, published by command stages) each evaluated with the model, plus
/// `extra` stages.
fn nanochat_pipeline(dir: &Path, saes: &[(&str, &Path)], extra: &str) {
    let mut text = format!(
        r#"[pipeline]
name = "ev"

[models.nc]
kind = "nanochat"
path = "{model}"

[stages.data]
kind = "dataset"
sources = [{{ path = "{data}", text = "statement", label = "label", max_rows = 2000 }}]

[stages.acts]
kind = "capture"
input = "data"
model = "nc"
hooks = ["{HOOK}"]
tokens = 12000
"#,
        model = nanochat_d4().display(),
        data = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets/quickstart/persona-deception.csv")
            .display(),
    );
    for (name, sae) in saes {
        text += &format!(
            r#"
[stages.{name}]
kind = "command"
shell = "cp -rL {sae}/. {{out}}/"
deps = ["{sae}"]

[stages.eval_{name}]
kind = "eval"
sae = "{name}"
input = "acts"
model = "nc"
ce_tokens = 1000000
"#,
            sae = sae.display()
        );
    }
    write(&dir.join("p.toml"), &(text + extra));
}

#[test]
fn identity_sae_recovers_all_of_the_loss_and_zero_sae_none() {
    let dir = tempfile::tempdir().unwrap();
    let d = D_MODEL;
    // Identity: latents (relu(x), relu(−x)), decoded as relu(x) − relu(−x) = x, exactly.
    let mut w_enc = vec![0f32; d * 2 * d];
    let mut w_dec = vec![0f32; 2 * d * d];
    for i in 0..d {
        w_enc[i * 2 * d + i] = 1.0;
        w_enc[i * 2 * d + d + i] = -1.0;
        w_dec[i * d + i] = 1.0;
        w_dec[(d + i) * d + i] = -1.0;
    }
    let identity = relu_sae(d, 2 * d, w_enc, vec![0.0; 2 * d], w_dec, vec![0.0; d]);
    let zero = relu_sae(
        d,
        8,
        vec![0.0; d * 8],
        vec![0.0; 8],
        vec![0.0; 8 * d],
        vec![0.0; d],
    );
    identity.save(&dir.path().join("identity")).unwrap();
    zero.save(&dir.path().join("zero")).unwrap();
    let (id_dir, zero_dir) = (dir.path().join("identity"), dir.path().join("zero"));
    nanochat_pipeline(
        dir.path(),
        &[("identity", &id_dir), ("zero", &zero_dir)],
        r#"
[stages.trained]
kind = "train"
input = "acts"
expansion = 2
k = 16
batch_size = 256

[stages.eval_trained]
kind = "eval"
sae = "trained"
input = "acts"
model = "nc"
ce_tokens = 1000000
"#,
    );
    let out = ok(dir.path(), &["run", "p.toml"]);
    let cache = dir.path().join("cache");

    let id = eval_json(&object_of(&cache, "ev", "eval_identity"));
    let perf = &id["model_performance_preservation"];
    assert_eq!(perf["ce_loss_score"], 1.0, "{id}");
    assert_eq!(perf["ce_loss_with_sae"], perf["ce_loss_without_sae"]);
    assert_eq!(id["model_behavior_preservation"]["kl_div_with_sae"], 0.0);
    assert_eq!(id["model_behavior_preservation"]["kl_div_score"], 1.0);
    assert_eq!(id["reconstruction_quality"]["fvu"], 0.0);
    assert_eq!(id["reconstruction_quality"]["cossim"], 1.0);
    // Zeroing the hook costs a lot: the loss rises well above the clean one.
    let clean = perf["ce_loss_without_sae"].as_f64().unwrap();
    let ablated = perf["ce_loss_with_ablation"].as_f64().unwrap();
    assert!(ablated > clean + 0.1, "{perf}");
    // Every test document is rerun whole: each stored token is a KL position (BOS is neither stored nor
    // counted), and each but a document's last predicts a next token.
    let stats = &id["token_stats"];
    let tokens = stats["tokens_eval_sparsity_variance"].as_u64().unwrap();
    assert_eq!(stats["kl_positions"].as_u64().unwrap(), tokens, "{stats}");
    let ce = stats["ce_positions"].as_u64().unwrap();
    assert!(ce < tokens && ce > tokens * 3 / 4, "{stats}");

    let zero = eval_json(&object_of(&cache, "ev", "eval_zero"));
    let perf = &zero["model_performance_preservation"];
    assert_eq!(perf["ce_loss_score"], 0.0, "{zero}");
    assert_eq!(perf["ce_loss_with_sae"], perf["ce_loss_with_ablation"]);
    assert_eq!(zero["model_behavior_preservation"]["kl_div_score"], 0.0);
    assert_eq!(zero["sparsity"]["l0"], 0.0);
    assert_eq!(zero["sparsity"]["dead_fraction"], 1.0);

    // A trained SAE is in between, and the clean loss is the same whatever SAE is evaluated.
    let trained_object = object_of(&cache, "ev", "eval_trained");
    let trained = eval_json(&trained_object);
    let perf = &trained["model_performance_preservation"];
    let score = perf["ce_loss_score"].as_f64().unwrap();
    assert!(score > 0.0 && score < 1.0, "{perf}");
    assert_eq!(perf["ce_loss_without_sae"].as_f64().unwrap(), clean);
    assert_eq!(trained["sparsity"]["l0"], 16.0);
    assert!(out.contains("recovered"), "{out}");

    // Recomputed, its outputs are byte-identical.
    let first = std::fs::read(trained_object.join("metrics.parquet")).unwrap();
    std::fs::remove_dir_all(&trained_object).unwrap();
    ok(dir.path(), &["run", "p.toml"]);
    let again = object_of(&cache, "ev", "eval_trained");
    assert_eq!(std::fs::read(again.join("metrics.parquet")).unwrap(), first);
}

#[test]
fn bad_inputs_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let d = D_MODEL;
    let sae = relu_sae(
        d,
        4,
        vec![0.1; d * 4],
        vec![0.0; 4],
        vec![0.1; 4 * d],
        vec![0.0; d],
    );
    sae.save(&dir.path().join("sae")).unwrap();
    let sae_dir = dir.path().join("sae");
    let fails = |extra: &str, expected: &str| {
        nanochat_pipeline(dir.path(), &[("s", &sae_dir)], extra);
        let out = run(dir.path(), &["run", "p.toml"]);
        let message = text(&out);
        assert!(!out.status.success(), "{message}");
        assert!(
            message.contains(expected),
            "expected `{expected}` in:\n{message}"
        );
    };
    // Captures of some positions only cannot be rerun as whole documents.
    fails(
        r#"
[stages.completions]
kind = "capture"
input = "data"
model = "nc"
hooks = ["blocks.2.hook_resid_post"]
tokens = 2000
positions = "last"

[stages.eval_c]
kind = "eval"
sae = "s"
input = "completions"
model = "nc"
"#,
        "stored positions = \"last\": capture with positions = \"all\"",
    );
    // A split the capture does not have.
    fails(
        r#"
[stages.eval_v]
kind = "eval"
sae = "s"
input = "acts"
split = "holdout"
"#,
        "capture `acts` has no tokens in split `holdout` (its splits: ",
    );
    // Another model than the capture's.
    let other = dir.path().join("other-nanochat");
    common::checkpoints::make_nanochat(&other, 2, &[]);
    fails(
        &format!(
            r#"
[models.smol]
kind = "nanochat"
path = "{}"

[stages.eval_m]
kind = "eval"
sae = "s"
input = "acts"
model = "smol"
"#,
            other.display()
        ),
        "capture `acts` ran model `nc`, not `smol`",
    );
}
