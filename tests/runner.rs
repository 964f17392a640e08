//! The runner end to end through the CLI, with `command` stages whose side effects count executions, and
//! grouping through the library with a test stage kind.
mod common;

use common::{lines, ok, run, text, write};

/// a -> b -> c; every stage appends a line to counts/<stage> when it actually runs.
const CHAIN: &str = r#"
[pipeline]
name = "chain"

[stages.a]
kind = "command"
shell = "echo run >> counts/a; echo a > {out}/a.txt"
outs = ["a.txt"]

[stages.b]
kind = "command"
inputs = { up = "a" }
params = { x = 0 }
shell = "echo run >> counts/b; cat {up}/a.txt > {out}/b.txt; echo x={x} >> {out}/b.txt"
outs = ["b.txt"]

[stages.c]
kind = "command"
inputs = { up = "b" }
shell = "echo run >> counts/c; tr a-z A-Z < {up}/b.txt > {out}/c.txt"
outs = ["c.txt"]
"#;

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("p.toml"), CHAIN);
    std::fs::create_dir(dir.path().join("counts")).unwrap();
    dir
}

#[test]
fn sweep_runs_upstream_once_and_a_second_run_computes_nothing() {
    let dir = setup();
    let d = dir.path();
    let out = ok(d, &["run", "p.toml", "-S", "b.params.x=1,2,3"]);
    assert!(out.contains("7 computed, 0 cached"), "{out}");
    assert_eq!(
        (
            lines(&d.join("counts/a")),
            lines(&d.join("counts/b")),
            lines(&d.join("counts/c"))
        ),
        (1, 3, 3)
    );

    let status = ok(d, &["status", "p.toml", "-S", "b.params.x=1,2,3"]);
    let rows: Vec<&str> = status.lines().collect();
    assert_eq!(rows.len(), 7, "{status}");
    assert!(rows.iter().all(|r| r.contains(" cached ")), "{status}");
    assert!(status.contains("c[b.params.x=2]"), "{status}");

    let again = ok(d, &["run", "p.toml", "-S", "b.params.x=1,2,3"]);
    assert!(again.contains("0 computed, 7 cached"), "{again}");
    assert_eq!(
        (
            lines(&d.join("counts/a")),
            lines(&d.join("counts/b")),
            lines(&d.join("counts/c"))
        ),
        (1, 3, 3)
    );

    // Outputs flowed through: c[x=2] holds b's output uppercased.
    let objects = common::published_outputs(&d.join("cache"));
    assert_eq!(objects.len(), 7);
    let c2 = std::fs::read_dir(d.join("cache/objects"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            std::fs::read_to_string(p.join("manifest.json"))
                .unwrap()
                .contains("\"c[b.params.x=2]\"")
        })
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(c2.join("c.txt")).unwrap(),
        "A\nX=2\n"
    );
}

#[test]
fn status_dry_run_and_why_say_what_changed() {
    let dir = setup();
    let d = dir.path();
    ok(d, &["run", "p.toml"]);
    let status = ok(d, &["status", "p.toml", "-S", "b.params.x=5"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("cached")),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l.starts_with("b ")
            && l.contains("stale")
            && l.contains("params.params.x: 0 -> 5")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("c ") && l.contains("stale") && l.contains("upstream b")),
        "{status}"
    );

    let dry = ok(d, &["run", "--dry-run", "p.toml", "-S", "b.params.x=5"]);
    assert!(dry.contains("a: cached, would not run"), "{dry}");
    assert!(
        dry.contains("b: would run (params.params.x: 0 -> 5)"),
        "{dry}"
    );
    assert_eq!(
        lines(&d.join("counts/b")),
        1,
        "dry run must not run anything"
    );

    let why = ok(d, &["why", "p.toml", "b", "-S", "b.params.x=5"]);
    assert!(why.contains("params.params.x: 0 -> 5"), "{why}");
    let why = ok(d, &["why", "p.toml", "a"]);
    assert!(why.contains("unchanged since its last run"), "{why}");

    // A changed dependency file is named as the reason.
    write(&d.join("script.sh"), "echo v1\n");
    let with_dep = std::fs::read_to_string(d.join("p.toml")).unwrap().replace(
        "outs = [\"a.txt\"]",
        "outs = [\"a.txt\"]\ndeps = [\"script.sh\"]",
    );
    write(&d.join("q.toml"), &with_dep);
    ok(d, &["run", "q.toml"]);
    write(&d.join("script.sh"), "echo v2\n");
    let why = ok(d, &["why", "q.toml", "a"]);
    assert!(why.contains("script.sh content changed"), "{why}");
}

