//! `saeflow dag --format dot` is valid Graphviz (checked by `dot -Tsvg`), mermaid and ascii list every instance.
mod common;

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
#[cfg_attr(missing = "dot", ignore = "needs Graphviz `dot`")]
fn dot_output_renders_with_graphviz() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_saeflow"))
        .current_dir(root)
        .args([
            "dag",
            "--cache",
            cache.path().to_str().unwrap(),
            "--format",
            "dot",
            "pipelines/quickstart.toml",
        ])
        .args(["-S", "sae.k=4,8", "-S", "eval.ce_tokens=100,200"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let dot = String::from_utf8(out.stdout).unwrap();
    assert_eq!(dot.matches("label=\"eval[").count(), 4, "{dot}");

    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("Graphviz `dot` runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(dot.as_bytes())
        .unwrap();
    let svg = child.wait_with_output().unwrap();
    assert!(
        svg.status.success(),
        "dot rejected:\n{dot}\n{}",
        String::from_utf8_lossy(&svg.stderr)
    );
    let svg = String::from_utf8(svg.stdout).unwrap();
    assert!(
        svg.contains("<svg") && svg.matches("class=\"node\"").count() == 1 + 1 + 2 + 2 + 4 + 2,
        "{svg}"
    );
}

#[test]
fn mermaid_and_ascii_list_every_instance() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let cache = tempfile::tempdir().unwrap();
    for (format, marker) in [("mermaid", "flowchart LR"), ("ascii", "eval[sae.k=16]")] {
        let out = Command::new(env!("CARGO_BIN_EXE_saeflow"))
            .current_dir(root)
            .args([
                "dag",
                "--cache",
                cache.path().to_str().unwrap(),
                "--format",
                format,
                "pipelines/quickstart.toml",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(marker), "{text}");
        assert_eq!(text.matches("eval[").count(), 3, "{text}");
    }
}
