//! The `capture` stage end to end: parity of stored activations with nanochat's own residuals, position
//! selection against the tokenizer, resumption after SIGKILL, bounded memory, the reader, and bad inputs.
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{
    max_abs_diff, nanochat_d4, number_comparisons, object_of, ok, run, shared, text, write,
};
use saeflow_core::data::activations::{ActivationStore, CaptureInfo, ReadOptions};

/// A pipeline: a JSONL dataset (records with `text`, or `prompt` and `completion`, and `label`) and a
/// capture of it by nanochat-d4 with extra capture settings.
fn pipeline(dir: &Path, records: &[serde_json::Value], capture: &str) {
    let fields = if records[0].get("text").is_some() {
        r#"text = "text""#
    } else {
        r#"prompt = "prompt", completion = "completion""#
    };
    let label = if records[0].get("label").is_some() {
        r#", label = "label""#
    } else {
        ""
    };
    let jsonl: String = records.iter().map(|r| format!("{r}\n")).collect();
    write(&dir.join("data.jsonl"), &jsonl);
    write(
        &dir.join("p.toml"),
        &format!(
            r#"[pipeline]
name = "cap"

[models.nc]
kind = "nanochat"
path = "{model}"

[stages.data]
kind = "dataset"
sources = [{{ path = "data.jsonl", {fields}{label} }}]
splits = {{ train = 1.0 }}

[stages.acts]
kind = "capture"
input = "data"
model = "nc"
{capture}
"#,
            model = nanochat_d4().display()
        ),
    );
}

/// tokens.parquet as (doc_id, pos, token_id, is_completion) rows.
fn token_rows(object: &Path) -> Vec<(u64, u32, u32, bool)> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{UInt32Type, UInt64Type};
    let file = std::fs::File::open(object.join("tokens.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in reader {
        let b = b.unwrap();
        let doc = b
            .column_by_name("doc_id")
            .unwrap()
            .as_primitive::<UInt64Type>();
        let pos = b
            .column_by_name("pos")
            .unwrap()
            .as_primitive::<UInt32Type>();
        let tok = b
            .column_by_name("token_id")
            .unwrap()
            .as_primitive::<UInt32Type>();
        let comp = b.column_by_name("is_completion").unwrap().as_boolean();
        for i in 0..b.num_rows() {
            out.push((doc.value(i), pos.value(i), tok.value(i), comp.value(i)));
        }
    }
    out
}

/// Every activation of a hook in store order, `[rows, d]`.
fn all_acts(object: &Path, hook: &str) -> Tensor {
    let store = ActivationStore::open(object, hook).unwrap();
    let batches: Vec<Tensor> = store
        .batches(&ReadOptions::default(), &Device::Cpu)
        .unwrap()
        .map(|b| b.unwrap().acts)
        .collect();
    Tensor::cat(&batches, 0).unwrap()
}

/// doc_id of each text in the dataset stage's rows.
fn doc_ids(cache: &Path) -> BTreeMap<String, u64> {
    let rows =
        saeflow_core::data::rows::read(&object_of(cache, "cap", "data").join("rows.parquet"))
            .unwrap();
    rows.into_iter().map(|r| (r.text, r.doc_id)).collect()
}

