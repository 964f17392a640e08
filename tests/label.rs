//! The `label` stage: a planted feature is found and labelled with its class, shuffled labels give (almost)
//! no labels, the real pipeline (nanochat-d4 on geometry-of-truth) produces every output, and bad inputs
//! fail clearly.
mod common;

use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, UInt32Type};
use candle_core::{DType, Device, Tensor};
use common::{
    nanochat_chain, object_of, ok, published_capture_and_sae, read_parquet, run, text, write,
    write_capture,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use saeflow_core::data::activations::TokenRow;
use saeflow_core::sae::format::{Activation, Provenance, Sae};

const D: usize = 16;
const D_SAE: usize = 32;
const HOOK: &str = "blocks.0.hook_resid_post";
/// The feature the planted direction belongs to.
const PLANTED: usize = 5;

/// A capture of `docs` documents × 10 tokens of standard-normal noise (σ 0.5) in which every token of a
/// class-`A` document also carries 2.5 along e₅, and a ReLU SAE whose first 16 encoder columns are the unit
/// axes (threshold 1 through b_enc = −1). Labels are A/B by document, then optionally shuffled across
/// documents (the planted direction stays with the original A documents). Splits by document: 70% train,
/// 15% val, 15% test.
fn synthetic(dir: &Path, seed: u64, shuffle: bool) -> (PathBuf, PathBuf) {
    synthetic_with(dir, seed, shuffle, |_| "synthetic")
}

/// A document's label: A for the (possibly shuffled) class-A documents, else B.
fn a_or_b(_doc: u64, a: bool) -> Option<&'static str> {
    Some(if a { "A" } else { "B" })
}

/// [`synthetic`] with each document's source named by `source_of(doc)`.
fn synthetic_with(
    dir: &Path,
    seed: u64,
    shuffle: bool,
    source_of: fn(u64) -> &'static str,
) -> (PathBuf, PathBuf) {
    synthetic_labelled(dir, seed, shuffle, source_of, a_or_b)
}

/// [`synthetic_with`] with each document's label given by `label_of(doc, class_a)`.
fn synthetic_labelled(
    dir: &Path,
    seed: u64,
    shuffle: bool,
    source_of: fn(u64) -> &'static str,
    label_of: fn(u64, bool) -> Option<&'static str>,
) -> (PathBuf, PathBuf) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let docs = 400u64;
    let per_doc = 10;
    let noise = Normal::new(0.0f32, 0.5).unwrap();
    let planted: Vec<bool> = (0..docs).map(|d| d % 2 == 0).collect();
    let mut labels: Vec<bool> = planted.clone();
    if shuffle {
        for i in (1..labels.len()).rev() {
            labels.swap(i, rng.random_range(0..=i));
        }
    }
    let (mut rows, mut acts) = (Vec::new(), Vec::new());
    for d in 0..docs {
        let split = match d % 20 {
            0..=13 => "train",
            14..=16 => "val",
            _ => "test",
        };
        for pos in 0..per_doc {
            rows.push(TokenRow {
                doc_id: d,
                pos,
                token_id: (d as u32 * 7 + pos) % 50,
                label: label_of(d, labels[d as usize]).map(Into::into),
                split: split.into(),
                is_completion: false,
                source: source_of(d).into(),
                ..Default::default()
            });
            let mut x: Vec<f32> = (0..D).map(|_| noise.sample(&mut rng)).collect();
            if planted[d as usize] {
                x[PLANTED] += 2.5;
            }
            acts.extend(x);
        }
    }
    let capture = dir.join("capture");
    write_capture(&capture, HOOK, D, &rows, &acts);

    let cpu = Device::Cpu;
    let mut w_enc = vec![0f32; D * D_SAE];
    for j in 0..D_SAE {
        if j < D {
            w_enc[j * D_SAE + j] = 1.0;
        } else {
            // Random directions orthogonal to the planted axis: only feature 5 sees it.
            let mut v: Vec<f32> = (0..D).map(|_| noise.sample(&mut rng)).collect();
            v[PLANTED] = 0.0;
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            for i in 0..D {
                w_enc[i * D_SAE + j] = v[i] / norm;
            }
        }
    }
    let w_enc = Tensor::from_vec(w_enc, (D, D_SAE), &cpu).unwrap();
    let sae = Sae {
        activation: Activation::Relu,
        w_dec: w_enc.t().unwrap().contiguous().unwrap(),
        w_enc,
        b_enc: Tensor::full(-1f32, D_SAE, &cpu).unwrap(),
        b_dec: Tensor::zeros(D, DType::F32, &cpu).unwrap(),
        threshold: None,
        apply_b_dec_to_input: true,
        input_norm: saeflow_core::sae::format::InputNorm::None,
        cfg: Sae::standard_cfg(
            D,
            D_SAE,
            &Provenance {
                hook_name: HOOK.into(),
                ..Provenance::default()
            },
        ),
    };
    let sae_dir = dir.join("sae");
    sae.save(&sae_dir).unwrap();
    (capture, sae_dir)
}

