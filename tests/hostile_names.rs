//! Names that reach the file system, written as the attack: pipeline names from the file and from `-S`,
//! stage names, swept values that become instance (ref file) names, Slurm options that go into job
//! scripts. Each refusal exits 2 naming the field, and nothing outside the cache changes.
mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{ok, run, saeflow, text, write};

/// One `command` stage with a free parameter.
const ONE: &str = r#"
[pipeline]
name = "p"

[stages.a]
kind = "command"
cmd = ["true"]
params = { x = 0 }
"#;

/// A tree `root/work` (the working directory, cache inside) with sentinel files around it.
fn setup(pipeline: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("sentinel/keep.txt"), "keep");
    write(&dir.path().join("work/p.toml"), pipeline);
    dir
}

/// Runs saeflow in `root/work` and asserts exit 2 with `field` named, nothing changed outside the cache.
fn refused(root: &Path, args: &[&str], field: &str) -> String {
    let before = common::snapshot(root, &root.join("work/cache"));
    let out = run(&root.join("work"), args);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {msg}");
    assert!(
        msg.contains(field),
        "{args:?}: message names {field}: {msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    assert_eq!(
        common::snapshot(root, &root.join("work/cache")),
        before,
        "{args:?} wrote outside the cache"
    );
    msg
}

#[test]
fn pipeline_name_overrides_are_checked_like_the_file() {
    let dir = setup(ONE);
    let d = dir.path();
    let long = "n".repeat(300);
    for bad in [
        "../../x",
        "..",
        ".",
        "a/b",
        "a\\b",
        "a\nb",
        "",
        long.as_str(),
    ] {
        let arg = format!("pipeline.name={bad}");
        for verb in [
            &["run", "p.toml"][..],
            &["run", "--dry-run", "p.toml"],
            &["status", "p.toml"],
        ] {
            let mut args = verb.to_vec();
            args.extend(["-S", &arg]);
            // An empty value is refused by the -S parser itself; every other one by the name check.
            let field = if bad.is_empty() {
                "-S"
            } else {
                "pipeline name"
            };
            let msg = refused(d, &args, field);
            if !bad.is_empty() {
                // Named, with a newline escaped so the message stays on its line.
                let shown = arg.replace('\n', "\\n");
                assert!(
                    msg.contains(&format!("-S {shown}")),
                    "names the argument: {msg}"
                );
            }
        }
    }
    assert!(!d.join("x").exists() && !d.join("work/x").exists());
}

#[test]
fn pipeline_and_stage_names_in_the_file_are_checked() {
    let cases = [
        (
            ONE.replace("name = \"p\"", "name = \"a\\u0000b\""),
            "pipeline name",
        ),
        (
            ONE.replace("name = \"p\"", "name = \"a\\nb\""),
            "pipeline name",
        ),
        (
            ONE.replace("name = \"p\"", "name = \"..\""),
            "pipeline name",
        ),
        (
            ONE.replace("name = \"p\"", &format!("name = \"{}\"", "n".repeat(300))),
            "pipeline name",
        ),
        (
            ONE.replace("[stages.a]", &format!("[stages.{}]", "s".repeat(300))),
            "stage name",
        ),
        (
            ONE.replace("[stages.a]", "[stages.\"a\\u0000b\"]"),
            "stage name",
        ),
        (
            ONE.replace("[stages.a]", "[stages.\"a\\nb\"]"),
            "stage name",
        ),
    ];
    for (pipeline, field) in cases {
        let dir = setup(&pipeline);
        let msg = refused(dir.path(), &["run", "p.toml"], field);
        // Located like every other config error.
        assert!(msg.contains("p.toml:"), "{msg}");
    }
}