#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn stored_residuals_equal_nanochats_reference_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared("fixtures/nanochat-d4/reference_outputs.json")).unwrap(),
    )
    .unwrap();
    let cases = reference["cases"].as_array().unwrap();
    let records: Vec<_> = cases
        .iter()
        .map(|c| serde_json::json!({"text": c["prompt"], "label": "x"}))
        .collect();
    let hooks: Vec<String> = (0..4)
        .map(|l| format!("blocks.{l}.hook_resid_post"))
        .collect();
    pipeline(
        dir.path(),
        &records,
        &format!("hooks = {hooks:?}\nexclude_bos = false\nbatch_size = 3"),
    );
    ok(dir.path(), &["run", "p.toml"]);
    let cache = dir.path().join("cache");
    let object = object_of(&cache, "cap", "acts");
    let tokens = token_rows(&object);
    let ids = doc_ids(&cache);
    let tensors = candle_core::safetensors::load(
        shared("fixtures/nanochat-d4/reference_tensors.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let acts: Vec<Tensor> = hooks.iter().map(|h| all_acts(&object, h)).collect();
    let mut compared = 0;
    for (case, c) in cases.iter().enumerate() {
        let doc = ids[c["prompt"].as_str().unwrap()];
        let rows: Vec<usize> = (0..tokens.len()).filter(|&i| tokens[i].0 == doc).collect();
        let expected_ids: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got_ids: Vec<u32> = rows.iter().map(|&i| tokens[i].2).collect();
        let got_pos: Vec<u32> = rows.iter().map(|&i| tokens[i].1).collect();
        assert_eq!(got_ids, expected_ids, "case {case}: token ids");
        assert_eq!(got_pos, (0..expected_ids.len() as u32).collect::<Vec<_>>());
        let index = Tensor::from_vec(
            rows.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            rows.len(),
            &Device::Cpu,
        )
        .unwrap();
        for (layer, a) in acts.iter().enumerate() {
            let got = a.index_select(&index, 0).unwrap();
            let want = &tensors[&format!("resid_post_{case}_{layer}")];
            let diff: f32 = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff <= 1e-4, "case {case} layer {layer}: max |diff| {diff}");
            compared += 1;
        }
    }
    assert_eq!(compared, 16);
    let info = CaptureInfo::read(&object).unwrap();
    assert_eq!(info.tokens as usize, tokens.len());
    assert_eq!(info.documents, 4);
    assert_eq!(info.d_model, 128);
}

#[test]
fn positions_select_exactly_the_tokens_the_tokenizer_says() {
    let model = saeflow_core::models::load(&nanochat_d4(), None, &Device::Cpu).unwrap();
    let pairs = [
        ("Is the sky green?", " No, the sky is blue."),
        ("Did you take the money?", " I never touched it, I promise."),
        ("Say something.", " Hello"),
    ];
    let records: Vec<_> = pairs
        .iter()
        .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c, "label": "l"}))
        .collect();
    let encode = |s: &str| model.tokenizer.encode(s).unwrap();
    for (positions, expect) in [
        (
            "completion",
            pairs.iter().map(|(_, c)| encode(c).len()).sum::<usize>(),
        ),
        ("last", 3),
        ("last_prompt", 3),
        (
            "all",
            pairs
                .iter()
                .map(|(p, c)| encode(p).len() + encode(c).len())
                .sum::<usize>(),
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        pipeline(
            dir.path(),
            &records,
            &format!("hooks = [\"blocks.1.hook_resid_post\"]\npositions = \"{positions}\""),
        );
        ok(dir.path(), &["run", "p.toml"]);
        let cache = dir.path().join("cache");
        let object = object_of(&cache, "cap", "acts");
        let tokens = token_rows(&object);
        assert_eq!(tokens.len(), expect, "positions = {positions}");
        let ids = doc_ids(&cache);
        for (p, c) in pairs {
            let doc = ids[&format!("{p}{c}")];
            let mine: Vec<_> = tokens.iter().filter(|t| t.0 == doc).collect();
            let (np, nc) = (encode(p).len() as u32, encode(c).len() as u32);
            match positions {
                "completion" => {
                    // BOS + prompt come first, so the completion starts at 1 + |prompt|.
                    assert_eq!(
                        mine.iter().map(|t| t.2).collect::<Vec<_>>(),
                        encode(c),
                        "{c}"
                    );
                    assert_eq!(mine[0].1, 1 + np);
                    assert!(mine.iter().all(|t| t.3));
                }
                "last" => assert_eq!((mine.len(), mine[0].1), (1, np + nc)),
                "last_prompt" => {
                    assert_eq!((mine.len(), mine[0].1, mine[0].3), (1, np, false))
                }
                _ => {
                    // BOS is left out by default.
                    assert_eq!(mine.first().unwrap().1, 1);
                    assert_eq!(mine.iter().filter(|t| t.3).count() as u32, nc);
                }
            }
        }
        assert_eq!(
            all_acts(&object, "blocks.1.hook_resid_post").dims(),
            [expect, 128]
        );
    }
}