/// A pipeline that publishes the synthetic capture and SAE through `command` stages and labels them.
fn label_pipeline(dir: &Path, capture: &Path, sae: &Path, label: &str) {
    let stages = published_capture_and_sae("lb", capture, sae);
    write(
        &dir.join("p.toml"),
        &format!("{stages}\n[stages.labels]\nkind = \"label\"\nsae = \"sae\"\ninput = \"acts\"\n{label}\n"),
    );
}

/// (feature, class, labelled, test_auroc_doc_mean, test_auroc) of every row of `features.parquet`.
fn features(object: &Path) -> Vec<(u32, String, bool, f64, f64)> {
    let b = read_parquet(&object.join("features.parquet"));
    let feature = b
        .column_by_name("feature")
        .unwrap()
        .as_primitive::<UInt32Type>();
    let class = b.column_by_name("class").unwrap().as_string::<i32>();
    let labelled = b.column_by_name("labelled").unwrap().as_boolean();
    let doc = b
        .column_by_name("test_auroc_doc_mean")
        .unwrap()
        .as_primitive::<Float64Type>();
    let token = b
        .column_by_name("test_auroc")
        .unwrap()
        .as_primitive::<Float64Type>();
    (0..b.num_rows())
        .map(|i| {
            (
                feature.value(i),
                class.value(i).to_string(),
                labelled.value(i),
                doc.value(i),
                token.value(i),
            )
        })
        .collect()
}

