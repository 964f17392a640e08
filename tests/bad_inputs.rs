//! The bad-inputs corpus (tests/bad_inputs/, written by make.py, listed in cases.toml): every broken file fed
//! to the stage that reads it must fail with its exit code and message, without a panic, a death by signal or
//! an allocation failure, and without publishing the failing stage. `BAD_INPUTS_SHOW=1` prints every case's output; `BAD_INPUTS_ONLY=fragment` runs the matching cases.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use saeflow_core::data::activations::TokenRow;

const HOOK: &str = "blocks.0.hook_resid_post";
/// Width of the synthetic capture the SAE cases run on (the base SAE's d_in).
const D: usize = 6;
/// A case that runs longer than this hangs.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// The bad file, relative to tests/bad_inputs/.
    file: String,
    /// `dataset`, `nanochat`, `llama` (GGUF), `hf` (a Hugging Face directory) or `sae`.
    consumer: String,
    /// For model and SAE consumers: the path inside the model/SAE directory the file replaces.
    #[serde(default, rename = "as")]
    target: Option<String>,
    /// Further replacements inside the model/SAE directory: path there → corpus file.
    #[serde(default)]
    also: BTreeMap<String, String>,
    /// Files deleted from the model/SAE directory (a missing tokenizer, weights or config).
    #[serde(default)]
    remove: Vec<String>,
    /// Extra keys of the dataset source (TOML inline-table body).
    #[serde(default)]
    source: Option<String>,
    /// Expected exit code.
    exit: i32,
    /// Fragment the output must contain.
    expect: String,
    /// What the case shows, when the file name does not say.
    #[serde(default)]
    #[allow(dead_code)]
    note: Option<String>,
}

#[derive(serde::Deserialize)]
struct Manifest {
    case: Vec<Case>,
}

/// What one run showed.
struct Outcome {
    code: Option<i32>,
    signal: Option<i32>,
    text: String,
    hung: bool,
    published_failing_stage: bool,
}

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_inputs")
}

fn toml_str(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// Runs `saeflow run p.toml` (not `-q`: quiet runs do not print why a stage failed) in `dir` (cache `dir/cache`), killing it after [`TIMEOUT`].
fn run_saeflow(dir: &Path, cwd: &Path, pipeline: &str, failing_stage: &str) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_saeflow"))
        .current_dir(cwd)
        .env_remove("SAEFLOW_LOG")
        .env("RUST_BACKTRACE", "0")
        .args(["run", "--cache"])
        .arg(dir.join("cache"))
        .arg(pipeline)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("saeflow starts");
    let started = Instant::now();
    let mut hung = false;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > TIMEOUT {
            child.kill().unwrap();
            hung = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    Outcome {
        code: out.status.code(),
        signal: out.status.signal(),
        text: common::text(&out),
        hung,
        published_failing_stage: published_instances(&dir.join("cache"))
            .iter()
            .any(|i| i == failing_stage || i.starts_with(&format!("{failing_stage}@"))),
    }
}

/// Instance names of every published object.
fn published_instances(cache: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(cache.join("objects")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let m = std::fs::read(e.ok()?.path().join("manifest.json")).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&m).ok()?;
            Some(v["instance"].as_str()?.to_string())
        })
        .collect()
}

/// Mirrors `src` under `dst` with symlinks to its files (the files a case replaces are then overwritten).
fn mirror(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            mirror(&e.path(), &to);
        } else {
            std::os::unix::fs::symlink(e.path(), &to).unwrap();
        }
    }
}

fn replace(dir: &Path, target: &str, with: &Path) {
    let to = dir.join(target);
    let _ = std::fs::remove_file(&to);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(with, &to).unwrap();
}

/// The capture the SAE cases read: 24 documents × 5 tokens of width [`D`], every third document in `test`.
fn write_synthetic_capture(dir: &Path) {
    let (mut rows, mut acts) = (Vec::new(), Vec::new());
    for doc in 0..24u64 {
        for pos in 0..5u32 {
            rows.push(TokenRow {
                doc_id: doc,
                pos,
                token_id: pos,
                label: Some((if doc % 2 == 0 { "true" } else { "false" }).into()),
                split: (if doc % 3 == 0 { "test" } else { "train" }).into(),
                is_completion: false,
                ..Default::default()
            });
            acts.extend((0..D).map(|i| ((doc as f32 + 1.0) * (i as f32 + 0.5) + pos as f32).sin()));
        }
    }
    common::write_capture(dir, HOOK, D, &rows, &acts);
}