/// A multi-shard capture of geometry-of-truth's number comparisons by nanochat-d4.
fn geometry_pipeline(dir: &Path, capture: &str) {
    write(
        &dir.join("p.toml"),
        &format!(
            r#"[pipeline]
name = "cap"

[models.nc]
kind = "nanochat"
path = "{model}"

[stages.data]
kind = "dataset"
sources = [{{ preset = "geometry_of_truth", path = "{data}", subsets = ["larger_than", "smaller_than"] }}]

[stages.acts]
kind = "capture"
input = "data"
model = "nc"
hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"]
{capture}
"#,
            model = nanochat_d4().display(),
            data = number_comparisons(&dir.join("geometry_of_truth")).display(),
        ),
    );
}

#[test]
fn sigkill_during_capture_resumes_from_the_last_shard_with_identical_files() {
    use rand::{Rng, SeedableRng};
    let settings = "tokens = 50000\nshard_tokens = 1000";
    let reference = tempfile::tempdir().unwrap();
    geometry_pipeline(reference.path(), settings);
    ok(reference.path(), &["run", "p.toml", "data"]);
    ok(reference.path(), &["run", "p.toml"]);
    let expected = common::published_outputs(&reference.path().join("cache"));
    let shards = expected
        .keys()
        .filter(|k| k.contains("acts-blocks.1"))
        .count();
    assert!(shards >= 20, "{shards} shards");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    geometry_pipeline(d, settings);
    ok(d, &["run", "p.toml", "data"]);
    let seed = std::process::id() as u64;
    println!("kill-moment seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let cache = d.join("cache");
    let mut kept = Vec::new();
    for kill in 0..10 {
        let before = common::partial_shards(&cache);
        let mut child = common::saeflow(d)
            .args(["run", "-q", "p.toml"])
            .spawn()
            .unwrap();
        // Kill once this run has added 1 or 2 shards, plus a random part of the next one.
        let wanted = before + rng.random_range(1..=2);
        while common::partial_shards(&cache) < wanted {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the capture finished before kill {kill}"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(0..40)));
        child.kill().unwrap();
        child.wait().unwrap();
        kept.push(common::partial_shards(&cache));
        println!("kill {kill}: {} shards kept", kept[kill]);
        ok(d, &["cache", "verify"]);
    }
    let last = ok(d, &["run", "p.toml"]);
    let log = std::fs::read_to_string(
        std::fs::read_dir(cache.join("logs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| std::fs::read_to_string(p).unwrap().contains("capturing"))
            .expect("a capture log"),
    )
    .unwrap();
    println!("{log}\n{last}");
    let resumed: Vec<usize> = log
        .lines()
        .filter_map(|l| l.strip_prefix("resuming from shard "))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(
        resumed, kept,
        "every rerun resumes where the last one stopped"
    );
    assert!(last.contains("resuming from shard"), "{last}");
    assert_eq!(common::published_outputs(&cache), expected);
}

#[test]
fn the_reader_shuffles_by_seed_filters_splits_and_returns_each_row_once() {
    let dir = tempfile::tempdir().unwrap();
    geometry_pipeline(
        dir.path(),
        "tokens = 12000\nshard_tokens = 5000\ndtype = \"f16\"",
    );
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "cap", "acts");
    let hook = "blocks.1.hook_resid_post";
    let store = ActivationStore::open(&object, hook).unwrap();
    assert_eq!(store.rows(), 12000);
    assert!(store.info.shards.len() >= 2);
    let read = |options: ReadOptions| -> (Vec<u64>, Tensor) {
        let mut rows = Vec::new();
        let mut acts = Vec::new();
        for b in store.batches(&options, &Device::Cpu).unwrap() {
            let b = b.unwrap();
            assert!(b.acts.dim(0).unwrap() <= 1000);
            assert_eq!(b.acts.dtype(), DType::F32);
            rows.extend(b.rows);
            acts.push(b.acts);
        }
        (rows, Tensor::cat(&acts, 0).unwrap())
    };
    let base = ReadOptions {
        batch_size: 1000,
        buffer_rows: 3000,
        ..ReadOptions::default()
    };
    let (ordered, all) = read(base.clone());
    assert_eq!(ordered, (0..12000).collect::<Vec<u64>>());
    let shuffled = |seed| {
        read(ReadOptions {
            shuffle: Some(seed),
            ..base.clone()
        })
    };
    let (a, a_acts) = shuffled(1);
    let (b, _) = shuffled(1);
    let (c, _) = shuffled(2);
    assert_eq!(a, b, "same seed, same order");
    assert_ne!(a, c, "another seed, another order");
    assert_ne!(a, ordered);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, ordered, "every row exactly once");
    // Rows travel with their vectors.
    let index = Tensor::from_vec(
        a.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        a.len(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(&all.index_select(&index, 0).unwrap(), &a_acts),
        0.0
    );
    // The first 1000 shuffled rows come from all over the store, not from one block.
    let first: Vec<u64> = a[..1000].to_vec();
    assert!(first.iter().max().unwrap() - first.iter().min().unwrap() > 6000);

    let mask = store.split_mask(&["val".into()]).unwrap();
    let (val, _) = read(ReadOptions {
        splits: Some(vec!["val".into()]),
        shuffle: Some(3),
        ..base.clone()
    });
    assert_eq!(val.len() as u64, store.info.splits["val"]);
    assert!(val.iter().all(|&r| mask[r as usize]));
    assert!(!val.is_empty() && val.len() < 3000);

    // f16 storage holds the f32 values rounded to f16.
    let dir32 = tempfile::tempdir().unwrap();
    geometry_pipeline(dir32.path(), "tokens = 12000\nshard_tokens = 5000");
    ok(dir32.path(), &["run", "p.toml"]);
    let f32_all = all_acts(&object_of(&dir32.path().join("cache"), "cap", "acts"), hook);
    let rounded = f32_all
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let diff: f32 = (rounded - all)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(diff, 0.0);
}

/// Peak resident memory of one saeflow run: the child's own high-water mark (`VmHWM`), sampled until it
/// exits. (`wait4`'s `ru_maxrss` would also count the test process's image the child had before `exec`,
/// which depends on what other tests hold at that moment.)
fn peak_rss_kib(dir: &Path, args: &[&str]) -> i64 {
    let mut child = common::saeflow(dir)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        let hwm = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
            })
            .unwrap_or(0);
        peak = peak.max(hwm);
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    };
    assert!(status.success(), "{args:?} failed");
    peak
}