#[test]
fn the_planted_feature_gets_its_class_and_a_held_out_auroc_above_095() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, sae) = synthetic(dir.path(), 1, false);
    label_pipeline(dir.path(), &capture, &sae, "");
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "lb", "labels");
    let rows = features(&object);
    assert_eq!(rows.len(), D_SAE * 2);
    let labelled: Vec<_> = rows.iter().filter(|r| r.2).collect();
    // Feature 5 is labelled A (and, symmetrically, as a detector against B: AUROC < 0.5 there).
    let planted_a = rows
        .iter()
        .find(|r| r.0 == PLANTED as u32 && r.1 == "A")
        .unwrap();
    assert!(planted_a.2, "planted feature not labelled: {labelled:?}");
    assert!(planted_a.3 > 0.95 && planted_a.4 > 0.95, "{planted_a:?}");
    assert!(
        labelled.iter().all(|r| r.0 == PLANTED as u32),
        "other features labelled: {labelled:?}"
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object.join("label.json")).unwrap()).unwrap();
    assert_eq!(summary["per_class"]["A"]["best_feature"], PLANTED);
    // The baselines find the same direction: the 1-sparse probe on the SAE latents picks feature 5.
    let a = &summary["per_class"]["A"];
    assert_eq!(a["sparse_probes"][0]["k"], 1, "{a}");
    assert_eq!(
        a["sparse_probes"][0]["latents"],
        serde_json::json!([PLANTED]),
        "{a}"
    );
    // Per document, every method on the same unit with a 95% interval: the planted feature, DiffMean, the
    // probes find class A; the nulls (shuffled labels, the lone source, bags of noise tokens) do not.
    let docs = &a["documents"];
    for method in [
        "best_feature",
        "diffmean",
        "logistic",
        "sparse_probe_k1",
        "sparse_probe_k5",
        "sparse_probe_k20",
    ] {
        let m = &docs[method];
        let (auroc, low, high) = (
            m["auroc"].as_f64().unwrap(),
            m["low"].as_f64().unwrap(),
            m["high"].as_f64().unwrap(),
        );
        assert!(
            auroc > 0.95 && low <= auroc && auroc <= high && low > 0.85,
            "{method}: {m}"
        );
    }
    for method in [
        "shuffled_diffmean",
        "shuffled_logistic",
        "source_only",
        "lexical",
    ] {
        let m = &docs[method];
        let (low, high) = (m["low"].as_f64().unwrap(), m["high"].as_f64().unwrap());
        assert!(
            low < 0.5 + 0.05 && high > 0.5 - 0.05 && high - low < 0.4,
            "{method}: {m}"
        );
    }
    let evaluation = read_parquet(&object.join("evaluation.parquet"));
    let scope = evaluation
        .column_by_name("scope")
        .unwrap()
        .as_string::<i32>();
    assert!((0..evaluation.num_rows())
        .all(|i| ["pooled", "source:synthetic"].contains(&scope.value(i))));
    // `show` puts every method's interval and the baselines first.
    let shown = ok(dir.path(), &["show", "p.toml", "labels"]);
    let line = |method: &str| {
        shown
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{method} ")))
            .unwrap_or_else(|| panic!("no {method} line in:\n{shown}"))
            .to_string()
    };
    assert!(shown.contains("every method on one unit"), "{shown}");
    for method in [
        "best_feature",
        "sparse_probe_k5",
        "diffmean",
        "logistic",
        "lexical",
        "source_only",
        "shuffled_logistic",
    ] {
        let l = line(method);
        assert!(
            l.contains(" [") && l.contains(" pairs ") && l.contains(" n "),
            "{l}"
        );
    }
    let directions =
        candle_core::safetensors::load(object.join("directions.safetensors"), &Device::Cpu)
            .unwrap();
    for name in ["diffmean.A", "logistic.A"] {
        let a: Vec<f32> = directions[name].to_vec1().unwrap();
        let largest = (0..D)
            .max_by(|&i, &j| a[i].abs().total_cmp(&a[j].abs()))
            .unwrap();
        assert_eq!(largest, PLANTED, "{name}");
    }
    // Contexts: the top ones of the labelled feature are A documents' tokens, the strongest first.
    let contexts = read_parquet(&object.join("contexts.parquet"));
    let kind = contexts.column_by_name("kind").unwrap().as_string::<i32>();
    let act = contexts
        .column_by_name("activation")
        .unwrap()
        .as_primitive::<Float64Type>();
    let doc = contexts
        .column_by_name("doc_id")
        .unwrap()
        .as_primitive::<arrow_array::types::UInt64Type>();
    let tops: Vec<usize> = (0..contexts.num_rows())
        .filter(|&i| kind.value(i) == "top")
        .collect();
    assert_eq!(
        tops.len(),
        2 * 10,
        "10 top contexts for feature 5 as A and as B"
    );
    assert!(tops
        .windows(2)
        .take(9)
        .all(|w| act.value(w[0]) >= act.value(w[1])));
    assert!(
        tops.iter().all(|&i| doc.value(i) % 2 == 0),
        "top contexts outside A documents"
    );
}

#[test]
fn shuffled_labels_give_labels_in_no_more_than_alpha_of_runs() {
    // 20 seeds of the planted data with labels shuffled across documents: every null hypothesis is true,
    // so BH at α = 0.01 labels anything in at most ~1% of runs (it controls the family-wise error here).
    // `min_effect = 0` leaves the FDR control alone in charge. (With `unit = "token"` the same runs label
    // features in 5 of 20: a document's tokens share its label and its planted direction, so the
    // token-level test counts correlated samples as independent. Hence documents by default.)
    let dir = tempfile::tempdir().unwrap();
    let mut runs_with_labels = 0;
    for seed in 0..20 {
        let sub = dir.path().join(format!("s{seed}"));
        let (capture, sae) = synthetic(&sub, 100 + seed, true);
        label_pipeline(&sub, &capture, &sae, "min_effect = 0.0");
        ok(&sub, &["run", "p.toml"]);
        let object = object_of(&sub.join("cache"), "lb", "labels");
        if features(&object).iter().any(|r| r.2) {
            runs_with_labels += 1;
        }
    }
    eprintln!("shuffled labels: {runs_with_labels} of 20 runs labelled a feature");
    assert!(
        runs_with_labels as f64 / 20.0 <= 0.05,
        "{runs_with_labels} of 20 runs"
    );
}