#[test]
fn a_failure_stops_dependents_keeps_finished_work_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("counts")).unwrap();
    write(
        &d.join("p.toml"),
        r#"
[pipeline]
name = "fail"

[stages.ok]
kind = "command"
shell = "echo run >> counts/ok; echo fine > {out}/f"

[stages.bad]
kind = "command"
inputs = { up = "ok" }
shell = "echo about to fail; exit 3"

[stages.after]
kind = "command"
inputs = { up = "bad" }
shell = "echo run >> counts/after"

[stages.independent]
kind = "command"
shell = "echo run >> counts/independent"

[stages.missing_out]
kind = "command"
shell = "true"
outs = ["never.txt"]
"#,
    );
    let out = run(d, &["run", "p.toml"]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("FAILED bad: `sh` exited with status 3"), "{t}");
    assert!(
        t.contains("about to fail"),
        "the failure shows the log tail: {t}"
    );
    assert!(
        t.contains("did not write declared output `never.txt`"),
        "{t}"
    );
    assert!(
        t.contains("2 computed, 0 cached, 2 failed, 1 skipped"),
        "{t}"
    );
    assert_eq!(lines(&d.join("counts/after")), 0);
    assert_eq!(lines(&d.join("counts/independent")), 1);
    // Nothing half-written was published, and no temporaries are left.
    assert_eq!(
        std::fs::read_dir(d.join("cache/objects")).unwrap().count(),
        2
    );
    assert_eq!(std::fs::read_dir(d.join("cache/tmp")).unwrap().count(), 0);
    // Finished work is kept: rerunning only retries what failed.
    let again = run(d, &["run", "p.toml"]);
    assert!(
        text(&again).contains("0 computed, 2 cached"),
        "{}",
        text(&again)
    );
    assert_eq!(lines(&d.join("counts/ok")), 1);
}

