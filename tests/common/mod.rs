//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod checkpoints;
pub mod http;

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
