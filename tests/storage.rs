//! Storage faults: a cache on a filesystem that fills up mid-stage, and published objects damaged on disk
//! (a flipped byte, a damaged manifest, a truncated file): nothing wrong is published or used, and reruns
//! recompute exactly what was lost.
mod common;

use std::path::Path;
use std::process::Command;

use common::{lines, ok, published_outputs, run, text, write};

const CHAIN: &str = r#"
[pipeline]
name = "store"

[stages.a]
kind = "command"
shell = "echo run >> counts/a; seq 1 5000 > {out}/numbers.txt"

[stages.b]
kind = "command"
inputs = { up = "a" }
params = { x = 0 }
shell = "echo run >> counts/b; tail -n {x} {up}/numbers.txt > {out}/tail.txt"
"#;

fn object_of(d: &Path, stage: &str) -> std::path::PathBuf {
    common::object_of(&d.join("cache"), "store", stage)
}

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_reader_finds_damaged_inputs_and_reruns_their_producer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("p.toml"), CHAIN);
    std::fs::create_dir(d.join("counts")).unwrap();
    ok(d, &["run", "p.toml"]);
    let expected = published_outputs(&d.join("cache"));

    // Damage a's data (same size: only the hash can tell), then make b run again with another parameter.
    for (n, damage) in [("data", "numbers.txt"), ("manifest", "manifest.json")] {
        flip_byte(&object_of(d, "a").join(damage));
        let verify = run(d, &["cache", "verify"]);
        assert_eq!(verify.status.code(), Some(1), "{n}: {}", text(&verify));
        assert!(
            text(&verify).contains("1 damaged"),
            "{n}: {}",
            text(&verify)
        );
        let x = if n == "data" { "7" } else { "9" };
        let out = ok(d, &["run", "p.toml", "-S", &format!("b.params.x={x}")]);
        // A damaged manifest is caught as soon as the run looks at a's cached result, before any reader.
        let noticed = if n == "data" {
            "the output of a is damaged"
        } else {
            "a: cached result damaged (corrupt manifest"
        };
        assert!(out.contains(noticed), "{n}: {out}");
        assert!(ok(d, &["cache", "verify"]).contains("0 damaged"));
        assert_eq!(
            std::fs::read_to_string(object_of(d, "b").join("tail.txt")).unwrap(),
            (5001 - x.parse::<usize>().unwrap()..=5000)
                .map(|i| format!("{i}\n"))
                .collect::<String>(),
            "{n}: b read good data"
        );
    }
    assert_eq!(
        lines(&d.join("counts/a")),
        3,
        "a recomputed once per damage"
    );
    assert_eq!(lines(&d.join("counts/b")), 3);
    assert_eq!(
        std::fs::read_dir(d.join("cache/quarantine"))
            .unwrap()
            .count(),
        2
    );

    // A truncated file in a cached result is caught by the size check when the run reaches it.
    let b = object_of(d, "b");
    std::fs::write(b.join("tail.txt"), "").unwrap();
    let out = ok(d, &["run", "p.toml", "-S", "b.params.x=9"]);
    assert!(out.contains("b: cached result damaged"), "{out}");
    assert_eq!(lines(&d.join("counts/b")), 4);
    assert!(ok(d, &["cache", "verify"]).contains("0 damaged"));

    // `cache verify --repair` moves damaged objects aside; the next run recomputes them to the same bytes.
    ok(d, &["run", "p.toml"]);
    flip_byte(&object_of(d, "a").join("numbers.txt"));
    let repair = ok(d, &["cache", "verify", "--repair"]);
    assert!(repair.contains("moved to"), "{repair}");
    ok(d, &["run", "p.toml"]);
    assert_eq!(
        published_outputs(&d.join("cache"))["a/numbers.txt"],
        expected["a/numbers.txt"]
    );
    assert!(ok(d, &["cache", "verify"]).contains("0 damaged"));
    // gc clears the quarantine.
    ok(d, &["gc"]);
    assert_eq!(
        std::fs::read_dir(d.join("cache/quarantine"))
            .unwrap()
            .count(),
        0
    );
}

/// Mounts a tmpfs of `size` at `at` (root only); `Err` says why it cannot.
fn mount_tmpfs(at: &Path, size: &str, remount: bool) -> Result<(), String> {
    let mut opts = format!("size={size}");
    if remount {
        opts = format!("remount,{opts}");
    }
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &opts, "tmpfs"])
        .arg(at)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

struct Unmount<'a>(&'a Path);
impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
#[cfg_attr(missing = "tmpfs", ignore = "needs the right to mount a tmpfs (root)")]
fn a_full_disk_mid_capture_fails_clearly_publishes_nothing_and_resumes_after_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    // The quickstart's dataset (~250 KB) fits; its capture (~29 MB) does not.
    if let Err(why) = mount_tmpfs(&cache, "8m", false) {
        panic!("cannot mount a tmpfs for the cache: {why}");
    }
    let _unmount = Unmount(&cache);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let saeflow = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_saeflow"));
        c.current_dir(root)
            .args(["run", "--cache"])
            .arg(&cache)
            .args(["pipelines/quickstart.toml", "acts"]);
        c
    };
    let out = saeflow().output().unwrap();
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("FAILED acts: no space left on the cache's filesystem"),
        "{msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    let instances: Vec<String> = std::fs::read_dir(cache.join("objects"))
        .unwrap()
        .map(|e| {
            let m: serde_json::Value = serde_json::from_slice(
                &std::fs::read(e.unwrap().path().join("manifest.json")).unwrap(),
            )
            .unwrap();
            m["instance"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        instances,
        ["data"],
        "only the finished dataset is published"
    );
    assert_eq!(std::fs::read_dir(cache.join("tmp")).unwrap().count(), 0);

    mount_tmpfs(&cache, "64m", true).expect("grow the tmpfs");
    let out = saeflow().output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("1 computed, 1 cached"),
        "{}",
        text(&out)
    );
    let verify = Command::new(env!("CARGO_BIN_EXE_saeflow"))
        .args(["cache", "verify", "--cache"])
        .arg(&cache)
        .output()
        .unwrap();
    assert!(
        text(&verify).contains("2 objects verified, 0 damaged"),
        "{}",
        text(&verify)
    );
}
