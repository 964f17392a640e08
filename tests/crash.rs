//! Crash safety: SIGKILL a run at random moments, inside stages; the cache never holds a damaged object,
//! and a rerun finishes with outputs identical to an uninterrupted run's.
mod common;

use std::time::{Duration, Instant};

use common::{ok, published_outputs, write};

const PIPELINE: &str = r#"
[pipeline]
name = "crash"

[stages.a]
kind = "command"
shell = "for i in 1 2 3 4; do seq 1 20000 >> {out}/numbers.txt; sleep 0.04; done; echo done > {out}/a.txt"

[stages.b]
kind = "command"
inputs = { up = "a" }
shell = "mkdir {out}/sub; for i in 1 2 3; do sort -r {up}/numbers.txt > {out}/sub/part-$i.txt; sleep 0.04; done"

[stages.c]
kind = "command"
inputs = { up = "a" }
cmd = ["sh", "-c", "sleep 0.1; wc -l < {up}/numbers.txt > {out}/count.txt; sleep 0.1; cp {up}/a.txt {out}/a-copy.txt"]

[stages.d]
kind = "command"
inputs = { b = "b", c = "c" }
shell = "cat {c}/count.txt {b}/sub/part-2.txt > {out}/final.txt; sleep 0.1; md5sum < {out}/final.txt > {out}/final.md5"
"#;

#[test]
fn sigkill_at_random_moments_never_corrupts_and_resume_matches_an_uninterrupted_run() {
    let reference = tempfile::tempdir().unwrap();
    write(&reference.path().join("p.toml"), PIPELINE);
    let started = Instant::now();
    ok(reference.path(), &["run", "-j", "2", "p.toml"]);
    let full_time = started.elapsed();
    let expected = published_outputs(&reference.path().join("cache"));
    assert_eq!(expected.len(), 2 + 3 + 2 + 2, "{expected:?}");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("p.toml"), PIPELINE);
    let seed = 0x5eed_u64 ^ std::process::id() as u64;
    println!("kill-moment seed {seed}, uninterrupted run took {full_time:?}");
    let mut rng = common::Rng(seed | 1);
    let (mut kills, mut completed_runs) = (0, 0);
    while kills < 20 {
        let delay = full_time.mul_f64(1.2 * rng.next_f64());
        let mut child = common::saeflow(d)
            .args(["run", "-q", "-j", "2", "p.toml"])
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_some() {
            // Finished before the kill: start over from an empty cache so later kills land in stages again.
            completed_runs += 1;
            assert!(completed_runs < 40, "runs keep finishing before the kill");
            std::fs::remove_dir_all(d.join("cache")).unwrap();
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let verify = common::run(d, &["cache", "verify"]);
        assert!(
            verify.status.success(),
            "after kill {kills} at {delay:?}: {}",
            common::text(&verify)
        );
        // Every object that exists is complete (manifest present) — none half-published.
        for entry in std::fs::read_dir(d.join("cache/objects")).unwrap() {
            assert!(entry.unwrap().path().join("manifest.json").is_file());
        }
    }
    let out = ok(d, &["run", "-j", "2", "p.toml"]);
    assert!(out.contains("0 failed"), "{out}");
    assert_eq!(published_outputs(&d.join("cache")), expected);
    // Leftover temporaries of killed runs are garbage; gc clears them and keeps every referenced object.
    std::thread::sleep(Duration::from_millis(100));
    ok(d, &["gc"]);
    assert_eq!(std::fs::read_dir(d.join("cache/tmp")).unwrap().count(), 0);
    assert_eq!(published_outputs(&d.join("cache")), expected);
    println!("{kills} kills, {completed_runs} runs that finished first");
}