#[test]
fn bad_inputs_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, sae) = synthetic(dir.path(), 3, false);
    let fails_on = |capture: &Path, sae: &Path, label: &str, message: &str| {
        label_pipeline(dir.path(), capture, sae, label);
        let out = run(dir.path(), &["run", "p.toml"]);
        assert!(!out.status.success(), "{label}: succeeded");
        assert!(text(&out).contains(message), "{label}: {}", text(&out));
    };
    let fails = |sae: &Path, label: &str, message: &str| fails_on(&capture, sae, label, message);
    fails(
        &sae,
        "classes = [\"C\"]",
        "class `C` is not a label of capture `acts` (its labels: A, B)",
    );
    fails(
        &sae,
        "test_split = \"holdout\"",
        "capture `acts` has no split `holdout` (its splits: test, train, val)",
    );
    fails(
        &sae,
        "classes = [\"A\"]\nversus = [\"Z\"]",
        "`versus` label `Z` is not a label of capture `acts` (its labels: A, B)",
    );
    fails(
        &sae,
        "classes = [\"A\"]\nversus = [\"A\"]",
        "`A` is in both `classes` and `versus`",
    );
    fails(&sae, "versus = [\"B\"]", "`versus` needs `classes`");
    // Pooling completion tokens of documents that have none (statements) leaves nothing to measure.
    fails(
        &sae,
        "positions = \"completion\"",
        "FAILED labels: capture `acts`: 400 labelled documents of source `synthetic` have no stored \
         positions to pool (positions = \"completion\", skip_completion = 0)",
    );
    fails(
        &sae,
        "control_source = \"neutral\"",
        "`control_source`: `neutral` is not a source of capture `acts` (its sources: synthetic)",
    );
    // A packed capture mixes documents: labels measured on it are refused.
    let packed = tempfile::tempdir().unwrap();
    let (packed_capture, packed_sae) = synthetic(packed.path(), 3, false);
    let info_path = packed_capture.join("capture.json");
    let mut info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&info_path).unwrap()).unwrap();
    info["settings"] = serde_json::json!({ "pack": true });
    std::fs::write(&info_path, serde_json::to_vec(&info).unwrap()).unwrap();
    label_pipeline(dir.path(), &packed_capture, &packed_sae, "");
    let out = run(dir.path(), &["run", "p.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("FAILED labels: capture `acts` packs documents (pack = true)")
            && text(&out).contains("label a capture with pack = false"),
        "{}",
        text(&out)
    );
    // A source with fit documents and no test documents could never be tested.
    let other = tempfile::tempdir().unwrap();
    let (lopsided, lopsided_sae) = synthetic_with(other.path(), 3, false, |d| {
        if d % 20 == 0 {
            "train_only"
        } else {
            "synthetic"
        }
    });
    fails_on(
        &lopsided,
        &lopsided_sae,
        "",
        "FAILED labels: source `train_only` has 20 labelled units in `train` but none in `test`",
    );
    // A capture of unlabelled rows has nothing to compare.
    let unlabelled = tempfile::tempdir().unwrap();
    let (none, none_sae) =
        synthetic_labelled(unlabelled.path(), 3, false, |_| "synthetic", |_, _| None);
    fails_on(
        &none,
        &none_sae,
        "",
        "FAILED labels: capture `acts` has no labelled tokens: label the rows in its dataset stage",
    );
    // A test split of one class: no AUROC could be measured on it.
    let single = tempfile::tempdir().unwrap();
    let (one_class, one_class_sae) = synthetic_labelled(
        single.path(),
        3,
        false,
        |_| "synthetic",
        |d, a| Some(if a || d % 20 >= 17 { "A" } else { "B" }),
    );
    fails_on(
        &one_class,
        &one_class_sae,
        "",
        "FAILED labels: split `test` of capture `acts` has no `B` tokens",
    );
    // One class against the rest is fine, on any split.
    label_pipeline(
        dir.path(),
        &capture,
        &sae,
        "classes = [\"A\"]\nfit_split = \"val\"\nval_split = \"train\"",
    );
    ok(dir.path(), &["run", "p.toml"]);
    // With two labels, A versus B is A against the rest.
    label_pipeline(
        dir.path(),
        &capture,
        &sae,
        "classes = [\"A\"]\nversus = [\"B\"]",
    );
    ok(dir.path(), &["run", "p.toml"]);
    let versus = features(&object_of(&dir.path().join("cache"), "lb", "labels"));
    label_pipeline(dir.path(), &capture, &sae, "classes = [\"A\"]");
    ok(dir.path(), &["run", "p.toml"]);
    assert_eq!(
        versus,
        features(&object_of(&dir.path().join("cache"), "lb", "labels"))
    );
    // A valid SAE of another width: one more input dimension.
    let narrow = Sae::load(&sae, &Device::Cpu).unwrap();
    let cpu = Device::Cpu;
    let wide = Sae {
        w_enc: Tensor::cat(
            &[
                &narrow.w_enc,
                &Tensor::zeros((1, D_SAE), DType::F32, &cpu).unwrap(),
            ],
            0,
        )
        .unwrap(),
        w_dec: Tensor::cat(
            &[
                &narrow.w_dec,
                &Tensor::zeros((D_SAE, 1), DType::F32, &cpu).unwrap(),
            ],
            1,
        )
        .unwrap(),
        b_dec: Tensor::zeros(D + 1, DType::F32, &cpu).unwrap(),
        cfg: Sae::standard_cfg(
            D + 1,
            D_SAE,
            &Provenance {
                hook_name: HOOK.into(),
                ..Provenance::default()
            },
        ),
        ..narrow
    };
    let wide_dir = dir.path().join("wide");
    wide.save(&wide_dir).unwrap();
    fails(
        &wide_dir,
        "",
        "the SAE of `sae` takes d_in 17 but blocks.0.hook_resid_post of capture `acts` has width 16",
    );
}