#[test]
fn sweep_values_one_and_quoted_one_get_distinct_refs() {
    let dir = setup(&format!(
        "{ONE}\n[sweep]\n\"a.params.x\" = [1, \"1\", \"relu\"]\n"
    ));
    let work = dir.path().join("work");
    let out = ok(&work, &["run", "p.toml"]);
    assert!(out.contains("3 computed"), "{out}");
    let refs: BTreeSet<String> = std::fs::read_dir(work.join("cache/refs/p"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // Plain strings keep their bare names (existing refs stay valid); one that reads as a number is quoted.
    assert_eq!(
        refs,
        [
            "a[params.x=\"1\"].json",
            "a[params.x=1].json",
            "a[params.x=relu].json",
        ]
        .map(String::from)
        .into()
    );
    assert!(ok(&work, &["run", "p.toml"]).contains("0 computed, 3 cached"));
}

#[test]
fn hostile_swept_strings_make_safe_bounded_ref_names() {
    let long = "v".repeat(400);
    let dir = setup(&format!(
        "{ONE}\n[sweep]\n\"a.params.x\" = [\"a\\nb\", \"a\\tb\", \"{long}\", \"{long}w\", \"../../x\"]\n"
    ));
    let d = dir.path();
    let work = d.join("work");
    let before = common::snapshot(d, &d.join("work/cache"));
    let out = ok(&work, &["run", "p.toml"]);
    assert!(out.contains("5 computed"), "{out}");
    assert_eq!(common::snapshot(d, &d.join("work/cache")), before);
    let refs: Vec<String> = std::fs::read_dir(work.join("cache/refs/p"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(refs.len(), 5, "{refs:?}");
    for r in &refs {
        assert!(r.len() < 255 && !r.chars().any(char::is_control), "{r:?}");
    }
    assert!(
        refs.contains(&"a[params.x=\"a\\nb\"].json".to_string()),
        "{refs:?}"
    );
    // A second run finds every instance under the same (hashed) names.
    assert!(ok(&work, &["run", "p.toml"]).contains("0 computed, 5 cached"));
}

#[test]
fn why_on_non_ascii_values_and_a_damaged_ref_key_does_not_panic() {
    let dir = setup(ONE);
    let work = dir.path().join("work");
    ok(&work, &["run", "p.toml", "-S", "a.params.x=héllo—ü"]);
    let why = ok(&work, &["why", "p.toml", "a", "-S", "a.params.x=wörld—ü"]);
    assert!(why.contains("a: key"), "{why}");
    // A ref whose key is not hex (hand-edited, damaged): cut on characters, not bytes.
    let ref_path = work.join("cache/refs/p/a.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ref_path).unwrap()).unwrap();
    record["key"] = serde_json::Value::String("ééééééééééééééé".into());
    std::fs::write(&ref_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let why = ok(&work, &["why", "p.toml", "a", "-S", "a.params.x=héllo—ü"]);
    assert!(why.contains("ééééééééééé"), "{why}");
    let status = saeflow(&work).args(["status", "p.toml"]).output().unwrap();
    assert!(!text(&status).contains("panicked"), "{}", text(&status));
}

#[test]
fn slurm_partition_and_account_with_a_newline_are_refused() {
    let dir = setup(ONE);
    let d = dir.path();
    for (option, field) in [("--partition", "--partition"), ("--account", "--account")] {
        refused(
            d,
            &[
                "run",
                "--executor",
                "slurm",
                option,
                "gpu\n#SBATCH --wrap=x",
                "p.toml",
            ],
            field,
        );
    }
    // Nothing was submitted: no job script was written.
    assert!(!d.join("work/cache/slurm").exists());
}

#[test]
fn a_fifo_under_a_deps_directory_is_refused_instead_of_hanging() {
    let dir = setup(
        "[pipeline]\nname = \"p\"\n[stages.a]\nkind = \"command\"\ncmd = [\"true\"]\ndeps = [\"d\"]\n",
    );
    let d = dir.path();
    write(&d.join("work/d/ok.txt"), "fine");
    let fifo = d.join("work/d/pipe");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    for args in [
        &["status", "p.toml"][..],
        &["run", "p.toml"][..],
        &["why", "p.toml", "a"][..],
    ] {
        let mut child = saeflow(&d.join("work"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > std::time::Duration::from_secs(30) {
                let _ = child.kill();
                panic!("{args:?} hangs on a FIFO under deps");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let msg = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {msg}");
        assert!(
            msg.contains(&format!("{} is not a regular file", fifo.display())),
            "{args:?}: {msg}"
        );
    }
}
