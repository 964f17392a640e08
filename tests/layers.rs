//! The architecture, checked: crates depend only downward (`cargo metadata`), `saeflow-core`'s dependency
//! tree holds no TOML parser, graph library or runner, and inside every crate a module uses only modules of
//! lower layers (a scan of `crate::…` and `super::…` paths). The layer lists here are the ones
//! ARCHITECTURE.md states; a new module must be placed in one, or this test fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// Workspace crates, lowest layer first; each may depend only on crates before it.
const CRATES: &[&str] = &[
    "saeflow-core",
    "saeflow-runner",
    "saeflow-stages",
    "saeflow",
];

/// Packages that must not be anywhere in `saeflow-core`'s (normal and build) dependency tree.
const NOT_IN_CORE: &[&str] = &[
    "toml",
    "toml_edit",
    "petgraph",
    "saeflow-runner",
    "saeflow-stages",
];

/// Per crate (source directory), its top-level modules in layers, lowest first: a module may use modules
/// of earlier layers only (modules in one layer never use each other).
const MODULE_LAYERS: &[(&str, &[&[&str]])] = &[
    (
        "crates/core/src",
        &[
            &["huge_pages"],
            &["cancel"],
            &["progress"],
            &["fs"],
            &["kernels"],
            &["stats"],
            &["data"],
            &["models"],
            &["sae"],
        ],
    ),
    (
        "crates/runner/src",
        &[&["stage"], &["config"], &["cache"], &["plan"], &["exec"]],
    ),
    (
        "crates/stages/src",
        &[
            &["shared", "artifacts"],
            &[
                "capture", "command", "dataset", "eval", "explain", "generate", "label", "sae",
                "steer", "train",
            ],
        ],
    ),
    ("src", &[&["report", "bench"], &["cli"]]),
];

/// The only parts of `saeflow-core` the runner may use: it carries cancellation, progress, files and the
/// model/device *specs* of a pipeline, and knows nothing of models, SAEs or data.
const CORE_FOR_RUNNER: &[&str] = &["cancel", "progress", "fs", "models::spec"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn metadata() -> Value {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

#[test]
fn crates_depend_only_on_lower_layers() {
    let meta = metadata();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let mut seen = BTreeSet::new();
    for package in meta["packages"].as_array().unwrap() {
        if !members.contains(package["id"].as_str().unwrap()) {
            continue;
        }
        let name = package["name"].as_str().unwrap();
        let layer = CRATES
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("workspace crate `{name}` is in no layer of CRATES"));
        seen.insert(name);
        for dep in package["dependencies"].as_array().unwrap() {
            let dep_name = dep["name"].as_str().unwrap();
            if let Some(dep_layer) = CRATES.iter().position(|c| *c == dep_name) {
                assert!(
                    dep_layer < layer,
                    "`{name}` depends on `{dep_name}`, which is not in a lower layer"
                );
            }
        }
    }
    assert_eq!(seen.len(), CRATES.len(), "workspace members: {seen:?}");
}

#[test]
fn core_has_no_toml_graph_or_runner_in_its_dependency_tree() {
    let meta = metadata();
    let packages: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: BTreeMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let core = packages
        .iter()
        .find(|(_, name)| **name == "saeflow-core")
        .map(|(id, _)| *id)
        .expect("saeflow-core in the workspace");
    // Everything reachable through normal and build dependencies (dev-dependencies are not shipped).
    let mut stack = vec![core];
    let mut reached = BTreeSet::new();
    while let Some(id) = stack.pop() {
        if !reached.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let shipped = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].as_str() != Some("dev"));
            if shipped {
                stack.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    let names: BTreeSet<&str> = reached.iter().map(|id| packages[id]).collect();
    for banned in NOT_IN_CORE {
        assert!(
            !names.contains(banned),
            "saeflow-core's dependency tree contains `{banned}`"
        );
    }
    assert!(names.contains("candle-core"), "the scan found core's tree");
}

/// Source with comments removed (doc links may name any module).
fn code_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file (`data/download.rs` → `[data, download]`, `lib.rs` → `[]`).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Every module (as a path) a file names through `crate::a::b` or `super::…`, cut to the top-level module.
fn top_level_uses(src: &Path, file: &Path) -> BTreeSet<String> {
    let code = code_of(file);
    let module = module_of(src, file);
    let mut used = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `saeflow_crate::`
        }
        let rest = &code[i + "crate::".len()..];
        if rest.starts_with('{') {
            let inner = &rest[1..rest.find('}').unwrap_or(rest.len())];
            used.extend(
                inner
                    .split(',')
                    .map(|p| ident(p.trim()))
                    .filter(|s| !s.is_empty()),
            );
        } else {
            used.insert(ident(rest));
        }
    }
    // `super::` in a top-level module's own file (`fs.rs`, `data/mod.rs`) reaches the crate root, so what
    // follows is a sibling module; deeper down it stays inside the same top-level module.
    if module.len() == 1 {
        for (i, _) in code.match_indices("super::") {
            let rest = &code[i + "super::".len()..];
            let name = ident(rest);
            if !name.is_empty() {
                used.insert(name);
            }
        }
    }
    used
}

#[test]
fn modules_use_only_lower_layers() {
    let mut violations = Vec::new();
    for (dir, layers) in MODULE_LAYERS {
        let src = root().join(dir);
        let layer_of: BTreeMap<&str, usize> = layers
            .iter()
            .enumerate()
            .flat_map(|(i, mods)| mods.iter().map(move |m| (*m, i)))
            .collect();
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let module = module_of(&src, &file);
            let Some(top) = module.first() else { continue };
            let Some(&layer) = layer_of.get(top.as_str()) else {
                violations.push(format!(
                    "{}: module `{top}` is in no layer of {dir} (tests/layers.rs, ARCHITECTURE.md)",
                    file.display()
                ));
                continue;
            };
            for used in top_level_uses(&src, &file) {
                if used == *top {
                    continue;
                }
                match layer_of.get(used.as_str()) {
                    Some(&l) if l < layer => {}
                    Some(_) => violations.push(format!(
                        "{}: `{top}` uses `{used}`, which is not in a lower layer",
                        file.display()
                    )),
                    None => {} // an item of the crate root, e.g. `crate::Error`
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_runner_uses_only_the_runner_facing_parts_of_core() {
    let src = root().join("crates/runner/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in files {
        let code = code_of(&file);
        for (i, _) in code.match_indices("saeflow_core::") {
            let rest = &code[i + "saeflow_core::".len()..];
            let allowed = CORE_FOR_RUNNER
                .iter()
                .any(|m| rest.starts_with(&format!("{m}::")) || rest.starts_with(&format!("{m};")));
            if !allowed {
                let line = rest.lines().next().unwrap_or_default();
                violations.push(format!("{}: saeflow_core::{line}", file.display()));
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// The checker itself: a planted upward use and a cycle must be reported.
#[test]
fn the_module_scan_sees_crate_and_super_paths() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir_all(src.join("kernels")).unwrap();
    std::fs::write(
        src.join("kernels/gemm.rs"),
        "// crate::commented_out\nuse crate::sae::step::dot;\nfn f() { crate::{models, data}; }\n",
    )
    .unwrap();
    std::fs::write(src.join("fs.rs"), "use super::progress::Progress;\n").unwrap();
    let uses = top_level_uses(src, &src.join("kernels/gemm.rs"));
    assert_eq!(
        uses,
        BTreeSet::from(["sae".into(), "models".into(), "data".into()])
    );
    assert_eq!(
        top_level_uses(src, &src.join("fs.rs")),
        BTreeSet::from(["progress".into()])
    );
}