#[test]
fn gc_and_verify() {
    let dir = setup();
    let d = dir.path();
    ok(d, &["run", "p.toml", "-S", "b.params.x=1,2"]);
    ok(d, &["run", "p.toml", "-S", "b.params.x=3"]);
    // Refs now point at the x=3 chain and at the swept instances; nothing is garbage yet.
    let dry = ok(d, &["gc", "--dry-run", "--grace", "0"]);
    assert!(dry.contains("would remove 0 entries"), "{dry}");
    // Drop the refs of the sweep: its objects become unreachable.
    for entry in std::fs::read_dir(d.join("cache/refs/chain")).unwrap() {
        let p = entry.unwrap().path();
        if p.to_string_lossy().contains("x=") {
            std::fs::remove_file(p).unwrap();
        }
    }
    // Within the grace period (default 1h) even garbage stays.
    let dry = ok(d, &["gc", "--dry-run"]);
    assert!(
        dry.contains("would remove 0 entries")
            && dry.contains("kept 4 unreferenced entries younger"),
        "{dry}"
    );
    let dry = ok(d, &["gc", "--dry-run", "--grace", "0s"]);
    assert!(dry.contains("would remove 8 entries"), "{dry}");
    assert_eq!(
        std::fs::read_dir(d.join("cache/objects")).unwrap().count(),
        7
    );
    let gc = ok(d, &["gc", "--grace", "0"]);
    assert!(
        gc.contains("removed 8 entries") && gc.contains("kept 3 referenced objects"),
        "{gc}"
    );
    assert_eq!(
        std::fs::read_dir(d.join("cache/objects")).unwrap().count(),
        3
    );
    assert!(ok(d, &["run", "p.toml", "-S", "b.params.x=3"]).contains("0 computed, 3 cached"));

    let verify = ok(d, &["cache", "verify"]);
    assert!(verify.contains("3 objects verified, 0 damaged"), "{verify}");
    // Flip one byte of one output.
    let obj = std::fs::read_dir(d.join("cache/objects"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(obj.join("manifest.json")).unwrap()).unwrap();
    let file = obj.join(manifest["outputs"][0]["path"].as_str().unwrap());
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let out = run(d, &["cache", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("1 damaged") && text(&out).contains("manifest says"),
        "{}",
        text(&out)
    );
}

#[test]
fn targets_run_only_what_they_need() {
    let dir = setup();
    let d = dir.path();
    let out = ok(d, &["run", "p.toml", "b"]);
    assert!(out.contains("2 computed"), "{out}");
    assert_eq!(
        (
            lines(&d.join("counts/a")),
            lines(&d.join("counts/b")),
            lines(&d.join("counts/c"))
        ),
        (1, 1, 0)
    );
    let bad = run(d, &["run", "p.toml", "nope"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).contains("no stage or instance named `nope`"));
}

#[test]
fn independent_stages_run_in_parallel_with_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Two stages that each wait for the other's marker: they can only finish if they run at the same time.
    write(
        &d.join("p.toml"),
        r#"
[pipeline]
name = "par"

[stages.x]
kind = "command"
shell = "touch started-x; for i in $(seq 100); do [ -e started-y ] && exit 0; sleep 0.05; done; exit 1"

[stages.y]
kind = "command"
shell = "touch started-y; for i in $(seq 100); do [ -e started-x ] && exit 0; sleep 0.05; done; exit 1"
"#,
    );
    let out = ok(d, &["run", "-j", "2", "p.toml"]);
    assert!(out.contains("2 computed"), "{out}");
}

#[test]
fn ctrl_c_stops_cleanly_keeps_partial_work_and_the_rerun_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // First attempt records step 1 in {partial} and then takes long; a rerun finds step 1 and finishes.
    write(
        &d.join("p.toml"),
        r#"
[pipeline]
name = "resume"

[stages.slow]
kind = "command"
shell = "if [ -e {partial}/step1 ]; then echo resumed > {out}/result; else echo 1 > {partial}/step1; touch started; sleep 30; fi"
"#,
    );
    let child = common::saeflow(d)
        .args(["run", "p.toml"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if d.join("started").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    assert!(d.join("started").exists());
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        started.elapsed().as_secs() < 10,
        "the stage's child was not stopped promptly"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("stopped slow (partial work kept)")
            && stderr.contains("run again to resume"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(d.join("cache/objects")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(d.join("cache/tmp")).unwrap().count(),
        0,
        "the temp dir is removed"
    );
    let partial: Vec<_> = std::fs::read_dir(d.join("cache/partial"))
        .unwrap()
        .collect();
    assert_eq!(partial.len(), 1);

    let out = ok(d, &["run", "p.toml"]);
    assert!(out.contains("1 computed"), "{out}");
    let objects = common::published_outputs(&d.join("cache"));
    assert_eq!(objects.len(), 1);
    // Partial work is dropped once the object is published.
    assert_eq!(
        std::fs::read_dir(d.join("cache/partial")).unwrap().count(),
        0
    );
    let obj = std::fs::read_dir(d.join("cache/objects"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    assert_eq!(
        std::fs::read_to_string(obj.join("result")).unwrap(),
        "resumed\n"
    );
}

mod groups {
    //! Grouping, through the library with a test kind whose `lr` is groupable: instances that differ only in
    //! `lr` run as one `run_group` call, yet each is its own cache object.
    use std::path::Path;

    use saeflow_core::cancel::Cancel;
    use saeflow_core::progress::Reporter;
    use saeflow_runner::cache::Cache;
    use saeflow_runner::exec::Options;
    use saeflow_runner::plan::FileHasher;
    use saeflow_runner::stage::{key_path, Reference, References, Stage, StageContext};
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};

    #[derive(Deserialize, Serialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    struct FitParams {
        input: String,
        lr: f64,
        #[serde(default)]
        tag: String,
    }

    struct Fit;
    impl Stage for Fit {
        type Params = FitParams;
        const KIND: &'static str = "fit";
        const VERSION: u32 = 1;
        const ABOUT: &'static str = "test kind";
        const GROUPABLE: &'static [&'static str] = &["lr"];
        fn references(p: &FitParams) -> References {
            References {
                inputs: vec![Reference {
                    role: "input".into(),
                    target: p.input.clone(),
                    at: key_path(&["input"]),
                }],
                ..Default::default()
            }
        }
        fn run(_: &FitParams, _: &mut StageContext) -> anyhow::Result<()> {
            unreachable!("the runner always calls run_group")
        }
        /// Appends the group's members to `groups.log` beside the cache; lr = 13 fails.
        fn run_group(params: &[FitParams], ctxs: &mut [StageContext]) -> Vec<anyhow::Result<()>> {
            let names: Vec<&str> = ctxs.iter().map(|c| c.instance.as_str()).collect();
            let cache_root = ctxs[0].downloads_dir.parent().unwrap();
            let log = cache_root.parent().unwrap().join("groups.log");
            let mut text = std::fs::read_to_string(&log).unwrap_or_default();
            text += &format!("{}\n", names.join(" "));
            std::fs::write(&log, text).unwrap();
            params
                .iter()
                .zip(ctxs.iter())
                .map(|(p, ctx)| {
                    anyhow::ensure!(p.lr != 13.0, "lr 13 is unlucky");
                    std::fs::write(ctx.out_dir.join("lr.txt"), format!("{} {}", p.lr, p.tag))?;
                    Ok(())
                })
                .collect()
        }
    }

    const PIPELINE: &str = r#"
[pipeline]
name = "groups"

[stages.up]
kind = "command"
shell = "echo data > {out}/d.txt"
outs = ["d.txt"]

[stages.fit]
kind = "fit"
input = "up"
lr = 1.0
"#;

    /// Runs the pipeline with overrides; returns (computed, failed) instance names and the group log.
    fn run(dir: &Path, overrides: &[&str], group: bool) -> (Vec<String>, Vec<String>, String) {
        let mut registry = saeflow_stages::builtin();
        registry.register::<Fit>();
        let path = dir.join("p.toml");
        std::fs::write(&path, PIPELINE).unwrap();
        let overrides: Vec<_> = overrides.iter().map(|o| o.parse().unwrap()).collect();
        let cache = Cache::open(&dir.join("cache")).unwrap();
        let mut hasher = FileHasher::open(dir.join("memo.json"));
        let plan = saeflow_runner::plan::load(&path, &overrides, &registry, &mut hasher).unwrap();
        let options = Options {
            jobs: 1,
            targets: Vec::new(),
            group,
        };
        let reporter = Reporter::new(true);
        let outcome = saeflow_runner::exec::run(
            &plan,
            &registry,
            &cache,
            &options,
            &Cancel::new(),
            &reporter,
        )
        .unwrap();
        let log = std::fs::read_to_string(dir.join("groups.log")).unwrap_or_default();
        let _ = std::fs::remove_file(dir.join("groups.log"));
        let failed = outcome.failed.into_iter().map(|(n, _)| n).collect();
        (outcome.computed, failed, log)
    }

    fn objects(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("cache/objects"))
            .unwrap()
            .count()
    }

    #[test]
    fn instances_differing_only_in_groupable_parameters_run_as_one_group() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (computed, failed, log) = run(d, &["fit.lr=1,2,3"], true);
        assert_eq!(computed.len(), 4, "{computed:?}");
        assert!(failed.is_empty());
        assert_eq!(log, "fit[lr=1] fit[lr=2] fit[lr=3]\n");
        assert_eq!(objects(d), 4, "each member is its own object");

        // Cached members are not run again; a new member runs alone.
        let (computed, _, log) = run(d, &["fit.lr=1,2,3,4"], true);
        assert_eq!(computed, vec!["fit[lr=4]".to_string()]);
        assert_eq!(log, "fit[lr=4]\n");

        // A non-groupable parameter splits groups; --no-group runs every member alone.
        let (_, _, log) = run(d, &["fit.lr=5,6", "fit.tag=a,b"], true);
        let mut groups: Vec<&str> = log.lines().collect();
        groups.sort();
        assert_eq!(
            groups,
            [
                "fit[lr=5,tag=a] fit[lr=6,tag=a]",
                "fit[lr=5,tag=b] fit[lr=6,tag=b]"
            ]
        );
        let (computed, _, log) = run(d, &["fit.lr=7,8"], false);
        assert_eq!(computed.len(), 2);
        assert_eq!(log, "fit[lr=7]\nfit[lr=8]\n");
    }

    #[test]
    fn a_failing_member_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (computed, failed, log) = run(d, &["fit.lr=12,13,14"], true);
        assert_eq!(log.lines().count(), 1, "{log}");
        assert_eq!(failed, vec!["fit[lr=13]".to_string()]);
        assert_eq!(computed.len(), 3, "up and two members: {computed:?}");
        assert_eq!(objects(d), 3);
    }
}
