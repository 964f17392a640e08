//! The `train` stage end to end: SAELens export whose encoding matches the formulas, reproducible bits,
//! exact resume after SIGKILL, and clear errors for bad inputs.
mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{nanochat_d4, number_comparisons, object_of, ok, run, text, write};
use saeflow_core::data::activations::{ActivationStore, ReadOptions};
use saeflow_core::sae::format::Sae;

/// nanochat-d4 activations of geometry-of-truth's number comparisons, and an SAE trained on them.
fn pipeline(dir: &Path, train: &str) {
    write(
        &dir.join("p.toml"),
        &format!(
            r#"[pipeline]
name = "tr"

[models.nc]
kind = "nanochat"
path = "{model}"

[stages.data]
kind = "dataset"
sources = [{{ preset = "geometry_of_truth", path = "{data}", subsets = ["larger_than", "smaller_than"], max_rows = 4000 }}]

[stages.acts]
kind = "capture"
input = "data"
model = "nc"
hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
tokens = 24000
pack = true

[stages.sae]
kind = "train"
input = "acts"
hook = "blocks.2.hook_resid_post"
expansion = 4
k = 8
batch_size = 256
log_every = 5
{train}
"#,
            model = nanochat_d4().display(),
            data = number_comparisons(&dir.join("geometry_of_truth")).display(),
        ),
    );
}

/// The first `n` activation rows of the pipeline's capture (layer 2), in store order.
fn first_rows(cache: &Path, n: usize) -> Tensor {
    let store =
        ActivationStore::open(&object_of(cache, "tr", "acts"), "blocks.2.hook_resid_post").unwrap();
    let options = ReadOptions {
        batch_size: n,
        ..ReadOptions::default()
    };
    store
        .batches(&options, &Device::Cpu)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .acts
}

/// SAELens pre-activations from saved weights: (x − b_dec) W_enc + b_enc.
fn saved_pre(w: &std::collections::HashMap<String, Tensor>, x: &Tensor) -> Tensor {
    x.broadcast_sub(&w["b_dec"])
        .unwrap()
        .matmul(&w["W_enc"])
        .unwrap()
        .broadcast_add(&w["b_enc"])
        .unwrap()
}

