//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod checkpoints;
pub mod http;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The saeflow binary, run in `dir` with its cache in `dir/cache`.
pub fn saeflow(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_saeflow"));
    c.current_dir(dir)
        .env("SAEFLOW_CACHE", dir.join("cache"))
        .env_remove("SAEFLOW_LOG");
    c
}

/// Runs saeflow with `args` in `dir`.
pub fn run(dir: &Path, args: &[&str]) -> Output {
    saeflow(dir).args(args).output().expect("saeflow runs")
}

/// stdout + stderr as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts success and returns the output text.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "saeflow {args:?} failed:\n{}",
        text(&out)
    );
    text(&out)
}

/// Writes a file, creating parent directories.
pub fn write(path: &Path, content: &str) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
    path.to_path_buf()
}

/// Number of lines in a file (0 if missing).
pub fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Checks a run that must fail cleanly: exit `code`, every fragment in its output, no panic, nothing
/// published under `dir/cache/objects`. Returns the output text.
pub fn assert_clean_failure(out: &Output, dir: &Path, code: i32, fragments: &[&str]) -> String {
    let t = text(out);
    assert_eq!(out.status.code(), Some(code), "{t}");
    for f in fragments {
        assert!(t.contains(f), "want `{f}` in:\n{t}");
    }
    assert!(!t.contains("panicked"), "{t}");
    let objects = dir.join("cache/objects");
    assert_eq!(
        std::fs::read_dir(&objects).map(|d| d.count()).unwrap_or(0),
        0,
        "nothing may be published:\n{t}"
    );
    t
}

/// blake3 of every published output file, keyed by instance name and file (manifests excluded).
pub fn published_outputs(cache: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(cache.join("objects")) else {
        return out;
    };
    for entry in entries {
        let dir = entry.unwrap().path();
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
        for f in manifest["outputs"].as_array().unwrap() {
            let bytes = std::fs::read(dir.join(f["path"].as_str().unwrap())).unwrap();
            out.insert(
                format!(
                    "{}/{}",
                    manifest["instance"].as_str().unwrap(),
                    f["path"].as_str().unwrap()
                ),
                blake3::hash(&bytes).to_hex().to_string(),
            );
        }
    }
    out
}