#[test]
fn labels_a_trained_sae_on_real_activations_end_to_end() {
    // nanochat-d4 on geometry-of-truth (true/false statements), a small TopK SAE, then `label`.
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("p.toml"),
        &nanochat_chain(dir.path(), "lb", "", ""),
    );
    let out = ok(dir.path(), &["run", "p.toml"]);
    assert!(
        out.contains("labelling 512 features of `sae` against false, true"),
        "{out}"
    );
    let object = object_of(&dir.path().join("cache"), "lb", "labels");
    let rows = features(&object);
    assert_eq!(rows.len(), 512 * 2);
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object.join("label.json")).unwrap()).unwrap();
    assert_eq!(summary["classes"], serde_json::json!(["false", "true"]));
    assert_eq!(summary["unit"], "doc_mean");
    for class in ["false", "true"] {
        let c = &summary["per_class"][class];
        let diffmean = c["documents"]["diffmean"]["auroc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&diffmean), "{c}");
        // Labelled features in the summary agree with the table.
        let count = rows.iter().filter(|r| r.2 && r.1 == class).count();
        assert_eq!(c["labelled_features"], count, "{c}");
    }
    for file in [
        "contexts.parquet",
        "evaluation.parquet",
        "directions.safetensors",
    ] {
        assert!(object.join(file).exists(), "{file}");
    }
    // Recomputed (its cache object removed), the outputs are byte-identical.
    let first = std::fs::read(object.join("features.parquet")).unwrap();
    std::fs::remove_dir_all(&object).unwrap();
    let out = ok(dir.path(), &["run", "p.toml"]);
    assert!(out.contains("1 computed"), "{out}");
    let object = object_of(&dir.path().join("cache"), "lb", "labels");
    assert_eq!(
        std::fs::read(object.join("features.parquet")).unwrap(),
        first
    );
}