/// The pipeline feeding `case` (or, with `case` = None, the good base) to `consumer`, written in `dir`;
/// returns the pipeline path and the stage expected to fail.
fn build(
    consumer: &str,
    case: Option<&Case>,
    dir: &Path,
    capture: &Path,
) -> (PathBuf, &'static str) {
    let root = corpus();
    let rows = root.join("base/rows.jsonl");
    let header = "[pipeline]\nname = \"bad\"\n";
    let data = |file: &Path, extra: &str| {
        format!(
            "[stages.data]\nkind = \"dataset\"\nsources = [{{ path = {}, text = \"text\", label = \"label\"{extra} }}]\n",
            toml_str(file)
        )
    };
    let capture_stage = "[stages.acts]\nkind = \"capture\"\ninput = \"data\"\nmodel = \"m\"\nhooks = [\"blocks.0.hook_resid_post\"]\ncontext = 32\nbatch_size = 4\n";
    let swap_in = |base: &Path, model: &Path| {
        mirror(base, model);
        if let Some(c) = case {
            replace(
                model,
                c.target.as_deref().expect("`as` names the replaced file"),
                &root.join(&c.file),
            );
            for (target, file) in &c.also {
                replace(model, target, &root.join(file));
            }
            for target in &c.remove {
                std::fs::remove_file(model.join(target)).unwrap();
            }
        }
    };
    let (text, failing) = match consumer {
        "dataset" => {
            let (file, extra) = match case {
                Some(c) => (
                    root.join(&c.file),
                    c.source
                        .as_ref()
                        .map(|s| format!(", {s}"))
                        .unwrap_or_default(),
                ),
                None => (rows.clone(), String::new()),
            };
            (format!("{header}{}", data(&file, &extra)), "data")
        }
        "nanochat" | "llama" | "hf" => {
            let model = dir.join("model");
            let path = match consumer {
                "nanochat" => {
                    swap_in(
                        &Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("assets/quickstart/nanochat-d4"),
                        &model,
                    );
                    model.clone()
                }
                "llama" => {
                    swap_in(&root.join("base/tiny-llama"), &model);
                    model.join("model.gguf")
                }
                _ => {
                    swap_in(&root.join("base/tiny-hf"), &model);
                    model.clone()
                }
            };
            let kind = if consumer == "nanochat" {
                "nanochat"
            } else {
                "llama"
            };
            (
                format!(
                    "{header}\n[models.m]\nkind = \"{kind}\"\npath = {}\n\n{}\n{capture_stage}",
                    toml_str(&path),
                    data(&rows, "")
                ),
                "acts",
            )
        }
        "sae" => {
            let sae = dir.join("sae");
            swap_in(&root.join("base/sae"), &sae);
            let stages = common::published_capture_and_sae("bad", capture, &sae);
            (
                format!("{stages}\n[stages.eval]\nkind = \"eval\"\nsae = \"sae\"\ninput = \"acts\"\nbatch_size = 16\n"),
                "eval",
            )
        }
        other => panic!("unknown consumer `{other}`"),
    };
    let p = common::write(&dir.join("p.toml"), &text);
    (p, failing)
}

/// Whether an outcome is a clear error: exit code and fragment as expected, no panic, signal, allocation
/// failure or hang, nothing of the failing stage published. Returns the problems.
fn problems(o: &Outcome, exit: i32, expect: &str) -> Vec<String> {
    let mut p = Vec::new();
    if o.hung {
        p.push(format!("hung (killed after {TIMEOUT:?})"));
    }
    if let Some(s) = o.signal {
        p.push(format!("killed by signal {s}"));
    }
    if o.code != Some(exit) && !o.hung {
        p.push(format!("exit {:?}, want {exit}", o.code));
    }
    if !o.text.contains(expect) {
        p.push(format!("no `{expect}` in the output"));
    }
    if o.text.contains("panicked") {
        p.push("panicked".into());
    }
    if o.text.contains("memory allocation") {
        p.push("allocation failure".into());
    }
    if o.published_failing_stage {
        p.push("the failing stage was published".into());
    }
    p
}

fn is_panic(o: &Outcome) -> bool {
    o.text.contains("panicked") || o.signal.is_some() || o.text.contains("memory allocation")
}

/// A case to run in its own directory: the outcome, the expected exit code and fragment.
type Job = Box<dyn Fn(&Path) -> (Outcome, i32, String) + Sync>;

#[derive(Default)]
struct Tally {
    tried: usize,
    clear: usize,
    panics: usize,
}

