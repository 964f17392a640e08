//! `gc` against live and killed runs: it must not delete what a running pipeline is about to read (even when
//! another run of the same pipeline has moved the refs away from it), nor the partial work a killed run's
//! next run resumes from; and it touches nothing outside the cache.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{ok, write};

/// `a` writes its parameter; `b` reads it after waiting for a `go` file, so a test can act between the two.
const TWO_STAGES: &str = r#"
[pipeline]
name = "live"

[stages.a]
kind = "command"
params = { v = "one" }
shell = "printf %s {v} > {out}/v.txt"
outs = ["v.txt"]

[stages.b]
kind = "command"
inputs = { up = "a" }
params = { n = 0 }
shell = "touch b-started; while [ ! -e go ]; do sleep 0.05; done; cat {up}/v.txt > {out}/v.txt"
outs = ["v.txt"]
"#;

fn wait_for(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn(d: &Path, args: &[&str]) -> Child {
    common::saeflow(d)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn gc_between_two_stages_of_a_live_pipeline_keeps_what_the_next_stage_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("p.toml"), TWO_STAGES);
    write(&d.join("sentinel/keep.txt"), "keep");
    // Earlier runs leave objects for a=two and a=three, and `go`, so their `b`s finish at once.
    write(&d.join("go"), "");
    ok(d, &["run", "p.toml", "-S", "a.params.v=two"]);
    ok(d, &["run", "p.toml", "-S", "a.params.v=three"]);
    std::fs::remove_file(d.join("go")).unwrap();
    std::fs::remove_file(d.join("b-started")).unwrap();

    // A live run reads a=two (cached) and waits in b (new n)...
    let live = spawn(
        d,
        &[
            "run",
            "p.toml",
            "-S",
            "a.params.v=two",
            "-S",
            "b.params.n=1",
        ],
    );
    wait_for(&d.join("b-started"));
    // ...while another run of the same pipeline moves the ref of `a` to a=three: a=two is unreferenced.
    write(&d.join("go"), "");
    ok(d, &["run", "p.toml", "-S", "a.params.v=three"]);
    std::fs::remove_file(d.join("go")).unwrap();
    let before = common::snapshot(d, &d.join("cache"));

    let gc = ok(d, &["gc", "--grace", "0", "--partial"]);
    assert!(
        gc.contains("kept 2 unreferenced keys a running pipeline reads or computes"),
        "{gc}"
    );
    assert_eq!(
        common::snapshot(d, &d.join("cache")),
        before,
        "gc changed files outside the cache"
    );
    write(&d.join("go"), "");
    let out = live.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let text = common::text(&out);
    assert!(text.contains("1 computed, 1 cached"), "{text}");
    let b = common::object_of(&d.join("cache"), "live", "b");
    assert_eq!(std::fs::read_to_string(b.join("v.txt")).unwrap(), "two");

    // Once the run is over, its leftovers are ordinary garbage: the first runs' b objects and logs go; the
    // live run's objects are referenced now.
    let gc = ok(d, &["gc", "--grace", "0"]);
    assert!(gc.contains("removed 4 entries"), "{gc}");
    assert!(gc.contains("kept 2 referenced objects"), "{gc}");
    assert_eq!(
        std::fs::read_dir(d.join("cache/leases")).unwrap().count(),
        0,
        "finished runs leave no lease"
    );
}

#[test]
fn a_killed_runs_partial_work_survives_gc_and_its_next_run_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
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
    write(&d.join("sentinel/keep.txt"), "keep");
    let mut child = common::saeflow(d)
        .args(["run", "p.toml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    wait_for(&d.join("started"));
    // SIGKILL to the whole group: no chance to clean up; lock, lease and temp dir are left behind.
    // SAFETY: kill(2) on the process group of our own child.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    child.wait().unwrap();
    assert_eq!(
        std::fs::read_dir(d.join("cache/leases")).unwrap().count(),
        1
    );
    let before = common::snapshot(d, &d.join("cache"));

    let gc = ok(d, &["gc", "--grace", "0"]);
    assert!(
        gc.contains("kept the partial work of 1 unfinished runs"),
        "{gc}"
    );
    assert_eq!(common::snapshot(d, &d.join("cache")), before);
    let partial: Vec<_> = std::fs::read_dir(d.join("cache/partial"))
        .unwrap()
        .collect();
    assert_eq!(partial.len(), 1);
    assert!(partial[0].as_ref().unwrap().path().join("step1").is_file());
    for garbage in ["tmp", "leases"] {
        assert_eq!(
            std::fs::read_dir(d.join("cache").join(garbage))
                .unwrap()
                .count(),
            0,
            "the dead run's {garbage} are garbage"
        );
    }

    let out = ok(d, &["run", "p.toml"]);
    assert!(out.contains("1 computed"), "{out}");
    let result = common::object_of(&d.join("cache"), "resume", "slow").join("result");
    assert_eq!(std::fs::read_to_string(result).unwrap(), "resumed\n");
}

#[test]
fn gc_partial_removes_a_dead_runs_partial_work_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("p.toml"),
        "[pipeline]\nname = \"p\"\n[stages.s]\nkind = \"command\"\nshell = \"echo 1 > {partial}/step1; exit 3\"\n",
    );
    let out = common::run(d, &["run", "p.toml"]);
    assert!(!out.status.success());
    // A failed run's partial work is kept by default, within the grace period too with --partial...
    assert!(ok(d, &["gc", "--partial"]).contains("kept 1 unreferenced entries younger"));
    assert_eq!(
        std::fs::read_dir(d.join("cache/partial")).unwrap().count(),
        1
    );
    // ...and goes with --partial once older.
    let gc = ok(d, &["gc", "--partial", "--grace", "0"]);
    assert!(gc.contains("removed 2 entries"), "{gc}");
    assert_eq!(
        std::fs::read_dir(d.join("cache/partial")).unwrap().count(),
        0
    );
}