#[test]
fn peak_memory_does_not_grow_with_the_number_of_tokens() {
    let dir = tempfile::tempdir().unwrap();
    geometry_pipeline(dir.path(), "shard_tokens = 4096");
    ok(dir.path(), &["run", "p.toml", "data"]);
    let small = peak_rss_kib(
        dir.path(),
        &["run", "-q", "p.toml", "-S", "acts.tokens=12000"],
    );
    let large = peak_rss_kib(
        dir.path(),
        &["run", "-q", "p.toml", "-S", "acts.tokens=120000"],
    );
    println!("peak RSS: 12k tokens {small} KiB, 120k tokens {large} KiB");
    assert!(
        (large as f64) < 1.2 * small as f64,
        "10x the tokens took {large} KiB vs {small} KiB"
    );
}

/// Runs the pipeline expecting failure with `fragments` in the output and no published capture.
fn fails_clearly(dir: &Path, args: &[&str], fragments: &[&str]) {
    let out = run(dir, args);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    for f in fragments {
        assert!(msg.contains(f), "missing `{f}` in:\n{msg}");
    }
    assert!(!msg.contains("panicked"), "{msg}");
    assert!(
        !dir.join("cache/refs/cap/acts.json").exists(),
        "a failed capture was published"
    );
}

#[test]
fn bad_inputs_fail_with_clear_messages_and_publish_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let records = [serde_json::json!({"text": "hello world, this is a test", "label": "x"})];
    pipeline(d, &records, "hooks = [\"blocks.9.hook_resid_post\"]");
    fails_clearly(
        d,
        &["run", "p.toml"],
        &["hook `blocks.9.hook_resid_post` is beyond the model: it has 4 blocks (blocks.0 … blocks.3)"],
    );
    pipeline(
        d,
        &records,
        "hooks = [\"blocks.1.hook_resid_post\"]\nsplits = [\"test\"]",
    );
    fails_clearly(
        d,
        &["run", "p.toml"],
        &[
            "no rows to capture",
            "no rows in splits [\"test\"]",
            "it has: train 1",
        ],
    );
    pipeline(
        d,
        &records,
        "hooks = [\"blocks.1.hook_resid_post\"]\npositions = \"completion\"",
    );
    fails_clearly(d, &["run", "p.toml"], &["no tokens to store", "Completion"]);
    pipeline(
        d,
        &records,
        "hooks = [\"blocks.1.hook_resid_post\"]\ncontext = 100000",
    );
    fails_clearly(
        d,
        &["run", "p.toml"],
        &["context = 100000 exceeds", "positions"],
    );

    // A checkpoint with finite weights whose layer-1 MLP overflows: the error names hook, document and
    // position (weights holding NaN are refused at load, before any capture).
    let poisoned = d.join("poisoned");
    common::checkpoints::make_nanochat_with(&poisoned, 3, &[], Some(1));
    let toml = std::fs::read_to_string(d.join("p.toml")).unwrap().replace(
        &nanochat_d4().display().to_string(),
        &poisoned.display().to_string(),
    );
    write(&d.join("p.toml"), &toml.replace("context = 100000", ""));
    ok(d, &["run", "p.toml", "data"]);
    let docs = doc_ids(&d.join("cache"));
    let out = run(d, &["run", "p.toml"]);
    let msg = text(&out);
    let named = msg
        .split("non-finite activation at blocks.1.hook_resid_post in doc_id ")
        .nth(1)
        .unwrap_or_else(|| panic!("{msg}"));
    let doc: u64 = named.split_whitespace().next().unwrap().parse().unwrap();
    assert!(docs.values().any(|&d| d == doc), "{msg}");
    assert!(named.contains(" pos 1 (token "), "{msg}"); // the first position after BOS
    fails_clearly(d, &["run", "p.toml"], &["non-finite activation"]);
}

