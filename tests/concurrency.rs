//! Concurrent runs on one cache compute every key exactly once and all succeed.
mod common;

use common::{lines, ok, write};

const PIPELINE: &str = r#"
[pipeline]
name = "conc"

[stages.a]
kind = "command"
shell = "echo $$ >> counts/a; sleep 0.3; echo a > {out}/a"

[stages.b]
kind = "command"
inputs = { up = "a" }
params = { x = 0 }
shell = "echo $$ >> counts/b-{x}; sleep 0.2; echo {x} > {out}/b"

[stages.c]
kind = "command"
inputs = { up = "a" }
shell = "echo $$ >> counts/c; sleep 0.2; echo c > {out}/c"

[stages.d]
kind = "command"
inputs = { b = "b", c = "c" }
shell = "echo $$ >> counts/d-$(cat {b}/b); cat {b}/b {c}/c > {out}/d"
"#;

fn spawn_all(dir: &std::path::Path, args: &[&[&str]]) {
    let children: Vec<_> = args
        .iter()
        .map(|a| common::saeflow(dir).args(*a).output_async())
        .collect();
    for (a, c) in args.iter().zip(children) {
        let out = c.join().unwrap();
        assert!(out.status.success(), "{a:?}: {}", common::text(&out));
    }
}

trait OutputAsync {
    fn output_async(self) -> std::thread::JoinHandle<std::process::Output>;
}
impl OutputAsync for &mut std::process::Command {
    fn output_async(self) -> std::thread::JoinHandle<std::process::Output> {
        let child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::spawn(move || child.wait_with_output().unwrap())
    }
}

#[test]
fn four_runs_at_once_compute_each_stage_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("p.toml"), PIPELINE);
    std::fs::create_dir(d.join("counts")).unwrap();
    let run: &[&str] = &["run", "-j", "2", "p.toml"];
    spawn_all(d, &[run, run, run, run]);
    for stage in ["a", "b-0", "c", "d-0"] {
        assert_eq!(
            lines(&d.join("counts").join(stage)),
            1,
            "stage {stage} ran more than once"
        );
    }
    assert!(ok(d, &["cache", "verify"]).contains("4 objects verified, 0 damaged"));
}

#[test]
fn overlapping_sweeps_share_their_common_members() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("p.toml"), PIPELINE);
    std::fs::create_dir(d.join("counts")).unwrap();
    spawn_all(
        d,
        &[
            &["run", "-j", "2", "p.toml", "-S", "b.params.x=1,2"],
            &["run", "-j", "2", "p.toml", "-S", "b.params.x=2,3"],
        ],
    );
    for stage in ["a", "c", "b-1", "b-2", "b-3", "d-1", "d-2", "d-3"] {
        assert_eq!(
            lines(&d.join("counts").join(stage)),
            1,
            "stage {stage} ran more than once"
        );
    }
    assert!(ok(d, &["cache", "verify"]).contains("8 objects verified, 0 damaged"));
}

#[test]
fn a_lock_left_by_a_dead_node_is_taken_over_once_its_heartbeat_stops() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("p.toml"), PIPELINE);
    std::fs::create_dir(d.join("counts")).unwrap();
    ok(d, &["run", "p.toml", "a"]);
    let object = common::object_of(&d.join("cache"), "conc", "a");
    let key = object.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::remove_dir_all(&object).unwrap();
    // What a node that died (or lost the shared filesystem) while computing `a` leaves behind.
    let lock = d.join("cache/locks").join(format!("{key}.lock"));
    write(&lock, "host node-17 pid 4242 start 99 token deadbeef\n");
    let started = std::time::Instant::now();
    let out = common::saeflow(d)
        .env("SAEFLOW_LOCK_STALE_SECS", "1")
        .args(["run", "p.toml", "a"])
        .output()
        .unwrap();
    let text = common::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("waiting for a: pid 4242 on node-17 is computing it"),
        "{text}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "took over too early"
    );
    assert_eq!(lines(&d.join("counts/a")), 2);
    assert!(!lock.exists(), "the new holder released the lock");
}