#[test]
fn every_bad_input_fails_cleanly() {
    let root = corpus();
    let manifest: Manifest =
        toml::from_str(&std::fs::read_to_string(root.join("cases.toml")).unwrap())
            .expect("cases.toml parses");
    let show = std::env::var_os("BAD_INPUTS_SHOW").is_some();
    let only = std::env::var("BAD_INPUTS_ONLY").ok();
    let work = tempfile::tempdir().unwrap();
    let capture = work.path().join("capture");
    write_synthetic_capture(&capture);

    // Every listed file exists and every corpus file is listed.
    let listed: std::collections::BTreeSet<String> =
        manifest.case.iter().map(|c| c.file.clone()).collect();
    let mut unlisted = Vec::new();
    for format in std::fs::read_dir(&root).unwrap() {
        let format = format.unwrap().path();
        let name = format.file_name().unwrap().to_str().unwrap().to_string();
        if !format.is_dir() || name == "pipeline" || name == "base" {
            continue;
        }
        for f in std::fs::read_dir(&format).unwrap() {
            let rel = format!("{name}/{}", f.unwrap().file_name().to_str().unwrap());
            let used_as_also = manifest
                .case
                .iter()
                .any(|c| c.also.values().any(|v| *v == rel));
            if !listed.contains(&rel) && !used_as_also {
                unlisted.push(rel);
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "corpus files missing from cases.toml: {unlisted:?}"
    );

    // Controls: each consumer succeeds on the good base, so a case fails for its bad file alone.
    if only.is_none() {
        for consumer in ["dataset", "nanochat", "llama", "hf", "sae"] {
            let dir = work.path().join(format!("control-{consumer}"));
            let (p, _) = build(consumer, None, &dir, &capture);
            let o = run_saeflow(&dir, &dir, p.to_str().unwrap(), "");
            assert!(
                o.code == Some(0),
                "control run of `{consumer}` on the good base failed:\n{}",
                o.text
            );
        }
    }

    // The pipeline corpus (also checked, with locations, by tests/bad_configs.rs).
    let mut jobs: Vec<(String, Job)> = Vec::new();
    let mut pipelines: Vec<PathBuf> = std::fs::read_dir(root.join("pipeline"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    pipelines.sort();
    for file in pipelines {
        let rel = file
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let name = format!("pipeline/{}", file.file_name().unwrap().to_str().unwrap());
        jobs.push((
            name,
            Box::new(move |dir: &Path| {
                let text = std::fs::read_to_string(&file).unwrap();
                let (loc, fragment) = text
                    .lines()
                    .next()
                    .and_then(|l| l.strip_prefix("# expect: "))
                    .and_then(|e| e.split_once(' '))
                    .expect("first line: # expect: L:C fragment");
                std::fs::create_dir_all(dir).unwrap();
                let o = run_saeflow(dir, Path::new(env!("CARGO_MANIFEST_DIR")), &rel, "");
                let want = if o.text.contains(&format!("{rel}:{loc}: ")) {
                    fragment.to_string()
                } else {
                    format!("{rel}:{loc}: {fragment}")
                };
                (o, 2, want)
            }),
        ));
    }
    for case in &manifest.case {
        let case = case.clone();
        let capture = capture.clone();
        jobs.push((
            case.file.clone(),
            Box::new(move |dir: &Path| {
                let (p, failing) = build(&case.consumer, Some(&case), dir, &capture);
                let o = run_saeflow(dir, dir, p.to_str().unwrap(), failing);
                (o, case.exit, case.expect.clone())
            }),
        ));
    }
    if let Some(only) = &only {
        jobs.retain(|(name, _)| name.contains(only.as_str()));
    }

    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((name, job)) = jobs.get(i) else {
                    break;
                };
                let (o, exit, expect) = job(&work.path().join(format!("case-{i}")));
                results
                    .lock()
                    .unwrap()
                    .push((i, name.clone(), o, exit, expect));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);

    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    for (_, name, o, exit, expect) in &results {
        let format = name.split('/').next().unwrap().to_string();
        let t = tallies.entry(format).or_default();
        t.tried += 1;
        let p = problems(o, *exit, expect);
        if p.is_empty() {
            t.clear += 1;
        }
        if is_panic(o) {
            t.panics += 1;
        }
        let last_lines: String = {
            let lines: Vec<&str> = o
                .text
                .lines()
                .filter(|l| !l.starts_with("running "))
                .collect();
            lines[lines.len().saturating_sub(8)..].join("\n    ")
        };
        if show {
            println!(
                "--- {name}: exit {:?} signal {:?}{}\n    {last_lines}",
                o.code,
                o.signal,
                if p.is_empty() {
                    String::new()
                } else {
                    format!(" PROBLEMS: {}", p.join("; "))
                }
            );
        }
        if !p.is_empty() {
            failures.push(format!("{name}: {}:\n    {last_lines}", p.join("; ")));
        }
    }
    let mut total = Tally::default();
    for (format, t) in &tallies {
        println!(
            "bad inputs [{format}]: {} tried, {} clear errors, {} panics",
            t.tried, t.clear, t.panics,
        );
        total.tried += t.tried;
        total.clear += t.clear;
        total.panics += t.panics;
    }
    println!(
        "bad inputs: {} tried, {} clear errors, {} panics",
        total.tried, total.clear, total.panics
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