#[test]
fn methods_fit_on_some_sources_and_report_on_others() {
    let dir = tempfile::tempdir().unwrap();
    let (capture, sae) = synthetic_with(dir.path(), 4, false, |d| {
        if d % 3 == 0 {
            "left"
        } else {
            "right"
        }
    });
    let test_docs = |source: usize| {
        (0..400u64)
            .filter(|d| d % 20 >= 17 && (d % 3 == 0) == (source == 0))
            .count() as u64
    };
    // Fit on `left`, report on `right`: the planted direction transfers.
    label_pipeline(
        dir.path(),
        &capture,
        &sae,
        "train_sources = [\"left\"]\ntest_sources = [\"right\"]",
    );
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "lb", "labels");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object.join("label.json")).unwrap()).unwrap();
    let diffmean = &summary["per_class"]["A"]["documents"]["diffmean"];
    assert_eq!(
        diffmean["n_pos"].as_u64().unwrap() + diffmean["n_neg"].as_u64().unwrap(),
        test_docs(1),
        "only `right`'s test documents are scored: {diffmean}"
    );
    assert!(diffmean["low"].as_f64().unwrap() > 0.85, "{diffmean}");
    // The matrix: each source alone against each source's test documents, both ways.
    label_pipeline(dir.path(), &capture, &sae, "source_matrix = true");
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "lb", "labels");
    let evaluation = read_parquet(&object.join("evaluation.parquet"));
    let scope = evaluation
        .column_by_name("scope")
        .unwrap()
        .as_string::<i32>();
    let method = evaluation
        .column_by_name("method")
        .unwrap()
        .as_string::<i32>();
    let auroc = evaluation
        .column_by_name("auroc")
        .unwrap()
        .as_primitive::<Float64Type>();
    let class = evaluation
        .column_by_name("class")
        .unwrap()
        .as_string::<i32>();
    let mut cells = Vec::new();
    for i in 0..evaluation.num_rows() {
        if scope.value(i).starts_with("train:") && class.value(i) == "A" {
            cells.push((scope.value(i).to_string(), method.value(i).to_string()));
            assert!(
                auroc.value(i) > 0.9,
                "{} {}: {}",
                scope.value(i),
                method.value(i),
                auroc.value(i)
            );
        }
    }
    cells.sort();
    let want: Vec<(String, String)> = ["left", "right"]
        .iter()
        .flat_map(|a| ["left", "right"].map(move |b| format!("train:{a}/source:{b}")))
        .flat_map(|s| ["diffmean", "logistic"].map(|m| (s.clone(), m.to_string())))
        .collect();
    assert_eq!(cells, want);

    // A source the capture does not have is named.
    label_pipeline(dir.path(), &capture, &sae, "train_sources = [\"nope\"]");
    let out = run(dir.path(), &["run", "p.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(
            "`train_sources`: `nope` is not a source of capture `acts` (its sources: left, right)"
        ),
        "{}",
        text(&out)
    );
}

#[test]
fn the_shuffled_label_null_labels_nothing_on_planted_data() {
    // The planted feature is real, but `shuffle_labels` permutes the documents' labels within source and
    // split before anything is measured: no feature may be labelled, and every method sits at chance.
    let dir = tempfile::tempdir().unwrap();
    let (capture, sae) = synthetic(dir.path(), 6, false);
    label_pipeline(dir.path(), &capture, &sae, "shuffle_labels = true");
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "lb", "labels");
    let labelled: Vec<_> = features(&object).into_iter().filter(|r| r.2).collect();
    assert!(labelled.is_empty(), "{labelled:?}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object.join("label.json")).unwrap()).unwrap();
    assert_eq!(summary["shuffle_labels"], true);
    for method in ["diffmean", "logistic", "sparse_probe_k1"] {
        let m = &summary["per_class"]["A"]["documents"][method];
        let (low, high) = (m["low"].as_f64().unwrap(), m["high"].as_f64().unwrap());
        assert!(low < 0.5 && high > 0.5, "{method}: {m}");
    }
}