/// Activations of one document's stored rows, in position order.
fn doc_acts(object: &Path, hook: &str, doc: u64) -> Tensor {
    let rows: Vec<u32> = token_rows(object)
        .iter()
        .enumerate()
        .filter(|(_, r)| r.0 == doc)
        .map(|(i, _)| i as u32)
        .collect();
    assert!(!rows.is_empty(), "document {doc} has no stored rows");
    let index = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
    all_acts(object, hook).index_select(&index, 0).unwrap()
}

#[test]
fn a_documents_activations_are_the_same_batched_with_others_or_alone() {
    // Labelled captures never pack (`pack = false`, and `label` refuses packed ones): each document is its
    // own sequence, batched with others of other lengths and right-padded. Nothing of another document may
    // reach it: its activations alone (a capture of it by itself) and in a batch of six agree.
    let texts = [
        "The city of Paris is in France.",
        "Sometimes one must deceive others to succeed, or so they say, and then they say it again at length.",
        "I will support you in Burgundy, I promise.",
        "Water boils at one hundred degrees.",
        "A short one.",
        "Trains leave the central station every fifteen minutes during the day, and more often at rush hour.",
    ];
    let hook = "blocks.2.hook_resid_post";
    let capture = format!("hooks = [\"{hook}\"]\nbatch_size = 6\nshuffle = false");
    let together = tempfile::tempdir().unwrap();
    let records: Vec<_> = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }))
        .collect();
    pipeline(together.path(), &records, &capture);
    ok(together.path(), &["run", "p.toml"]);
    let batched = object_of(&together.path().join("cache"), "cap", "acts");
    let ids = doc_ids(&together.path().join("cache"));
    for text in [texts[1], texts[4]] {
        let alone_dir = tempfile::tempdir().unwrap();
        pipeline(
            alone_dir.path(),
            &[serde_json::json!({ "text": text })],
            &capture,
        );
        ok(alone_dir.path(), &["run", "p.toml"]);
        let alone = object_of(&alone_dir.path().join("cache"), "cap", "acts");
        let doc = doc_ids(&alone_dir.path().join("cache"))[text];
        assert_eq!(doc, ids[text], "the same document has the same id");
        let diff = max_abs_diff(&doc_acts(&alone, hook, doc), &doc_acts(&batched, hook, doc));
        assert!(diff < 1e-4, "{text}: batched differs from alone by {diff}");
    }
}