/// The published object directory of a stage instance, from the pipeline's refs.
pub fn object_of(cache: &Path, pipeline: &str, stage: &str) -> PathBuf {
    let r: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            cache
                .join("refs")
                .join(pipeline)
                .join(format!("{stage}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    cache.join("objects").join(r["key"].as_str().unwrap())
}

/// Writes a capture directory (one f32 shard of `hook`, `tokens.parquet`, `capture.json`) holding `acts`
/// (`rows.len()` vectors of width `d`, row-major), as the `capture` stage would.
pub fn write_capture(
    dir: &Path,
    hook: &str,
    d: usize,
    rows: &[saeflow_core::data::activations::TokenRow],
    acts: &[f32],
) {
    use saeflow_core::data::activations::{
        act_file_name, tokens_batch, write_act_shard, ActDtype, CaptureInfo, ShardInfo,
        FORMAT_VERSION,
    };
    assert_eq!(acts.len(), rows.len() * d);
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<u8> = acts.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_act_shard(&dir.join(act_file_name(hook, 0)), bytes, d, ActDtype::F32).unwrap();
    saeflow_core::data::parquet::write_batches(
        &dir.join("tokens.parquet"),
        &[tokens_batch(rows).unwrap()],
    )
    .unwrap();
    let mut splits = std::collections::BTreeMap::new();
    for r in rows {
        *splits.entry(r.split.to_string()).or_insert(0u64) += 1;
    }
    let documents = rows
        .windows(2)
        .filter(|w| w[0].doc_id != w[1].doc_id)
        .count() as u64
        + 1;
    let info = CaptureInfo {
        format: FORMAT_VERSION,
        model: "synthetic".into(),
        model_key: String::new(),
        model_source: String::new(),
        hooks: vec![hook.into()],
        d_model: d,
        dtype: ActDtype::F32,
        tokenizer: serde_json::Value::Null,
        context: 128,
        settings: serde_json::Value::Null,
        tokens: rows.len() as u64,
        documents,
        truncated_documents: 0,
        sequences: documents,
        splits,
        labels: Default::default(),
        mean_norm: Default::default(),
        shards: vec![ShardInfo {
            first_row: 0,
            rows: rows.len() as u64,
        }],
        sinks: Default::default(),
    };
    std::fs::write(
        dir.join("capture.json"),
        serde_json::to_string(&info).unwrap(),
    )
    .unwrap();
}

/// A path under `../shared` (the fixtures, models and data next to the project). A test that calls it
/// carries `#[cfg_attr(missing = "shared", ignore = "needs ../shared")]`, so that on a machine without
/// `../shared` it is listed as ignored rather than failing (see `crates/core/preconditions.rs`).
pub fn shared(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(p)
}

/// nanochat-d4 as the quickstart ships it (`assets/quickstart/nanochat-d4`; the same files as
/// `../shared/fixtures/nanochat-d4`, without the reference outputs).
pub fn nanochat_d4() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/quickstart/nanochat-d4")
}

/// A local copy of geometry-of-truth in `dir` holding its two number-comparison subsets, written here
/// byte for byte as upstream has them — they are arithmetic: every ordered pair of distinct numbers in
/// 51..=99 that are not multiples of ten, "Fifty-one is larger than fifty-two." — and the other subsets
/// empty. `tests/datasets.rs` checks the bytes against the preset's recorded sha256.
pub fn number_comparisons(dir: &Path) -> PathBuf {
    const ONES: [&str; 10] = [
        "", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    const TENS: [&str; 10] = [
        "", "", "", "", "", "fifty", "sixty", "seventy", "eighty", "ninety",
    ];
    let word = |n: i32| format!("{}-{}", TENS[n as usize / 10], ONES[n as usize % 10]);
    let numbers: Vec<i32> = (51..100).filter(|n| n % 10 != 0).collect();
    let header = "statement,label,n1,n2,diff,abs_diff\n";
    std::fs::create_dir_all(dir).unwrap();
    let preset = saeflow_core::data::presets::get("geometry_of_truth").unwrap();
    for file in preset.upstream().unwrap().files {
        std::fs::write(dir.join(file.local), header).unwrap();
    }
    for (subset, relation) in [("larger_than", "larger"), ("smaller_than", "smaller")] {
        let mut csv = header.to_string();
        for &a in &numbers {
            for &b in numbers.iter().filter(|&&b| b != a) {
                let first = word(a);
                let truth = if relation == "larger" { a > b } else { a < b };
                csv += &format!(
                    "{}{} is {relation} than {}.,{},{a},{b},{},{}\n",
                    first[..1].to_uppercase(),
                    &first[1..],
                    word(b),
                    u8::from(truth),
                    a - b,
                    (a - b).abs()
                );
            }
        }
        std::fs::write(dir.join(format!("{subset}.csv")), csv).unwrap();
    }
    dir.to_path_buf()
}

/// The largest |a − b| over two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The first record batch of a Parquet file (all rows: the tables tests read are small).
pub fn read_parquet(path: &Path) -> arrow_array::RecordBatch {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .with_batch_size(1 << 20)
        .build()
        .unwrap();
    reader.next().unwrap().unwrap()
}

/// Pipeline `name` in `dir`: nanochat-d4 (`nc`) over 3000 geometry-of-truth number comparisons (`data`:
/// the `larger_than`/`smaller_than` subsets, written by `number_comparisons`, which the 4-layer model
/// reads linearly; its city facts are at chance once a city's true and false statements stay in one
/// split), 20k tokens of
/// `blocks.2.hook_resid_post` (`acts`), a TopK SAE (`sae`, expansion 4, k 8) and a `labels` stage with
/// `label_params`; `extra` is appended.
pub fn nanochat_chain(dir: &Path, name: &str, label_params: &str, extra: &str) -> String {
    format!(
        r#"[pipeline]
name = "{name}"

[models.nc]
kind = "nanochat"
path = "{model}"

[stages.data]
kind = "dataset"
sources = [{{ preset = "geometry_of_truth", path = "{data}", max_rows = 3000, subsets = ["larger_than", "smaller_than"] }}]

[stages.acts]
kind = "capture"
input = "data"
model = "nc"
hooks = ["blocks.2.hook_resid_post"]
tokens = 20000

[stages.sae]
kind = "train"
input = "acts"
expansion = 4
k = 8
batch_size = 256

[stages.labels]
kind = "label"
sae = "sae"
input = "acts"
{label_params}
{extra}"#,
        model = nanochat_d4().display(),
        data = number_comparisons(&dir.join("geometry_of_truth")).display(),
    )
}

/// Logits `[1, t, vocab]` of `ids` decoded through a KV cache: the first `split` tokens in one forward, then
/// one token at a time, with `hooks` active throughout.
pub fn cached_logits(
    model: &saeflow_core::models::LoadedModel,
    ids: &[u32],
    hooks: &saeflow_core::models::Hooks,
    split: usize,
) -> candle_core::Tensor {
    use candle_core::{Device, Tensor};
    let mut cache = saeflow_core::models::transformer::KvCache::default();
    let mut parts = Vec::new();
    for chunk in std::iter::once(&ids[..split]).chain(ids[split..].chunks(1)) {
        let input = Tensor::from_vec(chunk.to_vec(), (1, chunk.len()), &Device::Cpu).unwrap();
        let out = model
            .transformer
            .forward(&input, hooks, Some(&mut cache))
            .unwrap();
        parts.push(out.logits.unwrap());
    }
    Tensor::cat(&parts, 1).unwrap()
}

/// The start of pipeline `name`: `command` stages publishing a capture directory as `acts` and an SAE
/// directory as `sae`.
pub fn published_capture_and_sae(name: &str, capture: &Path, sae: &Path) -> String {
    format!(
        r#"[pipeline]
name = "{name}"

[stages.acts]
kind = "command"
shell = "cp -rL {capture}/. {{out}}/"
deps = ["{capture}"]

[stages.sae]
kind = "command"
shell = "cp -rL {sae}/. {{out}}/"
deps = ["{sae}"]
"#,
        capture = capture.display(),
        sae = sae.display()
    )
}

/// xorshift64*, so random moments (kills, delays) are reproducible from a printed seed.
pub struct Rng(pub u64);

impl Rng {
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Every file under `dir`, recursively.
pub fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Every path under `root` except the tree at `skip` (the cache), each with what it is: a file's blake3, a
/// link's target, or "dir". Compared before and after an attack, it shows nothing outside the cache changed.
pub fn snapshot(root: &Path, skip: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path == skip {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let what = if meta.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                stack.push(path);
                "dir".to_string()
            } else if meta.is_file() {
                blake3::hash(&std::fs::read(&path).unwrap())
                    .to_hex()
                    .to_string()
            } else {
                "not a regular file".to_string() // a FIFO: reading it would block
            };
            out.insert(rel, what);
        }
    }
    out
}

/// Complete shards (`shard-*`, written whole by a stage that resumes) in the partial directories of a
/// cache.
pub fn partial_shards(cache: &Path) -> usize {
    let Ok(keys) = std::fs::read_dir(cache.join("partial")) else {
        return 0;
    };
    keys.flatten()
        .flat_map(|k| std::fs::read_dir(k.path()).into_iter().flatten().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        .count()
}