#[test]
fn probes_alone_and_every_pool_measure_the_same_planted_direction() {
    // Without `sae`: no features are tested, but DiffMean, the logistic probe and the baselines are
    // measured as with one — identical numbers, since they never read the SAE.
    let dir = tempfile::tempdir().unwrap();
    let (capture, sae) = synthetic(dir.path(), 7, false);
    let stages = published_capture_and_sae("lb", &capture, &sae);
    let pipeline = |label: &str| {
        write(
            &dir.path().join("p.toml"),
            &format!("{stages}\n[stages.labels]\nkind = \"label\"\ninput = \"acts\"\n{label}\n"),
        );
    };
    let summary = |dir: &Path| -> serde_json::Value {
        let object = object_of(&dir.join("cache"), "lb", "labels");
        serde_json::from_slice(&std::fs::read(object.join("label.json")).unwrap()).unwrap()
    };
    pipeline("");
    let out = ok(dir.path(), &["run", "p.toml"]);
    assert!(out.contains("probing (no SAE)"), "{out}");
    let alone = summary(dir.path());
    assert!(!object_of(&dir.path().join("cache"), "lb", "labels")
        .join("features.parquet")
        .exists());
    let docs = &alone["per_class"]["A"]["documents"];
    assert!(
        docs.get("best_feature").is_none() && docs.get("sparse_probe_k1").is_none(),
        "{docs}"
    );
    pipeline("sae = \"sae\"");
    ok(dir.path(), &["run", "p.toml"]);
    let with_sae = summary(dir.path());
    for method in [
        "diffmean",
        "logistic",
        "lexical",
        "source_only",
        "shuffled_diffmean",
    ] {
        assert_eq!(
            alone["per_class"]["A"]["documents"][method],
            with_sae["per_class"]["A"]["documents"][method],
            "{method}"
        );
    }
    // Every pool finds the planted direction (it is on every token); `token` has 10 units a document.
    for pool in ["max", "last", "token"] {
        pipeline(&format!("sae = \"sae\"\npool = \"{pool}\""));
        ok(dir.path(), &["run", "p.toml"]);
        let s = summary(dir.path());
        let units_per_doc = if pool == "token" { 10 } else { 1 };
        assert_eq!(s["units"], 400 * units_per_doc, "{pool}");
        for method in ["best_feature", "diffmean", "logistic"] {
            let m = &s["per_class"]["A"]["documents"][method];
            assert!(m["auroc"].as_f64().unwrap() > 0.9, "{pool} {method}: {m}");
        }
    }
}

#[test]
fn recall_at_one_percent_false_positives_is_set_on_the_control_source() {
    // A third of the class-B documents form a `neutral` source, never fitted on: its test units set each
    // method's threshold at 1% false positives, and the planted class is recalled above it.
    let dir = tempfile::tempdir().unwrap();
    let (capture, sae) = synthetic_with(dir.path(), 8, false, |d| {
        if d % 2 == 1 && d % 3 == 0 {
            "neutral"
        } else {
            "data"
        }
    });
    label_pipeline(
        dir.path(),
        &capture,
        &sae,
        "control_source = \"neutral\"\ntrain_sources = [\"data\"]",
    );
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "lb", "labels");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(object.join("label.json")).unwrap()).unwrap();
    let docs = &summary["per_class"]["A"]["documents"];
    for method in ["diffmean", "logistic"] {
        let recall = docs[method]["recall_at_1pct_fpr"].as_f64().unwrap();
        assert!(recall > 0.8, "{method}: {}", docs[method]);
    }
    // Every test A document is a positive; the control's documents are negatives.
    let test_a = (0..400u64).filter(|d| d % 20 == 18).count() as u64;
    assert_eq!(docs["diffmean"]["n_pos"], test_a, "{}", docs["diffmean"]);
    // A control source that is also fitted on is refused.
    label_pipeline(
        dir.path(),
        &capture,
        &sae,
        "control_source = \"neutral\"\ntrain_sources = [\"neutral\", \"data\"]",
    );
    let out = run(dir.path(), &["run", "p.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("the control source `neutral` is also in `train_sources`"),
        "{}",
        text(&out)
    );
}