/// Runs the pipeline with `train` settings; returns the temp dir, its cache, the SAE object and its cfg.json.
fn train_with(train: &str) -> (tempfile::TempDir, PathBuf, PathBuf, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    pipeline(dir.path(), train);
    ok(dir.path(), &["run", "p.toml"]);
    let cache = dir.path().join("cache");
    let object = object_of(&cache, "tr", "sae");
    let cfg = serde_json::from_slice(&std::fs::read(object.join("cfg.json")).unwrap()).unwrap();
    (dir, cache, object, cfg)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn the_exported_sae_loads_and_encodes_by_the_saelens_topk_formula() {
    let (dir, cache, object, cfg) = train_with("tokens = 10240");
    assert_eq!(cfg["architecture"], "topk");
    assert_eq!(
        (
            cfg["d_in"].as_u64(),
            cfg["d_sae"].as_u64(),
            cfg["k"].as_u64()
        ),
        (Some(128), Some(512), Some(8))
    );
    assert_eq!(cfg["metadata"]["hook_name"], "blocks.2.hook_resid_post");
    assert!(cfg["metadata"]["sae_lens_version"]
        .as_str()
        .unwrap()
        .starts_with('6'));
    let sparsity =
        candle_core::safetensors::load(object.join("sparsity.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(sparsity["sparsity"].dims(), [512]);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object.join("train.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 40);
    let val_fvu = summary["final"]["val_fvu"].as_f64().unwrap();
    assert!(val_fvu < 0.6, "validation FVU {val_fvu}");

    let sae = Sae::load(&object, &Device::Cpu).unwrap();
    let x = first_rows(&cache, 64);
    let a = sae.encode(&x).unwrap();
    // SAELens TopK, written out: relu(topk((x − b_dec) W_enc + b_enc)), from the saved tensors.
    let w = candle_core::safetensors::load(object.join("sae_weights.safetensors"), &Device::Cpu)
        .unwrap();
    let xs: Vec<Vec<f32>> = x.to_vec2().unwrap();
    let (w_enc, b_enc, b_dec): (Vec<Vec<f32>>, Vec<f32>, Vec<f32>) = (
        w["W_enc"].to_vec2().unwrap(),
        w["b_enc"].to_vec1().unwrap(),
        w["b_dec"].to_vec1().unwrap(),
    );
    let mut expected = vec![vec![0f32; 512]; xs.len()];
    for (row, out) in xs.iter().zip(expected.iter_mut()) {
        let pre: Vec<f32> = (0..512)
            .map(|j| {
                (0..128)
                    .map(|i| (row[i] - b_dec[i]) * w_enc[i][j])
                    .sum::<f32>()
                    + b_enc[j]
            })
            .collect();
        let mut order: Vec<usize> = (0..512).collect();
        order.sort_by(|&p, &q| pre[q].total_cmp(&pre[p]));
        for &j in &order[..8] {
            out[j] = pre[j].max(0.0);
        }
    }
    let expected = Tensor::new(expected, &Device::Cpu).unwrap();
    assert!(
        max_diff(&a, &expected) < 1e-4,
        "{}",
        max_diff(&a, &expected)
    );
    // The reconstruction explains most of the variance of held-in activations too.
    let recon = sae.decode(&a).unwrap();
    let err: f32 = (recon - &x)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let var: f32 = x
        .broadcast_sub(&x.mean_keepdim(0).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(err / var < 0.6, "FVU {}", err / var);

    // Same config and seed: the same bits, and a rerun computes nothing.
    let again = tempfile::tempdir().unwrap();
    pipeline(again.path(), "tokens = 10240");
    ok(again.path(), &["run", "p.toml"]);
    assert_eq!(
        common::published_outputs(&cache),
        common::published_outputs(&again.path().join("cache"))
    );
    assert!(ok(dir.path(), &["run", "p.toml"]).contains("0 computed"));
}

#[test]
fn sigkill_during_training_resumes_from_checkpoints_to_identical_weights() {
    use rand::{Rng, SeedableRng};
    let settings = "tokens = 30720\ncheckpoint_every = 4";
    let reference = tempfile::tempdir().unwrap();
    pipeline(reference.path(), settings);
    ok(reference.path(), &["run", "p.toml", "acts"]);
    let started = std::time::Instant::now();
    ok(reference.path(), &["run", "p.toml"]);
    let full = started.elapsed();
    let expected = common::published_outputs(&reference.path().join("cache"));

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, settings);
    ok(d, &["run", "p.toml", "acts"]);
    let seed = std::process::id() as u64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    println!("kill-moment seed {seed}; uninterrupted training took {full:?}");
    let checkpoints = |d: &Path| -> usize {
        std::fs::read_dir(d.join("cache/partial"))
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|k| {
                std::fs::read_dir(k.path().join("checkpoints"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
            .filter_map(|e| e.file_name().to_string_lossy()[5..].parse::<usize>().ok())
            .max()
            .unwrap_or(0)
    };
    let mut resumed_at = Vec::new();
    for kill in 0..5 {
        let before = checkpoints(d);
        let mut child = common::saeflow(d).args(["run", "p.toml"]).spawn().unwrap();
        // Wait for a newer checkpoint, then kill a random moment later.
        while checkpoints(d) <= before {
            assert!(
                child.try_wait().unwrap().is_none(),
                "training finished before kill {kill}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(0..30)));
        child.kill().unwrap();
        child.wait().unwrap();
        resumed_at.push(checkpoints(d));
        ok(d, &["cache", "verify"]);
    }
    let out = ok(d, &["run", "p.toml"]);
    assert!(
        out.contains("resuming from the checkpoint at step"),
        "{out}"
    );
    let log: String = std::fs::read_dir(d.join("cache/logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let steps: Vec<usize> = log
        .lines()
        .filter_map(|l| l.strip_prefix("resuming from the checkpoint at step "))
        .map(|s| s.parse().unwrap())
        .collect();
    println!("checkpoints after each kill {resumed_at:?}, resumed at {steps:?}");
    assert_eq!(steps.len(), 5, "{log}");
    assert_eq!(steps.last(), resumed_at.last());
    assert_eq!(common::published_outputs(&d.join("cache")), expected);
}

/// A sweep trains as one group on one pass over the activations, and every member ends with exactly the bits
/// it gets trained alone (`--no-group`), also after a SIGKILL that leaves the members' last checkpoints at
/// different steps.
#[test]
fn a_sweep_trains_as_one_group_with_the_bits_of_members_trained_alone() {
    let settings = "tokens = 15360";
    let sweep = ["-S", "sae.k=4,8", "-S", "sae.checkpoint_every=3,5"];
    let alone = tempfile::tempdir().unwrap();
    pipeline(alone.path(), settings);
    let out = ok(
        alone.path(),
        &[&["run", "p.toml", "--no-group"][..], &sweep].concat(),
    );
    assert!(!out.contains("together"), "{out}");
    let expected = common::published_outputs(&alone.path().join("cache"));
    assert_eq!(
        expected
            .keys()
            .filter(|k| k.ends_with("sae_weights.safetensors"))
            .count(),
        4
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, settings);
    ok(d, &["run", "p.toml", "acts"]);
    let has_step_5 = |d: &Path| {
        std::fs::read_dir(d.join("cache/partial"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|k| k.path().join("checkpoints/step-000000005").exists())
    };
    let mut child = common::saeflow(d)
        .args([&["run", "p.toml"][..], &sweep].concat())
        .spawn()
        .unwrap();
    while !has_step_5(d) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "training finished before the kill"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let out = ok(d, &[&["run", "p.toml"][..], &sweep].concat());
    assert!(out.contains("together (one group"), "{out}");
    let mut resumed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("resuming from the checkpoint at step ").nth(1))
        .collect();
    resumed.sort();
    resumed.dedup();
    assert!(
        resumed.len() >= 2,
        "members resume from different steps: {out}"
    );
    assert_eq!(common::published_outputs(&d.join("cache")), expected);
}

fn fails(dir: &Path, fragments: &[&str]) {
    let out = run(dir, &["run", "p.toml"]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    for f in fragments {
        assert!(msg.contains(f), "missing `{f}` in:\n{msg}");
    }
    assert!(
        !dir.join("cache/refs/tr/sae.json").exists(),
        "a failed training was published"
    );
}

#[test]
fn bad_inputs_stop_training_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pipeline(d, "tokens = 2560");
    let toml = std::fs::read_to_string(d.join("p.toml")).unwrap();
    write(
        &d.join("p.toml"),
        &toml.replace(
            "hook = \"blocks.2.hook_resid_post\"",
            "hook = \"blocks.0.hook_resid_post\"",
        ),
    );
    fails(
        d,
        &[
            "hook `blocks.0.hook_resid_post` was not captured",
            "captured: blocks.1.hook_resid_post, blocks.2.hook_resid_post",
        ],
    );
    write(&d.join("p.toml"), &toml.replace("k = 8", "k = 600"));
    fails(d, &["k = 600 exceeds the SAE's 512 latents"]);
    write(
        &d.join("p.toml"),
        &toml.replace(
            "tokens = 2560",
            "tokens = 25600\nlr = 1e30\ncheckpoint_every = 2",
        ),
    );
    fails(
        d,
        &[
            "training diverged at step",
            "the last good checkpoint (step",
        ],
    );

    // A capture published with NaN inside (a producer's bug, not disk damage: the manifest vouches for the
    // bytes, so the cache's checks pass and the trainer's own check must catch it).
    write(&d.join("p.toml"), &toml);
    ok(d, &["run", "p.toml", "acts"]);
    let acts = object_of(&d.join("cache"), "tr", "acts");
    let store = ActivationStore::open(&acts, "blocks.2.hook_resid_post").unwrap();
    let row = store
        .split_mask(&["train".into()])
        .unwrap()
        .iter()
        .position(|&t| t)
        .unwrap();
    let first: Vec<f32> = store
        .batches(
            &ReadOptions {
                batch_size: row + 1,
                ..ReadOptions::default()
            },
            &Device::Cpu,
        )
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .acts
        .get(row)
        .unwrap()
        .to_vec1()
        .unwrap();
    let file = acts.join("acts-blocks.2.hook_resid_post-00000.parquet");
    let mut bytes = std::fs::read(&file).unwrap();
    let pattern: Vec<u8> = first[..4].iter().flat_map(|v| v.to_le_bytes()).collect();
    let at = bytes
        .windows(16)
        .position(|w| w == pattern.as_slice())
        .expect("the row in the file");
    // Rows of one page are contiguous (plain, uncompressed): poison the first value of the next 1000 train
    // rows, so a 10-step run surely meets one.
    let mask = store.split_mask(&["train".into()]).unwrap();
    for r in (row..row + 1000).filter(|&r| mask[r]) {
        let o = at + (r - row) * 128 * 4;
        bytes[o..o + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let mut perms = std::fs::metadata(&file).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&file, perms).unwrap();
    std::fs::write(&file, &bytes).unwrap();
    let manifest_path = acts.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    for out in manifest["outputs"].as_array_mut().unwrap() {
        if out["path"] == "acts-blocks.2.hook_resid_post-00000.parquet" {
            out["blake3"] = blake3::hash(&bytes).to_hex().to_string().into();
        }
    }
    let manifest = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(&manifest_path, &manifest).unwrap();
    std::fs::write(
        acts.join("manifest.blake3"),
        blake3::hash(&manifest).to_hex().as_bytes(),
    )
    .unwrap();
    fails(
        d,
        &[
            "non-finite activation in tokens.parquet row ",
            "(column 0) of the capture",
        ],
    );
}

#[test]
fn batch_top_k_exports_a_jumprelu_with_its_learned_threshold() {
    // 240 steps: the threshold is an EMA (rate 0.01) from 0, so it needs some steps to settle.
    let (_dir, cache, object, cfg) = train_with("tokens = 61440\narch = \"batchtopk\"");
    assert_eq!(cfg["architecture"], "jumprelu");
    assert!(cfg.get("k").is_none());
    let w = candle_core::safetensors::load(object.join("sae_weights.safetensors"), &Device::Cpu)
        .unwrap();
    let threshold: Vec<f32> = w["threshold"].to_vec1().unwrap();
    assert_eq!(threshold.len(), 512);
    assert!(threshold[0] > 0.0 && threshold.iter().all(|&t| t == threshold[0]));

    let sae = Sae::load(&object, &Device::Cpu).unwrap();
    let x = first_rows(&cache, 64);
    // SAELens JumpReLU: pre · 1[pre > θ] (θ ≥ 0, so ReLU is implied).
    let pre = saved_pre(&w, &x);
    let keep = pre
        .broadcast_gt(&w["threshold"])
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    let expected = (&pre * keep).unwrap();
    let got = sae.encode(&x).unwrap();
    assert!(max_diff(&got, &expected) < 1e-5);
    let l0: f32 = got
        .ne(0f32)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        / 64.0;
    assert!((4.0..16.0).contains(&l0), "inference L0 {l0} for k = 8");
}

#[test]
fn jumprelu_and_relu_export_as_saelens_jumprelu_and_standard() {
    for (arch, extra, saelens) in [
        ("jumprelu", "", "jumprelu"),
        // Anthropic's setup: tanh sparsity penalty and the pre-activation loss on dead latents.
        (
            "jumprelu",
            "l0_mode = \"tanh\"\npre_act_coef = 3e-6\ndead_tokens = 256",
            "jumprelu",
        ),
        ("relu", "", "standard"),
    ] {
        let (_dir, cache, object, cfg) = train_with(&format!(
            "tokens = 5120\narch = \"{arch}\"\npenalty_warmup_steps = 5\n{extra}"
        ));
        assert_eq!(cfg["architecture"], saelens);
        assert_eq!(
            cfg["metadata"]["training_architecture"],
            if arch == "relu" { "standard" } else { arch }
        );
        let w =
            candle_core::safetensors::load(object.join("sae_weights.safetensors"), &Device::Cpu)
                .unwrap();
        assert_eq!(w.contains_key("threshold"), arch == "jumprelu");
        let sae = Sae::load(&object, &Device::Cpu).unwrap();
        let x = first_rows(&cache, 32);
        let pre = saved_pre(&w, &x);
        let expected = match arch {
            "jumprelu" => {
                let keep = pre
                    .broadcast_gt(&w["threshold"])
                    .unwrap()
                    .to_dtype(candle_core::DType::F32)
                    .unwrap();
                (pre.relu().unwrap() * keep).unwrap()
            }
            _ => pre.relu().unwrap(),
        };
        assert!(
            max_diff(&sae.encode(&x).unwrap(), &expected) < 1e-5,
            "{arch}"
        );
        let log = std::fs::read_to_string(
            std::fs::read_dir(cache.join("logs"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| std::fs::read_to_string(p).unwrap().contains("training a"))
                .unwrap(),
        )
        .unwrap();
        assert!(log.contains(&format!("training a {arch} SAE")), "{log}");
    }
}

#[test]
fn the_dense_engine_trains_the_same_sae_up_to_rounding() {
    // TopK and BatchTopK (which the device-resident engine trains too), through the stage.
    for arch in ["topk", "batchtopk"] {
        let val_fvu = |engine: &str| {
            let dir = tempfile::tempdir().unwrap();
            pipeline(
                dir.path(),
                &format!("tokens = 5120\narch = \"{arch}\"\nengine = \"{engine}\""),
            );
            let out = ok(dir.path(), &["run", "p.toml"]);
            assert!(
                out.contains(if engine == "dense" {
                    "dense Cpu engine"
                } else {
                    "sparse CPU"
                }),
                "{out}"
            );
            if engine == "dense" {
                // The stage's log reports what the engine moved: 20 batches of 256 × 128 f32 in.
                let log = std::fs::read_dir(dir.path().join("cache/logs"))
                    .unwrap()
                    .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                    .find(|l| l.contains("host↔device"))
                    .expect("a traffic line in the train log");
                assert!(log.contains("steps moved 2.6 MB in (batches)"), "{log}");
            }
            let summary: serde_json::Value = serde_json::from_slice(
                &std::fs::read(
                    object_of(&dir.path().join("cache"), "tr", "sae").join("train.json"),
                )
                .unwrap(),
            )
            .unwrap();
            summary["final"]["val_fvu"].as_f64().unwrap()
        };
        let (sparse, dense) = (val_fvu("sparse"), val_fvu("dense"));
        assert!(
            (sparse - dense).abs() < 1e-3,
            "{arch}: sparse {sparse} vs dense {dense}"
        );
    }
}

#[test]
fn the_rounded_ranked_encoders_train_the_same_sae_up_to_rounding() {
    // bf16 and int16 ranking re-rank their candidates exactly, so they keep the latents f32 TopK keeps;
    // only the summation order of the kept pre-activations differs. The default, `auto`, is one of them.
    let train = |precision: Option<&str>| {
        let dir = tempfile::tempdir().unwrap();
        let choice = precision.map_or(String::new(), |p| format!("encoder_precision = \"{p}\""));
        pipeline(
            dir.path(),
            &format!("tokens = 5120\nengine = \"sparse\"\n{choice}"),
        );
        let out = ok(dir.path(), &["run", "p.toml"]);
        let sae = object_of(&dir.path().join("cache"), "tr", "sae");
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sae.join("train.json")).unwrap()).unwrap();
        let weights = std::fs::read(sae.join("sae_weights.safetensors")).unwrap();
        assert!(
            out.contains(summary["engine"].as_str().unwrap()),
            "train.json names the engine the log does: {summary}"
        );
        (out, summary["final"]["val_fvu"].as_f64().unwrap(), weights)
    };
    let (_, f32_fvu, f32_weights) = train(Some("f32"));
    let (out, bf16_fvu, bf16_weights) = train(Some("bf16"));
    assert!(out.contains("sparse CPU (bf16"), "{out}");
    assert!(
        (f32_fvu - bf16_fvu).abs() < 1e-5 * f32_fvu,
        "f32 {f32_fvu} vs bf16 {bf16_fvu}"
    );
    let (out, int16_fvu, int16_weights) = train(Some("int16"));
    assert!(out.contains("sparse CPU (int16"), "{out}");
    assert!(
        (f32_fvu - int16_fvu).abs() < 1e-5 * f32_fvu,
        "f32 {f32_fvu} vs int16 {int16_fvu}"
    );
    // `auto` is bf16 ranking where it outruns f32 (AMX, or AVX512-BF16 on AMD), else int16 ranking where
    // that does (AVX2 without AVX-512), f32 elsewhere: the same bytes.
    use saeflow_core::kernels::gemm::Precision;
    let (out, _, auto_weights) = train(None);
    if Precision::bf16_faster() {
        assert!(out.contains("sparse CPU (bf16-ranked TopK, "), "{out}");
        assert!(
            auto_weights == bf16_weights,
            "auto's SAE is not bf16 ranking's"
        );
    } else if Precision::int16_faster() {
        assert!(
            out.contains("sparse CPU (int16-ranked TopK, AVX2 int16)"),
            "{out}"
        );
        assert!(
            auto_weights == int16_weights,
            "auto's SAE is not int16 ranking's"
        );
    } else {
        assert!(out.contains("sparse CPU engine"), "{out}");
        assert!(auto_weights == f32_weights, "auto's SAE is not f32's");
    }
}

#[test]
fn auto_keeps_the_f32_encoder_where_rounded_ranking_does_not_apply_or_pay() {
    // ReLU has no TopK to rank; the explicit `bf16` is refused there, the default quietly keeps f32.
    let dir = tempfile::tempdir().unwrap();
    pipeline(
        dir.path(),
        "arch = \"relu\"\ntokens = 2560\nengine = \"sparse\"",
    );
    let out = ok(dir.path(), &["run", "p.toml"]);
    assert!(out.contains("sparse CPU engine"), "{out}");

    // With AMX switched off bf16's kernel is AVX512-BF16: twice f32's rate on AMD, half of it on Intel;
    // without AVX-512, int16's on AVX2 is faster than f32's.
    use saeflow_core::kernels::{amd, gemm::Kernel, gemm::Precision};
    let dir = tempfile::tempdir().unwrap();
    pipeline(dir.path(), "tokens = 2560\nengine = \"sparse\"");
    let out = common::saeflow(dir.path())
        .env("SAEFLOW_AMX", "0")
        .args(["run", "p.toml"])
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    let avx512_bf16 = Kernel::Avx512Bf16.available();
    let want = if avx512_bf16 && amd() {
        "sparse CPU (bf16-ranked TopK, AVX512-BF16) engine"
    } else if Precision::int16_faster() {
        "sparse CPU (int16-ranked TopK, AVX2 int16) engine"
    } else {
        "sparse CPU engine"
    };
    assert!(
        log.contains(want),
        "AVX512-BF16 {avx512_bf16}, AMD {}: {log}",
        amd()
    );
}

/// Protocol-2 pickle of a unicode string.
fn pickle_str(s: &str) -> Vec<u8> {
    let mut p = vec![b'X'];
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
    p
}

#[test]
fn openai_topk_checkpoints_load_with_their_layer_norm() {
    let (d, m, k) = (6usize, 10usize, 3usize);
    let rand = |n: usize, seed: u64| -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    };
    let (enc, lat, dec, pre) = (rand(m * d, 1), rand(m, 2), rand(d * m, 3), rand(d, 4));
    let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &Device::Cpu).unwrap();
    let tensors = vec![
        ("pre_bias".to_string(), t(&pre, &[d])),
        ("encoder.weight".to_string(), t(&enc, &[m, d])),
        ("latent_bias".to_string(), t(&lat, &[m])),
        ("decoder.weight".to_string(), t(&dec, &[d, m])),
    ];
    let mut extras = pickle_str("activation");
    extras.extend(pickle_str("TopK"));
    extras.extend(pickle_str("activation_state_dict"));
    extras.extend(b"}(");
    extras.extend(pickle_str("k"));
    extras.push(b'J');
    extras.extend((k as i32).to_le_bytes());
    extras.extend(pickle_str("postact_fn"));
    extras.extend(pickle_str("ReLU"));
    extras.push(b'u');
    let dir = tempfile::tempdir().unwrap();
    common::checkpoints::write_torch_checkpoint_with(
        &dir.path().join("v5_32k_layer_8.pt"),
        &tensors,
        "FloatStorage",
        &extras,
    );
    let sae = Sae::load(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(
        sae.activation,
        saeflow_core::sae::format::Activation::TopK(k)
    );

    // OpenAI's Autoencoder by hand (sparse_autoencoder/model.py): LN, (x − pre_bias)·encoderᵀ + latent_bias, top-k, ReLU, decode, un-LN.
    let x = rand(2 * d, 9)
        .iter()
        .map(|v| v * 4.0 + 1.0)
        .collect::<Vec<_>>();
    for row in 0..2 {
        let xr = &x[row * d..][..d];
        let mu = xr.iter().sum::<f32>() / d as f32;
        // OpenAI's LN: torch's `std`, unbiased (n − 1), with ε added to it.
        let std = (xr.iter().map(|v| (v - mu).powi(2)).sum::<f32>() / (d - 1) as f32).sqrt() + 1e-5;
        let ln: Vec<f32> = xr.iter().map(|v| (v - mu) / std).collect();
        let latents: Vec<f32> = (0..m)
            .map(|j| {
                (0..d)
                    .map(|i| (ln[i] - pre[i]) * enc[j * d + i])
                    .sum::<f32>()
                    + lat[j]
            })
            .collect();
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|&a, &b| latents[b].total_cmp(&latents[a]));
        let mut acts = vec![0f32; m];
        for &j in &order[..k] {
            acts[j] = latents[j].max(0.0);
        }
        let recon: Vec<f32> = (0..d)
            .map(|i| ((0..m).map(|j| acts[j] * dec[i * m + j]).sum::<f32>() + pre[i]) * std + mu)
            .collect();
        let xt = t(xr, &[1, d]);
        let got_acts: Vec<f32> = sae
            .encode(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let got_recon: Vec<f32> = sae
            .reconstruct(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in got_acts
            .iter()
            .zip(&acts)
            .chain(got_recon.iter().zip(&recon))
        {
            assert!(
                (a - b).abs() < 1e-4,
                "{got_acts:?} vs {acts:?} / {got_recon:?} vs {recon:?}"
            );
        }
    }
}
