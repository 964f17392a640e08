//! Every file in tests/bad_inputs/pipeline/ must fail with exit code 2, its expected message and its line:column.
mod common;

use std::path::Path;

#[test]
fn every_bad_config_exits_2_with_message_and_location() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(root.join("tests/bad_inputs/pipeline"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 25,
        "the corpus must hold at least 25 broken pipelines, has {}",
        files.len()
    );
    let cache = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .expect("first line: # expect: L:C fragment");
        let (location, fragment) = expect.split_once(' ').unwrap();
        let rel = file.strip_prefix(root).unwrap().to_str().unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_saeflow"))
            .current_dir(root)
            .args(["run", "--cache", cache.path().to_str().unwrap(), rel])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want_loc = format!("{rel}:{location}: ");
        if out.status.code() != Some(2)
            || !stderr.contains(&want_loc)
            || !stderr.contains(fragment)
            || stderr.contains("panicked")
        {
            failures.push(format!(
                "{rel}: want exit 2, `{want_loc}` and `{fragment}`; got {:?}:\n{stderr}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn bad_overrides_exit_2_and_name_the_argument() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::write(
        &dir.path().join("p.toml"),
        "[pipeline]\nname = \"x\"\n[stages.a]\nkind = \"command\"\nshell = \"true\"\n",
    );
    let p = p.to_str().unwrap();
    for (args, fragment) in [
        (vec!["-S", "nope.x=1"], "no stage named `nope`"),
        (vec!["-S", "a.nope=1"], "has no parameter `nope`"),
        (
            vec!["-S", "a.outs=3"],
            "-S a.outs=3: `outs` = 3: invalid type",
        ),
        (vec!["-S", "a.shell"], "expected stage.param=value"),
        (
            vec!["-S", "pipeline.seed=-1"],
            "seed must be a non-negative integer",
        ),
        (
            vec!["-S", "a.shell=true,{bad}"],
            "unknown placeholder `{bad}`",
        ),
    ] {
        let mut all = vec!["status", p];
        all.extend(args.iter().copied());
        let out = common::run(dir.path(), &all);
        let text = common::text(&out);
        assert_eq!(out.status.code(), Some(2), "{all:?}: {text}");
        assert!(
            text.contains(fragment),
            "{all:?}: want `{fragment}` in:\n{text}"
        );
        assert!(!text.contains("panicked"), "{text}");
    }
}

#[test]
fn an_unknown_benchmark_shape_exits_2_and_lists_the_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let all = ["bench", "gemm", "--shape", "qkv", "--shape", "nope"];
    let out = common::run(dir.path(), &all);
    let text = common::text(&out);
    assert_eq!(out.status.code(), Some(2), "{all:?}: {text}");
    assert!(
        text.contains("nope") && text.contains("qkv, o, gate_up, down, lm_head"),
        "{text}"
    );
}