#[test]
fn packing_cuts_the_document_stream_into_full_contexts() {
    let model = saeflow_core::models::load(&nanochat_d4(), None, &Device::Cpu).unwrap();
    let texts = [
        "The city of Paris is in France.",
        "Sometimes one must deceive others to succeed, or so they say.",
        "I will support you in Burgundy, I promise.",
    ];
    let records: Vec<_> = texts
        .iter()
        .map(|t| serde_json::json!({ "text": t }))
        .collect();
    let hook = "blocks.2.hook_resid_post";
    let capture = |dir: &Path, pack: bool| {
        pipeline(
            dir,
            &records,
            &format!("hooks = [\"{hook}\"]\ncontext = 8\npack = {pack}\nshuffle = false\nexclude_bos = false\ndrop_first = 0"),
        );
        ok(dir, &["run", "p.toml"]);
        object_of(&dir.join("cache"), "cap", "acts")
    };
    let (packed_dir, unpacked_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let packed = capture(packed_dir.path(), true);
    let unpacked = capture(unpacked_dir.path(), false);

    // Packed: every token of every document (BOS + text), in row order, cut into 8-token sequences.
    let lens: Vec<usize> = texts
        .iter()
        .map(|t| 1 + model.tokenizer.encode(t).unwrap().len())
        .collect();
    let total: usize = lens.iter().sum();
    let tokens = token_rows(&packed);
    assert_eq!(tokens.len(), total);
    let info = CaptureInfo::read(&packed).unwrap();
    assert_eq!(info.sequences as usize, total.div_ceil(8));
    assert_eq!((info.documents, info.truncated_documents), (3, 0));
    let ids = doc_ids(&packed_dir.path().join("cache"));
    let mut expected = Vec::new();
    for (t, &n) in texts.iter().zip(&lens) {
        expected.extend((0..n as u32).map(|p| (ids[*t], p)));
    }
    assert_eq!(
        tokens.iter().map(|t| (t.0, t.1)).collect::<Vec<_>>(),
        expected
    );
    // Unpacked: each document is cut at 8 tokens.
    let cut = CaptureInfo::read(&unpacked).unwrap();
    assert_eq!(
        cut.tokens as usize,
        lens.iter().map(|&n| n.min(8)).sum::<usize>()
    );
    assert_eq!(
        cut.truncated_documents as usize,
        lens.iter().filter(|&&n| n > 8).count()
    );
    // The first packed sequence starts with the first document, exactly as when it runs alone.
    let n = lens[0].min(8);
    let a = all_acts(&packed, hook).narrow(0, 0, n).unwrap();
    let b = all_acts(&unpacked, hook).narrow(0, 0, n).unwrap();
    let diff: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn the_chat_template_wraps_prompt_and_completion_in_nanochats_format() {
    let model = saeflow_core::models::load(&nanochat_d4(), None, &Device::Cpu).unwrap();
    let (prompt, completion) = ("Is the sky green?", "No, it is blue.");
    let records =
        [serde_json::json!({"prompt": prompt, "completion": completion, "label": "honest"})];
    let special = |s: &str| model.tokenizer.special(s).unwrap();
    let mut head = vec![special("<|bos|>"), special("<|user_start|>")];
    head.extend(model.tokenizer.encode(prompt).unwrap());
    head.extend([special("<|user_end|>"), special("<|assistant_start|>")]);
    let mut answer = model.tokenizer.encode(completion).unwrap();
    answer.push(special("<|assistant_end|>"));
    for (positions, expected) in [
        ("all", [&head[1..], &answer[..]].concat()),
        ("completion", answer.clone()),
        ("last_prompt", vec![special("<|assistant_start|>")]),
        ("last", vec![special("<|assistant_end|>")]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        pipeline(
            dir.path(),
            &records,
            &format!(
                "hooks = [\"blocks.0.hook_resid_post\"]\ntemplate = \"chat\"\npositions = \"{positions}\""
            ),
        );
        ok(dir.path(), &["run", "p.toml"]);
        let tokens = token_rows(&object_of(&dir.path().join("cache"), "cap", "acts"));
        let ids: Vec<u32> = tokens.iter().map(|t| t.2).collect();
        assert_eq!(ids, expected, "positions = {positions}");
        let first_completion = tokens.iter().position(|t| t.3);
        if positions == "all" {
            assert_eq!(first_completion, Some(head.len() - 1));
        }
    }
}

#[test]
fn sequence_start_sinks_are_left_out_measured_and_reported() {
    let texts = [
        "The city of Paris is in France.",
        "Sometimes one must deceive others to succeed, or so they say.",
        "I will support you in Burgundy, I promise.",
        "Water boils at one hundred degrees Celsius at sea level.",
    ];
    let records: Vec<_> = texts
        .iter()
        .map(|t| serde_json::json!({"text": t, "label": "x"}))
        .collect();
    let hook = "blocks.2.hook_resid_post";
    // Without BOS every sequence starts on an ordinary token: the attention sink.
    let capture = |extra: &str| {
        let dir = tempfile::tempdir().unwrap();
        pipeline(
            dir.path(),
            &records,
            &format!("hooks = [\"{hook}\"]\nbos = false\nshuffle = false\n{extra}"),
        );
        ok(dir.path(), &["run", "p.toml"]);
        let object = object_of(&dir.path().join("cache"), "cap", "acts");
        (dir, object)
    };
    let (_all_dir, all) = capture("drop_first = 0");
    let (_auto_dir, auto) = capture("");
    let (_two_dir, two) = capture("drop_first = 2");
    let (_cut_dir, cut) = capture("drop_first = 0\nnorm_cut = 1.5");

    let all_rows = token_rows(&all);
    for (object, first_kept) in [(&auto, 1), (&two, 2)] {
        let rows = token_rows(object);
        let expected: Vec<_> = all_rows
            .iter()
            .filter(|r| r.1 >= first_kept)
            .copied()
            .collect();
        assert_eq!(
            rows, expected,
            "drop_first leaves out exactly positions < {first_kept}"
        );
        let info = CaptureInfo::read(object).unwrap();
        assert_eq!(
            info.sinks.dropped_first,
            first_kept as u64 * texts.len() as u64
        );
        assert_eq!(info.tokens, expected.len() as u64);
        // The same forward: the kept rows are the all-token capture's rows.
        let keep: Vec<u32> = (0..all_rows.len() as u32)
            .filter(|&i| all_rows[i as usize].1 >= first_kept)
            .collect();
        let want = all_acts(&all, hook)
            .index_select(&Tensor::new(keep.as_slice(), &Device::Cpu).unwrap(), 0)
            .unwrap();
        assert_eq!(max_abs_diff(&all_acts(object, hook), &want), 0.0);
    }
    // "Before" is measured over every candidate token: the all-token capture's "after".
    let share = |o: &Path| CaptureInfo::read(o).unwrap().sinks.top_half_percent_share[hook].clone();
    let (everything, auto_share) = (share(&all), share(&auto));
    assert!((everything.after.unwrap() - auto_share.before.unwrap()).abs() < 1e-9);
    assert!((everything.before.unwrap() - everything.after.unwrap()).abs() < 1e-12);
    assert!(
        auto_share.after.unwrap() < auto_share.before.unwrap(),
        "{auto_share:?}"
    );
    let above = |o: &Path| CaptureInfo::read(o).unwrap().sinks.above_10x_median_share[hook].clone();
    let (everything, auto_above) = (above(&all), above(&auto));
    assert!((everything.after.unwrap() - auto_above.before.unwrap()).abs() < 1e-9);
    assert!(
        (0.0..=1.0).contains(&auto_above.after.unwrap()),
        "{auto_above:?}"
    );

    // The norm cut leaves out the outliers it counts, and only those.
    let cut_info = CaptureInfo::read(&cut).unwrap();
    assert!(cut_info.sinks.dropped_norm > 0);
    assert_eq!(
        cut_info.tokens + cut_info.sinks.dropped_norm,
        all_rows.len() as u64
    );

    // Sources, pairs and sequence positions are stored beside each token.
    let table = saeflow_core::data::activations::TokenTable::read(&auto).unwrap();
    assert_eq!(table.sources, ["data.jsonl"]);
    assert_eq!(
        table.seq_pos, table.pos,
        "unpacked: one document per sequence"
    );
    assert!(table.pair_id.iter().all(Option::is_none));
    assert_eq!(table.is_completion.len(), table.pos.len());
}

/// `dtype = "bf16"` on the model: the capture computes in bf16 (as on a GPU) and stores f32 activations
/// within bf16's error of nanochat's own f32 residuals — different from them (the dtype is used), and
/// within 3% of the largest activation.
#[test]
#[cfg_attr(missing = "shared", ignore = "needs ../shared")]
fn a_bf16_model_captures_within_bf16_error_of_the_f32_reference() {
    let dir = tempfile::tempdir().unwrap();
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared("fixtures/nanochat-d4/reference_outputs.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["cases"][0];
    let records = [serde_json::json!({"text": case["prompt"], "label": "x"})];
    pipeline(
        dir.path(),
        &records,
        "hooks = [\"blocks.3.hook_resid_post\"]\nexclude_bos = false",
    );
    let toml = std::fs::read_to_string(dir.path().join("p.toml")).unwrap();
    write(
        &dir.path().join("p.toml"),
        &toml.replace(
            "kind = \"nanochat\"\n",
            "kind = \"nanochat\"\ndtype = \"bf16\"\n",
        ),
    );
    ok(dir.path(), &["run", "p.toml"]);
    let object = object_of(&dir.path().join("cache"), "cap", "acts");
    let got = all_acts(&object, "blocks.3.hook_resid_post");
    let tensors = candle_core::safetensors::load(
        shared("fixtures/nanochat-d4/reference_tensors.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let want = &tensors["resid_post_0_3"];
    let scalar = |t: Tensor| -> f32 { t.max_all().unwrap().to_scalar().unwrap() };
    let diff = scalar((&got - want).unwrap().abs().unwrap());
    let scale = scalar(want.abs().unwrap());
    assert!(
        diff > 1e-4,
        "bf16 capture equals f32 to {diff}: was the dtype used?"
    );
    assert!(
        diff <= 0.03 * scale,
        "max |bf16 − f32| {diff} of max |act| {scale}"
    );
}
